"""Who sees and changes which network resources (Neutron's default policy).

Own project's resources, plus shared and external networks (and their subnets) for reading;
admin sees everything. Another project's private resource is "not found", never "forbidden".
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.context import RequestContext
from cloudland.api.errors import ApiError, forbidden
from cloudland.db.models import Network, Port, Subnet


def network_not_found(network_id: str) -> ApiError:
    return ApiError(404, f"Network {network_id} could not be found.", "NetworkNotFound")


def subnet_not_found(subnet_id: str) -> ApiError:
    return ApiError(404, f"Subnet {subnet_id} could not be found.", "SubnetNotFound")


def port_not_found(port_id: str) -> ApiError:
    return ApiError(404, f"Port {port_id} could not be found.", "PortNotFound")


def visible_networks(ctx: RequestContext) -> Any:
    """WHERE clause for networks the caller may read (None: no restriction)."""
    if ctx.is_admin:
        return None
    return or_(Network.project_id == ctx.project_id, Network.shared.is_(True), Network.external.is_(True))


def visible_subnets(ctx: RequestContext) -> Any:
    if ctx.is_admin:
        return None
    public = select(Network.id).where(or_(Network.shared.is_(True), Network.external.is_(True)))
    return or_(Subnet.project_id == ctx.project_id, Subnet.network_id.in_(public))


def visible_ports(ctx: RequestContext) -> Any:
    if ctx.is_admin:
        return None
    return Port.project_id == ctx.project_id


def network_readable(ctx: RequestContext, net: Network) -> bool:
    return ctx.is_admin or ctx.owns(net.project_id) or net.shared or net.external


async def get_network(session: AsyncSession, ctx: RequestContext, network_id: str) -> Network:
    net = await session.get(Network, network_id)
    if net is None or not network_readable(ctx, net):
        raise network_not_found(network_id)
    return net


def require_network_owner(ctx: RequestContext, net: Network) -> None:
    """Changing a network (or its subnets): admin or the owner; others who can see it get 403."""
    if not (ctx.is_admin or ctx.owns(net.project_id)):
        raise forbidden(f"Policy doesn't allow this operation on network {net.id} to be performed.")


async def get_subnet(session: AsyncSession, ctx: RequestContext, subnet_id: str) -> tuple[Subnet, Network]:
    subnet = await session.get(Subnet, subnet_id)
    if subnet is None:
        raise subnet_not_found(subnet_id)
    net = await session.get(Network, subnet.network_id)
    if net is None or not (ctx.is_admin or ctx.owns(subnet.project_id) or net.shared or net.external):
        raise subnet_not_found(subnet_id)
    return subnet, net


async def get_port(session: AsyncSession, ctx: RequestContext, port_id: str) -> Port:
    port = await session.get(Port, port_id)
    if port is None or not (ctx.is_admin or ctx.owns(port.project_id)):
        raise port_not_found(port_id)
    return port
