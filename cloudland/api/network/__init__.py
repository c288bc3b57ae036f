"""OpenStack Networking (Neutron) API v2.0 under /network: networks, subnets, ports, IPAM."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from cloudland.api.network import (
    routes_networks,
    routes_ports,
    routes_security_groups,
    routes_subnets,
    tags,
    versions,
)
from cloudland.config import Config

router = APIRouter()
router.include_router(versions.router)
for module in (routes_networks, routes_subnets, routes_ports, routes_security_groups, tags):
    router.include_router(module.router, prefix="/network/v2.0")


async def setup(app: FastAPI, config: Config) -> None:
    """Nothing to prepare: all network state lives in the database."""
