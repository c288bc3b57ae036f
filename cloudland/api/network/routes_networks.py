"""Neutron networks: /v2.0/networks."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.context import RequestContext, require_context
from cloudland.api.deps import get_db
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
from cloudland.api.network.quotas import check_quota
from cloudland.api.network.render import DHCP_OWNER, network_view
from cloudland.api.network.router_rules import FLOATINGIP_OWNER, GATEWAY_OWNER
from cloudland.api.network.tags import tag_filter
from cloudland.api.network.validation import (
    as_bool,
    as_int,
    as_list,
    as_str,
    check_project,
    invalid,
    read_body,
)
from cloudland.api.policy import require_write
from cloudland.db.models import IpAllocation, Network, Port, Subnet

router = APIRouter()

PROVIDER = ("provider:network_type", "provider:physical_network", "provider:segmentation_id")
UPDATABLE = {"name", "description", "admin_state_up", "shared", "router:external", "port_security_enabled",
             "mtu", *PROVIDER}
CREATABLE = UPDATABLE | {"project_id", "tenant_id", "availability_zone_hints"}
MAX_MTU = {"vxlan": 1450, "flat": 1500, "vlan": 1500}
MAX_VNI = 2**24 - 1
VNI_ATTEMPTS = 10

ATTRS = {
    "id": Attr(Network.id),
    "name": Attr(Network.name),
    "description": Attr(Network.description),
    "project_id": Attr(Network.project_id),
    "tenant_id": Attr(Network.project_id),
    "status": Attr(Network.status),
    "admin_state_up": Attr(Network.admin_state_up, bool),
    "shared": Attr(Network.shared, bool),
    "router:external": Attr(Network.external, bool),
    "mtu": Attr(Network.mtu, int),
    "port_security_enabled": Attr(Network.port_security_enabled, bool),
    "revision_number": Attr(Network.revision_number, int),
    "created_at": Attr(Network.created_at, str),
    "updated_at": Attr(Network.updated_at, str),
    "provider:network_type": Attr(Network.network_type, admin_only=True),
    "provider:physical_network": Attr(Network.physical_network, sortable=False, admin_only=True),
    "provider:segmentation_id": Attr(Network.segmentation_id, int, sortable=False, admin_only=True),
}


async def subnet_ids_by_network(session: AsyncSession, network_ids: list[str]) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {nid: [] for nid in network_ids}
    if network_ids:
        rows = await session.execute(select(Subnet.network_id, Subnet.id)
                                     .where(Subnet.network_id.in_(network_ids))
                                     .order_by(Subnet.created_at, Subnet.id))
        for network_id, subnet_id in rows:
            result[network_id].append(subnet_id)
    return result


async def _view(session: AsyncSession, ctx: RequestContext, net: Network) -> dict[str, Any]:
    subnets = await subnet_ids_by_network(session, [net.id])
    return network_view(net, subnets[net.id], admin=ctx.is_admin)


@router.get("/networks")
async def list_networks(request: Request, ctx: RequestContext = Depends(require_context),
                        session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    params = parse_list_params(request)
    stmt = select(Network)
    if (clause := access.visible_networks(ctx)) is not None:
        stmt = stmt.where(clause)
    stmt = apply_filters(stmt, params, ATTRS, admin=ctx.is_admin)
    if (tagged := tag_filter(Network.tags, params)) is not None:
        stmt = stmt.where(tagged)
    marker = None
    if params.marker:
        marker = await access.get_network(session, ctx, params.marker)
    nets = list(await session.scalars(apply_sort_and_page(stmt, params, ATTRS, Network.id, marker)))
    subnets = await subnet_ids_by_network(session, [n.id for n in nets])
    items = [network_view(n, subnets[n.id], admin=ctx.is_admin) for n in nets]
    return list_body(request, "networks", items, params)


@router.get("/networks/{network_id}")
async def show_network(network_id: str, request: Request, ctx: RequestContext = Depends(require_context),
                       session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    net = await access.get_network(session, ctx, network_id)
    fields = parse_list_params(request).fields
    return {"network": select_fields(await _view(session, ctx, net), fields)}


def _check_admin_only(ctx: RequestContext, attrs: dict[str, Any], *, creating: bool) -> None:
    if ctx.is_admin:
        return
    for key in ("shared", "router:external", *PROVIDER):
        if key not in attrs:
            continue
        # On create Neutron only enforces the policy when the value differs from the default.
        if creating and attrs[key] in (None, False):
            continue
        raise forbidden(f"(rule:{'create' if creating else 'update'}_network:{key}) is disallowed by policy")


def _segment(attrs: dict[str, Any]) -> tuple[str, str | None, int | None]:
    network_type = attrs.get("provider:network_type") or "vxlan"
    physnet = attrs.get("provider:physical_network")
    seg = attrs.get("provider:segmentation_id")
    if network_type not in MAX_MTU:
        raise invalid(f"Invalid input for operation: network_type value '{network_type}' not supported.",
                      "InvalidInput")
    if physnet is not None:
        physnet = as_str(physnet, "provider:physical_network", 64)
    if network_type == "vxlan":
        if physnet:
            raise invalid("Invalid input for operation: provider:physical_network specified for vxlan "
                          "network.", "InvalidInput")
        return network_type, None, as_int(seg, "provider:segmentation_id", 1, MAX_VNI) if seg is not None \
            else None
    if not physnet:
        raise invalid(f"Invalid input for operation: physical_network required for {network_type} provider "
                      "network.", "InvalidInput")
    if network_type == "flat":
        if seg is not None:
            raise invalid("Invalid input for operation: provider:segmentation_id specified for flat "
                          "network.", "InvalidInput")
        return network_type, physnet, None
    if seg is None:
        raise invalid("Invalid input for operation: segmentation_id required for VLAN provider network.",
                      "InvalidInput")
    return network_type, physnet, as_int(seg, "provider:segmentation_id", 1, 4094)


async def _lowest_free_vni(session: AsyncSession) -> int:
    used = set(await session.scalars(select(Network.segmentation_id).where(Network.network_type == "vxlan")))
    vni = ipam.first_free([(1, MAX_VNI)], {v for v in used if v is not None})
    if vni is None:
        raise ApiError(503, "Unable to create the network. No tenant network is available for allocation.",
                       "NoNetworkAvailable")
    return vni


def _segment_in_use(network_type: str, physnet: str | None, seg: int | None) -> ApiError:
    if network_type == "flat":
        return ApiError(409, f"Unable to create the flat network. Physical network {physnet} is in use.",
                        "FlatNetworkInUse")
    if network_type == "vlan":
        return ApiError(409, f"Unable to create the network. The VLAN {seg} on physical network {physnet} "
                        "is in use.", "VlanIdInUse")
    return ApiError(409, f"Unable to create the network. The tunnel ID {seg} is in use.", "TunnelIdInUse")


def _mtu(attrs: dict[str, Any], network_type: str) -> int:
    if attrs.get("mtu") is None:
        return MAX_MTU[network_type]
    mtu = as_int(attrs["mtu"], "mtu", 68, 9216)
    if mtu > MAX_MTU[network_type]:
        raise invalid(f"Requested MTU is too big, maximum is {MAX_MTU[network_type]}.", "InvalidInput")
    return mtu


@router.post("/networks", status_code=201)
async def create_network(request: Request, ctx: RequestContext = Depends(require_context),
                         session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    require_write(ctx)
    attrs = await read_body(request, "network", CREATABLE)
    _check_admin_only(ctx, attrs, creating=True)
    project_id = check_project(ctx.project_id, ctx.is_admin, attrs)
    network_type, physnet, requested_seg = _segment(attrs)
    values = {
        "name": as_str(attrs.get("name"), "name"),
        "description": as_str(attrs.get("description"), "description", 1024),
        "admin_state_up": as_bool(attrs.get("admin_state_up", True), "admin_state_up"),
        "shared": as_bool(attrs.get("shared") or False, "shared"),
        "external": as_bool(attrs.get("router:external") or False, "router:external"),
        "port_security_enabled": as_bool(attrs.get("port_security_enabled", True), "port_security_enabled"),
        "availability_zone_hints": [as_str(z, "availability_zone_hints")
                                    for z in as_list(attrs.get("availability_zone_hints"),
                                                     "availability_zone_hints")],
        "mtu": _mtu(attrs, network_type),
        "network_type": network_type,
        "physical_network": physnet,
        "project_id": project_id,
    }
    for _ in range(VNI_ATTEMPTS):
        await check_quota(session, "network", project_id)
        if network_type == "flat" and await session.scalar(
                select(func.count()).select_from(Network).where(Network.network_type == "flat",
                                                                Network.physical_network == physnet)):
            raise _segment_in_use(network_type, physnet, None)
        seg = requested_seg
        if network_type == "vxlan" and seg is None:
            seg = await _lowest_free_vni(session)
        net = Network(segmentation_id=seg, **values)
        session.add(net)
        try:
            await session.commit()
        except IntegrityError:
            # Another request took this segment between our read and our insert.
            await session.rollback()
            if requested_seg is not None or network_type != "vxlan":
                raise _segment_in_use(network_type, physnet, requested_seg)
            continue
        return {"network": network_view(net, [], admin=ctx.is_admin)}
    raise ApiError(409, "Unable to allocate a VXLAN ID; please retry.", "NoNetworkAvailable")


@router.put("/networks/{network_id}")
async def update_network(network_id: str, request: Request, ctx: RequestContext = Depends(require_context),
                         session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    require_write(ctx)
    net = await access.get_network(session, ctx, network_id)
    access.require_network_owner(ctx, net)
    attrs = await read_body(request, "network", UPDATABLE)
    _check_admin_only(ctx, attrs, creating=False)
    current = {"provider:network_type": net.network_type, "provider:physical_network": net.physical_network,
               "provider:segmentation_id": net.segmentation_id}
    if any(key in attrs and attrs[key] != current[key] for key in PROVIDER):
        raise invalid("Invalid input for operation: Plugin does not support updating provider attributes.",
                      "InvalidInput")
    if "name" in attrs:
        net.name = as_str(attrs["name"], "name")
    if "description" in attrs:
        net.description = as_str(attrs["description"], "description", 1024)
    if "admin_state_up" in attrs:
        net.admin_state_up = as_bool(attrs["admin_state_up"], "admin_state_up")
    if "port_security_enabled" in attrs:
        net.port_security_enabled = as_bool(attrs["port_security_enabled"], "port_security_enabled")
    if "router:external" in attrs:
        external = as_bool(attrs["router:external"], "router:external")
        if net.external and not external and await session.scalar(
                select(func.count()).select_from(Port).where(
                    Port.network_id == net.id, Port.device_owner.in_((GATEWAY_OWNER, FLOATINGIP_OWNER)))):
            raise ApiError(409, f"External network {net.id} cannot be updated to be made non-external, since "
                           "it has existing gateway ports.", "ExternalNetworkInUse")
        net.external = external
    if "mtu" in attrs:
        net.mtu = _mtu(attrs, net.network_type)
    if "shared" in attrs:
        shared = as_bool(attrs["shared"], "shared")
        if net.shared and not shared and await session.scalar(
                select(func.count()).select_from(Port).where(Port.network_id == net.id,
                                                             Port.project_id != net.project_id)):
            raise ApiError(409, f"Unable to reconfigure sharing settings for network {net.id}. Multiple "
                           "tenants are using it.", "InvalidSharedSetting")
        net.shared = shared
    net.revision_number = (net.revision_number or 0) + 1
    await session.commit()
    return {"network": await _view(session, ctx, net)}


@router.delete("/networks/{network_id}", status_code=204)
async def delete_network(network_id: str, ctx: RequestContext = Depends(require_context),
                         session: AsyncSession = Depends(get_db)) -> Response:
    require_write(ctx)
    net = await access.get_network(session, ctx, network_id)
    access.require_network_owner(ctx, net)
    in_use = await session.scalar(select(func.count()).select_from(Port)
                                  .where(Port.network_id == net.id, Port.device_owner != DHCP_OWNER))
    if in_use:
        raise ApiError(409, f"Unable to complete operation on network {net.id}. There are one or more ports "
                       "still in use on the network.", "NetworkInUse")
    await session.execute(delete(IpAllocation).where(IpAllocation.network_id == net.id))
    await session.execute(delete(Port).where(Port.network_id == net.id))
    await session.execute(delete(Subnet).where(Subnet.network_id == net.id))
    await session.delete(net)
    await session.commit()
    return Response(status_code=204)
