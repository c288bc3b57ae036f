"""The network's DHCP port: one per network, one address per DHCP-enabled subnet.

Agents serve DHCP from these addresses (the same on every hypervisor), so the port is kept
in step with the subnets whenever a subnet is created, updated or deleted.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.network import ipam
from cloudland.api.network.render import DHCP_OWNER
from cloudland.db.models import IpAllocation, Network, Port


async def dhcp_port(session: AsyncSession, network_id: str) -> Port | None:
    return await session.scalar(select(Port).where(Port.network_id == network_id,
                                                   Port.device_owner == DHCP_OWNER).limit(1))


async def sync_dhcp_port(session: AsyncSession, network: Network) -> None:
    subnets = [s for s in await ipam.network_subnets(session, network.id) if s.enable_dhcp]
    port = await dhcp_port(session, network.id)
    if not subnets:
        if port is not None:
            await ipam.delete_port(session, port.id)
        return
    if port is None:
        await ipam.create_port(session, network=network, project_id=network.project_id,
                               device_id=f"dhcp{network.id}", device_owner=DHCP_OWNER,
                               fixed_ips=[{"subnet_id": s.id} for s in subnets])
        return
    allocations = list(await session.scalars(select(IpAllocation).where(IpAllocation.port_id == port.id)))
    wanted = {s.id for s in subnets}
    held = set()
    for allocation in allocations:
        if allocation.subnet_id in wanted and allocation.subnet_id not in held:
            held.add(allocation.subnet_id)
        else:
            await session.delete(allocation)
    await session.flush()
    for subnet in subnets:
        if subnet.id not in held:
            await ipam.allocate(session, port, subnet)
