"""The compute driver contract. The agent owns convergence; a driver only does primitives.

Drivers: ``qemu`` (real guests, one daemonised QEMU per VM over QMP) and ``simulated``
(no guests, for scale benchmarks only; never the default).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

from cloudland.bus.messages import InstanceSpec, Resources

PowerState = Literal["running", "stopped", "paused", "absent"]


class ComputeDriver(ABC):
    name: str = "base"

    @abstractmethod
    async def init_host(self) -> None:
        """Re-attach to guests that survived an agent restart. Never kills a guest."""

    @abstractmethod
    def resources(self) -> Resources:
        """Total resources this host offers (before overcommit)."""

    @abstractmethod
    async def list_instances(self) -> dict[str, PowerState]:
        """Every instance this host has (running or not), by id."""

    @abstractmethod
    async def power_state(self, instance_id: str) -> PowerState: ...

    @abstractmethod
    async def prepare(self, spec: InstanceSpec, base_image: Path | None) -> None:
        """Create the instance's disk (overlay on ``base_image``) and files. Idempotent;
        an existing disk is kept. Stores the spec for later power-on."""

    @abstractmethod
    async def power_on(self, spec: InstanceSpec) -> None:
        """Boot the prepared instance; no-op if running. ``tap`` devices already exist."""

    @abstractmethod
    async def power_off(self, instance_id: str, timeout: float) -> None:
        """ACPI powerdown, then kill after ``timeout`` seconds. No-op if not running."""

    @abstractmethod
    async def reboot(self, instance_id: str, hard: bool) -> None: ...

    @abstractmethod
    async def destroy(self, instance_id: str) -> None:
        """Kill the guest and delete its disk and files. No-op if absent."""

    @abstractmethod
    async def console_output(self, instance_id: str, length: int | None) -> str | None:
        """The serial console log (last ``length`` lines), or None if no such instance."""

    async def close(self) -> None:
        """Release connections (QMP sockets); guests keep running."""
