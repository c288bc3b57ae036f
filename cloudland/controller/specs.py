"""Build the specs commands carry (InstanceSpec, NetworkSpec) from the database, in batches.

One pass builds specs for many instances and (host, network) pairs with a fixed number of
queries, never one query per instance.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import Select, String, any_, bindparam, or_, select, tuple_
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.bus.messages import (
    FixedIp,
    ImageRef,
    InstanceSpec,
    NetworkSpec,
    PortSpec,
    SecurityRuleSpec,
    SubnetSpec,
)
from cloudland.config import Config
from cloudland.controller import router_specs, secgroups
from cloudland.controller.columns import OneOf, array_rows, json_text, json_value, on_postgresql, per_dialect
from cloudland.db.models import Image, Instance, IpAllocation, Network, Port, Subnet

if TYPE_CHECKING:
    from cloudland.controller.broadcast_sets import BroadcastSets
    from cloudland.controller.group_members import GroupMemberIndex
    from cloudland.controller.network_hosts import NetworkHostCache

DHCP_OWNER = "network:dhcp"

# Core statements of table columns, built once per dialect (``columns.per_dialect``): no ORM
# objects, and JSON read as text and decoded only where a spec uses it.
_ports = Port.__table__
_networks = Network.__table__
_subnets = Subnet.__table__
_allocations = IpAllocation.__table__
_instances = Instance.__table__
_images = Image.__table__


@per_dialect
def _fixed_ips_stmt(one_of: OneOf) -> Select[Any]:
    return (select(_allocations.c.port_id, _allocations.c.ip_address, _subnets.c.id, _subnets.c.cidr,
                   _subnets.c.ip_version, _subnets.c.gateway_ip)
            .join(_subnets, _subnets.c.id == _allocations.c.subnet_id)
            .where(one_of(_allocations.c.port_id, "port_ids"))
            .order_by(_allocations.c.port_id, _subnets.c.ip_version, _allocations.c.ip_address))


async def _fixed_ips(session: AsyncSession, port_ids: list[str]) -> dict[str, list[FixedIp]]:
    result: dict[str, list[FixedIp]] = defaultdict(list)
    if not port_ids:
        return result
    rows = await session.execute(_fixed_ips_stmt(session), {"port_ids": port_ids})
    for port_id, ip, subnet_id, cidr, version, gateway in rows:
        result[port_id].append(FixedIp(ip_address=ip, subnet_id=subnet_id, cidr=cidr,
                                       ip_version=version, gateway_ip=gateway))
    return result


class PortKey(NamedTuple):
    """What callers of ``_port_specs`` need of a port besides its spec."""

    device_id: str
    device_owner: str
    network_id: str
    binding_host_id: str


# A port with what its spec needs of its network (the JSON columns as text).
_PORT_COLUMNS = (_ports.c.id, _ports.c.network_id, _ports.c.mac_address, _ports.c.port_security_enabled,
                 _ports.c.device_owner, _ports.c.device_id, _ports.c.binding_host_id,
                 json_text(_ports.c.allowed_address_pairs), json_text(_ports.c.security_groups),
                 _networks.c.mtu, _networks.c.network_type, _networks.c.segmentation_id)


def _ports_select() -> Select[Any]:
    return select(*_PORT_COLUMNS).join(_networks, _networks.c.id == _ports.c.network_id)


@per_dialect
def _device_ports_stmt(one_of: OneOf) -> Select[Any]:
    return (_ports_select().where(one_of(_ports.c.device_id, "device_ids"))
            .order_by(_ports.c.created_at, _ports.c.id))


@cache
def _network_ports_built(pg: bool) -> Select[Any]:
    """The DHCP ports of the networks and the ports bound to the (host, network) pairs (not to
    any of the hosts on any of the networks: at size that was most of the rows read)."""
    bound = tuple_(_ports.c.binding_host_id, _ports.c.network_id)
    if pg:
        pairs = array_rows("p", {"host": String, "net": String})
        on_nets = _ports.c.network_id == any_(bindparam("net_ids", type_=postgresql.ARRAY(String)))
        in_pairs = bound.in_(select(pairs.c.host, pairs.c.net))
    else:
        on_nets = _ports.c.network_id.in_(bindparam("net_ids", expanding=True))
        in_pairs = bound.in_(bindparam("pairs", expanding=True))
    return (_ports_select().where(on_nets, or_(_ports.c.device_owner == DHCP_OWNER, in_pairs))
            .order_by(_ports.c.created_at, _ports.c.id))


def _network_ports(session: AsyncSession, net_ids: list[str],
                   pairs: list[tuple[str, str]]) -> tuple[Select[Any], dict[str, Any]]:
    """``_network_ports_built``'s statement for the session's database, and its parameters."""
    if on_postgresql(session):
        return _network_ports_built(True), {"net_ids": net_ids, "p_host": [h for h, _ in pairs],
                                            "p_net": [n for _, n in pairs]}
    return _network_ports_built(False), {"net_ids": net_ids, "pairs": pairs}


async def _port_specs(session: AsyncSession, statement: Select[Any],
                      params: dict[str, Any]) -> list[tuple[PortKey, PortSpec]]:
    rows = (await session.execute(statement, params)).all()
    fixed = await _fixed_ips(session, [r[0] for r in rows])
    groups_of = [json_value(r[8]) for r in rows]
    rules = await secgroups.rules_of_groups(session, {g for groups in groups_of for g in groups or []})
    result: list[tuple[PortKey, PortSpec]] = []
    rules_of: dict[str | None, list[SecurityRuleSpec]] = {}  # per group list: most ports share one
    for (port_id, net_id, mac, security, owner, device, host, pairs, groups_text, mtu, net_type, segment), \
            groups in zip(rows, groups_of, strict=True):
        secure = bool(security and owner != DHCP_OWNER)
        port_rules: list[SecurityRuleSpec] = []
        if secure:
            found = rules_of.get(groups_text)
            if found is None:
                found = rules_of[groups_text] = secgroups.port_rules(groups, rules)
            port_rules = list(found)
        result.append((PortKey(device, owner, net_id, host), PortSpec(
            port_id=port_id, network_id=net_id, mac_address=mac, mtu=mtu, fixed_ips=fixed.get(port_id, []),
            network_type=net_type, segmentation_id=segment, port_security=secure,
            allowed_address_pairs=list(json_value(pairs) or []) if secure else [],
            security_rules=port_rules)))
    return result


async def instance_ports(session: AsyncSession, instance_ids: Iterable[str]) -> dict[str, list[PortSpec]]:
    """{instance id: [PortSpec]} for many instances."""
    ids = list(instance_ids)
    result: dict[str, list[PortSpec]] = {i: [] for i in ids}
    if ids:
        await session.flush()  # Core selects do not autoflush: the caller's pending changes first
        for port, spec in await _port_specs(session, _device_ports_stmt(session), {"device_ids": ids}):
            result.setdefault(port.device_id, []).append(spec)
    return result


@per_dialect
def _images_stmt(one_of: OneOf) -> Select[Any]:
    return select(_images.c.id, _images.c.os_hash_algo, _images.c.os_hash_value, _images.c.size,
                  _images.c.disk_format).where(one_of(_images.c.id, "ids"))


async def image_refs(session: AsyncSession, config: Config, image_ids: Iterable[str]) -> dict[str, ImageRef]:
    from cloudland.api.internal import image_download_url

    ids = [i for i in set(image_ids) if i]
    if not ids:
        return {}
    rows = await session.execute(_images_stmt(session), {"ids": ids})
    return {image_id: ImageRef(id=image_id, url=image_download_url(config, image_id),
                               hash_algo=algo or "sha512", hash_value=value or "",
                               size=size or 0, disk_format=disk_format or "qcow2")
            for image_id, algo, value, size, disk_format in rows}


# What converge and ``instance_spec`` read of an instance (``InstanceRow``'s order).
INSTANCE_COLUMNS = (_instances.c.id, _instances.c.name, _instances.c.project_id, _instances.c.image_id,
                    _instances.c.host, _instances.c.vm_state, _instances.c.task_state,
                    _instances.c.desired_power, _instances.c.reboot_generation, _instances.c.deleted,
                    _instances.c.deleted_at, _instances.c.user_data, _instances.c.key_data,
                    _instances.c.config_drive, _instances.c.key_name, _instances.c.availability_zone,
                    json_text(_instances.c.flavor), json_text(_instances.c.metadata))


class InstanceRow:
    """An instance as converge and ``instance_spec`` read it: ``INSTANCE_COLUMNS`` of a Core row
    (no ORM object); ``flavor`` and ``metadata_`` are decoded when read."""

    __slots__ = ("_flavor", "_metadata", "availability_zone", "config_drive", "deleted", "deleted_at",
                 "desired_power", "host", "id", "image_id", "key_data", "key_name", "name", "project_id",
                 "reboot_generation", "task_state", "user_data", "vm_state")

    def __init__(self, row: Sequence[Any]) -> None:
        (self.id, self.name, self.project_id, self.image_id, self.host, self.vm_state, self.task_state,
         self.desired_power, self.reboot_generation, self.deleted, self.deleted_at, self.user_data,
         self.key_data, self.config_drive, self.key_name, self.availability_zone, self._flavor,
         self._metadata) = row

    @property
    def flavor(self) -> Any:
        return json_value(self._flavor)

    @property
    def metadata_(self) -> Any:
        return json_value(self._metadata)


def instance_spec(inst: Instance | InstanceRow, ports: list[PortSpec],
                  image: ImageRef | None) -> InstanceSpec:
    flavor = inst.flavor or {}
    power = "stopped" if inst.desired_power == "stopped" else "running"
    return InstanceSpec(
        id=inst.id, name=inst.name, project_id=inst.project_id,
        vcpus=int(flavor.get("vcpus", 1)), memory_mb=int(flavor.get("ram", 512)),
        disk_gb=int(flavor.get("disk", 0)), image=image, ports=ports, power=power,
        reboot_generation=inst.reboot_generation, reboot_hard=inst.task_state == "rebooting_hard",
        user_data=inst.user_data, key_data=inst.key_data,
        metadata={str(k): str(v) for k, v in (inst.metadata_ or {}).items()},
        config_drive=inst.config_drive, key_name=inst.key_name,
        availability_zone=inst.availability_zone or "nova")


@per_dialect
def _host_networks_stmt(one_of: OneOf) -> Select[Any]:
    return (select(_ports.c.binding_host_id, _ports.c.network_id).distinct()
            .where(one_of(_ports.c.binding_host_id, "hosts"), _ports.c.device_owner != DHCP_OWNER))


@per_dialect
def _network_hosts_stmt(one_of: OneOf) -> Select[Any]:
    return (select(_ports.c.network_id, _ports.c.binding_host_id).distinct()
            .where(one_of(_ports.c.network_id, "nets"), _ports.c.binding_host_id != "",
                   _ports.c.device_owner != DHCP_OWNER))


async def networks_of_hosts(session: AsyncSession, host_ids: Iterable[str]) -> dict[str, set[str]]:
    """{host: networks it carries}: those it has ports bound on (DHCP ports are everywhere, so
    they do not count) and those a router joins to them (the host realises the router)."""
    hosts = list(host_ids)
    result: dict[str, set[str]] = {h: set() for h in hosts}
    if hosts:
        await session.flush()
        rows = await session.execute(_host_networks_stmt(session), {"hosts": hosts})
        for host, net in rows:
            result[host].add(net)
        linked = await router_specs.linked_networks(session, {n for nets in result.values() for n in nets})
        for nets in result.values():
            nets |= {m for n in list(nets) for m in linked.get(n, ())}
    return result


async def hosts_of_networks(session: AsyncSession, network_ids: Iterable[str],
                            memo: dict[str, set[str]] | None = None,
                            cache: NetworkHostCache | None = None) -> dict[str, set[str]]:
    """{network: hosts that carry it} (``networks_of_hosts`` the other way round).

    ``memo``: networks already read in this transaction (not read again), and where the ones
    read now go: one pass asks for the members of mostly the same networks more than once.
    ``cache``: the controller's ``NetworkHostCache``: the networks' own hosts come from it
    where it has them, and the ones read go there."""
    asked = list(network_ids)
    known = {n: memo[n] for n in asked if n in memo} if memo is not None else {}
    nets = [n for n in asked if n not in known]
    result: dict[str, set[str]] = {n: set() for n in nets}
    if memo is not None:
        memo.update(result)  # filled in below (the same sets)
    if nets:
        await session.flush()
        linked = await router_specs.linked_networks(session, nets)
        wanted = set(nets) | {m for n in nets for m in linked.get(n, ())}
        direct: dict[str, set[str]] = defaultdict(set)
        if cache is not None:
            direct.update(cache.known(wanted))
        missing = sorted(wanted - direct.keys())
        if missing:
            since = cache.generation() if cache is not None else 0
            read: dict[str, set[str]] = {n: set() for n in missing}
            for net, host in await session.execute(_network_hosts_stmt(session), {"nets": missing}):
                read[net].add(host)
            direct.update(read)
            if cache is not None:
                cache.store(read, since)
        for net in nets:
            result[net].update(direct[net], *(direct[m] for m in linked.get(net, ())))
    return {**result, **known}


HostNetwork = tuple[str, str]


@per_dialect
def _networks_stmt(one_of: OneOf) -> Select[Any]:
    return select(_networks.c.id, _networks.c.network_type, _networks.c.segmentation_id,
                  _networks.c.physical_network, _networks.c.mtu).where(one_of(_networks.c.id, "net_ids"))


@per_dialect
def _subnets_stmt(one_of: OneOf) -> Select[Any]:
    return (select(_subnets.c.network_id, _subnets.c.id, _subnets.c.cidr, _subnets.c.ip_version,
                   _subnets.c.gateway_ip, _subnets.c.enable_dhcp, json_text(_subnets.c.dns_nameservers),
                   json_text(_subnets.c.host_routes), _subnets.c.ipv6_ra_mode, _subnets.c.ipv6_address_mode)
            .where(one_of(_subnets.c.network_id, "net_ids")).order_by(_subnets.c.created_at, _subnets.c.id))


async def network_specs(session: AsyncSession, pairs: Iterable[HostNetwork],
                        peer_address: Callable[[str], str | None],
                        bindings: router_specs.GatewayBindings | None = None,
                        member_index: GroupMemberIndex | None = None,
                        members_memo: dict[str, set[str]] | None = None,
                        host_cache: NetworkHostCache | None = None,
                        published_groups: BroadcastSets | None = None,
                        ) -> dict[HostNetwork, NetworkSpec | None]:
    """NetworkSpec per (host, network); None where the host has no port on it any more.

    ``peer_address`` gives the underlay address of an up host (None when down or unknown).
    Gateway ports bound to a host while building routers are added to ``bindings``: those
    hosts need the external network's spec too. Remote groups' members come from
    ``member_index`` when given, else from the database. ``members_memo``: as
    ``hosts_of_networks``' memo, ``host_cache`` its cache. ``published_groups``: member sets as
    the agents were told them; a spec names those by their version only (the agent has them, or
    asks for them once: a set of 10,000 addresses in every spec was 150 KB each), and only the
    groups never published are read.
    """
    wanted = set(pairs)
    if not wanted:
        return {}
    net_ids = sorted({n for _, n in wanted})
    host_ids = sorted({h for h, _ in wanted})
    await session.flush()
    networks = {row[0]: row for row in await session.execute(_networks_stmt(session), {"net_ids": net_ids})}
    subnets: dict[str, list[SubnetSpec]] = defaultdict(list)
    for net_id, subnet_id, cidr, version, gateway, dhcp_on, dns, routes, ra_mode, address_mode \
            in await session.execute(_subnets_stmt(session), {"net_ids": net_ids}):
        subnets[net_id].append(SubnetSpec(
            id=subnet_id, cidr=cidr, ip_version=version, gateway_ip=gateway, enable_dhcp=dhcp_on,
            dns_nameservers=list(json_value(dns) or []), host_routes=list(json_value(routes) or []),
            ipv6_ra_mode=ra_mode, ipv6_address_mode=address_mode))
    dhcp: dict[str, PortSpec] = {}
    local: dict[HostNetwork, list[PortSpec]] = defaultdict(list)
    hosts = set(host_ids)
    for port, spec in await _port_specs(session, *_network_ports(session, net_ids, sorted(wanted))):
        if port.device_owner == DHCP_OWNER:
            dhcp.setdefault(port.network_id, spec)
        elif port.binding_host_id in hosts:
            local[(port.binding_host_id, port.network_id)].append(spec)
    members = await hosts_of_networks(session, net_ids, members_memo, host_cache)
    # Addresses per network once (not per host: a network may span thousands of hosts).
    addresses = {net: sorted({a for h in hosts for a in [peer_address(h)] if a})
                 for net, hosts in members.items()}
    local_ports = [p for ports in local.values() for p in ports]
    if member_index is not None:
        named = secgroups.named_groups(local_ports)
        if published_groups is not None:
            named = {g for g in named if published_groups.version(g) is None}
        remote = await member_index.remote_groups(session, named)
    else:
        remote = await secgroups.remote_groups(session, local_ports)
    carried = [(h, n) for h, n in wanted if h in members.get(n, ())]
    routers = await router_specs.router_specs(session, carried, bindings or router_specs.GatewayBindings())
    result: dict[HostNetwork, NetworkSpec | None] = {}
    for host, net_id in wanted:
        network = networks.get(net_id)
        if network is None or host not in members.get(net_id, ()):
            result[(host, net_id)] = None
            continue
        own = peer_address(host) if host in members.get(net_id, ()) else None
        peers = [a for a in addresses.get(net_id, []) if a != own]
        _, network_type, segmentation_id, physical_network, mtu = network
        spec = result[(host, net_id)] = NetworkSpec(
            id=net_id, network_type=network_type, segmentation_id=segmentation_id,
            physical_network=physical_network, routers=routers.get((host, net_id), []),
            mtu=mtu, subnets=subnets.get(net_id, []), ports=local.get((host, net_id), []),
            dhcp_port=dhcp.get(net_id), peers=peers)
        for group in {g for p in local[(host, net_id)] for r in p.security_rules if (g := r.remote_group_id)}:
            if group in remote:
                spec.remote_groups[group] = remote[group]
            elif published_groups is not None and (told := published_groups.version(group)) is not None:
                spec.remote_group_versions[group] = told[1]
    return result
