"""Resources claimed per host, in the controller's memory: ``HostUsage``.

The scheduler needs, per host, the sum of the flavors of the live instances placed there. Summing
them in the database is a read of the whole instances table (2.3 s at 270,000 servers, the
flavor being JSON), which ran inside a pass every 30 s. Instead the sums are read once, then kept
by what this controller does: its claims add, the deletes it finalizes subtract. What it does not
see (a delete the API finalized itself because the host was down, another controller's work) is
caught by a read every ``refresh`` seconds, made in the background, beside the passes.

The error is always on the safe side: capacity may be under-estimated for a while, never
over-committed. Claims made while a background read runs are added to its result (a claim the
read already saw is then counted twice: safe); deletes finalized meanwhile are not subtracted from
it (the read may already miss them: subtracting again could over-commit).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cloudland.controller.scheduler import flavor_needs, load_usage

log = logging.getLogger(__name__)

Needs = tuple[int, int, int]  # vcpus, RAM MiB, disk GiB


class HostUsage:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], clock: Callable[[], float],
                 refresh: float = 300.0) -> None:
        self.sessionmaker = sessionmaker
        self.clock = clock
        self.refresh = refresh
        self.by_host: dict[str, list[int]] = {}
        self._loaded = False
        self._read_at = 0.0
        self._reading: asyncio.Task[None] | None = None
        # Claims since the running (or finished, not yet taken in) background read started.
        self._claimed_since_read: list[tuple[str, Needs]] = []
        self._fresh: dict[str, list[int]] | None = None
        self._changed: set[str] = set()
        self.reads = 0  # whole reads (for tests and stats)

    async def current(self, session: AsyncSession) -> dict[str, list[int]]:
        """The sums, brought up to date: read in ``session`` the first time; later a finished
        background read is taken in, and the next one started when due."""
        if not self._loaded:
            self._take(await self._read(session))
            self._loaded = True
            self._read_at = self.clock()
        if self._fresh is not None:
            fresh, self._fresh = self._fresh, None
            for host, needs in self._claimed_since_read:
                used = fresh.setdefault(host, [0, 0, 0])
                for k, amount in enumerate(needs):
                    used[k] += amount
            self._claimed_since_read = []
            self._take(fresh)
        if self._reading is None and self.clock() - self._read_at >= self.refresh:
            self._read_at = self.clock()
            self._reading = asyncio.create_task(self._read_in_background(), name="usage-read")
        return self.by_host

    def take_changed(self) -> set[str]:
        """Hosts whose sums changed since the last call (their free capacity is recomputed)."""
        changed, self._changed = self._changed, set()
        return changed

    def claim(self, host: str, needs: Needs) -> None:
        self._add(self.by_host, host, needs, 1)
        if self._reading is not None or self._fresh is not None:
            self._claimed_since_read.append((host, needs))

    def release(self, host: str | None, flavor: dict[str, Any] | None) -> None:
        """A live instance on ``host`` was finalized (its claim ends)."""
        if host and host in self.by_host:
            self._add(self.by_host, host, flavor_needs(flavor or {}), -1)

    async def stop(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
            self._reading = None

    # ---------------------------------------------------------------------------------------

    def _add(self, sums: dict[str, list[int]], host: str, needs: Needs, sign: int) -> None:
        used = sums.setdefault(host, [0, 0, 0])
        for k, amount in enumerate(needs):
            used[k] = max(0, used[k] + sign * amount)
        self._changed.add(host)

    def _take(self, fresh: dict[str, list[int]]) -> None:
        old = self.by_host
        self._changed |= {h for h in old.keys() | fresh.keys() if old.get(h) != fresh.get(h)}
        self.by_host = fresh

    async def _read(self, session: AsyncSession) -> dict[str, list[int]]:
        self.reads += 1
        return {h: list(u) for h, u in (await load_usage(session)).items()}

    async def _read_in_background(self) -> None:
        try:
            async with self.sessionmaker() as session:
                self._fresh = await self._read(session)
        except Exception:
            log.exception("reading the hosts' usage failed (the sums kept in memory go on)")
            self._claimed_since_read = []
        finally:
            self._reading = None
