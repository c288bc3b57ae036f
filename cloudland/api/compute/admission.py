"""Admission control of server creates: a bounded queue in front of the scheduler.

The API takes creates faster than the controller can place them when it is loaded (or down):
without a bound the unscheduled backlog, and every new server's time to ACTIVE with it, grows
without limit (250,000 servers and 25 minutes in the 500,000-server benchmark). Each API
process reads how many servers wait to be placed (live, ``building``, no host yet) at most
every ``interval`` seconds — counting no further than the limit, so the read stays cheap at any
size — adds the creates it accepted since, and answers creates beyond
``compute.max_pending_builds`` with 429 (Nova's ``overLimit``) and ``Retry-After``. Nothing is
written for a refused create; the client sends it again later. 0 turns this off.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Select, func, literal, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cloudland.api.errors import ApiError
from cloudland.db.models import UNPLACED, Instance

RETRY_AFTER_SECONDS = 1

_instances = Instance.__table__


def _waiting_statement(limit: int) -> Select[tuple[int]]:
    """How many servers wait to be placed, counted up to ``limit`` (a range of the partial index
    ``ix_instances_unplaced``, which holds only them)."""
    waiting = select(literal(1)).select_from(_instances).where(text(UNPLACED)).limit(limit).subquery()
    return select(func.count()).select_from(waiting)


def requested(payload: Any) -> int:
    """The servers a create body asks for (at most; ``max_count``), 1 when it does not say."""
    body = payload.get("server") if isinstance(payload, dict) else None
    if isinstance(body, dict):
        for key in ("max_count", "min_count"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return 1


class BuildBacklog:
    """One per API process."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], limit: int,
                 interval: float = 0.5) -> None:
        self.sessionmaker = sessionmaker
        self.limit = limit
        self.interval = interval
        self._statement = _waiting_statement(limit) if limit > 0 else None
        self._waiting = 0  # at the last read, plus the creates accepted since
        self._read_at = -interval
        self.refused = 0

    async def admit(self, count: int = 1) -> None:
        """Raise 429 when ``count`` more creates would pass the limit; else count them in."""
        if self._statement is None:
            return
        now = time.monotonic()
        if now - self._read_at >= self.interval:
            self._read_at = now  # concurrent requests meanwhile go by the last figure
            async with self.sessionmaker() as session:
                self._waiting = int((await session.execute(self._statement)).scalar_one())
        if self._waiting + count > self.limit:
            self.refused += 1
            raise ApiError(429, f"{self._waiting} servers are waiting to be scheduled (the limit is "
                                f"{self.limit}); try again later.",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        self._waiting += count
