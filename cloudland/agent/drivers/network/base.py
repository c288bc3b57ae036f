"""The network driver contract: the data plane of one hypervisor.

``linux`` builds it with pyroute2 (bridges, VXLAN, taps, namespaces) and dnsmasq; the
simulated driver records specs only. Every method is idempotent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from cloudland.bus.messages import NetworkSpec, PortSpec


class NetworkDriver(ABC):
    name: str = "base"

    @abstractmethod
    async def init_host(self) -> None:
        """Find what exists from a previous run (bridges, DHCP namespaces)."""

    @abstractmethod
    async def ensure_network(self, spec: NetworkSpec) -> None:
        """Bridge (+ VXLAN to ``spec.peers``) and DHCP serving exactly ``spec.ports``."""

    @abstractmethod
    async def remove_network(self, network_id: str) -> None:
        """Remove every device, namespace and process of the network. No-op if absent."""

    @abstractmethod
    async def list_networks(self) -> list[str]: ...

    @abstractmethod
    async def plug_port(self, port: PortSpec) -> str:
        """Create the port's tap device on the network's bridge (creating the bridge if
        needed); return the tap's name."""

    @abstractmethod
    async def unplug_port(self, port_id: str) -> None: ...

    async def close(self) -> None:
        """Release resources; the data plane stays up."""
