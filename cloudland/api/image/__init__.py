"""OpenStack Image API (Glance v2) under /image."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from cloudland.api.image.routes import router
from cloudland.api.image.store import ImageStore, bootstrap_image
from cloudland.config import Config

__all__ = ["ImageStore", "bootstrap_image", "router", "setup"]


async def setup(app: FastAPI, config: Config) -> None:
    """Make sure the image directory exists."""
    await asyncio.to_thread(config.images_dir.mkdir, parents=True, exist_ok=True)
