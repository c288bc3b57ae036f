"""A simulated data plane: records network specs and tap devices in memory.

For scale benchmarks and for testing the agent; never the default. No devices, no files.
"""

from __future__ import annotations

from cloudland.agent.drivers.network.base import NetworkDriver
from cloudland.bus.messages import NetworkSpec, PortSpec


class SimulatedNetworkDriver(NetworkDriver):
    name = "simulated"

    def __init__(self) -> None:
        self.networks: dict[str, NetworkSpec] = {}
        # Networks that have a bridge only because a port was plugged before EnsureNetwork.
        self.bridges: set[str] = set()
        self.ports: dict[str, PortSpec] = {}
        self.closed = False

    async def init_host(self) -> None:
        self.closed = False

    async def ensure_network(self, spec: NetworkSpec) -> None:
        self.networks[spec.id] = spec
        self.bridges.add(spec.id)

    async def remove_network(self, network_id: str) -> None:
        self.networks.pop(network_id, None)
        self.bridges.discard(network_id)

    async def list_networks(self) -> list[str]:
        return sorted(self.networks)

    async def plug_port(self, port: PortSpec) -> str:
        self.bridges.add(port.network_id)
        self.ports[port.port_id] = port
        return port.tap_name

    async def unplug_port(self, port_id: str) -> None:
        self.ports.pop(port_id, None)

    @property
    def taps(self) -> set[str]:
        return {p.tap_name for p in self.ports.values()}

    async def close(self) -> None:
        self.closed = True
