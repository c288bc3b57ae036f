"""Scheduling: pick a host with room for a flavor and claim it in the database.

Capacity comes from the host index (heartbeats) times the allocation ratios; usage is the
sum of the flavors of the instances on each host that are not yet finalized. The claim is a
conditional UPDATE (``WHERE host IS NULL``) in the same transaction that binds the ports, so
two controllers can never both place one instance. Weigher: most free RAM (spread), kept in a
heap so a pick costs O(log hosts) for the common case, not a scan of 20,000 hosts. The reconciler
keeps one ``Placement`` across passes and updates only the hosts that changed.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.config import ControllerConfig
from cloudland.controller.columns import array_rows, on_postgresql
from cloudland.controller.hosts import HostInfo
from cloudland.db.models import Instance, Port, utcnow

NO_VALID_HOST = "No valid host was found. There are not enough hosts available."


@dataclass
class Free:
    vcpus: float
    ram: float
    disk: float


def flavor_needs(flavor: dict[str, Any]) -> tuple[int, int, int]:
    return (int(flavor.get("vcpus", 0)), int(flavor.get("ram", 0)),
            int(flavor.get("disk", 0)) + int(flavor.get("ephemeral", 0)))


async def load_usage(session: AsyncSession) -> dict[str, tuple[int, int, int]]:
    """{host: (vcpus, ram MiB, disk GiB)} claimed by instances that still hold their host."""
    rows = await session.execute(
        select(Instance.host,
               func.coalesce(func.sum(Instance.flavor["vcpus"].as_integer()), 0),
               func.coalesce(func.sum(Instance.flavor["ram"].as_integer()), 0),
               func.coalesce(func.sum(Instance.flavor["disk"].as_integer()), 0)
               + func.coalesce(func.sum(Instance.flavor["ephemeral"].as_integer()), 0))
        .where(Instance.host.is_not(None), Instance.deleted_at.is_(None))
        .group_by(Instance.host))
    return {host: (int(c), int(r), int(d)) for host, c, r, d in rows}


Usage = Mapping[str, Sequence[int]]  # host -> (vcpus, ram MiB, disk GiB) claimed
_UNUSED = (0, 0, 0)


class Placement:
    """Free capacity of the up, enabled hosts.

    Built from all hosts once; ``update`` then recomputes only the hosts given (those whose
    state, capacity or usage changed, and those ``pick`` took capacity from), so a scheduling pass
    does not rebuild per-host structures for 20,000 hosts. Free capacity is always recomputed as
    capacity * ratio - usage, exactly as a fresh build would: the picks do not depend on history.
    """

    def __init__(self, hosts: Iterable[HostInfo], usage: Usage, ratios: ControllerConfig) -> None:
        self.ratios = ratios
        self.hosts: dict[str, HostInfo] = {}
        self.free: dict[str, Free] = {}
        # (-free RAM, host id); entries whose RAM is no longer the host's (or whose host left)
        # are stale and skipped by ``pick``.
        self.heap: list[tuple[float, str]] = []
        self.update(hosts, usage)

    def update(self, hosts: Iterable[HostInfo], usage: Usage) -> None:
        """Recompute the free capacity of ``hosts`` (up or not) from their capacity and ``usage``."""
        ratios = self.ratios
        fresh: list[tuple[float, str]] = []
        for h in hosts:
            if h.up and h.enabled:
                used = usage.get(h.id, _UNUSED)
                free = Free(vcpus=h.vcpus * ratios.cpu_allocation_ratio - used[0],
                            ram=h.memory_mb * ratios.ram_allocation_ratio - used[1],
                            disk=h.disk_gb * ratios.disk_allocation_ratio - used[2])
                self.hosts[h.id] = h
                self.free[h.id] = free
                fresh.append((-free.ram, h.id))
            else:
                self.hosts.pop(h.id, None)
                self.free.pop(h.id, None)
        if 8 * len(fresh) >= len(self.heap) or len(self.heap) > 2 * len(self.free) + 1024:
            # Many changes, or mostly stale entries: one entry per host again, O(hosts).
            self.heap = [(-f.ram, host_id) for host_id, f in self.free.items()]
            heapq.heapify(self.heap)
        else:
            for entry in fresh:
                heapq.heappush(self.heap, entry)

    def pick(self, flavor: dict[str, Any], zone: str | None = None, host: str | None = None) -> str | None:
        """The host with the most free RAM that fits (or ``host``, if it fits); its free
        capacity is reduced."""
        vcpus, ram, disk = flavor_needs(flavor)
        if host is not None:
            return self._take(host, vcpus, ram, disk)
        skipped = []
        chosen = None
        while self.heap:
            neg_ram, host_id = heapq.heappop(self.heap)
            free = self.free.get(host_id)
            if free is None or -neg_ram != free.ram:  # stale entry
                continue
            if free.ram < ram:
                skipped.append((neg_ram, host_id))
                break  # every other host has less free RAM
            skipped.append((neg_ram, host_id))
            if free.vcpus >= vcpus and free.disk >= disk and (
                    not zone or zone == "nova" or self.hosts[host_id].zone == zone):
                chosen = host_id
                break
        for entry in skipped:
            if entry[1] != chosen:
                heapq.heappush(self.heap, entry)
        if chosen is None:
            return None
        return self._take(chosen, vcpus, ram, disk)

    def _take(self, host: str, vcpus: int, ram: int, disk: int) -> str | None:
        """Claim capacity on ``host`` if it is up, enabled and has room; the heap entry it had
        goes stale (``pick`` skips entries whose RAM differs)."""
        free = self.free.get(host)
        if free is None or free.vcpus < vcpus or free.ram < ram or free.disk < disk:
            return None
        free.vcpus, free.ram, free.disk = free.vcpus - vcpus, free.ram - ram, free.disk - disk
        heapq.heappush(self.heap, (-free.ram, host))
        return host


async def claim(session: AsyncSession, instance_id: str, host: HostInfo) -> bool:
    """Assign the host and bind the ports; False if the instance was placed (or deleted) meanwhile."""
    result = await session.execute(
        update(Instance).where(Instance.id == instance_id, Instance.host.is_(None),
                               Instance.deleted.is_(False))
        .values(host=host.id, task_state="spawning",
                availability_zone=func.coalesce(Instance.availability_zone, host.zone))
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    await session.execute(update(Port).where(Port.device_id == instance_id).values(binding_host_id=host.id)
                          .execution_options(synchronize_session=False))
    return True


_instances = Instance.__table__
_ports = Port.__table__


_CLAIM_KEYS = array_rows("k", dict.fromkeys(("id", "host", "zone"), String))
_CLAIM_PG = (update(_instances)
             .where(_instances.c.id == _CLAIM_KEYS.c.id, _instances.c.host.is_(None),
                    _instances.c.deleted.is_(False))
             .values(host=_CLAIM_KEYS.c.host, task_state="spawning", updated_at=bindparam("now"),
                     availability_zone=func.coalesce(_instances.c.availability_zone, _CLAIM_KEYS.c.zone))
             .returning(_instances.c.id))
_BIND_KEYS = array_rows("k", dict.fromkeys(("id", "host"), String))
_BIND_PG = (update(_ports).where(_ports.c.device_id == _BIND_KEYS.c.id)
            .values(binding_host_id=_BIND_KEYS.c.host)
            .returning(_ports.c.device_id, _ports.c.network_id))


async def claim_many(session: AsyncSession, picks: list[tuple[str, HostInfo]]) -> dict[str, set[str]]:
    """``claim`` for many instances with a fixed number of statements: on PostgreSQL one
    conditional UPDATE of all instances (the picks as arrays) returning those claimed, and one
    of their ports returning their networks; elsewhere executemany, then reads. Returns
    {claimed instance id: the networks of its ports}. Core statements: the ORM objects in the
    session are not touched (re-read them if needed)."""
    if not picks:
        return {}
    now = utcnow()
    if on_postgresql(session):
        claimed = {iid: set() for iid in await session.scalars(_CLAIM_PG, {
            "k_id": [iid for iid, _ in picks], "k_host": [h.id for _, h in picks],
            "k_zone": [h.zone for _, h in picks], "now": now})}
        if claimed:
            host_of = {iid: h.id for iid, h in picks}
            rows = await session.execute(_BIND_PG, {"k_id": list(claimed),
                                                    "k_host": [host_of[i] for i in claimed]})
            for device, net in rows:
                claimed[device].add(net)
        return claimed
    await session.execute(
        update(_instances).where(_instances.c.id == bindparam("b_id"), _instances.c.host.is_(None),
                                 _instances.c.deleted.is_(False))
        .values(host=bindparam("b_host"), task_state="spawning", updated_at=now,
                availability_zone=func.coalesce(_instances.c.availability_zone, bindparam("b_zone"))),
        [{"b_id": iid, "b_host": h.id, "b_zone": h.zone} for iid, h in picks])
    wanted = {iid: h.id for iid, h in picks}
    claimed: dict[str, set[str]] = {}
    ids = list(wanted)
    for start in range(0, len(ids), 500):
        rows = await session.execute(select(_instances.c.id, _instances.c.host)
                                     .where(_instances.c.id.in_(ids[start:start + 500])))
        claimed.update({iid: set() for iid, host in rows if host == wanted[iid]})
    if not claimed:
        return {}
    await session.execute(
        update(_ports).where(_ports.c.device_id == bindparam("b_id"))
        .values(binding_host_id=bindparam("b_host")),
        [{"b_id": iid, "b_host": wanted[iid]} for iid in claimed])
    got = list(claimed)
    for start in range(0, len(got), 500):
        rows = await session.execute(select(_ports.c.device_id, _ports.c.network_id)
                                     .where(_ports.c.device_id.in_(got[start:start + 500])))
        for device, net in rows:
            claimed[device].add(net)
    return claimed


async def fail_no_host(session: AsyncSession, instance_id: str) -> None:
    fault = {"code": 500, "message": NO_VALID_HOST, "created": utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")}
    await session.execute(
        update(Instance).where(Instance.id == instance_id, Instance.host.is_(None),
                               Instance.deleted.is_(False))
        .values(vm_state="error", task_state=None, fault=fault)
        .execution_options(synchronize_session=False))
