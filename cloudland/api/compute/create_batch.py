"""Group commit of server creates: concurrent POST /servers of one API process share a transaction.

A create writes a few small rows (the instance, its port, the port's addresses); one request
at a time, each row is a round trip plus the Python around it, and the commit another. Here
requests that arrive while a batch is being written wait for the next batch, which writes
all of them with the same statements as one: one insert per table (executemany), one read of
each subnet's allocations, one commit. Nothing waits for a timer: with no load a batch is one
request, under load it is what arrived during the previous one.

Only the common shape takes this path (``batchable``: one server on one network named by id,
automatic addresses, the project's default security group). A batch that fails as a whole
(a network deleted meanwhile, a pool running out, a quota) is rolled back and its requests go
through ``server_create`` one by one, each in its own transaction: their errors and outcomes
are exactly those of the one-at-a-time path.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cloudland.api.compute import server_create
from cloudland.api.compute.server_create import CreateRequest
from cloudland.api.context import RequestContext
from cloudland.api.network import ipam
from cloudland.config import ComputeConfig
from cloudland.db.models import Instance, Port, new_id

log = logging.getLogger(__name__)

MAX_BATCH = 128
DIALECTS = ("postgresql", "sqlite")


def batchable_body(payload: Any) -> bool:
    """A cheap look at the request before any database work: one server, one network by id."""
    if not isinstance(payload, dict) or not isinstance(payload.get("server"), dict):
        return False
    body = payload["server"]
    if body.get("min_count", 1) != 1 or body.get("max_count", 1) != 1:
        return False
    networks = body.get("networks")
    return (isinstance(networks, list) and len(networks) == 1 and isinstance(networks[0], dict)
            and set(networks[0]) == {"uuid"})


def batchable(req: CreateRequest) -> bool:
    """What ``parse_create`` found fits the batch's statements."""
    if req.max_count != 1 or len(req.networks) != 1:
        return False
    net = req.networks[0]
    return (net.port is None and net.fixed_ip is None and net.subnets is not None
            and req.security_groups == ["default"] and req.default_group_id is not None)


@dataclass
class _Item:
    ctx: RequestContext
    req: CreateRequest | None  # None: parsed in the batch, from ``payload``
    future: asyncio.Future[tuple[str, CreateRequest]]
    payload: Any = None
    instance_id: str = field(default_factory=new_id)
    port_id: str = field(default_factory=new_id)
    mac: str = field(default_factory=ipam.random_mac)


class BatchFailed(Exception):
    """The batch cannot be written as one; its requests go one by one."""


class CreateBatcher:
    """One per API process. ``create`` returns the new server's id or raises its ApiError."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], quotas: ComputeConfig,
                 written: Callable[[list[str]], Awaitable[None]] | None = None,
                 max_batch: int = MAX_BATCH) -> None:
        """``written``: told the ids of each batch's new servers once committed (one wake of
        the controller per batch, not per server)."""
        self.sessionmaker = sessionmaker
        self.written = written
        self.quotas = quotas
        self.max_batch = max_batch
        self._queue: list[_Item] = []
        self._writer: asyncio.Task[None] | None = None
        # Figures for the benchmark and tests: batches written, requests in them, fallbacks.
        self.batches = 0
        self.batched = 0
        self.fallbacks = 0

    async def create(self, ctx: RequestContext, req: CreateRequest | None = None,
                     payload: Any = None) -> tuple[str, CreateRequest]:
        """The new server's id and the request as parsed. Either ``req`` (parsed by the caller)
        or the request's ``payload``: then the batch parses it, reading what every request of
        the batch needs in one statement (``server_create.lookups_many``). A parsed request the
        batch cannot write (not ``batchable``) comes back with no id: the caller writes it."""
        item = _Item(ctx, req, asyncio.get_running_loop().create_future(), payload)
        self._queue.append(item)
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain())
        return await item.future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
                await self._write_batch(batch)
        finally:
            self._writer = None

    async def _write_batch(self, batch: list[_Item]) -> None:
        batch = await self._parse(batch)
        for item in batch:
            if not batchable(_req(item)):  # the caller writes it: ("", the request)
                item.future.set_result(("", _req(item)))
        batch = [i for i in batch if not i.future.done()]
        if not batch:
            return
        ids = await self._write_or_fall_back(batch)
        if self.written is not None and ids:
            try:
                await self.written(ids)
            except Exception as e:  # the controller finds them on its next pass anyway
                log.warning("cannot announce %d new servers: %s", len(ids), e)

    async def _parse(self, batch: list[_Item]) -> list[_Item]:
        """The batch's requests parsed (those given as payloads: their lookups in one statement);
        the ones that fail get their error now and leave the batch."""
        raw = [i for i in batch if i.req is None]
        if not raw:
            return batch
        keys = [server_create.lookup_key(i.ctx, i.payload) for i in raw]
        try:
            async with self.sessionmaker() as session:
                # No transaction: BEGIN and COMMIT would be two more round trips.
                await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
                rows = await server_create.lookups_many(session, keys)
                for item, key in zip(raw, keys, strict=True):
                    try:
                        item.req = await server_create.parse_create(session, item.ctx, item.payload,
                                                                    rows[key])
                    except Exception as e:  # the request's own error (ApiError)
                        if not item.future.done():
                            item.future.set_exception(e)
        except Exception as e:  # the database: every request not parsed yet fails with it
            for item in raw:
                if item.req is None and not item.future.done():
                    item.future.set_exception(e)
        return [i for i in batch if i.req is not None and not i.future.done()]

    async def _write_or_fall_back(self, batch: list[_Item]) -> list[str]:
        """The ids of the servers created."""
        try:
            async with self.sessionmaker() as session, session.begin():
                await _write(session, batch, self.quotas)
            self.batches += 1
            self.batched += len(batch)
            for item in batch:
                if not item.future.done():  # done: the client went away (cancelled)
                    item.future.set_result((item.instance_id, _req(item)))
            return [i.instance_id for i in batch]
        except BatchFailed as e:
            log.debug("batch of %d creates goes one by one: %s", len(batch), e)
        except Exception as e:  # a concurrent change, a constraint: the one-by-one path tells which
            log.info("batch of %d creates goes one by one: %s", len(batch), e)
        self.fallbacks += 1
        return await self._one_by_one(batch)

    async def _one_by_one(self, items: list[_Item]) -> list[str]:
        created = []
        for item in items:
            if item.future.done():
                continue
            try:
                server_ids = await self._one(item)
            except Exception as e:  # the request's own error (ApiError), or a failure to report
                if not item.future.done():
                    item.future.set_exception(e)
                continue
            created.extend(server_ids)
            if not item.future.done():
                item.future.set_result((server_ids[0], _req(item)))
        return created

    async def _one(self, item: _Item) -> list[str]:
        req = _req(item)
        async with self.sessionmaker() as session, session.begin():
            project_id = item.ctx.project_id
            assert project_id is not None
            count = await server_create.allowed_count(session, project_id, req, self.quotas)
            return await server_create.create_instances(session, item.ctx, req, count)


def _req(item: _Item) -> CreateRequest:
    assert item.req is not None
    return item.req


async def _check_quotas(session: AsyncSession, batch: list[_Item], quotas: ComputeConfig) -> None:
    """Every request of the batch fits its project's quota counted with the others; else the
    batch goes one by one (and the ones over quota get their 403 there)."""
    limits = (quotas.quota_instances, quotas.quota_cores, quotas.quota_ram)
    if all(limit < 0 for limit in limits):
        return
    projects = sorted({i.ctx.project_id for i in batch if i.ctx.project_id})
    used: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    rows = await session.execute(
        select(Instance.project_id, func.count(Instance.id),
               func.coalesce(func.sum(Instance.flavor["vcpus"].as_integer()), 0),
               func.coalesce(func.sum(Instance.flavor["ram"].as_integer()), 0))
        .where(Instance.project_id.in_(projects), Instance.deleted_at.is_(None))
        .group_by(Instance.project_id))
    for project, count, cores, ram in rows:
        used[project] = [count, cores, ram]
    for item in batch:
        total = used[item.ctx.project_id or ""]
        for k, per in enumerate((1, _req(item).flavor.vcpus, _req(item).flavor.ram)):
            total[k] += per
            if limits[k] >= 0 and total[k] > limits[k]:
                raise BatchFailed("over quota")


_INSERT_PORTS = {d: ins(Port.__table__).on_conflict_do_nothing().returning(Port.__table__.c.id)
                 for d, ins in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))}


async def _write(session: AsyncSession, batch: list[_Item], quotas: ComputeConfig) -> None:
    dialect = session.get_bind().dialect.name
    if dialect not in DIALECTS:
        raise BatchFailed(f"no batch statements for {dialect}")
    await _check_quotas(session, batch, quotas)
    await session.execute(server_create.INSERT_INSTANCE, [
        server_create.instance_row(i.ctx, _req(i), i.instance_id, _req(i).name) for i in batch])
    pending = batch
    for _ in range(4):  # a MAC taken on the network: another one (a 1 in 16 million event)
        rows = [server_create.port_row(_req(i).networks[0].network, i.ctx.project_id or "", i.port_id,
                                       i.mac, i.instance_id, [_req(i).default_group_id or ""])
                for i in pending]
        inserted = set((await session.execute(_INSERT_PORTS[dialect], rows)).scalars())
        pending = [i for i in pending if i.port_id not in inserted]
        if not pending:
            break
        for i in pending:
            i.mac = ipam.random_mac()
    else:
        raise BatchFailed("MAC addresses taken")
    await _allocate_addresses(session, batch)


async def _allocate_addresses(session: AsyncSession, batch: list[_Item]) -> None:
    """``allocate_default``'s addresses for every port: the first stateful subnet of each IP
    version (with a second one, or a full pool, the one-by-one path decides) and every SLAAC
    subnet."""
    wanted: list[tuple[str, str, Any]] = []
    for item in batch:
        subnets = _req(item).networks[0].subnets or []
        for version in (4, 6):
            stateful = [s for s in subnets if s.ip_version == version and not ipam.is_auto_address(s)]
            if len(stateful) > 1:
                raise BatchFailed("several subnets of one IP version")
            wanted.extend((item.port_id, item.mac, s) for s in stateful)
        wanted.extend((item.port_id, item.mac, s) for s in subnets if ipam.is_auto_address(s))
    if wanted:
        await ipam.allocate_many(session, wanted)
