"""The Alembic migrations build exactly the schema of models.py, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from cloudland.db.engine import make_engine
from cloudland.db.migrate import upgrade_async
from cloudland.db.models import Base

_fresh = itertools.count(1)


@pytest.mark.both_databases
async def test_migrations_match_models(db_backend: str, tmp_path: Path,
                                       request: pytest.FixtureRequest) -> None:
    if db_backend == "postgresql":
        url = request.getfixturevalue("postgres").create_database(f"migrate_{next(_fresh)}")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    await upgrade_async(url)
    await upgrade_async(url)  # idempotent
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            def diff(sync_conn: Any) -> list[Any]:
                ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})
                return list(compare_metadata(ctx, Base.metadata))

            def indexes(sync_conn: Any) -> set[str]:
                return {str(i["name"]) for i in inspect(sync_conn).get_indexes("instances")}

            assert await conn.run_sync(diff) == []
            assert "ix_instances_project_created" in await conn.run_sync(indexes)
    finally:
        await engine.dispose()
