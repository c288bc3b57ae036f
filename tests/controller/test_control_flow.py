"""API → controller → agent over a real nats-server, with the simulated drivers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from controller_helpers import HOST, Cloud, wait_for  # type: ignore[import-not-found]
from sqlalchemy import select

from cloudland.db.models import Instance, IpAllocation, Port


async def ports_of(cloud: Cloud, server_id: str) -> list[Port]:
    async with cloud.app.state.sessionmaker() as s:
        return list(await s.scalars(select(Port).where(Port.device_id == server_id)))


@pytest.mark.both_databases
async def test_lifecycle(cloud: Cloud) -> None:
    sid = await cloud.create()
    server = await cloud.wait_status(sid, "ACTIVE")
    assert server["OS-EXT-STS:power_state"] == 1 and server["OS-SRV-USG:launched_at"]
    assert server["hostId"] and server["addresses"]["private"][0]["addr"].startswith("10.0.0.")
    guest = cloud.compute.instances[sid]
    assert guest.boots == 1 and guest.spec.memory_mb == 512
    assert cloud.images.refs[0].id == cloud.image_id and "/internal/images/" in cloud.images.refs[0].url
    (port,) = await ports_of(cloud, sid)
    assert port.binding_host_id == HOST
    net = cloud.network.networks[cloud.network_id]
    assert [p.port_id for p in net.ports] == [port.id]
    assert net.dhcp_port is not None and net.segmentation_id == 1000 and net.subnets[0].cidr == "10.0.0.0/24"
    await assert_quiet(cloud)

    assert (await cloud.action(sid, {"os-stop": None})).status_code == 202
    server = await cloud.wait_status(sid, "SHUTOFF")
    assert server["OS-EXT-STS:power_state"] == 4 and cloud.compute.instances[sid].state == "stopped"
    assert (await cloud.action(sid, {"os-start": None})).status_code == 202
    await cloud.wait_status(sid, "ACTIVE")
    assert cloud.compute.instances[sid].boots == 2

    assert (await cloud.action(sid, {"reboot": {"type": "SOFT"}})).status_code == 202
    await cloud.wait_status(sid, "ACTIVE")
    assert cloud.compute.instances[sid].reboots == 1

    r = await cloud.action(sid, {"os-getConsoleOutput": {"length": 2}})
    assert r.status_code == 200
    assert r.json()["output"].endswith("cloudland-guest: booted\n")
    assert len(r.json()["output"].splitlines()) == 2

    r = await cloud.client.delete(f"/compute/v2.1/servers/{sid}", headers=cloud.headers)
    assert r.status_code == 204
    await wait_for(lambda: _gone(cloud, sid))

    async def finalized() -> bool:
        async with cloud.app.state.sessionmaker() as s:
            inst = await s.get(Instance, sid)
            return inst is not None and inst.vm_state == "deleted" and inst.deleted_at is not None

    await wait_for(finalized)
    assert sid not in cloud.compute.instances
    assert await ports_of(cloud, sid) == []
    async with cloud.app.state.sessionmaker() as s:
        assert list(await s.scalars(select(IpAllocation).where(IpAllocation.port_id == port.id))) == []
    await wait_for(lambda: _true(cloud.network_id not in cloud.network.networks))


async def _true(value: bool) -> bool:
    return value


async def assert_quiet(cloud: Cloud) -> None:
    """Converged: a few passes send nothing, and the controller's view matches the heartbeat's."""
    reconciler = cloud.controller.reconciler
    assert reconciler is not None and cloud.agent is not None
    sent: list[object] = []
    original = reconciler.send

    async def record(host: str, command: object, data: bytes) -> None:
        sent.append(command)
        await original(host, command, data)  # type: ignore[arg-type]

    reconciler.send = record  # type: ignore[method-assign]
    await cloud.wait_passes(3)
    reconciler.send = original  # type: ignore[method-assign]
    assert sent == []
    assert reconciler.believed_digest(HOST) == cloud.agent.heartbeat().state_digest


@pytest.mark.e2e  # restarts processes: seconds each, with the end-to-end set
async def test_delete_while_agent_stopped(cloud: Cloud) -> None:
    sid = await cloud.create()
    await cloud.wait_status(sid, "ACTIVE")
    assert cloud.agent is not None
    await cloud.agent.stop()
    r = await cloud.client.delete(f"/compute/v2.1/servers/{sid}", headers=cloud.headers)
    assert r.status_code == 204
    await wait_for(lambda: _gone(cloud, sid))

    async def finalized() -> bool:
        async with cloud.app.state.sessionmaker() as s:
            inst = await s.get(Instance, sid)
            return inst is not None and inst.deleted_at is not None

    await wait_for(finalized)  # local delete once the host is down
    assert await ports_of(cloud, sid) == []
    assert sid in cloud.compute.instances  # the guest outlived its agent
    agent = cloud.new_agent()
    await agent.start()
    await wait_for(lambda: _true(sid not in cloud.compute.instances), describe=lambda: "guest not destroyed")


async def test_no_valid_host(cloud: Cloud) -> None:
    ok = await cloud.create(name="fits")
    sid = await cloud.create(name="toobig", flavorRef="big")
    server = await cloud.wait_status(sid, "ERROR")
    assert server["fault"]["message"] == "No valid host was found. There are not enough hosts available."
    assert server["fault"]["code"] == 500
    await cloud.wait_status(ok, "ACTIVE")
    assert sid not in cloud.compute.instances
    r = await cloud.client.delete(f"/compute/v2.1/servers/{sid}", headers=cloud.headers)
    assert r.status_code == 204
    await wait_for(lambda: _ports_gone(cloud, sid))


async def _gone(cloud: Cloud, sid: str) -> bool:
    """The server stays visible ("deleting") until its host destroyed it or went down."""
    return (await cloud.show(sid)).status_code == 404


async def _ports_gone(cloud: Cloud, sid: str) -> bool:
    return await ports_of(cloud, sid) == []


@pytest.mark.e2e  # restarts processes: seconds each, with the end-to-end set
async def test_agent_restart_keeps_instances(cloud: Cloud) -> None:
    sids = [await cloud.create(name=f"vm{i}") for i in range(3)]
    for sid in sids:
        await cloud.wait_status(sid, "ACTIVE")
    assert cloud.agent is not None
    await cloud.agent.stop()
    agent = cloud.new_agent()
    await agent.start()
    await cloud.wait_passes(4)
    for sid in sids:
        await cloud.wait_status(sid, "ACTIVE", timeout=2)
        assert cloud.compute.instances[sid].boots == 1 and cloud.compute.instances[sid].reboots == 0
    cloud.agent = agent
    await assert_quiet(cloud)


@pytest.mark.e2e  # restarts processes: seconds each, with the end-to-end set
async def test_controller_restart_is_quiet(cloud: Cloud) -> None:
    from cloudland.controller.service import ControllerService

    sid = await cloud.create()
    await cloud.wait_status(sid, "ACTIVE")
    await cloud.controller.stop()
    cloud.controller = ControllerService(cloud.config)
    await cloud.controller.start()
    # The new controller learns the host's state and re-sends network specs once (peers may
    # have changed while nobody watched); after that it is quiet.
    reconciler = cloud.controller.reconciler
    assert reconciler is not None
    await wait_for(lambda: _true(HOST in reconciler.synced and not reconciler.has_work))
    await cloud.wait_passes(2)
    await assert_quiet(cloud)
    assert cloud.compute.instances[sid].boots == 1
    assert (await cloud.action(sid, {"os-stop": None})).status_code == 202
    await cloud.wait_status(sid, "SHUTOFF")


@contextlib.asynccontextmanager
async def passes_held(cloud: Cloud) -> AsyncIterator[None]:
    """The controller's next pass starts and waits (a long pass, as at scale) until the block ends."""
    reconciler = cloud.controller.reconciler
    assert reconciler is not None
    held, release = asyncio.Event(), asyncio.Event()
    original = reconciler.run_pass

    async def slow_pass(sweep: bool = False) -> None:
        held.set()
        await release.wait()
        await original(sweep)

    reconciler.run_pass = slow_pass  # type: ignore[method-assign]
    try:
        await asyncio.wait_for(held.wait(), 5)
        yield
    finally:
        release.set()
        reconciler.run_pass = original  # type: ignore[method-assign]


@pytest.mark.both_databases
async def test_reports_are_written_while_a_pass_runs(cloud: Cloud) -> None:
    """The status writer puts reports in the table beside the passes: with every pass held
    (a slow one, at scale), a guest that powers itself off still shows SHUTOFF."""
    sid = await cloud.create()
    await cloud.wait_status(sid, "ACTIVE")
    async with passes_held(cloud):
        passes = cloud.controller.passes
        cloud.compute.guest_power_off(sid)
        server = await cloud.wait_status(sid, "SHUTOFF")
        assert server["OS-EXT-STS:power_state"] == 4
        assert cloud.controller.passes == passes


@pytest.mark.e2e  # waits out a host's down threshold: seconds, with the end-to-end set
@pytest.mark.both_databases
async def test_a_dead_host_is_written_down_while_a_pass_runs(cloud: Cloud) -> None:
    """The host watcher marks and writes a silent host down beside the passes: with every pass
    held, the hosts table says ``down`` within the threshold and a second or so."""
    from cloudland.db.models import Host

    await cloud.wait_hosts_up([HOST])
    assert cloud.agent is not None
    async with passes_held(cloud):
        await cloud.agent.stop()

        async def down() -> bool:
            async with cloud.app.state.sessionmaker() as s:
                host = await s.get(Host, HOST)
                return host is not None and host.status == "down"

        await wait_for(down, 6, lambda: "the silent host is not down in the table")


@pytest.mark.e2e  # restarts processes: seconds each, with the end-to-end set
async def test_guest_shutdown_is_adopted_but_restarted_agent_brings_guests_back(cloud: Cloud) -> None:
    kept, restored = await cloud.create(name="kept"), await cloud.create(name="restored")
    for sid in (kept, restored):
        await cloud.wait_status(sid, "ACTIVE")
    # A guest that powers itself off under a running agent stays off, as in Nova.
    cloud.compute.guest_power_off(kept)
    await cloud.wait_status(kept, "SHUTOFF")
    # A guest found stopped by a restarted agent (host reboot, `cloudland down`) that should
    # run is started again.
    assert cloud.agent is not None
    await cloud.agent.stop()
    cloud.compute.guest_power_off(restored)
    agent = cloud.new_agent()
    await agent.start()
    cloud.agent = agent
    await wait_for(lambda: _true(cloud.compute.instances[restored].boots == 2),
                   describe=lambda: "the stopped guest was not started again")
    await cloud.wait_status(restored, "ACTIVE")
    assert (await cloud.wait_status(kept, "SHUTOFF"))["OS-EXT-STS:power_state"] == 4
