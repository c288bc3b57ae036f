"""Shared fixtures: a migrated database, the API app in-process, tokens, a real NATS server."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from cloudland.config import Config

if TYPE_CHECKING:
    from cloudland.db.local_postgres import LocalPostgres


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_databases`` run once on SQLite and once on PostgreSQL."""
    if metafunc.definition.get_closest_marker("both_databases") and "db_backend" in metafunc.fixturenames:
        metafunc.parametrize("db_backend", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def db_backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture(scope="session")
def template_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, bootstrapped SQLite state directory; each test gets a copy (fast setup)."""
    from tests.support.databases import make_template_state

    path = tmp_path_factory.mktemp("template") / "state"
    make_template_state(path)
    return path


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory, template_state: Path) -> Iterator[LocalPostgres]:
    """A real PostgreSQL server (Debian's package) for the session, with a template database."""
    from cloudland.db.local_postgres import LocalPostgres
    from tests.support.databases import make_template_database

    work = tmp_path_factory.mktemp("postgres")
    pg = LocalPostgres(work / "server")
    pg.start()
    try:
        make_template_database(pg, template_state, work)
        yield pg
    finally:
        pg.remove()


@pytest.fixture
def database_url(request: pytest.FixtureRequest, db_backend: str) -> str:
    """Empty for SQLite (the state directory's file); a fresh PostgreSQL database otherwise."""
    if db_backend != "postgresql":
        return ""
    from tests.support.databases import new_database

    return new_database(request.getfixturevalue("postgres"))


@pytest.fixture
def config(tmp_path: Path, template_state: Path, database_url: str) -> Config:
    from tests.support.databases import copy_state

    cfg = Config(state_dir=tmp_path / "state")
    cfg.api.public_url = "http://cloudland.test"
    cfg.agent.host_id = "test-host"
    cfg.compute.shutdown_timeout = 5
    cfg.database.url = database_url
    copy_state(template_state, cfg.state_dir)
    return cfg


@pytest.fixture
async def app(config: Config):  # type: ignore[no-untyped-def]
    """The whole API in-process against a migrated, bootstrapped database (SQLite, or PostgreSQL
    for ``both_databases`` tests)."""
    from cloudland.api.app import create_app
    from cloudland.api.identity.bootstrap import bootstrap_identity
    from cloudland.db.migrate import upgrade_async

    await upgrade_async(config.database_url)
    application = create_app(config, connect_bus=False)
    async with application.router.lifespan_context(application):
        application.state.credentials = await bootstrap_identity(application.state.sessionmaker, config)
        yield application


@pytest.fixture
async def client(app) -> AsyncIterator[httpx.AsyncClient]:  # type: ignore[no-untyped-def]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cloudland.test") as c:
        yield c


async def get_token(client: httpx.AsyncClient, user: str, password: str, project: str) -> str:
    body = {"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"name": "Default"}, "password": password}}},
        "scope": {"project": {"name": project, "domain": {"name": "Default"}}}}}
    r = await client.post("/identity/v3/auth/tokens", json=body)
    assert r.status_code == 201, r.text
    return r.headers["X-Subject-Token"]


@pytest.fixture
async def admin_token(client: httpx.AsyncClient, app) -> str:  # type: ignore[no-untyped-def]
    creds = app.state.credentials
    return await get_token(client, "admin", creds.admin_password, "admin")


@pytest.fixture
async def demo_token(client: httpx.AsyncClient, app) -> str:  # type: ignore[no-untyped-def]
    creds = app.state.credentials
    return await get_token(client, "demo", creds.demo_password, "demo")


@pytest.fixture
async def nats_url(tmp_path: Path) -> AsyncIterator[str]:
    """A real nats-server (the bundled binary) on a free port."""
    from cloudland.allinone.nats import NatsServer

    server = NatsServer(port=free_port(), work_dir=tmp_path / "nats")
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()
