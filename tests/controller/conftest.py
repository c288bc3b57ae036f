"""A small cloud in one event loop: the API in-process, a real nats-server, the controller and
an AgentService with the simulated drivers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from controller_helpers import Cloud, FakeImageCache, seed  # type: ignore[import-not-found]

from cloudland.agent.drivers.compute.simulated import SimulatedComputeDriver
from cloudland.agent.drivers.network.simulated import SimulatedNetworkDriver
from cloudland.config import Config
from cloudland.controller.service import ControllerService


@pytest.fixture
async def cloud(config: Config, nats_url: str, app: Any, client: httpx.AsyncClient, demo_token: str,
                tmp_path: Path) -> AsyncIterator[Cloud]:
    config.nats.url = nats_url
    config.controller.reconcile_seconds = 0.5
    config.controller.host_down_seconds = 1.5
    config.agent.heartbeat_seconds = 0.25
    config.agent.underlay_address = "192.0.2.10"
    config.agent.memory_mb = 4096
    app.state.bus = await nats.connect(nats_url)
    image_id, network_id = await seed(app)
    controller = ControllerService(config)
    await controller.start()
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"QFI")
    c = Cloud(config=config, client=client, token=demo_token, app=app, controller=controller,
              compute=SimulatedComputeDriver(), network=SimulatedNetworkDriver(),
              images=FakeImageCache(base), agent=None, image_id=image_id, network_id=network_id)
    c.agent = c.new_agent()
    await c.agent.start()
    try:
        yield c
    finally:
        for agent in c.agents:
            if agent.nc is not None:
                await agent.stop()
        await controller.stop()
        await app.state.bus.close()
        app.state.bus = None
