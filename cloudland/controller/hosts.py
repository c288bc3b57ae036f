"""The in-memory host index: capacity and liveness from heartbeats, mirrored to the hosts table.

Heartbeats arrive every couple of seconds from every hypervisor; the table is written only
when a host is first seen, changes (resources, address, boot), goes up or down, and otherwise
at most every ``write_every`` seconds, in one batched transaction.

Nothing here walks all hosts per call: up hosts are kept in the order of their last heartbeat
(a heartbeat moves its host to the end), so the silent ones are at the front; the hosts whose row
may need writing and those whose capacity or state changed (for placement) are kept in sets.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

from sqlalchemy import DateTime, String, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.bus.messages import Heartbeat
from cloudland.controller.columns import array_rows, on_postgresql
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
    # The row as last written (``HostIndex._row_state``): a refresh that changes nothing else
    # writes only last_heartbeat.
    written: tuple[object, ...] | None = None


class HeartbeatResult(NamedTuple):
    came_up: bool  # first heartbeat after being down (or unknown to this controller)
    restarted: bool  # boot_id differs from the last one this controller saw


_hosts = Host.__table__
_REFRESH = (update(_hosts).where(_hosts.c.id == bindparam("b_id"))
            .values(last_heartbeat=bindparam("b_heartbeat")))
# PostgreSQL: the refreshes as one statement over parallel arrays (not one execution per host).
_REFRESH_ROWS = array_rows("b", {"id": String, "heartbeat": DateTime()})
_REFRESH_PG = (update(_hosts).where(_hosts.c.id == _REFRESH_ROWS.c.id)
               .values(last_heartbeat=_REFRESH_ROWS.c.heartbeat))


class HostIndex:
    def __init__(self, down_after: float, write_every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.down_after = down_after
        # last_heartbeat is for people (the hosts table); down detection is in memory. At
        # 20,000 hosts this is ~333 single-column row updates/s, spread over passes (below).
        self.write_every = write_every
        self.clock = clock
        self.hosts: dict[str, HostInfo] = {}
        # Up hosts, least recently heard first (``observe`` moves a host to the end).
        self._alive: OrderedDict[str, HostInfo] = OrderedDict()
        # Hosts that may need writing (``HostInfo.dirty`` decides), and the disabled ones.
        self._dirty: set[str] = set()
        self._disabled: set[str] = set()
        # Hosts whose state, enablement, zone or capacity changed since the scheduler last took
        # them (``take_changed``): its placement recomputes only those.
        self._changed: set[str] = set()

    def load(self, rows: Iterable[Host]) -> None:
        """Hosts known from the table; those marked up get ``down_after`` seconds of grace."""
        now = self.clock()
        for row in rows:
            info = self.hosts[row.id] = HostInfo(
                id=row.id, zone=row.zone, address=row.address, vcpus=row.vcpus,
                memory_mb=row.memory_mb, disk_gb=row.disk_gb, enabled=row.enabled,
                up=row.status == "up", boot_id=str((row.info or {}).get("boot_id", "")),
                last_seen=now, written_at=now, dirty=False, in_db=True)
            info.written = (row.zone, row.address, row.vcpus, row.memory_mb, row.disk_gb, row.status,
                            info.boot_id, (row.info or {}).get("driver", ""))
            self._alive.pop(row.id, None)
            if info.up:
                self._alive[row.id] = info
            if not info.enabled:
                self._disabled.add(row.id)
            self._changed.add(row.id)

    def get(self, host_id: str) -> HostInfo | None:
        return self.hosts.get(host_id)

    def is_up(self, host_id: str | None) -> bool:
        info = self.hosts.get(host_id) if host_id else None
        return info is not None and info.up

    def up_hosts(self) -> list[HostInfo]:
        return [h for h in self.hosts.values() if h.up]

    def take_changed(self) -> set[str]:
        """The hosts whose up/enabled state, zone or capacity changed since the last call."""
        changed, self._changed = self._changed, set()
        return changed

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
        alive = self._alive
        if hb.host_id in alive:
            alive.move_to_end(hb.host_id)
        else:
            alive[hb.host_id] = info
        if changed:
            self._changed.add(hb.host_id)
        if changed or now - info.written_at >= self.write_every:
            info.dirty = True
            self._dirty.add(hb.host_id)
        return HeartbeatResult(came_up=came_up, restarted=restarted)

    def sweep(self) -> list[str]:
        """Mark hosts without a recent heartbeat down; returns the ones that just went down, the
        longest silent first. Looks only at the front of the heartbeat order."""
        now = self.clock()
        gone = []
        alive = self._alive
        while alive:
            info = next(iter(alive.values()))
            if info.up and now - info.last_seen <= self.down_after:
                break
            alive.popitem(last=False)
            if info.up:  # (a host marked down by other means just leaves the order)
                info.up = False
                info.dirty = True
                self._dirty.add(info.id)
                self._changed.add(info.id)
                gone.append(info.id)
        return gone

    def overdue(self) -> bool:
        """Some host that is up has sent no heartbeat for ``down_after`` seconds."""
        limit = self.clock() - self.down_after
        for info in self._alive.values():
            if info.up:
                return info.last_seen < limit
        return False

    def set_disabled(self, disabled: set[str]) -> None:
        """Hosts in ``disabled`` are disabled, all others enabled (only changes are applied)."""
        for host_id in self._disabled - disabled:
            info = self.hosts.get(host_id)
            if info is not None and not info.enabled:
                info.enabled = True
                self._changed.add(host_id)
        for host_id in disabled:
            info = self.hosts.get(host_id)
            if info is not None and info.enabled:
                info.enabled = False
                self._changed.add(host_id)
        self._disabled = set(disabled)

    @staticmethod
    def _row_state(h: HostInfo) -> tuple[object, ...]:
        return (h.zone, h.address, h.vcpus, h.memory_mb, h.disk_gb, "up" if h.up else "down",
                h.boot_id, h.driver)

    async def persist(self, session: AsyncSession) -> int:
        """Write the dirty hosts in the caller's transaction; returns how many were written.

        New and changed rows are written whole, at once. A periodic refresh (nothing changed but
        the time) writes only last_heartbeat, and at most ``refresh_batch`` of them per call: the
        rest stay dirty for the next pass, so refreshes spread over passes instead of arriving
        together every ``write_every`` seconds (hosts seen or loaded together stay together)."""
        dirty = [h for h in map(self.hosts.get, self._dirty) if h is not None and h.dirty]
        self._dirty = {h.id for h in dirty}
        if not dirty:
            return 0
        now, wall = self.clock(), utcnow()
        unknown = [h.id for h in dirty if not h.in_db]
        if unknown:
            existing = set(await session.scalars(select(Host.id).where(Host.id.in_(unknown))))
            for h in dirty:
                h.in_db = h.in_db or h.id in existing
        full: list[HostInfo] = []
        states: list[tuple[object, ...]] = []  # what the full writes put in the rows
        refresh: list[HostInfo] = []
        for h in dirty:
            state = self._row_state(h)
            if not h.in_db or h.written != state:
                full.append(h)
                states.append(state)
            else:
                refresh.append(h)
        del refresh[self.refresh_batch():]
        written = full + refresh

        def seen(h: HostInfo) -> object:
            return wall - timedelta(seconds=max(0.0, now - h.last_seen))

        rows = [{"id": h.id, "zone": h.zone, "address": h.address, "vcpus": h.vcpus,
                 "memory_mb": h.memory_mb, "disk_gb": h.disk_gb, "status": "up" if h.up else "down",
                 "last_heartbeat": seen(h), "info": {"boot_id": h.boot_id, "driver": h.driver}}
                for h in full]
        new = [r for r, h in zip(rows, full, strict=True) if not h.in_db]
        old = [r for r, h in zip(rows, full, strict=True) if h.in_db]
        if new:
            await session.execute(insert(Host), [r | {"first_seen": wall, "enabled": True} for r in new])
        if old:
            await session.execute(update(Host), old)
        if refresh:
            if on_postgresql(session):
                await session.execute(_REFRESH_PG, {"b_id": [h.id for h in refresh],
                                                    "b_heartbeat": [seen(h) for h in refresh]})
            else:
                await session.execute(_REFRESH, [{"b_id": h.id, "b_heartbeat": seen(h)} for h in refresh])
        for h, state in zip(full, states, strict=True):
            h.written = state
        for h in written:
            # A host that changed while the statements ran stays dirty (written again next pass).
            h.dirty, h.in_db, h.written_at = self._row_state(h) != h.written, True, now
        self._dirty.difference_update(h.id for h in written if not h.dirty)
        return len(written)

    def refresh_batch(self) -> int:
        """Refresh-only rows written per pass: a tenth of the hosts (at least 1,000), so with a
        pass at least every 5 s all of them are refreshed well within ``write_every`` (60 s)."""
        return max(1000, len(self.hosts) // 10)
