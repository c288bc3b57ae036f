"""Security group rules: Neutron's validation, normalization, duplicates and default groups."""

from __future__ import annotations

import ipaddress
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.errors import ApiError
from cloudland.api.network.validation import as_int, as_str, invalid
from cloudland.db.models import DefaultSecurityGroup, SecurityGroup, SecurityGroupRule

PROTOCOLS = {
    "tcp": 6,
    "udp": 17,
    "icmp": 1,
    "ipv6-icmp": 58,
    "icmpv6": 58,
    "sctp": 132,
    "ah": 51,
    "dccp": 33,
    "egp": 8,
    "esp": 50,
    "gre": 47,
    "igmp": 2,
    "ipip": 4,
    "ipv6-encap": 41,
    "ospf": 89,
    "pgm": 113,
    "rsvp": 46,
    "udplite": 136,
    "vrrp": 112,
}
PORTED = {6, 17, 132, 33, 136}
ICMP = {1, 58}
DIRECTIONS = ("ingress", "egress")
ETHERTYPES = ("IPv4", "IPv6")


def group_not_found(group_id: str) -> ApiError:
    return ApiError(404, f"Security group {group_id} does not exist", "SecurityGroupNotFound")


def rule_not_found(rule_id: str) -> ApiError:
    return ApiError(404, f"Security group rule {rule_id} does not exist", "SecurityGroupRuleNotFound")


def protocol_number(protocol: str | None) -> int | None:
    """``tcp`` / ``6`` → 6; None or ``any`` → None."""
    if protocol is None:
        return None
    if protocol.isdigit():
        return int(protocol)
    return PROTOCOLS[protocol]


def _protocol(value: Any) -> str | None:
    if value is None or value == "" or (isinstance(value, str) and value.lower() == "any"):
        return None
    text = str(value).lower() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if text in PROTOCOLS or (text.isdigit() and 0 <= int(text) <= 255):
        return text
    raise invalid(
        f"Security group rule protocol {value} not supported. Only protocol values "
        f"{sorted(PROTOCOLS)} and integer representations [0 to 255] are supported.",
        "SecurityGroupRuleInvalidProtocol",
    )


def _port(value: Any, name: str) -> int | None:
    return None if value is None else as_int(value, name, 0, 65535)


def _check_ports(number: int | None, low: int | None, high: int | None) -> None:
    if low is None and high is None:
        return
    if number is None:
        raise invalid(
            "Must also specify protocol if port range is given.", "SecurityGroupProtocolRequiredWithPorts"
        )
    if number in ICMP:
        for field, attr, value in (("type", "port_range_min", low), ("code", "port_range_max", high)):
            if value is not None and not 0 <= value <= 255:
                raise invalid(
                    f"Invalid value for ICMP {field} ({attr}) {value}. It must be 0 to 255.",
                    "SecurityGroupInvalidIcmpValue",
                )
        if low is None:
            raise invalid(
                f"ICMP code (port-range-max) {high} is provided but ICMP type (port-range-min) is missing.",
                "SecurityGroupMissingIcmpType",
            )
        return
    if number not in PORTED:
        raise invalid(
            f"Invalid protocol {number} for port range, only supported for TCP, UDP, UDPLITE, SCTP and DCCP.",
            "SecurityGroupInvalidProtocolForPortRange",
        )
    if low is None or high is None or not 1 <= low <= high <= 65535:
        raise invalid(
            "For TCP/UDP protocols, port_range_min must be <= port_range_max", "SecurityGroupInvalidPortRange"
        )


def _prefix(value: Any, ethertype: str) -> str | None:
    if value is None or value == "":
        return None
    try:
        net = ipaddress.ip_network(as_str(value, "remote_ip_prefix", 64), strict=False)
    except ValueError:
        raise invalid(f"Invalid input for remote_ip_prefix. Reason: '{value}' is not a valid IP subnet.")
    if f"IPv{net.version}" != ethertype:
        raise invalid(
            f"Conflicting value ethertype {ethertype} for CIDR {value}", "SecurityGroupRuleParameterConflict"
        )
    return str(net)


def rule_values(attrs: dict[str, Any]) -> dict[str, Any]:
    """Validated column values of a new rule (without security_group_id/project_id)."""
    direction = attrs.get("direction")
    if direction not in DIRECTIONS:
        raise invalid(f"Invalid input for direction. Reason: '{direction}' is not in {list(DIRECTIONS)}.")
    ethertype = attrs.get("ethertype") or "IPv4"
    if ethertype not in ETHERTYPES:
        raise invalid(f"Invalid input for ethertype. Reason: '{ethertype}' is not in {list(ETHERTYPES)}.")
    protocol = _protocol(attrs.get("protocol"))
    number = protocol_number(protocol)
    if number == 58 and ethertype == "IPv4":
        raise invalid(
            f"Protocol {protocol} is not supported with ethertype {ethertype}.",
            "SecurityGroupEthertypeConflictWithProtocol",
        )
    low, high = (
        _port(attrs.get("port_range_min"), "port_range_min"),
        _port(attrs.get("port_range_max"), "port_range_max"),
    )
    _check_ports(number, low, high)
    if number in PORTED and low is not None and (low, high) == (1, 65535):
        low = high = None  # Neutron stores the full range as "any port"
    if attrs.get("remote_ip_prefix") and attrs.get("remote_group_id"):
        raise invalid(
            "Only remote_ip_prefix or remote_group_id may be provided.",
            "SecurityGroupRemoteGroupAndRemoteIpPrefix",
        )
    return {
        "direction": direction,
        "ethertype": ethertype,
        "protocol": protocol,
        "port_range_min": low,
        "port_range_max": high,
        "remote_ip_prefix": _prefix(attrs.get("remote_ip_prefix"), ethertype),
        "remote_group_id": as_str(attrs.get("remote_group_id"), "remote_group_id", 36) or None,
        "description": as_str(attrs.get("description"), "description", 255),
    }


def _key(values: dict[str, Any]) -> tuple[Any, ...]:
    prefix = values.get("remote_ip_prefix")
    if prefix in ("0.0.0.0/0", "::/0"):
        prefix = None
    return (
        values["direction"],
        values["ethertype"],
        protocol_number(values.get("protocol")),
        values.get("port_range_min"),
        values.get("port_range_max"),
        prefix,
        values.get("remote_group_id"),
    )


async def check_duplicate(session: AsyncSession, group_id: str, values: dict[str, Any]) -> None:
    key = _key(values)
    for rule in await session.scalars(
        select(SecurityGroupRule).where(SecurityGroupRule.security_group_id == group_id)
    ):
        if _key(rule.__dict__) == key:
            raise ApiError(
                409, f"Security group rule already exists. Rule id is {rule.id}.", "SecurityGroupRuleExists"
            )


def default_rules(group: SecurityGroup, *, is_default: bool) -> list[SecurityGroupRule]:
    """Egress anywhere; the default group also admits ingress from its own members."""
    rules = []
    for ethertype in ETHERTYPES:
        rules.append(
            SecurityGroupRule(
                security_group_id=group.id,
                project_id=group.project_id,
                direction="egress",
                ethertype=ethertype,
                description="",
            )
        )
        if is_default:
            rules.append(
                SecurityGroupRule(
                    security_group_id=group.id,
                    project_id=group.project_id,
                    direction="ingress",
                    ethertype=ethertype,
                    remote_group_id=group.id,
                    description="",
                )
            )
    return rules


async def ensure_default_group(session: AsyncSession, project_id: str) -> str:
    """The project's ``default`` group id, created (with its rules) on first use, in a savepoint
    of the caller's transaction (the caller commits)."""
    found = await session.get(DefaultSecurityGroup, project_id)
    if found is not None:
        return found.security_group_id
    try:
        async with session.begin_nested():
            group = SecurityGroup(project_id=project_id, name="default", description="Default security group")
            session.add(group)
            await session.flush()
            session.add(DefaultSecurityGroup(project_id=project_id, security_group_id=group.id))
            session.add_all(default_rules(group, is_default=True))
    except IntegrityError:  # created concurrently by another request
        found = await session.get(DefaultSecurityGroup, project_id, populate_existing=True)
        assert found is not None
        return found.security_group_id
    return group.id


async def resolve_groups(
    session: AsyncSession, project_id: str, refs: list[str], *, by_name: bool
) -> list[str]:
    """Group ids for ids (or, for Nova, names) in the project; unknown → SecurityGroupNotFound
    (404 for Neutron, and a 400 from Nova's caller)."""
    if (by_name and "default" in refs) or not refs:
        default_id = await ensure_default_group(session, project_id)
    groups = list(await session.scalars(select(SecurityGroup).where(SecurityGroup.project_id == project_id)))
    ids: list[str] = []
    for ref in refs:
        match = [g.id for g in groups if g.id == ref] or (
            [default_id]
            if by_name and ref == "default"
            else [g.id for g in groups if by_name and g.name == ref]
        )
        if not match:
            raise group_not_found(ref)
        if len(match) > 1:
            raise ApiError(
                409,
                f"Multiple security_group matches found for name '{ref}', use an ID to be more specific.",
                "NoUniqueMatch",
            )
        if match[0] not in ids:
            ids.append(match[0])
    return ids
