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


def group_members(group_id: str) -> str:
    """Member addresses of a security group, for the hypervisors whose rules name it as remote
    group (they subscribe while they do)."""
    return f"sg.{group_id}.members"


def report(zone: str) -> str:
    """State changes (instance statuses, full host states) from the agents of a zone."""
    return f"report.{zone}"


def heartbeat(zone: str) -> str:
    """Heartbeats of the agents of a zone. Taken by a heartbeat relay (queue group
    ``HEARTBEAT_RELAY_QUEUE``, the member on the publisher's own server when there is one), which
    forwards them in batches on ``HEARTBEAT_BATCH``; never read one by one by the controllers."""
    return f"heartbeat.{zone}"


REPORT_ALL = "report.*"
HEARTBEAT_ALL = "heartbeat.*"
HEARTBEAT_RELAY_QUEUE = "heartbeat-relay"
# Relays → every controller: the heartbeats a relay gathered over one flush period.
HEARTBEAT_BATCH = "heartbeats.batch"
# The API pokes the controllers after it changes desired state; they also poll.
CONTROLLER_WAKE = "controller.wake"
# Agents → a controller (request/reply, queue group): a published set, whole (``GetSet``).
CONTROLLER_SETS = "controller.sets"
CONTROLLER_SETS_QUEUE = "controller-sets"
# Controller figures (JSON) on request; "reset" in the request clears the samples.
CONTROLLER_STATS = "controller.stats"
