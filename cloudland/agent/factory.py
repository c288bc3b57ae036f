"""Build the agent's drivers from the configuration."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

from cloudland.agent.drivers.compute.base import ComputeDriver
from cloudland.agent.drivers.network.base import NetworkDriver
from cloudland.config import Config
from cloudland.secrets import METADATA_PROXY_KEY, metadata_key


def build_drivers(config: Config, host_id: str) -> tuple[ComputeDriver, NetworkDriver]:
    state_dir = config.agent_state_dir(host_id)
    if config.agent.compute_driver == "simulated":
        from cloudland.agent.drivers.compute.simulated import SimulatedComputeDriver
        from cloudland.agent.drivers.network.simulated import SimulatedNetworkDriver

        a = config.agent
        compute: ComputeDriver = SimulatedComputeDriver(
            vcpus=a.vcpus or 64, memory_mb=a.memory_mb or 262144, disk_gb=a.disk_gb or 4096
        )
        return compute, SimulatedNetworkDriver()
    if config.agent.compute_driver == "qemu":
        # Imported here: the real drivers pull in pyroute2/qemu.qmp and need a real host.
        from cloudland.agent.drivers.compute.qemu import QemuDriver
        from cloudland.agent.drivers.network.linux import LinuxNetworkDriver

        return (
            QemuDriver(state_dir, accel=config.agent.accel),
            LinuxNetworkDriver(
                state_dir / "network", host_tag=host_tag(host_id), underlay_address=underlay_address(config),
                metadata_upstream=config.api.agent_url(), metadata_key_file=metadata_key_file(config),
                enforce_security_groups=config.agent.enforce_security_groups,
                physical_networks=config.agent.physical_networks,
            ),
        )
    raise ValueError(f"unknown compute driver {config.agent.compute_driver!r}")


def metadata_key_file(config: Config) -> Path:
    """The metadata proxies' signing key; shared with the API (copy it to other machines)."""
    metadata_key(config.keys_dir)  # created on first use, like the API does
    return config.keys_dir / METADATA_PROXY_KEY


def host_tag(host_id: str) -> str:
    """A short tag, stable per host, that fits in Linux interface names."""
    return hashlib.sha256(host_id.encode()).hexdigest()[:8]


def underlay_address(config: Config) -> str:
    """``agent.underlay_address``, else the source address of the default route."""
    if config.agent.underlay_address:
        return config.agent.underlay_address
    # Connecting a UDP socket sends nothing; it only asks the kernel which source address
    # it would use to reach a public (documentation-range) address.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            address = s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    return address if address and address != "0.0.0.0" else "127.0.0.1"
