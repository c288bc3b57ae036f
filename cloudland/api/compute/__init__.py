"""OpenStack Compute (Nova) API v2.1 under /compute."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from cloudland.api.compute import flavors, keypairs, servers, versions
from cloudland.config import Config

router = APIRouter(prefix="/compute")
router.include_router(versions.router)
for module in (flavors, keypairs, servers):
    router.include_router(module.router, prefix="/v2.1")


async def setup(app: FastAPI, config: Config) -> None:
    for module in (versions, flavors, keypairs, servers):
        module_setup = getattr(module, "setup", None)
        if module_setup:
            await module_setup(app, config)
