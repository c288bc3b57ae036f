"""OpenStack Networking (Neutron) API v2.0 under /network: networks, subnets, ports, IPAM,
security groups, routers and floating IPs."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from cloudland.api.network import (
    routes_floating_ips,
    routes_networks,
    routes_ports,
    routes_routers,
    routes_security_groups,
    routes_subnets,
    tags,
    versions,
)
from cloudland.config import Config

router = APIRouter()
router.include_router(versions.router)
for module in (routes_networks, routes_subnets, routes_ports, routes_security_groups, routes_routers,
               routes_floating_ips, tags):
    router.include_router(module.router, prefix="/network/v2.0")


async def setup(app: FastAPI, config: Config) -> None:
    """Nothing to prepare: all network state lives in the database."""
