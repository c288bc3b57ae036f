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


async def _bootstrap(config: Config) -> None:
    from cloudland.api.app import create_app
    from cloudland.api.identity.bootstrap import bootstrap_identity
    from cloudland.db.migrate import upgrade_async

    await upgrade_async(config.database_url)
    application = create_app(config, connect_bus=False)
    async with application.router.lifespan_context(application):
        await bootstrap_identity(application.state.sessionmaker, config)


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
