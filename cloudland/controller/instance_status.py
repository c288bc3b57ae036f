"""Apply the agents' InstanceStatus reports to instance rows, many in one transaction.

A report moves vm_state/power_state to what the host has; task_state is cleared only when
the report shows the desired state reached, so a stale report never ends a pending action.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from sqlalchemy import Select, Update, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from cloudland.api.network import ipam
from cloudland.bus.messages import InstanceStatus
from cloudland.controller.columns import OneOf, array_rows, json_text, json_value, on_postgresql, per_dialect
from cloudland.db.models import Instance, Port, utcnow

POWER_RUNNING, POWER_PAUSED, POWER_SHUTDOWN, POWER_NOSTATE = 1, 3, 4, 0


@dataclass
class Outcome:
    # (instance, its host, the networks its ports were on)
    finalized: list[tuple[Instance, str | None, set[str]]] = field(default_factory=list)
    # Live instances the host says it does not have: EnsureInstance must go again.
    missing: list[str] = field(default_factory=list)
    # (host, instance) pairs of guests that must not exist on that host.
    strays: list[tuple[str, str]] = field(default_factory=list)
    # (port id, project) of the finalized instances' ports: deleted, or unbound when preserved.
    freed_ports: list[tuple[str, str]] = field(default_factory=list)

    def merge(self, other: Outcome) -> None:
        self.finalized += other.finalized
        self.missing += other.missing
        self.strays += other.strays
        self.freed_ports += other.freed_ports


async def finalize_delete(session: AsyncSession, inst: Instance,
                          freed: list[tuple[str, str]] | None = None) -> set[str]:
    """The guest is gone (or its host is down): release the ports and mark the row deleted.
    Returns the networks its ports were on; adds (port id, project) of its ports to ``freed``."""
    ports = list(await session.execute(
        select(Port.id, Port.project_id, Port.network_id).where(Port.device_id == inst.id)))
    networks = {net for _, _, net in ports}
    if freed is not None:
        freed.extend((port_id, project) for port_id, project, _ in ports)
    if inst.preserved_port_ids:
        await session.execute(
            update(Port).where(Port.id.in_(inst.preserved_port_ids), Port.device_id == inst.id)
            .values(device_id="", device_owner="", binding_host_id="", status="DOWN"))
    # Like Neutron: a deleted port's floating IPs are disassociated (preserved ports keep theirs).
    networks |= set(await ipam.disassociate_floating_ips_of_device(session, inst.id))
    await ipam.delete_ports_of_device(session, inst.id)
    now = utcnow()
    inst.deleted = True
    inst.deleted_at = now
    inst.terminated_at = now
    inst.vm_state = "deleted"
    inst.task_state = None
    inst.power_state = POWER_NOSTATE
    return networks


def _apply(inst: Instance | _Row, status: InstanceStatus, adopt_guest_shutdown: bool) -> None:
    state = status.state
    if state == "running":
        inst.vm_state, inst.power_state, inst.fault = "active", POWER_RUNNING, None
        if inst.launched_at is None:
            inst.launched_at = utcnow()
        if inst.desired_power == "running" and status.reboot_generation >= inst.reboot_generation:
            inst.task_state = None
    elif state == "stopped":
        if (adopt_guest_shutdown and inst.vm_state == "active" and inst.task_state is None
                and inst.desired_power == "running"):
            # The guest shut itself down: like Nova, that becomes the desired state.
            inst.desired_power = "stopped"
        inst.vm_state, inst.power_state, inst.fault = "stopped", POWER_SHUTDOWN, None
        if inst.launched_at is None:
            inst.launched_at = utcnow()
        if inst.desired_power == "stopped":
            inst.task_state = None
    elif state == "paused":
        inst.vm_state, inst.power_state = "paused", POWER_PAUSED
    elif state == "error":
        inst.vm_state, inst.task_state = "error", None
        inst.fault = {"code": 500, "message": status.error or "Unknown error on the hypervisor",
                      "created": utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")}
    # "building" changes nothing: the row is building (or a task is pending) already.


_instances = Instance.__table__
# What a report reads and may change (``_Row``'s order); only the last six are ever written.
_READ = ("id", "host", "deleted", "deleted_at", "reboot_generation")
_WRITTEN = ("vm_state", "task_state", "power_state", "desired_power", "launched_at", "fault")


@per_dialect
def _port_status_stmt(one_of: OneOf) -> Update:
    ports = Port.__table__
    return (update(ports).where(one_of(ports.c.device_id, "ids"), ports.c.status != bindparam("new_status"))
            .values(status=bindparam("new_status")))


@per_dialect
def _rows_stmt(one_of: OneOf) -> Select[Any]:
    columns = [_instances.c[name] for name in _READ + _WRITTEN[:-1]]
    return select(*columns, json_text(_instances.c.fault)).where(one_of(_instances.c.id, "ids"))


class _Row:
    """The columns of an instance that a report reads or changes (not an ORM object)."""

    __slots__ = _READ + _WRITTEN

    def __init__(self, row: Sequence[Any]) -> None:
        for name, value in zip(self.__slots__, row, strict=True):
            setattr(self, name, value)
        self.fault = json_value(self.fault)  # read as text (shared when decoded: never changed)

    def written(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in _WRITTEN)


@cache
def _write_pg(names: tuple[str, ...]) -> Update:
    """PostgreSQL: one UPDATE of every row with these changed columns, the values as parallel
    arrays (``unnest``), instead of one execution per row."""
    rows = array_rows("b", {name: _instances.c[name].type for name in ("id", *names)})
    return (update(_instances).where(_instances.c.id == rows.c.id)
            .values(updated_at=bindparam("now"), **{name: rows.c[name] for name in names}))


async def _write(session: AsyncSession, changes: list[tuple[str, dict[str, Any]]]) -> None:
    """One executemany UPDATE per set of changed columns (as the ORM's flush would), with
    updated_at; instances of the session's identity map (a caller's ORM objects) get the values
    as if loaded."""
    now = utcnow()
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for iid, values in changes:
        groups[tuple(values)].append({"b_id": iid, **{f"b_{k}": v for k, v in values.items()}})
    postgres = on_postgresql(session)
    for names, params in groups.items():
        if postgres and len(params) > 1 and "fault" not in names:
            await session.execute(_write_pg(names), {"now": now, **{
                f"b_{name}": [p[f"b_{name}"] for p in params] for name in ("id", *names)}})
            continue
        statement = (update(_instances).where(_instances.c.id == bindparam("b_id"))
                     .values(updated_at=now, **{name: bindparam(f"b_{name}") for name in names}))
        await session.execute(statement, params)
    identities = session.identity_map
    for iid, values in changes:
        obj = identities.get(identity_key(Instance, iid))
        if obj is not None:
            for name, value in (*values.items(), ("updated_at", now)):
                set_committed_value(obj, name, value)


async def apply_statuses(session: AsyncSession, statuses: Iterable[InstanceStatus],
                         adopt_guest_shutdown: bool = True) -> Outcome:
    """Apply reports in the caller's transaction; the last report per instance wins.

    With ``adopt_guest_shutdown`` a running guest reported stopped becomes desired-stopped
    (the guest shut itself down, as Nova sees it); without it (a restarted agent's first
    report) the guest is started again.

    Rows are read and written with Core statements (the columns involved, changed columns only,
    as the ORM's flush would write them); only deletes load the ORM object."""
    latest: dict[str, InstanceStatus] = {}
    for status in statuses:
        latest[status.instance_id] = status
    outcome = Outcome()
    if not latest:
        return outcome
    await session.flush()  # the caller's pending changes first (a Core select does not autoflush)
    rows = {r[0]: _Row(r) for r in await session.execute(_rows_stmt(session), {"ids": list(latest)})}
    port_status: dict[str, list[str]] = {"ACTIVE": [], "DOWN": []}
    finalize: list[str] = []
    changes: list[tuple[str, dict[str, Any]]] = []
    for iid, status in latest.items():
        inst = rows.get(iid)
        if inst is None or inst.deleted_at is not None or inst.host != status.host_id:
            if status.state != "absent":
                outcome.strays.append((status.host_id, iid))
            continue
        if inst.deleted:
            if status.state == "absent":
                finalize.append(iid)
            continue
        if status.state == "absent":
            outcome.missing.append(iid)
            continue
        before = inst.written()
        _apply(inst, status, adopt_guest_shutdown)
        after = inst.written()
        if after != before:
            changes.append((iid, {name: new for name, old, new in zip(_WRITTEN, before, after, strict=True)
                                  if new != old}))
        if status.state in ("running", "stopped", "error"):
            port_status["ACTIVE" if status.state == "running" else "DOWN"].append(iid)
    if changes:
        await _write(session, changes)
    if finalize:
        objects = {i.id: i for i in await session.scalars(select(Instance).where(Instance.id.in_(finalize)))}
        for iid in finalize:
            if (obj := objects.get(iid)) is not None:
                networks = await finalize_delete(session, obj, outcome.freed_ports)
                outcome.finalized.append((obj, obj.host, networks))
    for value, ids in port_status.items():
        if ids:
            # Neutron: a port is ACTIVE while its guest runs (its tap is plugged and up).
            await session.execute(_port_status_stmt(session), {"ids": ids, "new_status": value})
    return outcome
