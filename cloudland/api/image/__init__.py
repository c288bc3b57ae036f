"""OpenStack image API."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from cloudland.config import Config

router = APIRouter()


async def setup(app: FastAPI, config: Config) -> None:
    """Prepare this service's state on app start."""
