"""Security groups in specs: each port's rules and the addresses of remote groups' members."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.bus.messages import PortSpec, SecurityRuleSpec
from cloudland.db.models import IpAllocation, Network, Port, SecurityGroup, SecurityGroupRule


def _protocol(value: str | None) -> int | None:
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    from cloudland.api.network.secgroup_rules import PROTOCOLS

    return PROTOCOLS.get(value)


async def rules_of_groups(
    session: AsyncSession, group_ids: Iterable[str]
) -> dict[str, list[SecurityRuleSpec]]:
    ids = sorted(set(group_ids))
    result: dict[str, list[SecurityRuleSpec]] = defaultdict(list)
    if ids:
        for r in await session.scalars(
            select(SecurityGroupRule)
            .where(SecurityGroupRule.security_group_id.in_(ids))
            .order_by(SecurityGroupRule.created_at, SecurityGroupRule.id)
        ):
            result[r.security_group_id].append(
                SecurityRuleSpec(
                    direction=r.direction,
                    ethertype=r.ethertype,
                    protocol=_protocol(r.protocol),
                    port_range_min=r.port_range_min,
                    port_range_max=r.port_range_max,
                    remote_ip_prefix=r.remote_ip_prefix,
                    remote_group_id=r.remote_group_id,
                )
            )
    return result


def port_rules(port: Port, rules: dict[str, list[SecurityRuleSpec]]) -> list[SecurityRuleSpec]:
    return [r for g in port.security_groups or [] for r in rules.get(g, [])]


async def remote_groups(session: AsyncSession, ports: Iterable[PortSpec]) -> dict[str, list[str]]:
    """{group id: member addresses} for every remote group the ports' rules name."""
    wanted = {r.remote_group_id for p in ports for r in p.security_rules if r.remote_group_id}
    if not wanted:
        return {}
    members: dict[str, set[str]] = {g: set() for g in wanted}
    # A group's members are ports of its own project: read only those projects' ports.
    projects = select(SecurityGroup.project_id).where(SecurityGroup.id.in_(wanted))
    rows = await session.execute(
        select(Port.security_groups, IpAllocation.ip_address)
        .join(IpAllocation, IpAllocation.port_id == Port.id)
        .where(Port.project_id.in_(projects))
    )
    for groups, ip in rows:
        for g in set(groups or []) & wanted:
            members[g].add(ip)
    return {g: sorted(ips) for g, ips in members.items()}


async def networks_with_groups(session: AsyncSession, network_ids: Iterable[str]) -> set[str]:
    """The networks (of ``network_ids``) with a port in a security group: their hosts' rule
    sets may name remote groups, whose members change when ports come and go."""
    rows = await session.execute(
        select(Port.network_id, Port.security_groups).where(Port.network_id.in_(list(network_ids))))
    return {net for net, groups in rows if groups}


async def networks_admitting_members_of(session: AsyncSession, network_ids: Iterable[str]) -> set[str]:
    """Networks with bound ports whose rules name, as remote group, a group that has ports on
    ``network_ids``: when those networks' members change, so do these networks' member sets
    (a group spans its project's networks)."""
    nets = list(network_ids)
    if not nets:
        return set()
    # The groups a joining or leaving port may be in: those of the projects using these networks
    # (a port that just left is gone from the table, its project's groups are not).
    projects = set(await session.scalars(select(Network.project_id).where(Network.id.in_(nets))))
    projects |= set(await session.scalars(select(Port.project_id).distinct().where(
        Port.network_id.in_(nets), Port.project_id != "")))
    groups = select(SecurityGroup.id).where(SecurityGroup.project_id.in_(projects))
    referring = set(await session.scalars(select(SecurityGroupRule.security_group_id).distinct().where(
        SecurityGroupRule.remote_group_id.in_(groups))))
    if not referring:
        return set()
    projects = select(SecurityGroup.project_id).where(SecurityGroup.id.in_(referring))
    rows = await session.execute(select(Port.network_id, Port.security_groups).where(
        Port.project_id.in_(projects), Port.binding_host_id != ""))
    return {net for net, value in rows if set(value or []) & referring}
