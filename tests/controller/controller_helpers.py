"""Helpers for the control-flow tests: a small cloud in one event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from cloudland.agent.drivers.compute.simulated import SimulatedComputeDriver
from cloudland.agent.drivers.network.simulated import SimulatedNetworkDriver
from cloudland.agent.service import AgentService
from cloudland.bus.messages import ImageRef
from cloudland.config import Config
from cloudland.controller.service import ControllerService
from cloudland.db.models import Flavor, Image, Network, Port, Project, Subnet

V21 = "/compute/v2.1"
HOST = "hv1"


class FakeImageCache:
    """The agent's image cache without HTTP: every image is already there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.refs: list[ImageRef] = []

    async def ensure(self, ref: ImageRef) -> Path:
        self.refs.append(ref)
        return self.path


@dataclass
class Cloud:
    config: Config
    client: httpx.AsyncClient
    token: str
    app: Any
    controller: ControllerService
    compute: SimulatedComputeDriver
    network: SimulatedNetworkDriver
    images: FakeImageCache
    agent: AgentService | None
    image_id: str = ""
    network_id: str = ""
    agents: list[AgentService] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Auth-Token": self.token}

    def new_agent(self) -> AgentService:
        agent = AgentService(self.config, self.compute, self.network, host_id=HOST, image_cache=self.images)  # type: ignore[arg-type]
        self.agents.append(agent)
        return agent

    async def start_host(self, host: str, address: str) -> AgentService:
        """Another simulated hypervisor, with its own underlay address."""
        cfg = self.config.model_copy(deep=True)
        cfg.agent.underlay_address = address
        agent = AgentService(cfg, SimulatedComputeDriver(), SimulatedNetworkDriver(), host_id=host,
                             image_cache=self.images)  # type: ignore[arg-type]
        self.agents.append(agent)
        await agent.start()
        return agent

    async def wait_hosts_up(self, hosts: Any) -> None:
        from cloudland.db.models import Host

        async def up() -> bool:
            async with self.app.state.sessionmaker() as s:
                return set(await s.scalars(select(Host.id).where(Host.status == "up"))) >= set(hosts)

        await wait_for(up)

    async def create(self, **extra: Any) -> str:
        body = {"server": {"name": "vm", "imageRef": self.image_id, "flavorRef": "1", **extra}}
        r = await self.client.post(f"{V21}/servers", json=body, headers=self.headers)
        assert r.status_code == 202, r.text
        return r.json()["server"]["id"]

    async def show(self, server_id: str) -> httpx.Response:
        return await self.client.get(f"{V21}/servers/{server_id}", headers=self.headers)

    async def action(self, server_id: str, body: dict[str, Any]) -> httpx.Response:
        return await self.client.post(f"{V21}/servers/{server_id}/action", json=body, headers=self.headers)

    async def wait_passes(self, n: int) -> None:
        """Until the controller has run ``n`` more passes."""
        passes = self.controller.passes

        async def done() -> bool:
            return self.controller.passes >= passes + n

        await wait_for(done)

    async def wait_status(self, server_id: str, status: str, timeout: float = 15.0) -> dict[str, Any]:
        server: dict[str, Any] = {}

        async def reached() -> bool:
            nonlocal server
            server = (await self.show(server_id)).json().get("server", {})
            return server.get("status") == status and server.get("OS-EXT-STS:task_state") is None

        await wait_for(reached, timeout, lambda: f"{server_id} never reached {status}: {server}")
        return server


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0,
                   describe: Callable[[], str] = lambda: "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {describe()}")
        await asyncio.sleep(0.05)


async def seed(app: Any) -> tuple[str, str]:
    async with app.state.sessionmaker() as s, s.begin():
        demo = (await s.scalars(select(Project.id).where(Project.name == "demo"))).one()
        s.add_all([Flavor(id="1", name="m1.tiny", vcpus=1, ram=512, disk=1),
                   Flavor(id="big", name="big", vcpus=2, ram=8192, disk=1)])
        image = Image(name="cirros", status="active", visibility="public", disk_format="qcow2",
                      size=1024, os_hash_algo="sha512", os_hash_value="ab" * 64)
        net = Network(name="private", project_id=demo, segmentation_id=1000)
        s.add_all([image, net])
        await s.flush()
        subnet = Subnet(network_id=net.id, project_id=demo, cidr="10.0.0.0/24", gateway_ip="10.0.0.1",
                        allocation_pools=[{"start": "10.0.0.3", "end": "10.0.0.254"}])
        s.add(subnet)
        s.add(Port(network_id=net.id, project_id=demo, mac_address="fa:16:3e:00:00:02",
                   device_id=f"dhcp-{net.id}", device_owner="network:dhcp"))
        return image.id, net.id


