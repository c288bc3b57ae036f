"""Neutron ports: /v2.0/ports."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.context import RequestContext, require_context
from cloudland.api.deps import get_db, wake_controller
from cloudland.api.errors import ApiError, forbidden
from cloudland.api.network import access, ipam
from cloudland.api.network.query import (
    Attr,
    ListParams,
    apply_filters,
    apply_sort_and_page,
    list_body,
    parse_list_params,
    select_fields,
)
from cloudland.api.network.quotas import check_quota
from cloudland.api.network.render import port_view
from cloudland.api.network.router_rules import SERVICE_OWNERS
from cloudland.api.network.routes_security_groups import notify
from cloudland.api.network.secgroup_rules import ensure_default_group, resolve_groups
from cloudland.api.network.tags import tag_filter
from cloudland.api.network.validation import (
    allowed_address_pairs,
    as_bool,
    as_dict,
    as_id_list,
    as_list,
    as_str,
    check_project,
    invalid,
    normalize_mac,
    read_body,
)
from cloudland.api.policy import require_write
from cloudland.db.models import IpAllocation, Network, Port

router = APIRouter()

UPDATABLE = {"name", "description", "admin_state_up", "fixed_ips", "device_id", "device_owner",
             "mac_address", "binding:host_id", "binding:profile", "binding:vnic_type",
             "port_security_enabled", "allowed_address_pairs", "security_groups", "extra_dhcp_opts"}
CREATABLE = UPDATABLE | {"network_id", "project_id", "tenant_id"}
ADMIN_ONLY = ("binding:host_id", "binding:profile")
VNIC_TYPES = ("normal",)

ATTRS = {
    "id": Attr(Port.id),
    "name": Attr(Port.name),
    "description": Attr(Port.description),
    "network_id": Attr(Port.network_id),
    "project_id": Attr(Port.project_id),
    "tenant_id": Attr(Port.project_id),
    "mac_address": Attr(Port.mac_address),
    "device_id": Attr(Port.device_id),
    "device_owner": Attr(Port.device_owner),
    "status": Attr(Port.status),
    "admin_state_up": Attr(Port.admin_state_up, bool),
    "port_security_enabled": Attr(Port.port_security_enabled, bool),
    "binding:host_id": Attr(Port.binding_host_id, admin_only=True),
    "binding:vnic_type": Attr(Port.binding_vnic_type),
    "revision_number": Attr(Port.revision_number, int),
    "created_at": Attr(Port.created_at),
    "updated_at": Attr(Port.updated_at),
}


def _fixed_ip_filter(stmt: Select[Any], params: ListParams) -> Select[Any]:
    """``fixed_ips=ip_address=X`` / ``subnet_id=Y`` / ``ip_address_substr=Z``, as openstacksdk sends them."""
    wanted: dict[str, list[str]] = {}
    for value in params.filters.get("fixed_ips", []):
        key, _, val = value.partition("=")
        if key not in ("ip_address", "subnet_id", "ip_address_substr"):
            raise invalid(f"Invalid fixed_ips filter '{value}'")
        wanted.setdefault(key, []).append(val)
    if not wanted:
        return stmt
    sub = select(IpAllocation.port_id)
    if "ip_address" in wanted:
        sub = sub.where(IpAllocation.ip_address.in_(wanted["ip_address"]))
    if "subnet_id" in wanted:
        sub = sub.where(IpAllocation.subnet_id.in_(wanted["subnet_id"]))
    for part in wanted.get("ip_address_substr", []):
        sub = sub.where(IpAllocation.ip_address.contains(part, autoescape=True))
    return stmt.where(Port.id.in_(sub))


@router.get("/ports")
async def list_ports(request: Request, ctx: RequestContext = Depends(require_context),
                     session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    params = parse_list_params(request)
    stmt = select(Port)
    if (clause := access.visible_ports(ctx)) is not None:
        stmt = stmt.where(clause)
    stmt = _fixed_ip_filter(apply_filters(stmt, params, ATTRS, admin=ctx.is_admin), params)
    if (tagged := tag_filter(Port.tags, params)) is not None:
        stmt = stmt.where(tagged)
    marker = await access.get_port(session, ctx, params.marker) if params.marker else None
    ports = list(await session.scalars(apply_sort_and_page(stmt, params, ATTRS, Port.id, marker)))
    ips = await ipam.port_fixed_ips(session, [p.id for p in ports])
    items = [port_view(p, ips[p.id], admin=ctx.is_admin) for p in ports]
    return list_body(request, "ports", items, params)


async def _view(session: AsyncSession, ctx: RequestContext, port: Port) -> dict[str, Any]:
    ips = await ipam.port_fixed_ips(session, [port.id])
    return port_view(port, ips[port.id], admin=ctx.is_admin)


@router.get("/ports/{port_id}")
async def show_port(port_id: str, request: Request, ctx: RequestContext = Depends(require_context),
                    session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    port = await access.get_port(session, ctx, port_id)
    return {"port": select_fields(await _view(session, ctx, port), parse_list_params(request).fields)}


def _check_policy(ctx: RequestContext, net: Network, attrs: dict[str, Any]) -> None:
    """Binding attributes are admin's; addresses and network:* owners are the network owner's."""
    if ctx.is_admin:
        return
    for key in ADMIN_ONLY:
        if attrs.get(key):
            raise forbidden(f"(rule:create_port:{key}) is disallowed by policy")
    if ctx.owns(net.project_id):
        return
    if attrs.get("mac_address"):
        raise forbidden("(rule:create_port:mac_address) is disallowed by policy")
    if any(isinstance(f, dict) and f.get("ip_address") for f in as_list(attrs.get("fixed_ips"), "fixed_ips")):
        raise forbidden("(rule:create_port:fixed_ips:ip_address) is disallowed by policy")
    if str(attrs.get("device_owner") or "").startswith("network:"):
        raise forbidden("(rule:create_port:device_owner) is disallowed by policy")


def _columns(attrs: dict[str, Any]) -> dict[str, Any]:
    """Port column values from the attributes present in the request."""
    values: dict[str, Any] = {}
    if "name" in attrs:
        values["name"] = as_str(attrs["name"], "name")
    if "description" in attrs:
        values["description"] = as_str(attrs["description"], "description", 1024)
    if "admin_state_up" in attrs:
        values["admin_state_up"] = as_bool(attrs["admin_state_up"], "admin_state_up")
    if "device_id" in attrs:
        values["device_id"] = as_str(attrs["device_id"], "device_id")
    if "device_owner" in attrs:
        values["device_owner"] = as_str(attrs["device_owner"], "device_owner")
    if "binding:host_id" in attrs:
        values["binding_host_id"] = as_str(attrs["binding:host_id"], "binding:host_id")
    if "binding:profile" in attrs:
        values["binding_profile"] = as_dict(attrs["binding:profile"], "binding:profile")
    if "binding:vnic_type" in attrs:
        if attrs["binding:vnic_type"] not in VNIC_TYPES:
            raise invalid(f"Invalid input for binding:vnic_type. Reason: '{attrs['binding:vnic_type']}' is "
                          f"not in {list(VNIC_TYPES)}.")
        values["binding_vnic_type"] = attrs["binding:vnic_type"]
    if "port_security_enabled" in attrs:
        values["port_security_enabled"] = as_bool(attrs["port_security_enabled"], "port_security_enabled")
    if "allowed_address_pairs" in attrs:
        values["allowed_address_pairs"] = allowed_address_pairs(attrs["allowed_address_pairs"])
    if "security_groups" in attrs:
        values["security_groups"] = as_id_list(attrs["security_groups"], "security_groups")
    if as_list(attrs.get("extra_dhcp_opts"), "extra_dhcp_opts"):
        raise invalid("extra_dhcp_opts are not supported.", "InvalidInput")
    return values


def _check_port_security(port_security: bool, pairs: list[Any], groups: list[Any]) -> None:
    if port_security:
        return
    if pairs:
        raise ApiError(409, "Port Security must be enabled in order to have allowed address pairs on a port.",
                       "AddressPairAndPortSecurityRequired")
    if groups:
        raise invalid("Port security must be enabled and port must have an IP address in order to use "
                      "security groups.", "PortSecurityAndIPRequiredForSecurityGroups")


@router.post("/ports", status_code=201)
async def create_port(request: Request, ctx: RequestContext = Depends(require_context),
                      session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    require_write(ctx)
    attrs = await read_body(request, "port", CREATABLE)
    if not attrs.get("network_id"):
        raise invalid("Failed to parse request. Required attribute 'network_id' not specified")
    net = await access.get_network(session, ctx, as_str(attrs["network_id"], "network_id", 36))
    _check_policy(ctx, net, attrs)
    project_id = check_project(ctx.project_id, ctx.is_admin, attrs)
    values = _columns(attrs)
    values.setdefault("port_security_enabled", net.port_security_enabled)
    _check_port_security(values["port_security_enabled"], values.get("allowed_address_pairs", []),
                         values.get("security_groups", []))
    if values["port_security_enabled"] and not str(attrs.get("device_owner") or "").startswith("network:"):
        if "security_groups" in values:
            values["security_groups"] = await resolve_groups(session, project_id, values["security_groups"],
                                                             by_name=False)
        else:
            values["security_groups"] = [await ensure_default_group(session, project_id)]
    mac = normalize_mac(attrs["mac_address"]) if attrs.get("mac_address") else None
    fixed_ips = as_list(attrs["fixed_ips"], "fixed_ips") if "fixed_ips" in attrs else None
    await check_quota(session, "port", project_id)
    port = await ipam.create_port(
        session, network=net, project_id=project_id, device_id=values.pop("device_id", ""),
        device_owner=values.pop("device_owner", ""), fixed_ips=fixed_ips, mac_address=mac,
        name=values.pop("name", ""), binding_host_id=values.pop("binding_host_id", ""), attrs=values)
    await session.commit()
    # A new member of its groups (bound or not): the controller's member index reads the network again.
    await wake_controller(request, [], [port.network_id])
    return {"port": await _view(session, ctx, port)}


@router.put("/ports/{port_id}")
async def update_port(port_id: str, request: Request, ctx: RequestContext = Depends(require_context),
                      session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    require_write(ctx)
    port = await access.get_port(session, ctx, port_id)
    attrs = await read_body(request, "port", CREATABLE)
    read_only = sorted(set(attrs) - UPDATABLE)
    if read_only:
        raise invalid(f"Cannot update read-only attribute {read_only[0]}")
    net = await session.get(Network, port.network_id)
    if net is None:
        raise access.port_not_found(port_id)
    _check_policy(ctx, net, attrs)
    values = _columns(attrs)
    merged = {"port_security_enabled": port.port_security_enabled,
              "allowed_address_pairs": port.allowed_address_pairs,
              "security_groups": port.security_groups} | values
    _check_port_security(merged["port_security_enabled"], merged["allowed_address_pairs"],
                         merged["security_groups"])
    if attrs.get("mac_address"):
        mac = normalize_mac(attrs["mac_address"])
        if mac != port.mac_address:
            if port.binding_host_id:
                raise ApiError(409, f"Port {port.id} is bound; its MAC address cannot be changed.",
                               "PortBound")
            if await ipam.mac_taken(session, port.network_id, mac):
                raise ipam.mac_in_use(port.network_id, mac)
            port.mac_address = mac
    old_groups = set(port.security_groups or [])
    for key, value in values.items():
        setattr(port, key, value)
    fip_networks: set[str] = set()
    if "fixed_ips" in attrs:
        await ipam.replace_fixed_ips(session, port, net, as_list(attrs["fixed_ips"], "fixed_ips"))
        fip_networks = await ipam.disassociate_stale_floating_ips(session, port.id)
    if "security_groups" in values:
        port.security_groups = await resolve_groups(session, port.project_id, values["security_groups"],
                                                    by_name=False)
    port.revision_number = (port.revision_number or 0) + 1
    await session.commit()
    if fip_networks:
        await wake_controller(request, [], sorted(fip_networks))
    if {"security_groups", "port_security_enabled", "allowed_address_pairs", "fixed_ips",
            "binding_host_id"} & set(values) | ({"fixed_ips"} & set(attrs)):
        # Old and new groups: members left one and joined the other; the port's own network:
        # its host's rules for this port changed even when it is in no group any more (and,
        # bound or not, the controller's member index reads that network's ports again).
        await notify(request, session, old_groups | set(port.security_groups or []), {port.network_id})
    return {"port": await _view(session, ctx, port)}


@router.delete("/ports/{port_id}", status_code=204)
async def delete_port(port_id: str, request: Request, ctx: RequestContext = Depends(require_context),
                      session: AsyncSession = Depends(get_db)) -> Response:
    require_write(ctx)
    port = await access.get_port(session, ctx, port_id)
    if port.device_owner in SERVICE_OWNERS:
        raise ApiError(409, f"Port {port.id} cannot be deleted directly via the port API: has device owner "
                       f"{port.device_owner}.", "ServicePortInUse")
    # Like Neutron, a floating IP on the port stays, unassociated.
    networks = await ipam.disassociate_floating_ips(session, [port.id])
    await ipam.delete_port(session, port.id)
    await session.commit()
    # The port's own network too: the controller's member index reads its ports again.
    await wake_controller(request, [], sorted(set(networks) | {port.network_id}))
    return Response(status_code=204)
