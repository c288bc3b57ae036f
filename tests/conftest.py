"""Shared fixtures: a migrated database, the API app in-process, tokens, a real NATS server."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from cloudland.config import Config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    cfg = Config(state_dir=tmp_path / "state")
    cfg.api.public_url = "http://cloudland.test"
    cfg.agent.host_id = "test-host"
    cfg.compute.shutdown_timeout = 5
    cfg.state_dir.mkdir(parents=True)
    return cfg


@pytest.fixture
async def app(config: Config):  # type: ignore[no-untyped-def]
    """The whole API in-process against a freshly migrated SQLite database, bootstrapped."""
    from cloudland.api.identity.bootstrap import bootstrap_identity

    from cloudland.api.app import create_app
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
