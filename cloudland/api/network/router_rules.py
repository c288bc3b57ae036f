"""Routers and floating IPs: owners, errors, views and the queries both resources share.

A router's interfaces are ports with ``device_owner`` ``network:router_interface_distributed``
and ``device_id`` = router id; its gateway ports (one per hypervisor, the API creates the first
one unbound) are ``network:router_gateway`` ports on the external network. A floating IP's
address is held by a ``network:floatingip`` port whose ``device_id`` is the floating IP's id.
Gateway and floating IP ports belong to no project (``project_id`` ""), as in Neutron: they are
not the user's to see, count or delete.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.context import RequestContext
from cloudland.api.errors import ApiError
from cloudland.api.network import ipam
from cloudland.api.network.render import timestamp
from cloudland.api.network.validation import as_list, as_str, invalid
from cloudland.db.models import FloatingIp, IpAllocation, Network, Port, Router, Subnet

INTERFACE_OWNER = "network:router_interface_distributed"
GATEWAY_OWNER = "network:router_gateway"
FLOATINGIP_OWNER = "network:floatingip"
# Ports the port API must not delete: they go with their router / floating IP.
SERVICE_OWNERS = (*ipam.ROUTER_OWNERS, FLOATINGIP_OWNER)
SYSTEM_PROJECT = ""  # owner of gateway and floating IP ports
QUOTAS = {"router": (Router, 10), "floatingip": (FloatingIp, 50)}
MAX_ROUTES = 30  # Neutron's max_routes


# --- errors -------------------------------------------------------------------------------------


def router_not_found(router_id: str) -> ApiError:
    return ApiError(404, f"Router {router_id} could not be found", "RouterNotFound")


def floatingip_not_found(fip_id: str) -> ApiError:
    return ApiError(404, f"Floating IP {fip_id} could not be found", "FloatingIPNotFound")


def bad_router(message: str) -> ApiError:
    return ApiError(400, f"Bad router request: {message}.", "BadRequest")


def bad_floatingip(message: str) -> ApiError:
    return ApiError(400, f"Bad floatingip request: {message}.", "BadRequest")


def invalid_routes(routes: Any, reason: str) -> ApiError:
    return ApiError(400, f"Invalid format for routes: {routes}, {reason}", "InvalidRoutes")


# --- access and quotas --------------------------------------------------------------------------


async def get_router(session: AsyncSession, ctx: RequestContext, router_id: str) -> Router:
    router = await session.get(Router, router_id)
    if router is None or not (ctx.is_admin or ctx.owns(router.project_id)):
        raise router_not_found(router_id)
    return router


async def get_floatingip(session: AsyncSession, ctx: RequestContext, fip_id: str) -> FloatingIp:
    fip = await session.get(FloatingIp, fip_id)
    if fip is None or not (ctx.is_admin or ctx.owns(fip.project_id)):
        raise floatingip_not_found(fip_id)
    return fip


async def check_quota(session: AsyncSession, resource: str, project_id: str) -> None:
    model, limit = QUOTAS[resource]
    used = await session.scalar(select(func.count()).select_from(model).where(model.project_id == project_id))
    if (used or 0) + 1 > limit:
        raise ApiError(409, f"Quota exceeded for resources: ['{resource}'].", "OverQuota")


def bump(obj: Router | FloatingIp) -> None:
    obj.revision_number = (obj.revision_number or 0) + 1


# --- queries ------------------------------------------------------------------------------------


async def _router_ports(session: AsyncSession, router_ids: list[str], owner: str) -> list[Port]:
    if not router_ids:
        return []
    return list(await session.scalars(
        select(Port).where(Port.device_id.in_(router_ids), Port.device_owner == owner)
        .order_by(Port.created_at, Port.id)))


async def interface_ports(session: AsyncSession, router_ids: list[str]) -> list[Port]:
    return await _router_ports(session, router_ids, INTERFACE_OWNER)


async def gateway_ports(session: AsyncSession, router_ids: list[str]) -> list[Port]:
    return await _router_ports(session, router_ids, GATEWAY_OWNER)


async def interface_subnets(session: AsyncSession, router_id: str) -> list[tuple[Port, Subnet, str]]:
    """(interface port, subnet, the port's address on it) for every address of the router's interfaces."""
    rows = await session.execute(
        select(Port, Subnet, IpAllocation.ip_address)
        .join(IpAllocation, IpAllocation.port_id == Port.id)
        .join(Subnet, Subnet.id == IpAllocation.subnet_id)
        .where(Port.device_id == router_id, Port.device_owner == INTERFACE_OWNER)
        .order_by(Port.created_at, Port.id)
    )
    return [(port, subnet, ip) for port, subnet, ip in rows]


async def internal_network_ids(session: AsyncSession, router_id: str) -> set[str]:
    return set(
        await session.scalars(
            select(Port.network_id).where(Port.device_id == router_id, Port.device_owner == INTERFACE_OWNER)
        )
    )


async def router_for_fixed_ip(session: AsyncSession, external_network_id: str, subnet_id: str) -> str | None:
    """A router with a gateway on ``external_network_id`` and an interface on ``subnet_id``."""
    return await session.scalar(
        select(Router.id)
        .join(Port, (Port.device_id == Router.id) & (Port.device_owner == INTERFACE_OWNER))
        .join(IpAllocation, IpAllocation.port_id == Port.id)
        .where(Router.external_network_id == external_network_id, IpAllocation.subnet_id == subnet_id)
        .order_by(Router.created_at, Router.id)
        .limit(1)
    )


async def create_service_port(
    session: AsyncSession,
    network: Network,
    device_id: str,
    device_owner: str,
    fixed_ips: list[dict[str, Any]] | None,
    what: str,
) -> Port:
    """A system port on an external network: the requested ``fixed_ips``, else one IPv4 address
    (and, for a router gateway, one IPv6 address too when the network has IPv6: IPv6 is routed,
    not translated)."""
    if fixed_ips:
        return await ipam.create_port(
            session,
            network=network,
            project_id=SYSTEM_PROJECT,
            device_id=device_id,
            device_owner=device_owner,
            fixed_ips=fixed_ips,
        )
    subnets = [s for s in await ipam.network_subnets(session, network.id) if s.ip_version == 4]
    if not subnets:
        raise ApiError(
            400, f"Bad {what} request: Network {network.id} does not contain any IPv4 subnet.", "BadRequest"
        )
    port = await ipam.create_port(
        session,
        network=network,
        project_id=SYSTEM_PROJECT,
        device_id=device_id,
        device_owner=device_owner,
        fixed_ips=[],
    )
    await allocate_external(session, port, network, subnets)
    return port


async def allocate_external(session: AsyncSession, port: Port, network: Network, v4: list[Subnet]) -> None:
    """One IPv4 address from ``v4``; a gateway port also one IPv6 address if there is a subnet."""
    for subnet in v4:
        try:
            await ipam.allocate(session, port, subnet)
            break
        except ApiError as exc:
            if exc.kind != "IpAddressGenerationFailure":
                raise
    else:
        raise ipam.exhausted(network.id)
    if port.device_owner == GATEWAY_OWNER:
        for subnet in [s for s in await ipam.network_subnets(session, network.id) if s.ip_version == 6]:
            try:
                await ipam.allocate(session, port, subnet)
                break
            except ApiError as exc:
                if exc.kind != "IpAddressGenerationFailure":
                    raise


# --- validation ---------------------------------------------------------------------------------


def parse_routes(value: Any) -> list[dict[str, str]]:
    """``routes`` as given: a list of {destination, nexthop}; destination a CIDR, nexthop an address."""
    routes = as_list(value, "routes")
    if len(routes) > MAX_ROUTES:
        raise ApiError(
            400,
            f"Unable to complete operation for the router. The number of routes exceeds "
            f"the maximum {MAX_ROUTES}.",
            "RoutesExhausted",
        )
    out: list[dict[str, str]] = []
    for route in routes:
        if not isinstance(route, dict) or set(route) != {"destination", "nexthop"}:
            raise invalid(f"Invalid input for routes. Reason: Invalid data format for hostroute: '{route}'.")
        text = as_str(route["destination"], "destination", 64)
        try:
            destination = ipaddress.ip_network(text, strict=False)
            if "/" not in text:
                raise ValueError
        except ValueError:
            raise invalid(f"Invalid input for routes. Reason: '{text}' is not a valid IP subnet.")
        if destination.network_address != ipaddress.ip_address(text.split("/")[0]):
            raise invalid(
                f"Invalid input for routes. Reason: '{text}' isn't a recommended IP subnet, "
                f"'{destination}' is recommended."
            )
        try:
            nexthop = ipaddress.ip_address(as_str(route["nexthop"], "nexthop", 64))
        except ValueError:
            raise invalid(
                f"Invalid input for routes. Reason: '{route['nexthop']}' is not a valid IP address."
            )
        if destination.version != nexthop.version:
            raise invalid_routes(routes, "the nexthop and destination IP versions differ")
        entry = {"destination": str(destination), "nexthop": str(nexthop)}
        if entry not in out:
            out.append(entry)
    return out


def check_routes_reachable(routes: list[dict[str, str]], interfaces: list[tuple[Port, Subnet, str]]) -> None:
    """Every nexthop must be inside a subnet the router has an interface on, and not the router's own."""
    own = {ip for _, _, ip in interfaces}
    for route in routes:
        nexthop = ipaddress.ip_address(route["nexthop"])
        if route["nexthop"] in own:
            raise invalid_routes([route], "the nexthop is used by router")
        if not any(nexthop in ipaddress.ip_network(subnet.cidr) for _, subnet, _ in interfaces):
            raise invalid_routes([route], "the nexthop is not connected with router")


# --- views --------------------------------------------------------------------------------------


async def router_views(session: AsyncSession, routers: list[Router]) -> list[dict[str, Any]]:
    ids = [r.id for r in routers]
    gateways: dict[str, list[Port]] = {rid: [] for rid in ids}
    for port in await gateway_ports(session, ids):
        gateways[port.device_id].append(port)
    ips = await ipam.port_fixed_ips(session, [p.id for ports in gateways.values() for p in ports])
    return [router_view(r, [ip for p in gateways[r.id] for ip in ips[p.id]]) for r in routers]


def router_view(router: Router, external_fixed_ips: list[dict[str, str]]) -> dict[str, Any]:
    gateway = None
    if router.external_network_id:
        gateway = {
            "network_id": router.external_network_id,
            "enable_snat": router.enable_snat,
            "external_fixed_ips": [dict(ip) for ip in external_fixed_ips],
        }
    return {
        "id": router.id,
        "name": router.name,
        "description": router.description or "",
        "project_id": router.project_id,
        "tenant_id": router.project_id,
        "admin_state_up": router.admin_state_up,
        "status": router.status,
        "external_gateway_info": gateway,
        "routes": [dict(r) for r in router.routes or []],
        "distributed": True,
        "ha": False,
        "availability_zone_hints": [],
        "availability_zones": ["nova"],
        "flavor_id": None,
        "tags": list(router.tags or []),
        "created_at": timestamp(router.created_at),
        "updated_at": timestamp(router.updated_at),
        "revision_number": router.revision_number or 0,
    }


async def floatingip_views(session: AsyncSession, fips: list[FloatingIp]) -> list[dict[str, Any]]:
    port_ids = [f.port_id for f in fips if f.port_id]
    ports = (
        {p.id: p for p in await session.scalars(select(Port).where(Port.id.in_(port_ids)))}
        if port_ids
        else {}
    )
    return [floatingip_view(f, ports.get(f.port_id or "")) for f in fips]


def floatingip_view(fip: FloatingIp, port: Port | None) -> dict[str, Any]:
    details = None
    if port is not None:
        details = {
            "name": port.name,
            "network_id": port.network_id,
            "mac_address": port.mac_address,
            "admin_state_up": port.admin_state_up,
            "status": port.status,
            "device_id": port.device_id,
            "device_owner": port.device_owner,
        }
    return {
        "id": fip.id,
        "floating_ip_address": fip.floating_ip_address,
        "floating_network_id": fip.floating_network_id,
        "router_id": fip.router_id,
        "port_id": fip.port_id,
        "fixed_ip_address": fip.fixed_ip_address,
        "status": fip.status,
        "project_id": fip.project_id,
        "tenant_id": fip.project_id,
        "description": fip.description or "",
        "dns_domain": "",
        "dns_name": "",
        "port_details": details,
        "qos_policy_id": None,
        "tags": list(fip.tags or []),
        "created_at": timestamp(fip.created_at),
        "updated_at": timestamp(fip.updated_at),
        "revision_number": fip.revision_number or 0,
    }
