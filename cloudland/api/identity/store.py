"""Cached reads of identity data, used by every token issue and validation.

Entries live ``ttl`` seconds (the staleness bound for changes made by *other* processes);
any identity write in this process calls ``invalidate()``, which drops everything, so this
process never serves stale data about its own changes. Writes are rare, reads are per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cloudland.db.models import Domain, Project, Role, RoleAssignment, User

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DomainInfo:
    id: str
    name: str
    enabled: bool


@dataclass(frozen=True, slots=True)
class ProjectInfo:
    id: str
    name: str
    domain_id: str
    enabled: bool


@dataclass(frozen=True, slots=True)
class UserInfo:
    id: str
    name: str
    domain_id: str
    enabled: bool
    password_hash: str | None
    default_project_id: str | None
    # Tokens issued before this UNIX time are invalid (set on password change).
    tokens_valid_after: float


@dataclass(frozen=True, slots=True)
class RoleInfo:
    id: str
    name: str


def _domain(row: Domain) -> DomainInfo:
    return DomainInfo(row.id, row.name, row.enabled)


def _project(row: Project) -> ProjectInfo:
    return ProjectInfo(row.id, row.name, row.domain_id, row.enabled)


def _user(row: User) -> UserInfo:
    valid_after = float((row.extra or {}).get("tokens_valid_after", 0.0))
    return UserInfo(row.id, row.name, row.domain_id, row.enabled, row.password_hash,
                    row.default_project_id, valid_after)


class SharedLoads:
    """Callers that ask for the same key while its load runs wait for that one load instead of
    each starting their own (at a cache's expiry every concurrent request missed at once). The
    load runs as a task of its own: a caller that goes away does not cancel it for the others."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Task[Any]] = {}

    async def run(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        task = self._running.get(key)
        if task is None:
            task = self._running[key] = asyncio.ensure_future(load())
            task.add_done_callback(lambda done: self._running.pop(key, None)
                                   if self._running.get(key) is done else None)
        return await asyncio.shield(task)


class IdentityStore:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], ttl: float = 5.0) -> None:
        self._sessionmaker = sessionmaker
        self.ttl = ttl
        self._cache: dict[tuple[Any, ...], tuple[float, Any]] = {}
        # A load is shared only by requests of one generation (not with one that predates a write).
        self._loads = SharedLoads()
        self.generation = 0
        self.loads = 0

    def invalidate(self) -> None:
        self._cache.clear()
        self.generation += 1

    async def _cached(self, key: tuple[Any, ...], load: Callable[[AsyncSession], Awaitable[T]]) -> T:
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        generation = self.generation

        async def read() -> T:
            self.loads += 1
            async with self._sessionmaker() as session:
                # One read: no BEGIN and ROLLBACK around it (two round trips of three).
                await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
                value = await load(session)
            # An invalidation during the load means the value may predate a write: do not keep it.
            if generation == self.generation:
                if len(self._cache) > 200_000:
                    self._cache.clear()
                self._cache[key] = (now + self.ttl, value)
            return value

        return await self._loads.run((generation, key), read)

    async def domain(self, domain_id: str) -> DomainInfo | None:
        async def load(s: AsyncSession) -> DomainInfo | None:
            row = await s.get(Domain, domain_id)
            return _domain(row) if row else None
        return await self._cached(("domain", domain_id), load)

    async def domain_by_name(self, name: str) -> DomainInfo | None:
        async def load(s: AsyncSession) -> DomainInfo | None:
            row = (await s.execute(select(Domain).where(Domain.name == name))).scalar_one_or_none()
            return _domain(row) if row else None
        return await self._cached(("domain-name", name), load)

    async def project(self, project_id: str) -> ProjectInfo | None:
        async def load(s: AsyncSession) -> ProjectInfo | None:
            row = await s.get(Project, project_id)
            return _project(row) if row else None
        return await self._cached(("project", project_id), load)

    async def project_by_name(self, name: str, domain_id: str) -> ProjectInfo | None:
        async def load(s: AsyncSession) -> ProjectInfo | None:
            stmt = select(Project).where(Project.name == name, Project.domain_id == domain_id)
            row = (await s.execute(stmt)).scalar_one_or_none()
            return _project(row) if row else None
        return await self._cached(("project-name", name, domain_id), load)

    async def user(self, user_id: str) -> UserInfo | None:
        async def load(s: AsyncSession) -> UserInfo | None:
            row = await s.get(User, user_id)
            return _user(row) if row else None
        return await self._cached(("user", user_id), load)

    async def user_by_name(self, name: str, domain_id: str) -> UserInfo | None:
        async def load(s: AsyncSession) -> UserInfo | None:
            stmt = select(User).where(User.name == name, User.domain_id == domain_id)
            row = (await s.execute(stmt)).scalar_one_or_none()
            return _user(row) if row else None
        return await self._cached(("user-name", name, domain_id), load)

    async def roles(self, user_id: str, target_type: str, target_id: str) -> tuple[RoleInfo, ...]:
        async def load(s: AsyncSession) -> tuple[RoleInfo, ...]:
            stmt = (select(Role.id, Role.name)
                    .join(RoleAssignment, RoleAssignment.role_id == Role.id)
                    .where(RoleAssignment.user_id == user_id,
                           RoleAssignment.target_type == target_type,
                           RoleAssignment.target_id == target_id)
                    .order_by(Role.name))
            return tuple(RoleInfo(rid, rname) for rid, rname in (await s.execute(stmt)).all())
        return await self._cached(("roles", user_id, target_type, target_id), load)
