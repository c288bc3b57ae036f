"""NATS subjects. A subject names its audience (see docs/architecture.md)."""

from __future__ import annotations


def host_cmd(host_id: str) -> str:
    """Commands for one hypervisor (publish; every command is idempotent)."""
    return f"host.{host_id}.cmd"


def host_rpc(host_id: str) -> str:
    """Request/reply to one hypervisor (console output, full state)."""
    return f"host.{host_id}.rpc"


def network_peers(network_id: str) -> str:
    """Peer lists for the hypervisors that carry a network (they subscribe while they do)."""
    return f"net.{network_id}.peers"


def report(zone: str) -> str:
    """Heartbeats and state changes from the agents of a zone."""
    return f"report.{zone}"


REPORT_ALL = "report.*"
# The API pokes the controllers after it changes desired state; they also poll.
CONTROLLER_WAKE = "controller.wake"
# Controller figures (JSON) on request; "reset" in the request clears the samples.
CONTROLLER_STATS = "controller.stats"
