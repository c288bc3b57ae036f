"""``HostUsage``: the claimed resources per host kept in memory, against a real database."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import update

from cloudland.controller.usage import HostUsage
from cloudland.db.models import Instance, utcnow

pytestmark = pytest.mark.both_databases

FLAVOR = {"vcpus": 2, "ram": 1024, "disk": 10}


async def place(app: Any, host: str | None) -> str:
    async with app.state.sessionmaker() as s, s.begin():
        inst = Instance(name="vm", project_id="p", user_id="u", flavor_id="1", flavor=FLAVOR, host=host)
        s.add(inst)
        await s.flush()
        return inst.id


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_read_once_then_kept_by_claims_and_releases(app: Any) -> None:
    for host in ("h1", "h1", "h2", None):
        await place(app, host)
    clock = Clock()
    usage = HostUsage(app.state.sessionmaker, clock, refresh=60)
    async with app.state.sessionmaker() as s:
        assert await usage.current(s) == {"h1": [4, 2048, 20], "h2": [2, 1024, 10]}
        assert usage.take_changed() == {"h1", "h2"}
        usage.claim("h2", (2, 1024, 10))
        usage.release("h1", FLAVOR)
        assert await usage.current(s) == {"h1": [2, 1024, 10], "h2": [4, 2048, 20]}
        assert usage.take_changed() == {"h1", "h2"} and usage.reads == 1


async def test_background_read_keeps_claims_made_meanwhile(app: Any) -> None:
    """A delete the API finalized itself shows at the next read; a claim made while that read
    ran (not in the table yet) is kept; a release made meanwhile is not taken from the result."""
    gone = await place(app, "h1")
    await place(app, "h1")
    clock = Clock()
    usage = HostUsage(app.state.sessionmaker, clock, refresh=60)
    async with app.state.sessionmaker() as s:
        await usage.current(s)
    async with app.state.sessionmaker() as s, s.begin():
        await s.execute(update(Instance).where(Instance.id == gone).values(deleted=True, deleted_at=utcnow()))
    clock.now += 61
    async with app.state.sessionmaker() as s:
        assert (await usage.current(s))["h1"] == [4, 2048, 20]  # the read started, in the background
        usage.claim("h1", (1, 512, 1))
        usage.release("h1", {"vcpus": 1, "ram": 256, "disk": 1})  # not taken from the read's result
        reading = usage._reading
        assert reading is not None
        await asyncio.wait_for(reading, 10)
        usage.claim("h2", (1, 512, 1))  # after the read, before it is taken in
        usage.take_changed()
        assert await usage.current(s) == {"h1": [3, 1536, 11], "h2": [1, 512, 1]}
        assert usage.take_changed() == {"h1"} and usage.reads == 2
    await usage.stop()
