"""Ready-made networks of a fresh all-in-one: the demo project's ``demo-net`` (so a server can
boot at once) and, in the dev/test topology, the admin's external network ``public``."""

from __future__ import annotations

import ipaddress

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cloudland.api.network import subnet_rules
from cloudland.api.network.dhcp import sync_dhcp_port
from cloudland.api.network.routes_networks import MAX_MTU, _lowest_free_vni
from cloudland.db.models import Network, Subnet

NETWORK_NAME = "demo-net"
SUBNET_NAME = "demo-subnet"
CIDR = "10.0.0.0/24"
GATEWAY = "10.0.0.1"


async def bootstrap_demo_network(sessionmaker: async_sessionmaker[AsyncSession], project_id: str) -> str:
    """Create ``demo-net`` with ``demo-subnet`` in ``project_id`` unless it exists; return its id."""
    async with sessionmaker() as session:
        net = await session.scalar(select(Network).where(Network.project_id == project_id,
                                                         Network.name == NETWORK_NAME).limit(1))
        if net is None:
            net = Network(name=NETWORK_NAME, project_id=project_id, network_type="vxlan",
                          segmentation_id=await _lowest_free_vni(session), mtu=MAX_MTU["vxlan"])
            session.add(net)
            await session.flush()
        has_subnet = await session.scalar(select(Subnet.id).where(Subnet.network_id == net.id).limit(1))
        if has_subnet is None:
            cidr = subnet_rules.parse_cidr(CIDR, 4)
            session.add(Subnet(network_id=net.id, project_id=project_id, name=SUBNET_NAME, ip_version=4,
                               cidr=CIDR, gateway_ip=GATEWAY, enable_dhcp=True, dns_nameservers=[],
                               allocation_pools=subnet_rules.default_pools(cidr, GATEWAY)))
            await session.flush()
            await sync_dhcp_port(session, net)
        await session.commit()
        return net.id


PUBLIC_NAME = "public"
PUBLIC_SUBNET_NAME = "public-subnet"
PUBLIC_PHYSICAL_NETWORK = "public"


async def bootstrap_public_network(sessionmaker: async_sessionmaker[AsyncSession],
                                   outside: ipaddress.IPv4Interface,
                                   outside6: ipaddress.IPv6Interface | None = None) -> str:
    """The admin project's ``public`` (router:external, flat on physical network ``public``)
    with the outside host as its subnet's gateway; created once."""
    from cloudland.db.models import Project

    async with sessionmaker() as session:
        admin = await session.scalar(select(Project.id).where(Project.name == "admin").limit(1))
        assert admin is not None, "identity bootstrap creates the admin project first"
        net = await session.scalar(select(Network).where(Network.external.is_(True),
                                                         Network.name == PUBLIC_NAME).limit(1))
        if net is None:
            net = Network(name=PUBLIC_NAME, project_id=admin, network_type="flat", segmentation_id=None,
                          physical_network=PUBLIC_PHYSICAL_NETWORK, external=True, shared=False, mtu=1500)
            session.add(net)
            await session.flush()
        has_subnet = await session.scalar(select(Subnet.id).where(Subnet.network_id == net.id).limit(1))
        if has_subnet is None:
            cidr = outside.network
            pools = [{"start": str(cidr[10]), "end": str(cidr[-2])}]
            session.add(Subnet(network_id=net.id, project_id=admin, name=PUBLIC_SUBNET_NAME, ip_version=4,
                               cidr=str(cidr), gateway_ip=str(outside.ip), enable_dhcp=False,
                               dns_nameservers=[], allocation_pools=pools))
            if outside6 is not None:
                cidr6 = outside6.network
                session.add(Subnet(network_id=net.id, project_id=admin, name=f"{PUBLIC_SUBNET_NAME}-v6",
                                   ip_version=6, cidr=str(cidr6), gateway_ip=str(outside6.ip),
                                   enable_dhcp=False, dns_nameservers=[],
                                   allocation_pools=[{"start": str(cidr6[16]), "end": str(cidr6[-2])}]))
        await session.commit()
        return net.id
