"""Neutron floating IPs: /v2.0/floatingips (address on an external network, NAT to a fixed IP)."""

from __future__ import annotations

import ipaddress
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.context import RequestContext, require_context
from cloudland.api.deps import get_db, wake_controller
from cloudland.api.errors import ApiError, forbidden
from cloudland.api.network import access, ipam
from cloudland.api.network.query import (
    Attr,
    apply_filters,
    apply_sort_and_page,
    list_body,
    parse_list_params,
    select_fields,
)
from cloudland.api.network.router_rules import (
    FLOATINGIP_OWNER,
    bad_floatingip,
    bump,
    check_quota,
    create_service_port,
    floatingip_views,
    get_floatingip,
    internal_network_ids,
    router_for_fixed_ip,
)
from cloudland.api.network.tags import tag_filter
from cloudland.api.network.validation import as_str, check_project, invalid, read_body
from cloudland.api.policy import require_write
from cloudland.db.models import FloatingIp, Port, Subnet, new_id

router = APIRouter()

UPDATABLE = {"port_id", "fixed_ip_address", "description", "qos_policy_id"}
CREATABLE = UPDATABLE | {
    "floating_network_id",
    "floating_ip_address",
    "subnet_id",
    "project_id",
    "tenant_id",
    "dns_domain",
    "dns_name",
}

F = FloatingIp
ATTRS = {
    "id": Attr(F.id),
    "floating_ip_address": Attr(F.floating_ip_address),
    "floating_network_id": Attr(F.floating_network_id),
    "router_id": Attr(F.router_id, sortable=False),
    "port_id": Attr(F.port_id, sortable=False),
    "fixed_ip_address": Attr(F.fixed_ip_address, sortable=False),
    "status": Attr(F.status),
    "description": Attr(F.description),
    "project_id": Attr(F.project_id),
    "tenant_id": Attr(F.project_id),
    "revision_number": Attr(F.revision_number, int),
    "created_at": Attr(F.created_at),
    "updated_at": Attr(F.updated_at),
}


async def _view(session: AsyncSession, fip: FloatingIp) -> dict[str, Any]:
    return (await floatingip_views(session, [fip]))[0]


@router.get("/floatingips")
async def list_floatingips(
    request: Request, ctx: RequestContext = Depends(require_context), session: AsyncSession = Depends(get_db)
) -> dict[str, Any]:
    params = parse_list_params(request)
    stmt = select(F)
    if not ctx.is_admin:
        stmt = stmt.where(F.project_id == ctx.project_id)
    # ``port_id=`` (empty) / ``fixed_ip_address=`` mean "not associated", as in Neutron's null filters.
    for key in ("port_id", "router_id", "fixed_ip_address"):
        if params.filters.get(key) == [""]:
            stmt = stmt.where(ATTRS[key].column.is_(None))
            del params.filters[key]
    stmt = apply_filters(stmt, params, ATTRS, admin=ctx.is_admin)
    if (tagged := tag_filter(F.tags, params)) is not None:
        stmt = stmt.where(tagged)
    marker = await get_floatingip(session, ctx, params.marker) if params.marker else None
    fips = list(await session.scalars(apply_sort_and_page(stmt, params, ATTRS, F.id, marker)))
    return list_body(request, "floatingips", await floatingip_views(session, fips), params)


@router.get("/floatingips/{floatingip_id}")
async def show_floatingip(
    floatingip_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> dict[str, Any]:
    fip = await get_floatingip(session, ctx, floatingip_id)
    return {"floatingip": select_fields(await _view(session, fip), parse_list_params(request).fields)}


def _check_unsupported(attrs: dict[str, Any]) -> None:
    if attrs.get("qos_policy_id") is not None:
        raise invalid("QoS policies are not supported.", "InvalidInput")
    for key in ("dns_domain", "dns_name"):
        if attrs.get(key):
            raise invalid(f"{key} is not supported (no DNS integration).", "InvalidInput")


async def _associate(
    session: AsyncSession, ctx: RequestContext, fip: FloatingIp, port_id: Any, fixed_ip: Any
) -> set[str]:
    """Point ``fip`` at ``port_id`` (and one of its IPv4 addresses) through a router that joins the
    port's subnet to the floating network. Returns the networks whose data plane changes."""
    port = await access.get_port(session, ctx, as_str(port_id, "port_id", 36))
    if port.project_id != fip.project_id:
        raise bad_floatingip(
            f"Cannot create floating IP and bind it to Port {port.id}, since that port is "
            "owned by a different tenant"
        )
    if port.device_owner.startswith("network:"):
        raise bad_floatingip(f"Port {port.id} is owned by {port.device_owner} and cannot have a floating IP")
    ips = (await ipam.port_fixed_ips(session, [port.id]))[port.id]
    v4 = [ip for ip in ips if ipaddress.ip_address(ip["ip_address"]).version == 4]
    if fixed_ip is not None:
        try:
            wanted = str(ipaddress.ip_address(as_str(fixed_ip, "fixed_ip_address", 64)))
        except ValueError:
            raise invalid(
                f"Invalid input for fixed_ip_address. Reason: '{fixed_ip}' is not a valid IP address."
            )
        chosen = [ip for ip in ips if ip["ip_address"] == wanted]
        if not chosen:
            raise bad_floatingip(f"Port {port.id} does not have fixed ip {wanted}")
        if ipaddress.ip_address(wanted).version != 4:
            raise bad_floatingip(
                f"Cannot process floating IP association with {wanted}, since that is not an IPv4 address"
            )
        entry = chosen[0]
    elif not v4:
        raise bad_floatingip(f"Cannot add floating IP to port {port.id} that has no fixed IPv4 addresses")
    elif len(v4) > 1:
        raise bad_floatingip(
            f"Port {port.id} has multiple fixed IPv4 addresses.  Must provide a specific "
            "IPv4 address when assigning a floating IP"
        )
    else:
        entry = v4[0]
    taken = await session.scalar(
        select(F)
        .where(F.port_id == port.id, F.fixed_ip_address == entry["ip_address"], F.id != fip.id)
        .limit(1)
    )
    if taken is not None:
        raise ApiError(
            409,
            f"Cannot associate floating IP {fip.floating_ip_address} ({fip.id}) with port "
            f"{port.id} using fixed IP {entry['ip_address']}, as that fixed IP already has a "
            f"floating IP on external network {taken.floating_network_id}.",
            "FloatingIPPortAlreadyAssociated",
        )
    router_id = await router_for_fixed_ip(session, fip.floating_network_id, entry["subnet_id"])
    if router_id is None:
        raise ApiError(
            404,
            f"External network {fip.floating_network_id} is not reachable from subnet "
            f"{entry['subnet_id']}.  Therefore, cannot associate Port {port.id} with a Floating IP.",
            "ExternalGatewayForFloatingIPNotFound",
        )
    networks = await _affected(session, fip)
    fip.port_id, fip.fixed_ip_address, fip.router_id, fip.status = (
        port.id,
        entry["ip_address"],
        router_id,
        "ACTIVE",
    )
    return networks | await _affected(session, fip)


async def _affected(session: AsyncSession, fip: FloatingIp) -> set[str]:
    """Networks whose hosts realise ``fip``'s current association (none when not associated)."""
    if not fip.port_id or not fip.router_id:
        return set()
    networks = await internal_network_ids(session, fip.router_id)
    port_network = await session.scalar(select(Port.network_id).where(Port.id == fip.port_id))
    return networks | ({port_network} if port_network else set())


async def _disassociate(session: AsyncSession, fip: FloatingIp) -> set[str]:
    networks = await _affected(session, fip)
    fip.port_id = fip.fixed_ip_address = fip.router_id = None
    fip.status = "DOWN"
    return networks


@router.post("/floatingips", status_code=201)
async def create_floatingip(
    request: Request, ctx: RequestContext = Depends(require_context), session: AsyncSession = Depends(get_db)
) -> dict[str, Any]:
    require_write(ctx)
    attrs = await read_body(request, "floatingip", CREATABLE)
    _check_unsupported(attrs)
    if not attrs.get("floating_network_id"):
        raise invalid("Failed to parse request. Required attribute 'floating_network_id' not specified")
    net = await access.get_network(
        session, ctx, as_str(attrs["floating_network_id"], "floating_network_id", 36)
    )
    if not net.external:
        raise bad_floatingip(f"Network {net.id} is not a valid external network")
    project_id = check_project(ctx.project_id, ctx.is_admin, attrs)
    fixed: dict[str, Any] = {}
    if attrs.get("floating_ip_address") is not None:
        if not ctx.is_admin:
            raise forbidden("(rule:create_floatingip:floating_ip_address) is disallowed by policy")
        fixed["ip_address"] = as_str(attrs["floating_ip_address"], "floating_ip_address", 64)
    if attrs.get("subnet_id") is not None:
        subnet_id = as_str(attrs["subnet_id"], "subnet_id", 36)
        subnet = await session.get(Subnet, subnet_id)
        if subnet is None or subnet.network_id != net.id:
            raise bad_floatingip(f"Subnet {subnet_id} is not on external network {net.id}")
        if subnet.ip_version != 4:
            raise bad_floatingip(f"Subnet {subnet_id} is not an IPv4 subnet")
        fixed["subnet_id"] = subnet_id
    if attrs.get("fixed_ip_address") is not None and attrs.get("port_id") is None:
        raise invalid("fixed_ip_address cannot be specified without a port_id")
    await check_quota(session, "floatingip", project_id)
    fip_id = new_id()
    port = await create_service_port(
        session, net, fip_id, FLOATINGIP_OWNER, [fixed] if fixed else None, "floatingip"
    )
    address = (await ipam.port_fixed_ips(session, [port.id]))[port.id][0]["ip_address"]
    if ipaddress.ip_address(address).version != 4:
        raise bad_floatingip(f"{address} is not an IPv4 address")
    fip = FloatingIp(
        id=fip_id,
        project_id=project_id,
        floating_network_id=net.id,
        floating_ip_address=address,
        floating_port_id=port.id,
        status="DOWN",
        tags=[],
        description=as_str(attrs.get("description"), "description", 255),
    )
    session.add(fip)
    await session.flush()
    networks: set[str] = set()
    if attrs.get("port_id") is not None:
        networks = await _associate(session, ctx, fip, attrs["port_id"], attrs.get("fixed_ip_address"))
    await session.commit()
    if networks:
        await wake_controller(request, [], sorted(networks))
    return {"floatingip": await _view(session, fip)}


@router.put("/floatingips/{floatingip_id}")
async def update_floatingip(
    floatingip_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> dict[str, Any]:
    require_write(ctx)
    fip = await get_floatingip(session, ctx, floatingip_id)
    attrs = await read_body(request, "floatingip", CREATABLE)
    read_only = sorted(set(attrs) - UPDATABLE)
    if read_only:
        raise invalid(f"Cannot update read-only attribute {read_only[0]}")
    _check_unsupported(attrs)
    networks: set[str] = set()
    if "description" in attrs:
        fip.description = as_str(attrs["description"], "description", 255)
    if "port_id" in attrs:
        if attrs["port_id"] is None:
            if attrs.get("fixed_ip_address") is not None:
                raise invalid("fixed_ip_address cannot be specified without a port_id")
            networks = await _disassociate(session, fip)
        else:
            networks = await _associate(session, ctx, fip, attrs["port_id"], attrs.get("fixed_ip_address"))
    elif attrs.get("fixed_ip_address") is not None:
        if not fip.port_id:
            raise invalid("fixed_ip_address cannot be specified without a port_id")
        networks = await _associate(session, ctx, fip, fip.port_id, attrs["fixed_ip_address"])
    bump(fip)
    await session.commit()
    if networks:
        await wake_controller(request, [], sorted(networks))
    return {"floatingip": await _view(session, fip)}


@router.delete("/floatingips/{floatingip_id}", status_code=204)
async def delete_floatingip(
    floatingip_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> Response:
    require_write(ctx)
    fip = await get_floatingip(session, ctx, floatingip_id)
    networks = await _disassociate(session, fip)
    await ipam.delete_port(session, fip.floating_port_id)
    await session.delete(fip)
    await session.commit()
    if networks:
        await wake_controller(request, [], sorted(networks))
    return Response(status_code=204)
