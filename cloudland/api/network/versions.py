"""Neutron discovery: the version document, the resource list and the extensions we implement."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from cloudland.api.context import RequestContext, require_context
from cloudland.api.errors import ApiError
from cloudland.api.network.query import public_base

router = APIRouter()

UPDATED = "2024-01-01T10:00:00-00:00"
EXTENSIONS = {
    "standard-attr-description": ("standard-attr-description",
                                  "Extension to add descriptions to standard attributes"),
    "standard-attr-timestamp": ("Resource timestamps", "Adds created_at and updated_at fields to all "
                                "Neutron resources that have Neutron standard attributes."),
    "standard-attr-revisions": ("Resource revision numbers", "This extension will display the revision "
                                "number of neutron resources."),
    "port-security": ("Port Security", "Provides port security"),
    "allowed-address-pairs": ("Allowed Address Pairs", "Provides allowed address pairs"),
    "binding": ("Port Binding", "Expose port bindings of a virtual port to external application"),
    "external-net": ("Neutron external network", "Adds external network attribute to network resource."),
    "provider": ("Provider Network", "Expose mapping of virtual networks to physical networks"),
    "net-mtu": ("Network MTU", "Provides MTU attribute for a network resource."),
    "net-mtu-writable": ("Network MTU (writable)", "Provides a writable MTU attribute for a network "
                         "resource."),
    "project-id": ("project_id field enabled", "Extension that indicates that project_id field is enabled."),
    "standard-attr-tag": ("Tag support for resources with standard attribute: subnet, network, port",
                          "Enables to set tag on resources with standard attribute."),
    "pagination": ("Pagination support", "Extension that indicates that pagination is enabled."),
    "sorting": ("Sorting support", "Extension that indicates that sorting is enabled."),
    "security-group": ("security-group", "The security groups extension."),
    "router": ("Neutron L3 Router", "Router abstraction for basic L3 forwarding between L2 Neutron networks "
               "and access to external networks via a NAT gateway."),
    "ext-gw-mode": ("Neutron L3 Configurable external gateway mode", "Extension of the router abstraction "
                    "for specifying whether SNAT should occur on the external gateway"),
    "extraroute": ("Neutron Extra Route", "Extra routes configuration for L3 router"),
    "extraroute-atomic": ("Atomically add/remove extra routes", "Edit extra routes of a router on server "
                          "side by atomically adding/removing extra routes"),
    "dvr": ("Distributed Virtual Router", "Enables configuration of Distributed Virtual Routers."),
    "router_availability_zone": ("Router Availability Zone", "Availability zone support for router."),
}
RESOURCES = ("network", "subnet", "port", "security-group", "security-group-rule")


def _extension(alias: str) -> dict[str, Any]:
    name, description = EXTENSIONS[alias]
    return {"name": name, "alias": alias, "description": description, "updated": UPDATED, "links": []}


@router.get("/network")
@router.get("/network/")
async def versions(request: Request) -> dict[str, Any]:
    href = f"{public_base(request)}/network/v2.0/"
    return {"versions": [{"id": "v2.0", "status": "CURRENT", "links": [{"rel": "self", "href": href}]}]}


@router.get("/network/v2.0")
@router.get("/network/v2.0/")
async def resources(request: Request) -> dict[str, Any]:
    base = f"{public_base(request)}/network/v2.0"
    return {"resources": [{"name": name, "collection": f"{name}s",
                           "links": [{"rel": "self", "href": f"{base}/{name}s"}]} for name in RESOURCES]}


@router.get("/network/v2.0/extensions")
async def list_extensions(ctx: RequestContext = Depends(require_context)) -> dict[str, Any]:
    return {"extensions": [_extension(alias) for alias in EXTENSIONS]}


@router.get("/network/v2.0/extensions/{alias}")
async def show_extension(alias: str, ctx: RequestContext = Depends(require_context)) -> dict[str, Any]:
    if alias not in EXTENSIONS:
        raise ApiError(404, f"Extension with alias {alias} does not exist", "HTTPNotFound")
    return {"extension": _extension(alias)}
