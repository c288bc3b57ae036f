"""A simulated hypervisor: instances are entries in a dict, operations are instant.

For scale benchmarks and for testing what sits above the driver (the agent). It never
runs a guest and is never the default. Kept cheap on purpose: no tasks, no files.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from cloudland.agent.drivers.compute.base import ComputeDriver, PowerState
from cloudland.bus.messages import InstanceSpec, Resources

_BOOT_LOG = (
    "SeaBIOS (version simulated)",
    "Booting from Hard Disk...",
    "[    0.000000] Linux version 6.1.0-simulated",
    "cloud-init: instance {id} ({name})",
    "cloudland-guest: booted",
)


@dataclass
class SimulatedInstance:
    spec: InstanceSpec
    base_image: Path | None
    state: PowerState = "stopped"
    boots: int = 0
    reboots: int = 0
    log: list[str] = field(default_factory=list)


class SimulatedComputeDriver(ComputeDriver):
    name = "simulated"

    def __init__(
        self,
        vcpus: int = 64,
        memory_mb: int = 262144,
        disk_gb: int = 4096,
        delay: float = 0.0,
    ) -> None:
        self._resources = Resources(vcpus=vcpus, memory_mb=memory_mb, disk_gb=disk_gb)
        self.delay = delay
        self.instances: dict[str, SimulatedInstance] = {}
        self.closed = False

    async def _pause(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)

    async def init_host(self) -> None:
        self.closed = False

    def resources(self) -> Resources:
        return self._resources

    async def list_instances(self) -> dict[str, PowerState]:
        return {iid: inst.state for iid, inst in self.instances.items()}

    async def power_state(self, instance_id: str) -> PowerState:
        inst = self.instances.get(instance_id)
        return inst.state if inst else "absent"

    async def prepare(self, spec: InstanceSpec, base_image: Path | None) -> None:
        await self._pause()
        inst = self.instances.get(spec.id)
        if inst is None:
            self.instances[spec.id] = SimulatedInstance(spec=spec, base_image=base_image)
        else:
            inst.spec = spec

    async def power_on(self, spec: InstanceSpec) -> None:
        inst = self._get(spec.id)
        if inst.state == "running":
            return
        await self._pause()
        inst.spec = spec
        inst.state = "running"
        inst.boots += 1
        self._boot(inst)

    async def power_off(self, instance_id: str, timeout: float) -> None:
        inst = self._get(instance_id)
        if inst.state == "stopped":
            return
        await self._pause()
        inst.state = "stopped"
        inst.log.append("reboot: Power down")

    async def reboot(self, instance_id: str, hard: bool) -> None:
        inst = self._get(instance_id)
        await self._pause()
        inst.reboots += 1
        inst.state = "running"
        inst.log.append("reboot: Restarting system" if not hard else "(hard reset)")
        self._boot(inst)

    async def destroy(self, instance_id: str) -> None:
        await self._pause()
        self.instances.pop(instance_id, None)

    async def console_output(self, instance_id: str, length: int | None) -> str | None:
        inst = self.instances.get(instance_id)
        if inst is None:
            return None
        lines = inst.log if length is None else inst.log[-length:] if length > 0 else []
        return "".join(line + "\n" for line in lines)

    async def close(self) -> None:
        self.closed = True

    # --- for tests and benchmarks: what a real guest or host would do on its own --------

    def guest_power_off(self, instance_id: str) -> None:
        """The guest shut itself down (or its QEMU died)."""
        inst = self._get(instance_id)
        inst.state = "stopped"
        inst.log.append("reboot: Power down")

    def _get(self, instance_id: str) -> SimulatedInstance:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise LookupError(f"instance {instance_id} is not prepared on this host")
        return inst

    @staticmethod
    def _boot(inst: SimulatedInstance) -> None:
        inst.log.extend(line.format(id=inst.spec.id, name=inst.spec.name) for line in _BOOT_LOG)
