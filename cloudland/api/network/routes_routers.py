"""Neutron routers: /v2.0/routers, interfaces, gateways and extra routes (all distributed)."""

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
from cloudland.api.network.quotas import check_quota as check_port_quota
from cloudland.api.network.router_rules import (
    GATEWAY_OWNER,
    INTERFACE_OWNER,
    bad_router,
    bump,
    check_quota,
    check_routes_reachable,
    create_service_port,
    gateway_ports,
    get_router,
    interface_subnets,
    internal_network_ids,
    parse_routes,
    router_views,
)
from cloudland.api.network.tags import tag_filter
from cloudland.api.network.validation import (
    as_bool,
    as_dict,
    as_list,
    as_str,
    check_project,
    invalid,
    read_body,
)
from cloudland.api.policy import require_write
from cloudland.db.models import FloatingIp, IpAllocation, Network, Port, Router, Subnet, new_id

router = APIRouter()

UPDATABLE = {"name", "description", "admin_state_up", "external_gateway_info", "routes", "distributed", "ha"}
CREATABLE = (UPDATABLE - {"routes"}) | {"project_id", "tenant_id", "availability_zone_hints", "flavor_id"}
GATEWAY_KEYS = {"network_id", "enable_snat", "external_fixed_ips", "qos_policy_id"}

ATTRS = {
    "id": Attr(Router.id),
    "name": Attr(Router.name),
    "description": Attr(Router.description),
    "project_id": Attr(Router.project_id),
    "tenant_id": Attr(Router.project_id),
    "status": Attr(Router.status),
    "admin_state_up": Attr(Router.admin_state_up, bool),
    "revision_number": Attr(Router.revision_number, int),
    "created_at": Attr(Router.created_at),
    "updated_at": Attr(Router.updated_at),
}


async def _view(session: AsyncSession, r: Router) -> dict[str, Any]:
    return (await router_views(session, [r]))[0]


async def _wake(
    request: Request, session: AsyncSession, router_id: str, also: set[str] | None = None
) -> None:
    networks = await internal_network_ids(session, router_id) | (also or set())
    await wake_controller(request, [], sorted(networks))


@router.get("/routers")
async def list_routers(
    request: Request, ctx: RequestContext = Depends(require_context), session: AsyncSession = Depends(get_db)
) -> dict[str, Any]:
    params = parse_list_params(request)
    stmt = select(Router)
    if not ctx.is_admin:
        stmt = stmt.where(Router.project_id == ctx.project_id)
    stmt = apply_filters(stmt, params, ATTRS, admin=ctx.is_admin)
    if (tagged := tag_filter(Router.tags, params)) is not None:
        stmt = stmt.where(tagged)
    for key, wanted in (("distributed", True), ("ha", False)):
        if key in params.filters and any(as_bool(v, key) != wanted for v in params.filters[key]):
            return list_body(request, "routers", [], params)
    marker = await get_router(session, ctx, params.marker) if params.marker else None
    routers = list(await session.scalars(apply_sort_and_page(stmt, params, ATTRS, Router.id, marker)))
    return list_body(request, "routers", await router_views(session, routers), params)


@router.get("/routers/{router_id}")
async def show_router(
    router_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> dict[str, Any]:
    r = await get_router(session, ctx, router_id)
    return {"router": select_fields(await _view(session, r), parse_list_params(request).fields)}


def _check_flags(ctx: RequestContext, attrs: dict[str, Any], creating: bool) -> None:
    """Every router is distributed and none is HA; only admins may even ask (Neutron's policy)."""
    verb = "create" if creating else "update"
    for key, supported in (("distributed", True), ("ha", False)):
        if attrs.get(key) is None:
            continue
        if not ctx.is_admin:
            raise forbidden(f"(rule:{verb}_router:{key}) is disallowed by policy")
        if as_bool(attrs[key], key) != supported:
            raise invalid(
                f"Invalid input for operation: {key}={not supported} routers are not supported.",
                "InvalidInput",
            )
    if creating:
        hints = as_list(attrs.get("availability_zone_hints"), "availability_zone_hints")
        if any(h != "nova" for h in hints):
            raise ApiError(
                404, f"AvailabilityZone {hints[0]} could not be found.", "AvailabilityZoneNotFound"
            )
        if attrs.get("flavor_id") is not None:
            raise invalid("Router flavors are not supported.", "InvalidInput")


def _parse_gateway(ctx: RequestContext, value: Any, verb: str) -> dict[str, Any] | None:
    """``external_gateway_info``: None or {} clears it; else network_id (+ enable_snat, fixed IPs)."""
    if value is None or value == {}:
        return None
    info = as_dict(value, "external_gateway_info")
    unknown = sorted(set(info) - GATEWAY_KEYS)
    if unknown:
        raise invalid(
            f"Invalid input for external_gateway_info. Reason: Unexpected keys supplied: "
            f"{', '.join(unknown)}."
        )
    if not info.get("network_id"):
        raise invalid("Invalid input for external_gateway_info. Reason: network_id is required.")
    if info.get("qos_policy_id") is not None:
        raise invalid("QoS policies are not supported.", "InvalidInput")
    parsed: dict[str, Any] = {"network_id": as_str(info["network_id"], "network_id", 36)}
    if info.get("enable_snat") is not None:
        parsed["enable_snat"] = as_bool(info["enable_snat"], "enable_snat")
        if not ctx.is_admin and not parsed["enable_snat"]:
            raise forbidden(f"(rule:{verb}_router:external_gateway_info:enable_snat) is disallowed by policy")
    if info.get("external_fixed_ips") is not None:
        fixed = as_list(info["external_fixed_ips"], "external_fixed_ips")
        for entry in fixed:
            if not isinstance(entry, dict) or not entry or set(entry) - {"subnet_id", "ip_address"}:
                raise invalid(
                    "Invalid input for external_fixed_ips: each entry needs subnet_id and/or ip_address."
                )
            if entry.get("ip_address") is not None and not ctx.is_admin:
                raise forbidden(
                    f"(rule:{verb}_router:external_gateway_info:external_fixed_ips) is disallowed by policy"
                )
        parsed["external_fixed_ips"] = fixed
    return parsed


async def _gateway_in_use(session: AsyncSession, r: Router) -> None:
    used = await session.scalar(select(FloatingIp.id).where(FloatingIp.router_id == r.id).limit(1))
    if used is not None:
        raise ApiError(
            409,
            f"Gateway cannot be updated for router {r.id}, since a gateway to external "
            f"network {r.external_network_id} is required by one or more floating IPs.",
            "RouterExternalGatewayInUseByFloatingIp",
        )


async def _set_gateway(
    session: AsyncSession, ctx: RequestContext, r: Router, info: dict[str, Any] | None
) -> bool:
    """Apply ``external_gateway_info``; True if the data plane is affected."""
    if info is None:
        if r.external_network_id is None:
            return False
        await _gateway_in_use(session, r)
        for port in await gateway_ports(session, [r.id]):
            await ipam.delete_port(session, port.id)
        r.external_network_id = None
        r.enable_snat = True
        return True
    net = await access.get_network(session, ctx, info["network_id"])
    if not net.external:
        raise bad_router(f"Network {net.id} is not an external network")
    snat = info.get("enable_snat", True)
    fixed_ips = info.get("external_fixed_ips")
    if r.external_network_id == net.id:
        changed = snat != r.enable_snat
        r.enable_snat = snat
        if fixed_ips:
            ports = await gateway_ports(session, [r.id])
            if ports:
                await ipam.replace_fixed_ips(session, ports[0], net, fixed_ips)
            else:
                await create_service_port(session, net, r.id, GATEWAY_OWNER, fixed_ips, "router")
            changed = True
        return changed
    if r.external_network_id is not None:
        await _gateway_in_use(session, r)
        for port in await gateway_ports(session, [r.id]):
            await ipam.delete_port(session, port.id)
    await create_service_port(session, net, r.id, GATEWAY_OWNER, fixed_ips, "router")
    r.external_network_id = net.id
    r.enable_snat = snat
    return True


@router.post("/routers", status_code=201)
async def create_router(
    request: Request, ctx: RequestContext = Depends(require_context), session: AsyncSession = Depends(get_db)
) -> dict[str, Any]:
    require_write(ctx)
    attrs = await read_body(request, "router", CREATABLE)
    _check_flags(ctx, attrs, creating=True)
    project_id = check_project(ctx.project_id, ctx.is_admin, attrs)
    gateway = _parse_gateway(ctx, attrs.get("external_gateway_info"), "create")
    await check_quota(session, "router", project_id)
    r = Router(
        id=new_id(),
        project_id=project_id,
        name=as_str(attrs.get("name"), "name"),
        description=as_str(attrs.get("description"), "description", 255),
        admin_state_up=as_bool(attrs.get("admin_state_up", True), "admin_state_up"),
        status="ACTIVE",
        enable_snat=True,
        routes=[],
        tags=[],
    )
    session.add(r)
    await session.flush()
    await _set_gateway(session, ctx, r, gateway)
    await session.commit()
    if gateway is not None:
        await wake_controller(request, [], [])
    return {"router": await _view(session, r)}


@router.put("/routers/{router_id}")
async def update_router(
    router_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> dict[str, Any]:
    require_write(ctx)
    r = await get_router(session, ctx, router_id)
    attrs = await read_body(request, "router", CREATABLE | {"routes"})
    read_only = sorted(set(attrs) - UPDATABLE)
    if read_only:
        raise invalid(f"Cannot update read-only attribute {read_only[0]}")
    _check_flags(ctx, attrs, creating=False)
    changed = False
    if "name" in attrs:
        r.name = as_str(attrs["name"], "name")
    if "description" in attrs:
        r.description = as_str(attrs["description"], "description", 255)
    if "admin_state_up" in attrs:
        up = as_bool(attrs["admin_state_up"], "admin_state_up")
        changed |= up != r.admin_state_up
        r.admin_state_up = up
    if "routes" in attrs:
        routes = parse_routes(attrs["routes"])
        check_routes_reachable(routes, await interface_subnets(session, r.id))
        changed |= routes != list(r.routes or [])
        r.routes = routes
    if "external_gateway_info" in attrs:
        changed |= await _set_gateway(
            session, ctx, r, _parse_gateway(ctx, attrs["external_gateway_info"], "update")
        )
    bump(r)
    await session.commit()
    if changed:
        await _wake(request, session, r.id)
    return {"router": await _view(session, r)}


async def _change_routes(
    request: Request, router_id: str, ctx: RequestContext, session: AsyncSession, adding: bool
) -> dict[str, Any]:
    """``add_extraroutes`` / ``remove_extraroutes`` (extraroute-atomic): change routes one by one."""
    require_write(ctx)
    r = await get_router(session, ctx, router_id)
    attrs = await read_body(request, "router", {"routes"})
    given = parse_routes(attrs.get("routes"))
    current = [dict(x) for x in r.routes or []]
    if adding:
        check_routes_reachable(given, await interface_subnets(session, r.id))
        routes = current + [x for x in given if x not in current]
        parse_routes(routes)  # the total must stay within the limit
    else:
        routes = [x for x in current if x not in given]
    if routes != current:
        r.routes = routes
        bump(r)
        await session.commit()
        await _wake(request, session, r.id)
    return {"router": await _view(session, r)}


@router.put("/routers/{router_id}/add_extraroutes")
async def add_extraroutes(
    router_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> dict[str, Any]:
    return await _change_routes(request, router_id, ctx, session, adding=True)


@router.put("/routers/{router_id}/remove_extraroutes")
async def remove_extraroutes(
    router_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> dict[str, Any]:
    return await _change_routes(request, router_id, ctx, session, adding=False)


@router.delete("/routers/{router_id}", status_code=204)
async def delete_router(
    router_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> Response:
    require_write(ctx)
    r = await get_router(session, ctx, router_id)
    has_ports = await session.scalar(
        select(Port.id).where(Port.device_id == r.id, Port.device_owner == INTERFACE_OWNER).limit(1)
    )
    has_fips = await session.scalar(select(FloatingIp.id).where(FloatingIp.router_id == r.id).limit(1))
    if has_ports is not None or has_fips is not None:
        raise ApiError(409, f"Router {r.id} still has ports", "RouterInUse")
    for port in await gateway_ports(session, [r.id]):
        await ipam.delete_port(session, port.id)
    await session.delete(r)
    await session.commit()
    await wake_controller(request, [], [])
    return Response(status_code=204)


# --- interfaces ---------------------------------------------------------------------------------


async def _interface_body(request: Request) -> tuple[str | None, str | None]:
    body = await request.json()
    if not isinstance(body, dict):
        raise bad_router("Either subnet_id or port_id must be specified")
    subnet_id, port_id = body.get("subnet_id"), body.get("port_id")
    subnet_id = as_str(subnet_id, "subnet_id", 36) or None
    port_id = as_str(port_id, "port_id", 36) or None
    return subnet_id, port_id


def _interface_info(r: Router, port: Port, subnet_ids: list[str]) -> dict[str, Any]:
    return {
        "id": r.id,
        "subnet_id": subnet_ids[0] if subnet_ids else None,
        "subnet_ids": subnet_ids,
        "port_id": port.id,
        "network_id": port.network_id,
        "project_id": r.project_id,
        "tenant_id": r.project_id,
    }


def _check_attachable(r: Router, subnet: Subnet, existing: list[tuple[Port, Subnet, str]]) -> None:
    cidr = ipaddress.ip_network(subnet.cidr)
    for _, other, _ in existing:
        if other.id == subnet.id:
            raise bad_router(f"Router already has a port on subnet {subnet.id}")
    for _, other, _ in existing:
        if ipaddress.ip_network(other.cidr).overlaps(cidr):
            raise bad_router(
                f"Cidr {subnet.cidr} of subnet {subnet.id} overlaps with cidr {other.cidr} of "
                f"subnet {other.id}"
            )


@router.put("/routers/{router_id}/add_router_interface")
async def add_router_interface(
    router_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> dict[str, Any]:
    require_write(ctx)
    r = await get_router(session, ctx, router_id)
    subnet_id, port_id = await _interface_body(request)
    if subnet_id and port_id:
        raise bad_router("Cannot specify both subnet-id and port-id")
    if not subnet_id and not port_id:
        raise bad_router("Either subnet_id or port_id must be specified")
    existing = await interface_subnets(session, r.id)
    if subnet_id:
        subnet, net = await access.get_subnet(session, ctx, subnet_id)
        if not ctx.is_admin and subnet.project_id != r.project_id:
            raise forbidden(f"(rule:add_router_interface) Subnet {subnet.id} belongs to another project.")
        if net.external:
            raise bad_router(
                f"Subnet {subnet.id} is on external network {net.id} and cannot be a router interface"
            )
        if not subnet.gateway_ip:
            raise bad_router("Subnet for router interface must have a gateway IP")
        _check_attachable(r, subnet, existing)
        await check_port_quota(session, "port", r.project_id)
        port = await ipam.create_port(
            session,
            network=net,
            project_id=r.project_id,
            device_id=r.id,
            device_owner=INTERFACE_OWNER,
            fixed_ips=[{"subnet_id": subnet.id, "ip_address": subnet.gateway_ip}],
        )
        subnet_ids = [subnet.id]
    else:
        assert port_id is not None
        port = await access.get_port(session, ctx, port_id)
        if port.device_id or port.device_owner:
            raise ApiError(
                409,
                f"Unable to complete operation on port {port.id} for network {port.network_id}. "
                f"Port already has an attached device {port.device_id or port.device_owner}.",
                "PortInUse",
            )
        ips = (await ipam.port_fixed_ips(session, [port.id]))[port.id]
        if not ips:
            raise bad_router("Router port must have at least one fixed IP")
        if len(ips) > 1:
            raise bad_router("Router port must have exactly one fixed IP")
        net = await session.get(Network, port.network_id)
        subnet = await session.get(Subnet, ips[0]["subnet_id"])
        if net is None or subnet is None:
            raise access.port_not_found(port.id)
        if net.external:
            raise bad_router(
                f"Port {port.id} is on external network {net.id} and cannot be a router interface"
            )
        _check_attachable(r, subnet, existing)
        port.device_id, port.device_owner = r.id, INTERFACE_OWNER
        port.security_groups = []
        port.revision_number = (port.revision_number or 0) + 1
        subnet_ids = [subnet.id]
    bump(r)
    info = _interface_info(r, port, subnet_ids)
    await session.commit()
    await _wake(request, session, r.id)
    return info


@router.put("/routers/{router_id}/remove_router_interface")
async def remove_router_interface(
    router_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> dict[str, Any]:
    require_write(ctx)
    r = await get_router(session, ctx, router_id)
    subnet_id, port_id = await _interface_body(request)
    if not subnet_id and not port_id:
        raise bad_router("Either subnet_id or port_id must be specified")
    existing = await interface_subnets(session, r.id)
    if port_id:
        found = [(p, s) for p, s, _ in existing if p.id == port_id]
        if not found:
            raise ApiError(
                404, f"Router {r.id} does not have an interface with id {port_id}", "RouterInterfaceNotFound"
            )
        if subnet_id and subnet_id not in {s.id for _, s in found}:
            raise ApiError(
                409,
                f"Subnet {subnet_id} does not match the subnet of port {port_id}",
                "SubnetMismatchForPort",
            )
    else:
        assert subnet_id is not None
        await access.get_subnet(session, ctx, subnet_id)
        found = [(p, s) for p, s, _ in existing if s.id == subnet_id]
        if not found:
            raise ApiError(
                404,
                f"Router {r.id} has no interface on subnet {subnet_id}",
                "RouterInterfaceNotFoundForSubnet",
            )
        port_id = found[0][0].id
    port = found[0][0]
    subnets = [s for p, s, _ in existing if p.id == port.id]
    for subnet in subnets:
        await _check_removable(session, r, subnet)
    info = _interface_info(r, port, [s.id for s in subnets])
    networks = await internal_network_ids(session, r.id)
    await ipam.delete_port(session, port.id)
    bump(r)
    await session.commit()
    await wake_controller(request, [], sorted(networks))
    return info


async def _check_removable(session: AsyncSession, r: Router, subnet: Subnet) -> None:
    used = await session.scalar(
        select(FloatingIp.id)
        .join(
            IpAllocation,
            (IpAllocation.port_id == FloatingIp.port_id)
            & (IpAllocation.ip_address == FloatingIp.fixed_ip_address),
        )
        .where(FloatingIp.router_id == r.id, IpAllocation.subnet_id == subnet.id)
        .limit(1)
    )
    if used is not None:
        raise ApiError(
            409,
            f"Router interface for subnet {subnet.id} on router {r.id} cannot be deleted, as it "
            "is required by one or more floating IPs.",
            "RouterInterfaceInUseByFloatingIP",
        )
    cidr = ipaddress.ip_network(subnet.cidr)
    for route in r.routes or []:
        if ipaddress.ip_address(route["nexthop"]) in cidr:
            raise ApiError(
                409,
                f"Router interface for subnet {subnet.id} on router {r.id} cannot be deleted, "
                "as it is required by one or more routes.",
                "RouterInterfaceInUseByRoute",
            )
