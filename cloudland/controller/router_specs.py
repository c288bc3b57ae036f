"""Distributed routers in network specs: what one host needs to realise a router.

A host realises router R when it has ports on a network where R has an interface. It then gets,
in each such network's spec, a ``RouterSpec``: R's interface there (the same MAC and gateway
addresses on every host), static neighbours for every port behind it, and R's router-wide
parts: static routes, SNAT, the floating IPs of this host's ports, and this host's own gateway
port on the external network (bound here, allocated on first use: every host that realises R
has its own external address, so SNAT and floating IPs never cross hosts).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Select, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.bus.messages import (
    FloatingIpSpec,
    NeighborSpec,
    RouterGatewaySpec,
    RouterInterfaceSpec,
    RouterSpec,
)
from cloudland.controller.columns import OneOf, per_dialect
from cloudland.db.models import (
    ROUTER_INTERFACE,
    ROUTER_INTERFACE_OWNERS,
    FloatingIp,
    IpAllocation,
    Network,
    Port,
    Router,
    Subnet,
)

# The predicate of ``ix_ports_router_interfaces``, as the planner can match it.
IS_INTERFACE = text(ROUTER_INTERFACE)
GATEWAY_OWNER = "network:router_gateway"
DHCP_OWNER = "network:dhcp"


def host_mac(host: str, router_id: str) -> str:
    """Per (host, router) MAC for routed frames leaving over the overlay (Neutron's DVR MAC):
    locally administered, so never a Neutron port's fa:16:3e:…."""
    digest = hashlib.sha256(f"{host}/{router_id}".encode()).digest()
    return "fa:16:3f:" + ":".join(f"{b:02x}" for b in digest[:3])


Address = tuple[str, str, str | None]  # ip, cidr, IPv6 RA mode (None: v4 or no RA)


async def _addresses(session: AsyncSession, port_ids: list[str]) -> dict[str, list[Address]]:
    result: dict[str, list[Address]] = defaultdict(list)
    if port_ids:
        rows = await session.execute(
            select(IpAllocation.port_id, IpAllocation.ip_address, Subnet.cidr, Subnet.ip_version,
                   Subnet.ipv6_ra_mode, Subnet.ipv6_address_mode)
            .join(Subnet, Subnet.id == IpAllocation.subnet_id).where(IpAllocation.port_id.in_(port_ids))
            .order_by(IpAllocation.port_id, Subnet.ip_version, IpAllocation.ip_address))
        for port_id, ip, cidr, version, ra_mode, address_mode in rows:
            mode = (address_mode or ra_mode) if version == 6 and ra_mode else None
            result[port_id].append((ip, cidr, mode))
    return result


def _with_prefix(ip: str, cidr: str) -> str:
    return f"{ip}/{ipaddress.ip_network(cidr).prefixlen}"


class GatewayBindings:
    """Gateway ports bound (or allocated) while building: their hosts need the external network."""

    def __init__(self) -> None:
        self.new: set[tuple[str, str]] = set()  # (host, external network)


async def _gateway_port(session: AsyncSession, router: Router, host: str, external: Network,
                        bindings: GatewayBindings) -> Port:
    ports = list(await session.scalars(
        select(Port).where(Port.device_id == router.id, Port.device_owner == GATEWAY_OWNER,
                           Port.network_id == external.id).order_by(Port.created_at, Port.id)))
    mine = next((p for p in ports if p.binding_host_id == host), None)
    if mine is not None:
        return mine
    free = next((p for p in ports if not p.binding_host_id), None)
    if free is None:
        from cloudland.api.network import ipam

        # Like the API's first gateway port: no project (users neither see nor count it).
        free = await ipam.create_port(session, network=external, project_id="",
                                      device_id=router.id, device_owner=GATEWAY_OWNER,
                                      attrs={"port_security_enabled": False})
    free.binding_host_id = host
    free.status = "ACTIVE"
    await session.flush()
    bindings.new.add((host, external.id))
    return free


async def router_specs(session: AsyncSession, pairs: Iterable[tuple[str, str]],
                       bindings: GatewayBindings) -> dict[tuple[str, str], list[RouterSpec]]:
    """RouterSpecs per (host, network). A host realises a router, with all its interfaces, when
    it has ports on any of the router's networks (Neutron DVR): routed traffic to a guest on
    another host goes over that guest's network from here, and the reply from that guest's
    own host's router."""
    pairs = list(pairs)
    pair_nets = sorted({n for _, n in pairs})
    if not pair_nets:
        return {}
    touching = select(Port.device_id).where(Port.network_id.in_(pair_nets), IS_INTERFACE)
    interfaces = list(await session.scalars(
        select(Port).where(Port.device_id.in_(touching), IS_INTERFACE)))
    if not interfaces:
        return {}
    routers = {r.id: r for r in await session.scalars(
        select(Router).where(Router.id.in_({p.device_id for p in interfaces})))}
    router_nets: dict[str, set[str]] = defaultdict(set)
    for p in interfaces:
        router_nets[p.device_id].add(p.network_id)
    nets_with_router = {p.network_id for p in interfaces}
    # Every port behind the routers: columns only (no ORM objects, no JSON decoded).
    members = (await session.execute(
        select(Port.id, Port.network_id, Port.binding_host_id, Port.mac_address)
        .where(Port.network_id.in_(nets_with_router), Port.device_owner.not_in(
            (*ROUTER_INTERFACE_OWNERS, DHCP_OWNER, GATEWAY_OWNER))))).all()
    hosts_on: dict[str, set[str]] = defaultdict(set)
    for _, net, host, _ in members:
        if host:
            hosts_on[net].add(host)
    realising = {r: {h for n in nets for h in hosts_on[n]} for r, nets in router_nets.items()}
    addresses = await _addresses(session, [p.id for p in interfaces] + [m[0] for m in members])
    neighbors: dict[str, list[NeighborSpec]] = defaultdict(list)
    for port_id, net, _, mac in members:
        for ip, _, _ in addresses.get(port_id, []):
            neighbors[net].append(NeighborSpec(ip=ip, mac=mac))
    networks = {n.id: n for n in await session.scalars(select(Network).where(
        Network.id.in_(nets_with_router | {r.external_network_id for r in routers.values()
                                           if r.external_network_id})))}
    ext_gateways: dict[str, list[str]] = defaultdict(list)
    for s in await session.scalars(select(Subnet).where(Subnet.network_id.in_(
            [r.external_network_id for r in routers.values() if r.external_network_id]))):
        if s.gateway_ip:
            ext_gateways[s.network_id].append(s.gateway_ip)
    fips: dict[str, list[FloatingIp]] = defaultdict(list)
    for fip in await session.scalars(select(FloatingIp).where(
            FloatingIp.router_id.in_(list(routers)), FloatingIp.port_id.is_not(None))):
        fips[fip.router_id or ""].append(fip)
    # A floating IP lives on the host of its port, whichever network that port is on.
    fip_ports = sorted({f.port_id for fs in fips.values() for f in fs if f.port_id})
    host_of = dict((await session.execute(select(Port.id, Port.binding_host_id).where(
        Port.id.in_(fip_ports)))).tuples().all()) if fip_ports else {}

    result: dict[tuple[str, str], list[RouterSpec]] = defaultdict(list)
    gateways: dict[tuple[str, str], RouterGatewaySpec] = {}
    for host, net_id in sorted(pairs):
        for iface in sorted((p for p in interfaces if p.network_id == net_id), key=lambda p: p.id):
            router = routers.get(iface.device_id)
            network = networks.get(net_id)
            if router is None or network is None or not router.admin_state_up \
                    or host not in realising.get(router.id, ()):
                continue
            if iface.status != "ACTIVE":  # realised on a host: Neutron shows DVR interfaces ACTIVE
                iface.status = "ACTIVE"
            gateway = None
            external = networks.get(router.external_network_id or "")
            if external is not None:
                key = (host, router.id)
                if key not in gateways:
                    port = await _gateway_port(session, router, host, external, bindings)
                    addrs = (await _addresses(session, [port.id])).get(port.id, [])
                    gateways[key] = RouterGatewaySpec(
                        port_id=port.id, network_id=external.id, mac_address=port.mac_address,
                        addresses=[_with_prefix(ip, cidr) for ip, cidr, _ in addrs],
                        gateway_ips=sorted(ext_gateways.get(external.id, [])), mtu=external.mtu)
                gateway = gateways[key]
            result[(host, net_id)].append(RouterSpec(
                id=router.id,
                interface=RouterInterfaceSpec(
                    port_id=iface.id, network_id=net_id, mac_address=iface.mac_address, mtu=network.mtu,
                    addresses=[_with_prefix(ip, cidr) for ip, cidr, _ in addresses.get(iface.id, [])],
                    ra_prefixes={cidr: mode for _, cidr, mode in addresses.get(iface.id, []) if mode}),
                neighbors=sorted(neighbors.get(net_id, []), key=lambda n: n.ip),
                gateway=gateway, enable_snat=router.enable_snat,
                routes=[dict(r) for r in router.routes or []],
                floating_ips=sorted((FloatingIpSpec(floating_ip=f.floating_ip_address,
                                                    fixed_ip=f.fixed_ip_address or "")
                                     for f in fips.get(router.id, [])
                                     if host_of.get(f.port_id or "") == host and f.fixed_ip_address),
                                    key=lambda f: f.floating_ip),
                host_mac=host_mac(host, router.id)))
    return result


_ports = Port.__table__


@per_dialect
def _with_routers_stmt(one_of: OneOf) -> Select[Any]:
    return select(_ports.c.network_id).distinct().where(one_of(_ports.c.network_id, "nets"), IS_INTERFACE)


@per_dialect
def _linked_stmt(one_of: OneOf) -> Select[Any]:
    """(router, network) of every interface of the routers with an interface on the networks."""
    touching = select(_ports.c.device_id).where(one_of(_ports.c.network_id, "nets"), IS_INTERFACE)
    return (select(_ports.c.device_id, _ports.c.network_id)
            .where(_ports.c.device_id.in_(touching), IS_INTERFACE))


async def networks_with_routers(session: AsyncSession, network_ids: Iterable[str]) -> set[str]:
    """Networks (of ``network_ids``) with a router interface: every member host's router holds
    static neighbours for all ports, so membership changes need full specs."""
    nets = list(network_ids)
    if not nets:
        return set()
    return set(await session.scalars(_with_routers_stmt(session), {"nets": nets}))


async def release_gateways(session: AsyncSession) -> set[tuple[str, str]]:
    """Unbind gateway ports from hosts that no longer realise their router (no port of theirs
    behind it); keep one unbound port per router for the next host, delete the others.
    Returns the (host, external network) pairs that changed."""
    gateways = list(await session.scalars(select(Port).where(
        Port.device_owner == GATEWAY_OWNER).order_by(Port.created_at, Port.id)))
    if not gateways:
        return set()
    routers = {p.device_id for p in gateways}
    iface_nets: dict[str, set[str]] = defaultdict(set)
    for router_id, net in await session.execute(select(Port.device_id, Port.network_id).where(
            Port.device_id.in_(routers), IS_INTERFACE)):
        iface_nets[router_id].add(net)
    all_nets = {n for nets in iface_nets.values() for n in nets}
    hosts_on: dict[str, set[str]] = defaultdict(set)
    if all_nets:
        for net, host in await session.execute(select(Port.network_id, Port.binding_host_id).distinct().where(
                Port.network_id.in_(all_nets), Port.binding_host_id != "",
                Port.device_owner.not_in((*ROUTER_INTERFACE_OWNERS, DHCP_OWNER, GATEWAY_OWNER)))):
            hosts_on[net].add(host)
    changed: set[tuple[str, str]] = set()
    spare: set[str] = set()  # routers that kept an unbound port
    from cloudland.api.network import ipam

    for port in gateways:
        router_id, host = port.device_id, port.binding_host_id
        if host and any(host in hosts_on[n] for n in iface_nets[router_id]):
            continue
        if host:
            changed.add((host, port.network_id))
        if router_id in spare:
            await ipam.delete_port(session, port.id)
        else:
            spare.add(router_id)
            port.binding_host_id = ""
            port.status = "DOWN"
    return changed


async def linked_networks(session: AsyncSession, network_ids: Iterable[str]) -> dict[str, set[str]]:
    """{network: the other networks a router joins it to}, for networks with router interfaces."""
    nets = list(network_ids)
    if not nets:
        return {}
    by_router: dict[str, set[str]] = defaultdict(set)
    for router_id, net in await session.execute(_linked_stmt(session), {"nets": nets}):
        by_router[router_id].add(net)
    result: dict[str, set[str]] = defaultdict(set)
    for joined in by_router.values():
        for net in joined:
            result[net] |= joined - {net}
    return dict(result)
