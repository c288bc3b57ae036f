"""The in-memory host index: capacity and liveness from heartbeats, mirrored to the hosts table.

Heartbeats arrive every couple of seconds from every hypervisor; the table is written only
when a host is first seen, changes (resources, address, boot), goes up or down, and otherwise
at most every ``write_every`` seconds, in one batched transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.bus.messages import Heartbeat
from cloudland.db.models import Host, utcnow


@dataclass
class HostInfo:
    id: str
    zone: str = "nova"
    address: str = ""
    vcpus: int = 0
    memory_mb: int = 0
    disk_gb: int = 0
    enabled: bool = True
    up: bool = False
    boot_id: str = ""
    digest: str = ""
    driver: str = ""
    last_seen: float = 0.0
    written_at: float = 0.0
    dirty: bool = True
    in_db: bool = False


class HeartbeatResult(NamedTuple):
    came_up: bool  # first heartbeat after being down (or unknown to this controller)
    restarted: bool  # boot_id differs from the last one this controller saw


class HostIndex:
    def __init__(self, down_after: float, write_every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.down_after = down_after
        self.write_every = write_every
        self.clock = clock
        self.hosts: dict[str, HostInfo] = {}

    def load(self, rows: Iterable[Host]) -> None:
        """Hosts known from the table; those marked up get ``down_after`` seconds of grace."""
        now = self.clock()
        for row in rows:
            self.hosts[row.id] = HostInfo(
                id=row.id, zone=row.zone, address=row.address, vcpus=row.vcpus,
                memory_mb=row.memory_mb, disk_gb=row.disk_gb, enabled=row.enabled,
                up=row.status == "up", boot_id=str((row.info or {}).get("boot_id", "")),
                last_seen=now, written_at=now, dirty=False, in_db=True)

    def get(self, host_id: str) -> HostInfo | None:
        return self.hosts.get(host_id)

    def is_up(self, host_id: str | None) -> bool:
        info = self.hosts.get(host_id) if host_id else None
        return info is not None and info.up

    def up_hosts(self) -> list[HostInfo]:
        return [h for h in self.hosts.values() if h.up]

    def observe(self, hb: Heartbeat) -> HeartbeatResult:
        now = self.clock()
        info = self.hosts.get(hb.host_id)
        if info is None:
            info = self.hosts[hb.host_id] = HostInfo(id=hb.host_id)
        came_up = not info.up
        restarted = info.boot_id != hb.boot_id
        r = hb.resources
        changed = (came_up or restarted or info.zone != hb.zone or info.address != hb.address
                   or (info.vcpus, info.memory_mb, info.disk_gb) != (r.vcpus, r.memory_mb, r.disk_gb))
        info.zone, info.address, info.boot_id, info.digest = hb.zone, hb.address, hb.boot_id, hb.state_digest
        info.vcpus, info.memory_mb, info.disk_gb = r.vcpus, r.memory_mb, r.disk_gb
        info.driver, info.up, info.last_seen = hb.driver, True, now
        if changed or now - info.written_at >= self.write_every:
            info.dirty = True
        return HeartbeatResult(came_up=came_up, restarted=restarted)

    def sweep(self) -> list[str]:
        """Mark hosts without a recent heartbeat down; returns the ones that just went down."""
        now = self.clock()
        gone = []
        for info in self.hosts.values():
            if info.up and now - info.last_seen > self.down_after:
                info.up = False
                info.dirty = True
                gone.append(info.id)
        return gone

    def overdue(self) -> bool:
        """Some host that is up has sent no heartbeat for ``down_after`` seconds."""
        limit = self.clock() - self.down_after
        return any(h.up and h.last_seen < limit for h in self.hosts.values())

    def set_disabled(self, disabled: set[str]) -> None:
        for info in self.hosts.values():
            info.enabled = info.id not in disabled

    async def persist(self, session: AsyncSession) -> int:
        """Write the dirty hosts in the caller's transaction; returns how many were written."""
        dirty = [h for h in self.hosts.values() if h.dirty]
        if not dirty:
            return 0
        now, wall = self.clock(), utcnow()
        unknown = [h.id for h in dirty if not h.in_db]
        if unknown:
            existing = set(await session.scalars(select(Host.id).where(Host.id.in_(unknown))))
            for h in dirty:
                h.in_db = h.in_db or h.id in existing
        rows = [{"id": h.id, "zone": h.zone, "address": h.address, "vcpus": h.vcpus,
                 "memory_mb": h.memory_mb, "disk_gb": h.disk_gb, "status": "up" if h.up else "down",
                 "last_heartbeat": wall - timedelta(seconds=max(0.0, now - h.last_seen)),
                 "info": {"boot_id": h.boot_id, "driver": h.driver}} for h in dirty]
        new = [r for r, h in zip(rows, dirty, strict=True) if not h.in_db]
        old = [r for r, h in zip(rows, dirty, strict=True) if h.in_db]
        if new:
            await session.execute(insert(Host), [r | {"first_seen": wall, "enabled": True} for r in new])
        if old:
            await session.execute(update(Host), old)
        for h in dirty:
            h.dirty, h.in_db, h.written_at = False, True, now
        return len(dirty)
