"""The demo project's ready-made network, so a fresh all-in-one can boot a server at once."""

from __future__ import annotations

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
