"""Build the specs commands carry (InstanceSpec, NetworkSpec) from the database, in batches.

One pass builds specs for many instances and (host, network) pairs with a fixed number of
queries, never one query per instance.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from sqlalchemy import and_, or_, select
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
from cloudland.db.models import Image, Instance, IpAllocation, Network, Port, Subnet

DHCP_OWNER = "network:dhcp"


async def _fixed_ips(session: AsyncSession, port_ids: list[str]) -> dict[str, list[FixedIp]]:
    result: dict[str, list[FixedIp]] = defaultdict(list)
    if not port_ids:
        return result
    rows = await session.execute(
        select(IpAllocation.port_id, IpAllocation.ip_address, Subnet.id, Subnet.cidr,
               Subnet.ip_version, Subnet.gateway_ip)
        .join(Subnet, Subnet.id == IpAllocation.subnet_id)
        .where(IpAllocation.port_id.in_(port_ids))
        .order_by(IpAllocation.port_id, Subnet.ip_version, IpAllocation.ip_address))
    for port_id, ip, subnet_id, cidr, version, gateway in rows:
        result[port_id].append(FixedIp(ip_address=ip, subnet_id=subnet_id, cidr=cidr,
                                       ip_version=version, gateway_ip=gateway))
    return result


def _port_spec(port: Port, network: Network, fixed: list[FixedIp],
               rules: dict[str, list[SecurityRuleSpec]]) -> PortSpec:
    secure = bool(port.port_security_enabled and port.device_owner != DHCP_OWNER)
    return PortSpec(port_id=port.id, network_id=network.id, mac_address=port.mac_address,
                    mtu=network.mtu, fixed_ips=fixed, network_type=network.network_type,
                    segmentation_id=network.segmentation_id, port_security=secure,
                    allowed_address_pairs=list(port.allowed_address_pairs or []) if secure else [],
                    security_rules=secgroups.port_rules(port, rules) if secure else [])


async def _port_specs(session: AsyncSession, where: object) -> list[tuple[Port, PortSpec]]:
    rows = list(await session.execute(
        select(Port, Network).join(Network, Network.id == Port.network_id).where(where)  # type: ignore[arg-type]
        .order_by(Port.created_at, Port.id)))
    fixed = await _fixed_ips(session, [p.id for p, _ in rows])
    rules = await secgroups.rules_of_groups(session, {g for p, _ in rows for g in p.security_groups or []})
    return [(p, _port_spec(p, n, fixed.get(p.id, []), rules)) for p, n in rows]


async def instance_ports(session: AsyncSession, instance_ids: Iterable[str]) -> dict[str, list[PortSpec]]:
    """{instance id: [PortSpec]} for many instances."""
    ids = list(instance_ids)
    result: dict[str, list[PortSpec]] = {i: [] for i in ids}
    if ids:
        for port, spec in await _port_specs(session, Port.device_id.in_(ids)):
            result.setdefault(port.device_id, []).append(spec)
    return result


async def image_refs(session: AsyncSession, config: Config, image_ids: Iterable[str]) -> dict[str, ImageRef]:
    from cloudland.api.internal import image_download_url

    ids = [i for i in set(image_ids) if i]
    if not ids:
        return {}
    images = await session.scalars(select(Image).where(Image.id.in_(ids)))
    return {img.id: ImageRef(id=img.id, url=image_download_url(config, img.id),
                             hash_algo=img.os_hash_algo or "sha512", hash_value=img.os_hash_value or "",
                             size=img.size or 0, disk_format=img.disk_format or "qcow2")
            for img in images}


def instance_spec(inst: Instance, ports: list[PortSpec], image: ImageRef | None) -> InstanceSpec:
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


async def networks_of_hosts(session: AsyncSession, host_ids: Iterable[str]) -> dict[str, set[str]]:
    """{host: networks it carries}: those it has ports bound on (DHCP ports are everywhere, so
    they do not count) and those a router joins to them (the host realises the router)."""
    hosts = list(host_ids)
    result: dict[str, set[str]] = {h: set() for h in hosts}
    if hosts:
        rows = await session.execute(
            select(Port.binding_host_id, Port.network_id).distinct()
            .where(Port.binding_host_id.in_(hosts), Port.device_owner != DHCP_OWNER))
        for host, net in rows:
            result[host].add(net)
        linked = await router_specs.linked_networks(session, {n for nets in result.values() for n in nets})
        for nets in result.values():
            nets |= {m for n in list(nets) for m in linked.get(n, ())}
    return result


async def hosts_of_networks(session: AsyncSession, network_ids: Iterable[str]) -> dict[str, set[str]]:
    """{network: hosts that carry it} (``networks_of_hosts`` the other way round)."""
    nets = list(network_ids)
    result: dict[str, set[str]] = {n: set() for n in nets}
    if nets:
        linked = await router_specs.linked_networks(session, nets)
        wanted = set(nets) | {m for n in nets for m in linked.get(n, ())}
        direct: dict[str, set[str]] = defaultdict(set)
        rows = await session.execute(
            select(Port.network_id, Port.binding_host_id).distinct()
            .where(Port.network_id.in_(wanted), Port.binding_host_id != "", Port.device_owner != DHCP_OWNER))
        for net, host in rows:
            direct[net].add(host)
        for net in nets:
            result[net] = direct[net] | {h for m in linked.get(net, ()) for h in direct[m]}
    return result


HostNetwork = tuple[str, str]


async def network_specs(session: AsyncSession, pairs: Iterable[HostNetwork],
                        peer_address: Callable[[str], str | None],
                        bindings: router_specs.GatewayBindings | None = None,
                        ) -> dict[HostNetwork, NetworkSpec | None]:
    """NetworkSpec per (host, network); None where the host has no port on it any more.

    ``peer_address`` gives the underlay address of an up host (None when down or unknown).
    Gateway ports bound to a host while building routers are added to ``bindings``: those
    hosts need the external network's spec too.
    """
    wanted = set(pairs)
    if not wanted:
        return {}
    net_ids = sorted({n for _, n in wanted})
    host_ids = sorted({h for h, _ in wanted})
    networks = {n.id: n for n in await session.scalars(select(Network).where(Network.id.in_(net_ids)))}
    subnets: dict[str, list[SubnetSpec]] = defaultdict(list)
    for s in await session.scalars(select(Subnet).where(Subnet.network_id.in_(net_ids))
                                   .order_by(Subnet.created_at, Subnet.id)):
        subnets[s.network_id].append(SubnetSpec(
            id=s.id, cidr=s.cidr, ip_version=s.ip_version, gateway_ip=s.gateway_ip,
            enable_dhcp=s.enable_dhcp, dns_nameservers=list(s.dns_nameservers or []),
            host_routes=list(s.host_routes or []), ipv6_ra_mode=s.ipv6_ra_mode,
            ipv6_address_mode=s.ipv6_address_mode))
    dhcp: dict[str, PortSpec] = {}
    local: dict[HostNetwork, list[PortSpec]] = defaultdict(list)
    for port, spec in await _port_specs(session, and_(
            Port.network_id.in_(net_ids),
            or_(Port.device_owner == DHCP_OWNER, Port.binding_host_id.in_(host_ids)))):
        if port.device_owner == DHCP_OWNER:
            dhcp.setdefault(port.network_id, spec)
        elif port.binding_host_id in host_ids:
            local[(port.binding_host_id, port.network_id)].append(spec)
    members = await hosts_of_networks(session, net_ids)
    # Addresses per network once (not per host: a network may span thousands of hosts).
    addresses = {net: sorted({a for h in hosts for a in [peer_address(h)] if a})
                 for net, hosts in members.items()}
    remote = await secgroups.remote_groups(session, [p for ports in local.values() for p in ports])
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
        result[(host, net_id)] = NetworkSpec(
            id=net_id, network_type=network.network_type, segmentation_id=network.segmentation_id,
            physical_network=network.physical_network, routers=routers.get((host, net_id), []),
            mtu=network.mtu, subnets=subnets.get(net_id, []), ports=local.get((host, net_id), []),
            dhcp_port=dhcp.get(net_id), peers=peers,
            remote_groups={g: remote[g] for p in local[(host, net_id)] for r in p.security_rules
                           if (g := r.remote_group_id)})
    return result
