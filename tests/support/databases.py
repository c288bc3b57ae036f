"""Test databases: one migrated, bootstrapped template per session, copied per test.

SQLite: the template state directory (database file plus the keys whose passwords the
bootstrap hashed) is copied into each test's state directory. PostgreSQL: a real server
(``LocalPostgres``) started once per session; each test gets ``CREATE DATABASE ... TEMPLATE``
of a migrated, bootstrapped template database, bootstrapped with the same keys.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from cloudland.config import Config
from cloudland.db.local_postgres import LocalPostgres

TEMPLATE_DB = "cloudland_template"
_counter = itertools.count(1)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """asyncio.run in a thread: session fixtures may be set up from inside a running loop."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


# The template's users get argon2id hashes with small parameters: each test verifies their
# passwords afresh (a new app has a new verified-credential cache), ~0.15 s a user with the
# product's parameters, a quarter of the fast set's time. Verifying reads the parameters from
# the hash; users the tests create get the product's.
TEMPLATE_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


async def _bootstrap(config: Config) -> None:
    from cloudland.api.app import create_app
    from cloudland.api.identity import passwords
    from cloudland.api.identity.bootstrap import bootstrap_identity
    from cloudland.db.migrate import upgrade_async

    await upgrade_async(config.database_url)
    application = create_app(config, connect_bus=False)
    product_hasher, passwords._hasher = passwords._hasher, TEMPLATE_HASHER
    try:
        async with application.router.lifespan_context(application):
            await bootstrap_identity(application.state.sessionmaker, config)
    finally:
        passwords._hasher = product_hasher


def make_template_state(state_dir: Path) -> None:
    """A state directory with a migrated, bootstrapped SQLite database and its keys."""
    state_dir.mkdir(parents=True)
    _run(_bootstrap(Config(state_dir=state_dir)))


def copy_state(template: Path, state_dir: Path) -> None:
    shutil.copytree(template, state_dir)


def make_template_database(pg: LocalPostgres, template_state: Path, work: Path) -> None:
    """The PostgreSQL template database, bootstrapped with the template state's keys."""
    pg.create_database(TEMPLATE_DB)
    state = work / "pg-template-state"
    copy_state(template_state, state)
    cfg = Config(state_dir=state)
    cfg.database.url = pg.url(TEMPLATE_DB)
    _run(_bootstrap(cfg))


def new_database(pg: LocalPostgres) -> str:
    return pg.create_database(f"test_{next(_counter)}", template=TEMPLATE_DB)
