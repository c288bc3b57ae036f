"""Endpoints for Cloudland's own components (agents), not part of any OpenStack API."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from cloudland.config import Config

router = APIRouter(prefix="/internal", include_in_schema=False)


async def setup(app: FastAPI, config: Config) -> None:
    """Nothing to prepare yet."""
