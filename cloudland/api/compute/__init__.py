"""OpenStack Compute (Nova) API v2.1 under /compute."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from cloudland.api.compute import flavors, keypairs, servers, versions
from cloudland.config import Config

router = APIRouter(prefix="/compute")
# Servers first: routes are matched in order, and they take most of the requests.
for module in (servers, flavors, keypairs):
    router.include_router(module.router, prefix="/v2.1")
router.include_router(versions.router)


async def setup(app: FastAPI, config: Config) -> None:
    for module in (versions, flavors, keypairs, servers):
        module_setup = getattr(module, "setup", None)
        if module_setup:
            await module_setup(app, config)
