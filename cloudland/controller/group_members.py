"""Security group members in the controller's memory: ``GroupMemberIndex``.

A rule naming a remote group (Neutron's ``default`` group admits its own members) puts the
group's member addresses in the specs of the hosts with such a port. A group's members are the
ports of its project that are in the group and have addresses, bound or not. Reading them from
the database read every port of the projects concerned on every pass in which a port of theirs
came or went; the index instead reads a project's ports once (one query of columns) when first
needed and is then kept current by what the reconciler tells it:

- ``devices_changed``: instances it scheduled (their ports were bound), ``ports_changed``: ports
  it freed (deleted, or unbound when preserved). Those rows are read again, one query per pass
  for all of them (with the networks below);
- ``networks_changed``: a ``Wake`` named these networks (the API changed ports or security groups
  there): their ports are read again;
- ``project_changed``: dropped, read again on next use (a server deleted by the API itself);
- a project or network read more than ``max_age`` ago (±25%, so they do not come due together)
  is read again on next use: a safety net for an event that never came.

While no rule anywhere names a remote group, the index holds nothing (each question first asks
the database whether one does) and reads no project.

Rules are not kept: a few per group, read when a question needs them. Answers are those of the
direct queries in ``secgroups`` for the same database state, once the events are in; a server's
port created by the API but not scheduled yet is known only after its project's next load or
its claim (it is not bound, and the claim makes the reconciler send the new member sets).
"""

from __future__ import annotations

import random
import sys
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import CompoundSelect, Select, or_, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.controller.columns import OneOf, json_text, json_value, per_dialect
from cloudland.db.models import IpAllocation, Network, Port, SecurityGroup, SecurityGroupRule

_ports = Port.__table__
_allocations = IpAllocation.__table__
_groups = SecurityGroup.__table__
_rules = SecurityGroupRule.__table__
_networks = Network.__table__

# (network, bound, security group ids, addresses): what the answers need of a port.
PortEntry = tuple[str, bool, tuple[str, ...], tuple[str, ...]]


# Ports, then their addresses by port id: each statement an index lookup per id whatever the
# table's size (a join, or an OR of the three conditions, let PostgreSQL's estimates pick scans
# of the whole table).
def _ports_select() -> Select[Any]:
    return select(_ports.c.id, _ports.c.project_id, _ports.c.network_id, _ports.c.binding_host_id,
                  json_text(_ports.c.security_groups))


@per_dialect
def _projects_stmt(one_of: OneOf) -> Select[Any]:
    return _ports_select().where(one_of(_ports.c.project_id, "projects"))


@per_dialect
def _changed_stmt(one_of: OneOf) -> CompoundSelect:
    return union_all(_ports_select().where(one_of(_ports.c.id, "ids")),
                     _ports_select().where(one_of(_ports.c.device_id, "devices")),
                     _ports_select().where(one_of(_ports.c.network_id, "nets")))


@per_dialect
def _addresses_stmt(one_of: OneOf) -> Select[Any]:
    return (select(_allocations.c.port_id, _allocations.c.ip_address)
            .where(one_of(_allocations.c.port_id, "ids")))


@per_dialect
def _net_projects_stmt(one_of: OneOf) -> Select[Any]:
    return (select(_ports.c.network_id, _ports.c.project_id).distinct()
            .where(one_of(_ports.c.network_id, "nets"), _ports.c.project_id != ""))


@per_dialect
def _group_projects_stmt(one_of: OneOf) -> Select[Any]:
    return select(_groups.c.id, _groups.c.project_id).where(one_of(_groups.c.id, "ids"))


@per_dialect
def _referring_stmt(one_of: OneOf) -> Select[Any]:
    """Groups (with their project) whose rules name, as remote group, a group of the projects or
    of the networks' owners."""
    owners = select(_networks.c.project_id).where(one_of(_networks.c.id, "nets"))
    named = select(_groups.c.id).where(or_(one_of(_groups.c.project_id, "projects"),
                                           _groups.c.project_id.in_(owners)))
    return (select(_rules.c.security_group_id, _groups.c.project_id).distinct()
            .join(_groups, _groups.c.id == _rules.c.security_group_id)
            .where(_rules.c.remote_group_id.in_(named)))


# Whether any rule names a remote group (an index range on ``remote_group_id``).
_ANY_REMOTE_RULE = select(_rules.c.id).where(_rules.c.remote_group_id.is_not(None)).limit(1)


@per_dialect
def _named_remote_stmt(one_of: OneOf) -> Select[Any]:
    """Those of the groups that a rule names as remote group."""
    return select(_rules.c.remote_group_id).distinct().where(one_of(_rules.c.remote_group_id, "groups"))


_group_lists: dict[str | None, tuple[str, ...]] = {}
# Addresses come and gone that a member set's next answer mends its sorted list by; beyond
# this many it is sorted anew.
MEND_AT_MOST = 2048
MEND_BY_BISECTION = 32


def _groups_of(text: str | None) -> tuple[str, ...]:
    """A port's group list as a tuple of interned ids, one object per distinct list."""
    found = _group_lists.get(text)
    if found is None:
        if len(_group_lists) >= 10_000:
            _group_lists.clear()
        found = _group_lists[text] = tuple(sys.intern(str(g)) for g in json_value(text) or [])
    return found


async def _read(session: AsyncSession, statement: Any,
                params: dict[str, Any]) -> dict[str, tuple[str, PortEntry]]:
    """{port id: (project, entry)} of the ports ``statement`` (``_ports_select`` columns) reads."""
    await session.flush()  # a Core select does not autoflush: the caller's changes first
    ports = {row[0]: row for row in (await session.execute(statement, params)).all()}
    addresses: dict[str, list[str]] = {}
    if ports:
        for port_id, ip in (await session.execute(_addresses_stmt(session), {"ids": list(ports)})).all():
            addresses.setdefault(port_id, []).append(ip)
    return {port_id: (sys.intern(project), (sys.intern(net), bool(host), _groups_of(groups),
                                            tuple(addresses.get(port_id, ()))))
            for port_id, project, net, host, groups in ports.values()}


def _bump(counts: dict[str, int], key: str, by: int) -> bool:
    """Count ``key`` ``by`` more; whether it came or went (its count crossed zero)."""
    before = counts.get(key, 0)
    value = before + by
    if value:
        counts[key] = value
    else:
        del counts[key]
    return not before or not value


class _Project:
    """One project's ports and what the answers need, counted so a port can be taken out."""

    __slots__ = ("bound", "changed", "expires", "members", "on_net", "ports", "sorted", "touched")

    def __init__(self, expires: float, changed: set[str]) -> None:
        self.expires = expires
        self.changed = changed  # the index's: groups whose members may have changed
        self.ports: dict[str, PortEntry] = {}
        self.members: dict[str, dict[str, int]] = {}  # group -> address -> ports with it
        self.bound: dict[str, dict[str, int]] = {}  # group -> network -> bound ports in the group
        self.on_net: dict[str, int] = {}  # network -> ports
        self.sorted: dict[str, list[str]] = {}  # group -> its members, sorted (as last answered)
        # group -> addresses that joined or left the group since ``sorted`` was made: the next
        # answer is that list mended, not the members sorted anew (10,000 addresses took ~3 ms
        # to sort, per group and pass, while a launch filled the projects)
        self.touched: dict[str, set[str]] = {}

    def add(self, port_id: str, port: PortEntry) -> None:
        self.remove(port_id)
        self.ports[port_id] = port
        self._count(port, 1)

    def remove(self, port_id: str) -> None:
        port = self.ports.pop(port_id, None)
        if port is not None:
            self._count(port, -1)

    def _count(self, port: PortEntry, by: int) -> None:
        net, bound, groups, addresses = port
        _bump(self.on_net, net, by)
        for group in groups:
            if addresses:
                members = self.members.setdefault(group, {})
                touched = self.touched.get(group)
                for address in addresses:
                    if _bump(members, address, by) and group in self.sorted:
                        if touched is None:
                            touched = self.touched[group] = set()
                        touched.add(address)
                if not members:
                    del self.members[group]
                if touched is not None and len(touched) > MEND_AT_MOST:
                    self.sorted.pop(group, None)
                    del self.touched[group]
                self.changed.add(group)
            if bound:
                nets = self.bound.setdefault(group, {})
                _bump(nets, net, by)
                if not nets:
                    del self.bound[group]

    def members_of(self, group: str) -> list[str]:
        """The group's members' addresses, sorted (a new list when they changed: answers are
        shared)."""
        found = self.sorted.get(group)
        touched = self.touched.pop(group, None)
        if found is None:
            found = self.sorted[group] = sorted(self.members.get(group, ()))
        elif touched:
            found = self.sorted[group] = _mended(found, touched, self.members.get(group, {}))
        return found


def _mended(found: list[str], touched: set[str], members: dict[str, int]) -> list[str]:
    """A new sorted list: ``found`` with the ``touched`` addresses in or out as ``members`` says."""
    if len(touched) <= MEND_BY_BISECTION:  # a few: found by bisection, moved in C
        mended = found.copy()
        for address in touched:
            i = bisect_left(mended, address)
            here = i < len(mended) and mended[i] == address
            if address in members:
                if not here:
                    mended.insert(i, address)
            elif here:
                del mended[i]
        return mended
    # Many: sorting a sorted run followed by a few more is linear (timsort merges runs).
    mended = [a for a in found if a not in touched]
    mended.extend(a for a in touched if a in members)
    mended.sort()
    return mended


class _Net:
    """The projects with ports on a network: a superset (one whose last port there went stays
    until the network is read again); the projects' own counts say which still have ports."""

    __slots__ = ("expires", "projects")

    def __init__(self, expires: float, projects: set[str]) -> None:
        self.expires = expires
        self.projects = projects


class GroupMemberIndex:
    """Per project, its ports' security groups, addresses, networks and binding (see the module
    docstring for how it is kept current). The answers' lists are shared: never change them."""

    def __init__(self, clock: Callable[[], float], max_age: float = 300.0,
                 rng: random.Random | None = None) -> None:
        self.clock = clock
        self.max_age = max_age
        self._random = rng or random.Random()
        self._projects: dict[str, _Project] = {}
        self._nets: dict[str, _Net] = {}
        self._group_project: dict[str, str] = {}  # a group's project never changes
        self._changed_ports: dict[str, str] = {}  # port id -> its project
        self._changed_devices: set[str] = set()
        self._changed_nets: set[str] = set()
        self._recording: set[str] | None = None
        self._recorded_nets: set[str] = set()
        self.loads = 0  # projects read whole (for tests and stats)
        # Groups whose members may have changed since their sets were last published.
        self.changed_groups: set[str] = set()

    # --- events (no I/O) --------------------------------------------------------------------

    def devices_changed(self, device_ids: Iterable[str]) -> None:
        """The ports of these devices (instances) were bound or may be new."""
        self._changed_devices.update(device_ids)

    def ports_changed(self, ports: Iterable[tuple[str, str]]) -> None:
        """These (port id, project) changed or were deleted."""
        self._changed_ports.update(ports)

    def networks_changed(self, network_ids: Iterable[str]) -> None:
        """Ports on these networks may have been created, changed or deleted."""
        self._changed_nets.update(network_ids)

    def project_changed(self, project_id: str) -> None:
        """Read the project again when next needed."""
        self._drop(project_id)

    def _drop(self, project_id: str) -> None:
        project = self._projects.pop(project_id, None)
        if project is not None:
            self.changed_groups.update(project.members)

    def record(self) -> None:
        """Start noting what the next reads change: ``discard_recorded`` forgets it (the reads
        were made in a transaction that then failed, and may have seen its own writes)."""
        self._recording, self._recorded_nets = set(), set()

    def discard_recorded(self) -> None:
        for project in self._recording or ():
            self._drop(project)
        for net in self._recorded_nets:
            self._nets.pop(net, None)
        self._recording, self._recorded_nets = None, set()

    def stop_recording(self) -> None:
        self._recording, self._recorded_nets = None, set()

    # --- answers ----------------------------------------------------------------------------

    async def remote_groups(self, session: AsyncSession, group_ids: Iterable[str]) -> dict[str, list[str]]:
        """{group id: its members' addresses, sorted} (``secgroups.remote_groups``)."""
        wanted = set(group_ids)
        if not wanted:
            return {}
        await self._sync(session)
        owners = await self._owners(session, wanted)
        projects = await self._load(session, set(owners.values()))
        return {g: projects[owners[g]].members_of(g) if g in owners else [] for g in wanted}

    async def changed_member_sets(self, session: AsyncSession) -> tuple[set[str], dict[str, list[str]]]:
        """The groups whose members may have changed since ``member_sets_published`` was told of
        them, and {group: its members' addresses, sorted} for those a rule names as remote group."""
        if not self.pending or not await self._any_remote_rules(session):
            return set(), {}
        await self._sync(session)
        if not self.changed_groups:
            return set(), {}
        considered = set(self.changed_groups)
        named = set(await session.scalars(_named_remote_stmt(session), {"groups": sorted(considered)}))
        return considered, (await self.remote_groups(session, named) if named else {})

    @property
    def pending(self) -> bool:
        """Events not read yet, or member sets not published yet."""
        return bool(self.changed_groups or self._changed_ports or self._changed_devices or self._changed_nets)

    def member_sets_published(self, groups: Iterable[str]) -> None:
        """What ``changed_member_sets`` answered for these groups went out. (Not done by
        ``changed_member_sets`` itself: its transaction may still fail.)"""
        self.changed_groups.difference_update(groups)

    async def networks_admitting_members_of(self, session: AsyncSession,
                                            network_ids: Iterable[str]) -> set[str]:
        """``secgroups.networks_admitting_members_of``: networks with bound ports whose rules name,
        as remote group, a group of the projects using ``network_ids``."""
        nets = sorted(set(network_ids))
        if not nets or not await self._any_remote_rules(session):
            return set()
        await self._sync(session)
        using = {p for ps in (await self._projects_on(session, nets)).values() for p in ps}
        referring = dict(list(await session.execute(
            _referring_stmt(session), {"nets": nets, "projects": sorted(using)})))
        if not referring:
            return set()
        result: set[str] = set()
        for project in (await self._load(session, set(referring.values()))).values():
            for group in referring:
                result.update(project.bound.get(group, ()))
        return result

    # --- reading ----------------------------------------------------------------------------

    async def _any_remote_rules(self, session: AsyncSession) -> bool:
        """Whether any rule names a remote group. Without one no answer needs ports, and the
        index keeps none: re-reading whole projects as they age (10,000 ports each, in a
        cloud of 500,000 servers) would be work for nothing."""
        if await session.scalar(_ANY_REMOTE_RULE) is not None:
            return True
        self._projects.clear()
        self._nets.clear()
        self._changed_ports.clear()
        self._changed_devices.clear()
        self._changed_nets.clear()
        self.changed_groups.clear()
        return False

    def _expiry(self) -> float:
        return self.clock() + self.max_age * self._random.uniform(0.75, 1.25)

    def _touched(self, project: str) -> None:
        if self._recording is not None:
            self._recording.add(project)

    async def _sync(self, session: AsyncSession) -> None:
        """Read the ports events named again (one query)."""
        if not (self._changed_ports or self._changed_devices or self._changed_nets):
            return
        ports, self._changed_ports = self._changed_ports, {}
        devices, self._changed_devices = self._changed_devices, set()
        nets, self._changed_nets = self._changed_nets, set()
        rows = await _read(session, _changed_stmt(session), {
            "ids": sorted(ports), "devices": sorted(devices), "nets": sorted(nets)})
        for port_id, project_id in ports.items():
            if port_id not in rows and (project := self._projects.get(project_id)) is not None:
                project.remove(port_id)
                self._touched(project_id)
        if nets:
            for project_id, project in self._projects.items():
                if not project.on_net.keys().isdisjoint(nets):
                    for port_id in [p for p, entry in project.ports.items() if entry[0] in nets]:
                        project.remove(port_id)
                    self._touched(project_id)
            for net in nets:
                self._nets[net] = _Net(self._expiry(), set())
            if self._recording is not None:
                self._recorded_nets.update(nets)
        for port_id, (project_id, entry) in rows.items():
            known = self._nets.get(entry[0])
            if known is not None and project_id:
                known.projects.add(project_id)
            if (project := self._projects.get(project_id)) is not None:
                project.add(port_id, entry)
                self._touched(project_id)

    async def _load(self, session: AsyncSession, project_ids: set[str]) -> dict[str, _Project]:
        """The projects, read whole where not known or too old."""
        now = self.clock()
        stale = sorted(p for p in project_ids if p not in self._projects or self._projects[p].expires <= now)
        if stale:
            rows = await _read(session, _projects_stmt(session), {"projects": stale})
            for p in stale:
                self._drop(p)
            fresh = {p: _Project(self._expiry(), self.changed_groups) for p in stale}
            for port_id, (project_id, entry) in rows.items():
                fresh[project_id].add(port_id, entry)
                known = self._nets.get(entry[0])
                if known is not None:
                    known.projects.add(project_id)
            self._projects.update(fresh)
            self.loads += len(stale)
            for p in stale:
                self._touched(p)
        return {p: self._projects[p] for p in project_ids}

    async def _projects_on(self, session: AsyncSession, nets: list[str]) -> dict[str, set[str]]:
        """{network: the projects with ports on it} (``''`` is never a project here)."""
        now = self.clock()
        stale = [n for n in nets if n not in self._nets or self._nets[n].expires <= now]
        if stale:
            for net in stale:
                self._nets[net] = _Net(self._expiry(), set())
            for net, project in await session.execute(_net_projects_stmt(session), {"nets": stale}):
                self._nets[net].projects.add(sys.intern(project))
            if self._recording is not None:
                self._recorded_nets.update(stale)
        candidates = {p for n in nets for p in self._nets[n].projects}
        projects = await self._load(session, candidates)
        result: dict[str, set[str]] = {}
        for net in nets:
            known = self._nets[net]
            gone = {p for p in known.projects if net not in projects[p].on_net}
            known.projects -= gone
            result[net] = set(known.projects)
        return result

    async def _owners(self, session: AsyncSession, group_ids: set[str]) -> dict[str, str]:
        """{group: its project} for the groups that exist."""
        unknown = sorted(g for g in group_ids if g not in self._group_project)
        if unknown:
            for group, project in await session.execute(_group_projects_stmt(session), {"ids": unknown}):
                self._group_project[sys.intern(group)] = sys.intern(project)
        return {g: self._group_project[g] for g in group_ids if g in self._group_project}
