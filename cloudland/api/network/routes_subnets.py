"""Neutron subnets: /v2.0/subnets."""

from __future__ import annotations

import ipaddress
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.context import RequestContext, require_context
from cloudland.api.deps import get_db
from cloudland.api.errors import ApiError
from cloudland.api.network import access, subnet_rules
from cloudland.api.network.dhcp import sync_dhcp_port
from cloudland.api.network.ipam import ROUTER_OWNERS
from cloudland.api.network.query import (
    Attr,
    apply_filters,
    apply_sort_and_page,
    list_body,
    parse_list_params,
    select_fields,
)
from cloudland.api.network.quotas import check_quota
from cloudland.api.network.render import DHCP_OWNER, subnet_view
from cloudland.api.network.tags import tag_filter
from cloudland.api.network.validation import as_bool, as_int, as_str, check_project, invalid, read_body
from cloudland.api.policy import require_write
from cloudland.db.models import IpAllocation, Port, Subnet

router = APIRouter()

UPDATABLE = {"name", "description", "gateway_ip", "enable_dhcp", "dns_nameservers", "host_routes",
             "allocation_pools"}
CREATABLE = UPDATABLE | {"network_id", "ip_version", "cidr", "ipv6_ra_mode", "ipv6_address_mode",
                         "subnetpool_id", "use_default_subnetpool", "prefixlen", "segment_id",
                         "service_types", "project_id", "tenant_id"}

ATTRS = {
    "id": Attr(Subnet.id),
    "name": Attr(Subnet.name),
    "description": Attr(Subnet.description),
    "network_id": Attr(Subnet.network_id),
    "project_id": Attr(Subnet.project_id),
    "tenant_id": Attr(Subnet.project_id),
    "ip_version": Attr(Subnet.ip_version, int),
    "cidr": Attr(Subnet.cidr),
    "gateway_ip": Attr(Subnet.gateway_ip, sortable=False),
    "enable_dhcp": Attr(Subnet.enable_dhcp, bool),
    "ipv6_ra_mode": Attr(Subnet.ipv6_ra_mode, sortable=False),
    "ipv6_address_mode": Attr(Subnet.ipv6_address_mode, sortable=False),
    "revision_number": Attr(Subnet.revision_number, int),
    "created_at": Attr(Subnet.created_at),
    "updated_at": Attr(Subnet.updated_at),
}


@router.get("/subnets")
async def list_subnets(request: Request, ctx: RequestContext = Depends(require_context),
                       session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    params = parse_list_params(request)
    stmt = select(Subnet)
    if (clause := access.visible_subnets(ctx)) is not None:
        stmt = stmt.where(clause)
    stmt = apply_filters(stmt, params, ATTRS, admin=ctx.is_admin)
    if (tagged := tag_filter(Subnet.tags, params)) is not None:
        stmt = stmt.where(tagged)
    marker = (await access.get_subnet(session, ctx, params.marker))[0] if params.marker else None
    subnets = await session.scalars(apply_sort_and_page(stmt, params, ATTRS, Subnet.id, marker))
    return list_body(request, "subnets", [subnet_view(s) for s in subnets], params)


@router.get("/subnets/{subnet_id}")
async def show_subnet(subnet_id: str, request: Request, ctx: RequestContext = Depends(require_context),
                      session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    subnet, _ = await access.get_subnet(session, ctx, subnet_id)
    return {"subnet": select_fields(subnet_view(subnet), parse_list_params(request).fields)}


def _check_unsupported(attrs: dict[str, Any]) -> None:
    if attrs.get("subnetpool_id") is not None or attrs.get("use_default_subnetpool"):
        raise invalid("Subnet pools are not supported.", "InvalidInput")
    if attrs.get("prefixlen") is not None:
        raise invalid("prefixlen is only valid with a subnet pool.", "InvalidInput")
    if attrs.get("segment_id") is not None or attrs.get("service_types"):
        raise invalid("Routed network segments and service types are not supported.", "InvalidInput")


@router.post("/subnets", status_code=201)
async def create_subnet(request: Request, ctx: RequestContext = Depends(require_context),
                        session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    require_write(ctx)
    attrs = await read_body(request, "subnet", CREATABLE)
    _check_unsupported(attrs)
    if not attrs.get("network_id"):
        raise invalid("Failed to parse request. Required attribute 'network_id' not specified")
    if attrs.get("cidr") is None:
        raise invalid("Failed to parse request. Required attribute 'cidr' not specified")
    net = await access.get_network(session, ctx, as_str(attrs["network_id"], "network_id", 36))
    access.require_network_owner(ctx, net)
    project_id = check_project(ctx.project_id, ctx.is_admin, attrs)
    ip_version = as_int(attrs.get("ip_version", 4), "ip_version", 4, 6)
    if ip_version not in (4, 6):
        raise invalid(f"Invalid input for ip_version. Reason: '{ip_version}' is not in [4, 6].")
    cidr = subnet_rules.parse_cidr(attrs["cidr"], ip_version)
    ra_mode, address_mode = attrs.get("ipv6_ra_mode"), attrs.get("ipv6_address_mode")
    subnet_rules.check_ipv6_modes(cidr, ra_mode, address_mode)
    for other in await session.scalars(select(Subnet).where(Subnet.network_id == net.id)):
        if ipaddress.ip_network(other.cidr).overlaps(cidr):
            raise invalid(f"Invalid input for operation: Requested subnet with cidr: {cidr} for network: "
                          f"{net.id} overlaps with another subnet.", "InvalidInput")
    if "gateway_ip" in attrs:
        gateway = subnet_rules.check_gateway(cidr, attrs["gateway_ip"])
    else:
        gateway = str(cidr.network_address + 1)
    if attrs.get("allocation_pools"):
        pools = subnet_rules.check_pools(cidr, attrs["allocation_pools"], gateway)
    else:
        pools = subnet_rules.default_pools(cidr, gateway)
    await check_quota(session, "subnet", project_id)
    subnet = Subnet(
        network_id=net.id, project_id=project_id, name=as_str(attrs.get("name"), "name"),
        description=as_str(attrs.get("description"), "description", 1024), ip_version=ip_version,
        cidr=str(cidr), gateway_ip=gateway, allocation_pools=pools,
        enable_dhcp=as_bool(attrs.get("enable_dhcp", True), "enable_dhcp"),
        dns_nameservers=subnet_rules.check_dns(attrs.get("dns_nameservers")),
        host_routes=subnet_rules.check_host_routes(attrs.get("host_routes"), ip_version),
        ipv6_ra_mode=ra_mode, ipv6_address_mode=address_mode,
    )
    session.add(subnet)
    net.revision_number = (net.revision_number or 0) + 1
    await session.flush()
    if subnet.enable_dhcp:
        await sync_dhcp_port(session, net)
    await session.commit()
    return {"subnet": subnet_view(subnet)}


async def _check_new_gateway(session: AsyncSession, subnet: Subnet, gateway: str | None) -> None:
    if gateway is None or gateway == subnet.gateway_ip:
        return
    holder = await session.scalar(
        select(Port.device_owner).join(IpAllocation, IpAllocation.port_id == Port.id)
        .where(IpAllocation.subnet_id == subnet.id, IpAllocation.ip_address == gateway))
    if holder is not None and holder not in ROUTER_OWNERS:
        raise ApiError(409, f"Gateway IP {gateway} in use by a port. Unable to update subnet {subnet.id}.",
                       "GatewayIpInUse")


@router.put("/subnets/{subnet_id}")
async def update_subnet(subnet_id: str, request: Request, ctx: RequestContext = Depends(require_context),
                        session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    require_write(ctx)
    subnet, net = await access.get_subnet(session, ctx, subnet_id)
    access.require_network_owner(ctx, net)
    attrs = await read_body(request, "subnet", CREATABLE)
    read_only = sorted(set(attrs) - UPDATABLE)
    if read_only:
        raise invalid(f"Cannot update read-only attribute {read_only[0]}")
    cidr = ipaddress.ip_network(subnet.cidr)
    gateway = subnet.gateway_ip
    if "gateway_ip" in attrs:
        gateway = subnet_rules.check_gateway(cidr, attrs["gateway_ip"])
        await _check_new_gateway(session, subnet, gateway)
    if "allocation_pools" in attrs:
        subnet.allocation_pools = subnet_rules.check_pools(cidr, attrs["allocation_pools"], gateway)
    elif gateway != subnet.gateway_ip:
        subnet_rules.check_pools(cidr, subnet.allocation_pools, gateway)
    subnet.gateway_ip = gateway
    if "name" in attrs:
        subnet.name = as_str(attrs["name"], "name")
    if "description" in attrs:
        subnet.description = as_str(attrs["description"], "description", 1024)
    if "dns_nameservers" in attrs:
        subnet.dns_nameservers = subnet_rules.check_dns(attrs["dns_nameservers"])
    if "host_routes" in attrs:
        subnet.host_routes = subnet_rules.check_host_routes(attrs["host_routes"], subnet.ip_version)
    dhcp_changed = False
    if "enable_dhcp" in attrs:
        enable = as_bool(attrs["enable_dhcp"], "enable_dhcp")
        dhcp_changed = enable != subnet.enable_dhcp
        subnet.enable_dhcp = enable
    subnet.revision_number = (subnet.revision_number or 0) + 1
    await session.flush()
    if dhcp_changed:
        await sync_dhcp_port(session, net)
    await session.commit()
    return {"subnet": subnet_view(subnet)}


@router.delete("/subnets/{subnet_id}", status_code=204)
async def delete_subnet(subnet_id: str, ctx: RequestContext = Depends(require_context),
                        session: AsyncSession = Depends(get_db)) -> Response:
    require_write(ctx)
    subnet, net = await access.get_subnet(session, ctx, subnet_id)
    if not (ctx.is_admin or ctx.owns(subnet.project_id)):
        access.require_network_owner(ctx, net)
    in_use = await session.scalar(
        select(func.count()).select_from(IpAllocation).join(Port, IpAllocation.port_id == Port.id)
        .where(IpAllocation.subnet_id == subnet.id, Port.device_owner != DHCP_OWNER))
    if in_use:
        raise ApiError(409, f"Unable to complete operation on subnet {subnet.id}: One or more ports have an "
                       "IP allocation from this subnet.", "SubnetInUse")
    await session.execute(delete(IpAllocation).where(IpAllocation.subnet_id == subnet.id))
    await session.delete(subnet)
    net.revision_number = (net.revision_number or 0) + 1
    await session.flush()
    await sync_dhcp_port(session, net)
    await session.commit()
    return Response(status_code=204)
