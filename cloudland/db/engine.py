"""Async engine and session factory for SQLite (default) and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    # WAL lets the API, controller and CLI read while one of them writes.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str, custom_plans: bool = False) -> AsyncEngine:
    """``custom_plans``: PostgreSQL plans every execution for its parameters (the controller's
    statements take id arrays, ``= ANY(:ids)``: a cached generic plan may scan a table and test
    each row against every element of the array; a custom plan sees the array and hashes it, or
    uses the index). Costs a little planning per statement."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # No pre-ping: it costs a round trip per checkout; recycled connections and the retry of a
    # failed request cover a restarted server. The pool is as large as a busy process's
    # concurrency: an overflow connection is closed when returned and the next one costs a
    # connect, a TLS attempt and every statement prepared again (profiled: ~20 a second per
    # API worker at pool_size 20 under 32 concurrent requests). Three processes (two API
    # workers and the controller) fit PostgreSQL's default max_connections of 100.
    connect_args = {"server_settings": {"plan_cache_mode": "force_custom_plan"}} if custom_plans else {}
    return create_async_engine(url, pool_size=32, max_overflow=16, pool_recycle=300,
                               connect_args=connect_args)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
