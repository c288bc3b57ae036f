"""FastAPI dependencies shared by every service: database sessions and the bus."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.bus import subjects
from cloudland.bus.messages import Wake, encode


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessionmaker() as session:
        yield session


async def wake_controller(request: Request, instance_ids: list[str],
                          network_ids: list[str] | None = None) -> None:
    """Tell the controllers desired state changed; they would find it on their next pass anyway
    (except for security group changes: ``network_ids`` whose member hosts need a new spec)."""
    bus = request.app.state.bus
    if bus is not None and bus.is_connected:
        await bus.publish(subjects.CONTROLLER_WAKE,
                          encode(Wake(instance_ids=instance_ids, network_ids=network_ids or [])))
