"""Security groups in specs: each port's rules and the addresses of remote groups' members.

The member queries here read every port of the projects concerned: the controller answers them
from its ``group_members.GroupMemberIndex``; these are the reference (tests compare the two) and
serve callers without an index."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.bus.messages import PortSpec, SecurityRuleSpec
from cloudland.controller.columns import OneOf, json_text, json_value, per_dialect
from cloudland.db.models import IpAllocation, Network, Port, SecurityGroup, SecurityGroupRule

_rules = SecurityGroupRule.__table__
_groups = SecurityGroup.__table__
_ports = Port.__table__
_networks = Network.__table__
_allocations = IpAllocation.__table__


def _protocol(value: str | None) -> int | None:
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    from cloudland.api.network.secgroup_rules import PROTOCOLS

    return PROTOCOLS.get(value)


@per_dialect
def _rules_stmt(one_of: OneOf) -> Select[Any]:
    return (
        select(_rules.c.security_group_id, _rules.c.direction, _rules.c.ethertype, _rules.c.protocol,
               _rules.c.port_range_min, _rules.c.port_range_max, _rules.c.remote_ip_prefix,
               _rules.c.remote_group_id)
        .where(one_of(_rules.c.security_group_id, "ids"))
        .order_by(_rules.c.created_at, _rules.c.id)
    )


async def rules_of_groups(
    session: AsyncSession, group_ids: Iterable[str]
) -> dict[str, list[SecurityRuleSpec]]:
    ids = sorted(set(group_ids))
    result: dict[str, list[SecurityRuleSpec]] = defaultdict(list)
    if ids:
        for group, direction, ethertype, protocol, low, high, prefix, remote in await session.execute(
            _rules_stmt(session), {"ids": ids}
        ):
            result[group].append(
                SecurityRuleSpec(
                    direction=direction,
                    ethertype=ethertype,
                    protocol=_protocol(protocol),
                    port_range_min=low,
                    port_range_max=high,
                    remote_ip_prefix=prefix,
                    remote_group_id=remote,
                )
            )
    return result


def port_rules(groups: list[str] | None, rules: dict[str, list[SecurityRuleSpec]]) -> list[SecurityRuleSpec]:
    """The rules of a port in ``groups`` (its security group ids)."""
    return [r for g in groups or [] for r in rules.get(g, [])]


@per_dialect
def _members_stmt(one_of: OneOf) -> Select[Any]:
    # A group's members are ports of its own project: read only those projects' ports.
    projects = select(_groups.c.project_id).where(one_of(_groups.c.id, "groups"))
    return (
        select(json_text(_ports.c.security_groups), _allocations.c.ip_address)
        .join(_allocations, _allocations.c.port_id == _ports.c.id)
        .where(_ports.c.project_id.in_(projects))
    )


def named_groups(ports: Iterable[PortSpec]) -> set[str]:
    """The remote groups the ports' rules name."""
    return {r.remote_group_id for p in ports for r in p.security_rules if r.remote_group_id}


async def remote_groups(session: AsyncSession, ports: Iterable[PortSpec]) -> dict[str, list[str]]:
    """{group id: member addresses} for every remote group the ports' rules name."""
    return await members_of_groups(session, named_groups(ports))


async def members_of_groups(session: AsyncSession, group_ids: Iterable[str]) -> dict[str, list[str]]:
    """{group id: member addresses, sorted}: the addresses of the ports of the group's project
    that are in the group, bound or not."""
    wanted = set(group_ids)
    if not wanted:
        return {}
    members: dict[str, set[str]] = {g: set() for g in wanted}
    rows = await session.execute(_members_stmt(session), {"groups": list(wanted)})
    # Most ports share a handful of group lists: gather addresses per list, decode each once.
    by_groups: dict[str | None, list[str]] = defaultdict(list)
    for text, ip in rows:
        by_groups[text].append(ip)
    for text, ips in by_groups.items():
        for g in set(json_value(text) or []) & wanted:
            members[g].update(ips)
    return {g: sorted(ips) for g, ips in members.items()}


@per_dialect
def _projects_of_networks_stmt(one_of: OneOf) -> Select[Any]:
    return select(_networks.c.project_id).where(one_of(_networks.c.id, "nets")).union(
        select(_ports.c.project_id).where(one_of(_ports.c.network_id, "nets"), _ports.c.project_id != ""))


@per_dialect
def _referring_stmt(one_of: OneOf) -> Select[Any]:
    """Groups whose rules name, as remote group, a group of the projects."""
    groups = select(_groups.c.id).where(one_of(_groups.c.project_id, "projects"))
    return select(_rules.c.security_group_id).distinct().where(_rules.c.remote_group_id.in_(groups))


@per_dialect
def _bound_group_lists_stmt(one_of: OneOf) -> Select[Any]:
    """The distinct group lists of the bound ports of the groups' projects, per network."""
    projects = select(_groups.c.project_id).where(one_of(_groups.c.id, "groups"))
    return (select(_ports.c.network_id, json_text(_ports.c.security_groups)).distinct()
            .where(_ports.c.project_id.in_(projects), _ports.c.binding_host_id != ""))


async def networks_admitting_members_of(session: AsyncSession, network_ids: Iterable[str]) -> set[str]:
    """Networks with bound ports whose rules name, as remote group, a group that has ports on
    ``network_ids``: when those networks' members change, so do these networks' member sets
    (a group spans its project's networks)."""
    nets = list(network_ids)
    if not nets:
        return set()
    # The groups a joining or leaving port may be in: those of the projects using these networks
    # (a port that just left is gone from the table, its project's groups are not).
    projects = list(await session.scalars(_projects_of_networks_stmt(session), {"nets": nets}))
    referring = set(await session.scalars(_referring_stmt(session), {"projects": projects}))
    if not referring:
        return set()
    rows = await session.execute(_bound_group_lists_stmt(session), {"groups": list(referring)})
    return {net for net, value in rows if set(json_value(value) or []) & referring}
