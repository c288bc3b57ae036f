"""AgentService over a real nats-server, with the simulated drivers standing in for the host."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client

from cloudland.agent.drivers.compute.simulated import SimulatedComputeDriver
from cloudland.agent.drivers.network.simulated import SimulatedNetworkDriver
from cloudland.agent.factory import build_drivers, host_tag, underlay_address
from cloudland.agent.instance_state import InstanceStateStore
from cloudland.agent.member_sets import MemberSets
from cloudland.agent.service import AgentService, _changed_list, _follows
from cloudland.allinone.nats import NatsServer
from cloudland.bus import subjects
from cloudland.bus.connection import subscriptions_ready
from cloudland.bus.messages import (
    ConsoleOutput,
    EnsureInstance,
    EnsureInstanceAbsent,
    EnsureNetwork,
    EnsureNetworkAbsent,
    GetConsoleOutput,
    GetHostState,
    GetSet,
    GroupMembers,
    Heartbeat,
    HostState,
    ImageRef,
    InstanceSpec,
    InstanceStatus,
    Message,
    NetworkPeers,
    NetworkSpec,
    PortSpec,
    SetVersion,
    decode,
    encode,
)
from cloudland.bus.shared_subscriptions import SharedSubscriptions
from cloudland.config import Config

IMAGE = b"QFI\xfb" + b"cloudland test image" * 1000
HOST = "test-host"


@pytest.fixture
def image_url() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/image":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMAGE)))
            self.end_headers()
            self.wfile.write(IMAGE)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/image"
    finally:
        server.shutdown()
        server.server_close()


def image_ref(url: str, image_id: str = "img-1", hash_value: str | None = None) -> ImageRef:
    return ImageRef(id=image_id, url=url, hash_algo="sha512",
                    hash_value=hash_value or hashlib.sha512(IMAGE).hexdigest(), size=len(IMAGE))


def make_spec(iid: str, image: ImageRef | None, **kw: object) -> InstanceSpec:
    ports = [PortSpec(port_id=f"port-{iid}", network_id="net-1", mac_address="fa:16:3e:00:00:01")]
    fields: dict[str, object] = {"id": iid, "name": f"vm-{iid}", "project_id": "p", "vcpus": 1,
                                 "memory_mb": 256, "disk_gb": 1, "image": image, "ports": ports}
    fields.update(kw)
    return InstanceSpec(**fields)  # type: ignore[arg-type]


class Harness:
    """Drives one agent: sends commands, collects its reports."""

    def __init__(self, config: Config, nc: Client) -> None:
        self.config = config
        self.nc = nc
        self.compute = SimulatedComputeDriver(vcpus=8, memory_mb=16384, disk_gb=100)
        self.network = SimulatedNetworkDriver()
        self.reports: list[Message] = []
        self._changed = asyncio.Event()
        self.agent: AgentService | None = None

    async def on_report(self, msg: object) -> None:
        self.reports.append(decode(msg.data))  # type: ignore[attr-defined]
        self._changed.set()

    async def start_agent(self) -> AgentService:
        self.agent = AgentService(self.config, self.compute, self.network)
        await self.agent.start()
        return self.agent

    async def send(self, cmd: Message) -> None:
        await self.nc.publish(subjects.host_cmd(HOST), encode(cmd))

    async def request(self, req: Message) -> Message:
        reply = await self.nc.request(subjects.host_rpc(HOST), encode(req), timeout=5)
        return decode(reply.data)

    def statuses(self, iid: str) -> list[InstanceStatus]:
        return [r for r in self.reports if isinstance(r, InstanceStatus) and r.instance_id == iid]

    async def wait_for(self, pred: Callable[[], object], timeout: float = 5.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not pred():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"timed out; last reports: {self.reports[-5:]}; instances: {self.compute.instances}")

    async def wait_state(self, iid: str, state: str, after: int = 0) -> InstanceStatus:
        def found() -> InstanceStatus | None:
            return next((s for s in self.statuses(iid)[after:] if s.state == state), None)
        await self.wait_for(found)
        result = found()
        assert result is not None
        return result


@pytest.fixture
async def harness(config: Config, nats_url: str) -> AsyncIterator[Harness]:
    config.nats.url = nats_url
    config.agent.heartbeat_seconds = 0.1
    config.agent.underlay_address = "192.0.2.10"
    nc = await nats.connect(nats_url)
    h = Harness(config, nc)
    await nc.subscribe(subjects.report(config.agent.zone), cb=h.on_report)
    await nc.subscribe(subjects.heartbeat(config.agent.zone), cb=h.on_report)  # (no relay here)
    await subscriptions_ready(nc)
    await h.start_agent()
    try:
        yield h
    finally:
        if h.agent:
            await h.agent.stop()
        await nc.close()


async def test_start_reports_host_state_then_heartbeats(harness: Harness) -> None:
    await harness.wait_for(lambda: any(isinstance(r, Heartbeat) for r in harness.reports))
    assert isinstance(harness.reports[0], HostState)
    hb = next(r for r in harness.reports if isinstance(r, Heartbeat))
    assert (hb.host_id, hb.zone, hb.address, hb.driver) == (HOST, "nova", "192.0.2.10", "simulated")
    assert (hb.resources.vcpus, hb.resources.memory_mb, hb.resources.disk_gb) == (8, 16384, 100)
    assert hb.instance_count == 0 and len(hb.boot_id) == 16


async def test_configured_resources_override_measured(config: Config) -> None:
    config.agent.vcpus = 2
    agent = AgentService(config, SimulatedComputeDriver(vcpus=8, memory_mb=1024), SimulatedNetworkDriver())
    r = agent.resources()
    assert (r.vcpus, r.memory_mb, r.disk_gb) == (2, 1024, 4096)


async def test_ensure_instance_builds_and_repeat_is_harmless(harness: Harness, image_url: str) -> None:
    spec = make_spec("i-1", image_ref(image_url))
    await harness.send(EnsureInstance(spec=spec))
    running = await harness.wait_state("i-1", "running")
    assert [s.state for s in harness.statuses("i-1")] == ["building", "running"]
    assert running.host_id == HOST and running.reboot_generation == 0
    inst = harness.compute.instances["i-1"]
    assert inst.base_image is not None and inst.base_image.read_bytes() == IMAGE
    assert harness.network.taps == {spec.ports[0].tap_name}

    await harness.send(EnsureInstance(spec=spec))
    await harness.wait_for(lambda: len(harness.statuses("i-1")) == 3)
    assert harness.statuses("i-1")[-1].state == "running"
    assert inst.boots == 1 and inst.reboots == 0


async def test_power_stopped_then_running(harness: Harness) -> None:
    spec = make_spec("i-2", None)
    await harness.send(EnsureInstance(spec=spec))
    await harness.wait_state("i-2", "running")
    await harness.send(EnsureInstance(spec=make_spec("i-2", None, power="stopped")))
    await harness.wait_state("i-2", "stopped")
    assert harness.compute.instances["i-2"].state == "stopped"
    n = len(harness.statuses("i-2"))
    await harness.send(EnsureInstance(spec=spec))
    await harness.wait_state("i-2", "running", after=n)


async def test_reboot_once_also_across_restart(harness: Harness) -> None:
    await harness.send(EnsureInstance(spec=make_spec("i-3", None)))
    await harness.wait_state("i-3", "running")
    inst = harness.compute.instances["i-3"]
    rebooted = make_spec("i-3", None, reboot_generation=1, reboot_hard=True)
    for _ in range(3):
        await harness.send(EnsureInstance(spec=rebooted))
    await harness.wait_for(lambda: any(s.reboot_generation == 1 for s in harness.statuses("i-3")))
    await harness.request(GetHostState())  # the agent has seen all three by now
    await harness.wait_for(lambda: harness.agent is not None and harness.agent.idle)
    assert inst.reboots == 1 and inst.boots == 1

    # A new agent process (same host, same state dir; the guest survived).
    assert harness.agent is not None
    await harness.agent.stop()
    assert harness.compute.closed
    await harness.start_agent()
    n = len(harness.statuses("i-3"))
    await harness.send(EnsureInstance(spec=rebooted))
    status = await harness.wait_state("i-3", "running", after=n)
    assert status.reboot_generation == 1 and inst.reboots == 1
    await harness.send(EnsureInstance(spec=make_spec("i-3", None, reboot_generation=2)))
    await harness.wait_for(lambda: harness.statuses("i-3")[-1].reboot_generation == 2)
    assert inst.reboots == 2


async def test_absent_destroys_and_unplugs(harness: Harness) -> None:
    spec = make_spec("i-4", None)
    await harness.send(EnsureInstance(spec=spec))
    await harness.wait_state("i-4", "running")
    await harness.send(EnsureInstanceAbsent(instance_id="i-4"))
    absent = await harness.wait_state("i-4", "absent")
    assert absent.host_id == HOST
    assert "i-4" not in harness.compute.instances
    assert harness.network.ports == {}
    # Absent for something that never existed is still answered.
    await harness.send(EnsureInstanceAbsent(instance_id="never"))
    await harness.wait_state("never", "absent")


async def test_console_output_and_host_state(harness: Harness) -> None:
    await harness.send(EnsureInstance(spec=make_spec("i-5", None)))
    await harness.send(EnsureNetwork(spec=NetworkSpec(id="net-1", segmentation_id=100)))
    await harness.wait_state("i-5", "running")

    out = await harness.request(GetConsoleOutput(instance_id="i-5"))
    assert isinstance(out, ConsoleOutput) and out.found and "cloudland-guest: booted" in out.output
    last = await harness.request(GetConsoleOutput(instance_id="i-5", length=1))
    assert isinstance(last, ConsoleOutput) and last.output == "cloudland-guest: booted\n"
    missing = await harness.request(GetConsoleOutput(instance_id="nope"))
    assert isinstance(missing, ConsoleOutput) and not missing.found

    await harness.wait_for(lambda: "net-1" in harness.network.networks)
    state = await harness.request(GetHostState())
    assert isinstance(state, HostState) and state.host_id == HOST and state.networks == ["net-1"]
    assert [(s.instance_id, s.state) for s in state.instances] == [("i-5", "running")]

    await harness.send(EnsureNetworkAbsent(network_id="net-1"))
    await harness.wait_for(lambda: "net-1" not in harness.network.networks)


async def test_heartbeat_digest_follows_state(harness: Harness) -> None:
    def last_heartbeat() -> Heartbeat:
        return [r for r in harness.reports if isinstance(r, Heartbeat)][-1]

    async def next_heartbeat() -> Heartbeat:
        n = len(harness.reports)
        await harness.wait_for(lambda: any(isinstance(r, Heartbeat) for r in harness.reports[n:]))
        return last_heartbeat()

    empty = await next_heartbeat()
    await harness.send(EnsureInstance(spec=make_spec("i-6", None)))
    await harness.wait_state("i-6", "running")
    running = await next_heartbeat()
    assert running.state_digest != empty.state_digest and running.instance_count == 1
    await harness.send(EnsureInstance(spec=make_spec("i-6", None, power="stopped")))
    await harness.wait_state("i-6", "stopped")
    stopped = await next_heartbeat()
    assert stopped.state_digest not in (empty.state_digest, running.state_digest)
    assert (await next_heartbeat()).state_digest == stopped.state_digest


async def test_bad_image_reports_error_and_agent_keeps_working(harness: Harness, image_url: str) -> None:
    bad = make_spec("i-7", image_ref(image_url, image_id="img-bad", hash_value="ab" * 64))
    await harness.send(EnsureInstance(spec=bad))
    error = await harness.wait_state("i-7", "error")
    assert error.error is not None and "checksum mismatch" in error.error
    assert "i-7" not in harness.compute.instances

    state = await harness.request(GetHostState())
    assert isinstance(state, HostState)
    assert [(s.instance_id, s.state) for s in state.instances] == [("i-7", "error")]

    await harness.send(EnsureInstance(spec=make_spec("i-8", image_ref(image_url))))
    await harness.wait_state("i-8", "running")
    # Retrying the failed instance with a good image recovers it.
    await harness.send(EnsureInstance(spec=make_spec("i-7", image_ref(image_url))))
    await harness.wait_state("i-7", "running")


async def test_guest_that_stops_by_itself_is_reported(harness: Harness) -> None:
    await harness.send(EnsureInstance(spec=make_spec("i-9", None)))
    await harness.wait_state("i-9", "running")
    n = len(harness.statuses("i-9"))
    harness.compute.guest_power_off("i-9")
    stopped = await harness.wait_state("i-9", "stopped", after=n)
    assert stopped.host_id == HOST
    await asyncio.sleep(0.3)
    assert len(harness.statuses("i-9")) == n + 1  # reported once, not on every tick


async def test_commands_for_one_instance_run_in_order(harness: Harness) -> None:
    harness.compute.delay = 0.05
    for power in ("running", "stopped", "running", "stopped"):
        await harness.send(EnsureInstance(spec=make_spec("i-10", None, power=power)))
    await harness.wait_for(lambda: "i-10" in harness.compute.instances
                           and harness.compute.instances["i-10"].state == "stopped"
                           and harness.statuses("i-10")[-1].state == "stopped")
    await asyncio.sleep(0.3)
    assert harness.compute.instances["i-10"].state == "stopped"
    assert harness.statuses("i-10")[-1].state == "stopped"


async def test_undecodable_command_is_ignored(harness: Harness) -> None:
    await harness.nc.publish(subjects.host_cmd(HOST), b"not json")
    await harness.nc.publish(subjects.host_cmd(HOST), msgspec.json.encode({"kind": "bogus"}))
    await harness.send(EnsureInstance(spec=make_spec("i-11", None)))
    await harness.wait_state("i-11", "running")


async def test_restart_reports_surviving_guests(harness: Harness) -> None:
    await harness.send(EnsureInstance(spec=make_spec("i-12", None)))
    await harness.wait_state("i-12", "running")
    assert harness.agent is not None
    old_boot = harness.agent.boot_id
    await harness.agent.stop()
    n = len(harness.reports)
    agent = await harness.start_agent()
    assert agent.boot_id != old_boot
    await harness.wait_for(lambda: any(isinstance(r, HostState) for r in harness.reports[n:]))
    state = next(r for r in harness.reports[n:] if isinstance(r, HostState))
    assert [(s.instance_id, s.state) for s in state.instances] == [("i-12", "running")]


async def test_reconnect_reports_full_state(config: Config, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = NatsServer(port=port, work_dir=tmp_path / "nats-restart")
    await server.start()
    config.nats.url = server.url
    config.agent.heartbeat_seconds = 0.1
    agent = AgentService(config, SimulatedComputeDriver(), SimulatedNetworkDriver())
    host_state_sent = asyncio.Event()
    publish = agent._publish

    async def recording_publish(msg: Message) -> None:
        if isinstance(msg, HostState):
            host_state_sent.set()
        await publish(msg)

    agent._publish = recording_publish  # type: ignore[method-assign]
    await agent.start()
    nc: Client | None = None
    try:
        await server.stop()
        host_state_sent.clear()
        await server.start()
        # Which of the agent and a test subscriber reconnects first is a race, so the
        # report is observed where it is published.
        await asyncio.wait_for(host_state_sent.wait(), 10)
        assert agent.nc is not None and agent.nc.stats["reconnects"] == 1
        nc = await nats.connect(server.url)
        request = encode(GetConsoleOutput(instance_id="x"))
        reply = await nc.request(subjects.host_rpc(HOST), request, timeout=5)
        assert decode(reply.data) == ConsoleOutput(output="", found=False)
    finally:
        await agent.stop()
        if nc is not None:
            await nc.close()
        await server.stop()


def test_factory_builds_configured_drivers(config: Config) -> None:
    config.agent.compute_driver = "simulated"
    config.agent.vcpus = 3
    compute, network = build_drivers(config, HOST)
    assert isinstance(compute, SimulatedComputeDriver) and isinstance(network, SimulatedNetworkDriver)
    assert compute.resources().vcpus == 3

    config.agent.compute_driver = "qemu"
    config.agent.accel = "tcg"
    config.agent.underlay_address = "192.0.2.7"
    compute, network = build_drivers(config, HOST)
    assert (compute.name, network.name) == ("qemu", "linux")
    assert network.underlay_address == "192.0.2.7"  # type: ignore[attr-defined]
    assert host_tag(HOST) == host_tag(HOST) != host_tag("other-host")


def test_underlay_address_defaults_to_a_local_address(config: Config) -> None:
    address = underlay_address(config)
    assert address == "127.0.0.1" or not address.startswith("0.")


async def network_spec_shows(network: SimulatedNetworkDriver, net: str,
                             part: Callable[[NetworkSpec], object], expected: object) -> None:
    """Wait (5 s at most) until the network's applied spec has ``part`` equal to ``expected``."""
    for _ in range(500):
        if (spec := network.networks.get(net)) is not None and part(spec) == expected:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"{net}: {network.networks.get(net)}, expected {expected}")


async def test_peer_lists_whole_and_changes(harness: Harness) -> None:
    """``NetworkPeers`` on the network's subject: a whole list replaces the spec's peers, a change
    adds and removes (again: no harm); the agent's own address is never a peer; a network the
    agent does not carry is ignored."""
    network = harness.network

    async def peers_become(expected: list[str]) -> None:
        await network_spec_shows(network, "net-1", lambda spec: spec.peers, expected)

    async def publish(net: str, **fields: object) -> None:
        await harness.nc.publish(subjects.network_peers(net), encode(NetworkPeers(network_id=net, **fields)))  # type: ignore[arg-type]

    await harness.send(EnsureNetwork(spec=NetworkSpec(id="net-1", segmentation_id=100, peers=["192.0.2.1"])))
    await peers_become(["192.0.2.1"])
    assert harness.agent is not None and harness.agent.nc is not None
    await subscriptions_ready(harness.agent.nc)
    await publish("net-1", addresses=["192.0.2.10", "192.0.2.2", "192.0.2.1"])  # .10 is this host
    await peers_become(["192.0.2.1", "192.0.2.2"])
    await publish("net-1", full=False, added=["192.0.2.3", "192.0.2.10"], removed=["192.0.2.1"])
    await peers_become(["192.0.2.2", "192.0.2.3"])
    await publish("net-1", full=False, added=["192.0.2.3"], removed=["192.0.2.1"])  # again
    await publish("net-2", addresses=["192.0.2.9"])
    await publish("net-1", full=False, added=["192.0.2.4"])
    await peers_become(["192.0.2.2", "192.0.2.3", "192.0.2.4"])
    assert "net-2" not in network.networks


async def test_group_members_whole_and_changes(harness: Harness) -> None:
    """``GroupMembers`` on a remote group's subject changes that group's member set in every
    network spec naming it; a spec not naming it, and other groups, stay as they are."""
    network = harness.network

    def members(net: str) -> dict[str, list[str]] | None:
        spec = network.networks.get(net)
        return None if spec is None else spec.remote_groups

    async def become(net: str, expected: dict[str, list[str]]) -> None:
        await network_spec_shows(network, net, lambda spec: spec.remote_groups, expected)

    async def publish(group: str, **fields: object) -> None:
        await harness.nc.publish(subjects.group_members(group),
                                 encode(GroupMembers(group_id=group, **fields)))  # type: ignore[arg-type]

    both = {"g1": ["10.0.0.5"], "g2": ["10.0.9.9"]}
    await harness.send(EnsureNetwork(spec=NetworkSpec(id="net-1", segmentation_id=100, remote_groups=both)))
    await harness.send(EnsureNetwork(spec=NetworkSpec(id="net-2", segmentation_id=101,
                                                      remote_groups={"g1": ["10.0.0.5"]})))
    await harness.send(EnsureNetwork(spec=NetworkSpec(id="net-3", segmentation_id=102)))
    await become("net-2", {"g1": ["10.0.0.5"]})
    assert harness.agent is not None and harness.agent.nc is not None
    await subscriptions_ready(harness.agent.nc)
    await publish("g1", full=False, added=["10.0.0.6", "10.0.0.7"], removed=["10.0.0.5"])
    await become("net-1", {"g1": ["10.0.0.6", "10.0.0.7"], "g2": ["10.0.9.9"]})
    await become("net-2", {"g1": ["10.0.0.6", "10.0.0.7"]})
    await publish("g1", addresses=["10.0.0.8"])
    await publish("g3", addresses=["10.0.3.3"])
    await become("net-1", {"g1": ["10.0.0.8"], "g2": ["10.0.9.9"]})
    await become("net-2", {"g1": ["10.0.0.8"]})
    assert members("net-3") == {}


async def test_versioned_sets_ask_for_the_whole_set_when_a_message_is_missing(harness: Harness) -> None:
    """A spec carries its sets' versions; the next message of a set follows on (taken), an older
    one is ignored, and one after a gap (or a mark of a newer version) is taken and the whole set
    asked of a controller (``GetSet``), whose answer replaces the set."""
    network = harness.network
    asked: list[GetSet] = []
    answers: dict[tuple[str, str], Message | None] = {}

    async def controller(msg: object) -> None:
        request = decode(msg.data)  # type: ignore[attr-defined]
        assert isinstance(request, GetSet)
        asked.append(request)
        answer = answers.get((request.set_kind, request.key))
        await msg.respond(encode(answer) if answer else b"")  # type: ignore[attr-defined]

    await harness.nc.subscribe(subjects.CONTROLLER_SETS, cb=controller)
    v = "e1"
    spec = NetworkSpec(id="net-1", segmentation_id=100, peers=["192.0.2.1"], peers_version=SetVersion(v, 3),
                       remote_groups={"g1": ["10.0.0.1"]}, remote_group_versions={"g1": SetVersion(v, 7)})
    await harness.send(EnsureNetwork(spec=spec))
    await network_spec_shows(network, "net-1", lambda s: s.peers, ["192.0.2.1"])
    assert harness.agent is not None and harness.agent.nc is not None
    await subscriptions_ready(harness.agent.nc)

    async def peers(**fields: object) -> None:
        await harness.nc.publish(subjects.network_peers("net-1"),
                                 encode(NetworkPeers(network_id="net-1", epoch=v, **fields)))  # type: ignore[arg-type]

    async def members(**fields: object) -> None:
        await harness.nc.publish(subjects.group_members("g1"),
                                 encode(GroupMembers(group_id="g1", epoch=v, **fields)))  # type: ignore[arg-type]

    await peers(full=False, added=["192.0.2.2"], seq=4)
    await network_spec_shows(network, "net-1", lambda s: (s.peers, s.peers_version),
                             (["192.0.2.1", "192.0.2.2"], SetVersion(v, 4)))
    await peers(full=False, removed=["192.0.2.2"], seq=4)  # a repeat: had it
    await members(full=False, removed=["10.0.0.1"], seq=6)  # older than the spec's set
    await members(full=False, added=["10.0.0.2"], seq=8)
    await network_spec_shows(network, "net-1", lambda s: (s.remote_groups, s.remote_group_versions),
                             ({"g1": ["10.0.0.1", "10.0.0.2"]}, {"g1": SetVersion(v, 8)}))
    assert network.networks["net-1"].peers == ["192.0.2.1", "192.0.2.2"]
    assert asked == []
    # Message 5 of the peers never came: 6 is taken, and the whole list asked for.
    answers[("peers", "net-1")] = NetworkPeers(network_id="net-1", addresses=["192.0.2.10", "192.0.2.7"],
                                               epoch=v, seq=6)
    await peers(full=False, added=["192.0.2.3"], seq=6)
    await network_spec_shows(network, "net-1", lambda s: (s.peers, s.peers_version),
                             (["192.0.2.7"], SetVersion(v, 6)))  # the whole list (without this host)
    assert asked == [GetSet(set_kind="peers", key="net-1")]
    # A mark of a version this host does not have: the whole set; unknown to the controller:
    # nothing changes (and the next message asks again).
    await members(full=False, seq=10)
    await harness.wait_for(lambda: len(asked) == 2)
    assert asked[1] == GetSet(set_kind="members", key="g1")
    answers[("members", "g1")] = GroupMembers(group_id="g1", addresses=["10.0.0.5"], epoch=v, seq=11)
    await members(full=False, added=["10.0.0.3"], seq=11)
    await network_spec_shows(network, "net-1", lambda s: (s.remote_groups, s.remote_group_versions),
                             ({"g1": ["10.0.0.5"]}, {"g1": SetVersion(v, 11)}))
    # Another publisher (a controller started since): its first message is whole.
    await harness.nc.publish(subjects.group_members("g1"),
                             encode(GroupMembers(group_id="g1", addresses=["10.0.0.9"], epoch="e2", seq=1)))
    await network_spec_shows(network, "net-1", lambda s: (s.remote_groups, s.remote_group_versions),
                             ({"g1": ["10.0.0.9"]}, {"g1": SetVersion("e2", 1)}))
    assert len(asked) == 3


async def test_a_spec_names_a_published_member_set_by_its_version(config: Config, nats_url: str) -> None:
    """A spec may name a published member set by its version alone: the agent fills it from a
    spec it holds at that version or later, else from its process's ``MemberSets``, else asks a
    controller once (agents of one process share the answer); a set not to be had is empty."""
    config.nats.url = nats_url
    config.agent.heartbeat_seconds = 5
    nc = await nats.connect(nats_url)
    asked: list[GetSet] = []
    g1 = ["10.0.0.1", "10.0.0.2"]

    async def controller(msg: object) -> None:
        request = decode(msg.data)  # type: ignore[attr-defined]
        assert isinstance(request, GetSet)
        asked.append(request)
        answer = GroupMembers(group_id="g1", addresses=g1, epoch="e", seq=4) if request.key == "g1" else None
        await msg.respond(encode(answer) if answer else b"")  # type: ignore[attr-defined]

    await nc.subscribe(subjects.CONTROLLER_SETS, cb=controller)
    shared = MemberSets()
    agents = [AgentService(config, SimulatedComputeDriver(), SimulatedNetworkDriver(), host_id=f"sim-{i}",
                           records=InstanceStateStore(None), nc=nc, member_sets=shared) for i in range(2)]
    networks = [a.network for a in agents]
    assert all(isinstance(n, SimulatedNetworkDriver) for n in networks)

    async def ensure(agent: AgentService, net: str, versions: dict[str, SetVersion]) -> None:
        spec = NetworkSpec(id=net, segmentation_id=100, remote_group_versions=versions)
        await nc.publish(subjects.host_cmd(agent.host_id), encode(EnsureNetwork(spec=spec)))

    def groups(i: int, net: str) -> object:
        spec = networks[i].networks.get(net)  # type: ignore[attr-defined]
        return None if spec is None else (spec.remote_groups, spec.remote_group_versions)

    try:
        for agent in agents:
            await agent.start()
        await subscriptions_ready(nc)
        await ensure(agents[0], "net-1", {"g1": SetVersion("e", 3)})
        await network_spec_shows(networks[0], "net-1", lambda s: (s.remote_groups, s.remote_group_versions),  # type: ignore[arg-type]
                                 ({"g1": g1}, {"g1": SetVersion("e", 4)}))
        assert asked == [GetSet(set_kind="members", key="g1")]
        await ensure(agents[0], "net-2", {"g1": SetVersion("e", 4)})  # held by net-1's spec
        await ensure(agents[1], "net-3", {"g1": SetVersion("e", 2)})  # held in the process
        await network_spec_shows(networks[0], "net-2", lambda s: s.remote_groups, {"g1": g1})  # type: ignore[arg-type]
        await network_spec_shows(networks[1], "net-3", lambda s: s.remote_groups, {"g1": g1})  # type: ignore[arg-type]
        assert len(asked) == 1
        pairs = zip(networks, ("net-1", "net-3"), strict=True)
        held = [n.networks[net].remote_groups["g1"] for n, net in pairs]  # type: ignore[attr-defined]
        assert held[1] is held[0]
        await ensure(agents[1], "net-4", {"g1": SetVersion("e", 5)})  # newer than any held: asked
        await ensure(agents[1], "net-5", {"g9": SetVersion("e", 1)})  # the controller has none
        await network_spec_shows(networks[1], "net-5", lambda s: (s.remote_groups, s.remote_group_versions),  # type: ignore[arg-type]
                                 ({"g9": []}, {}))
        assert groups(1, "net-4") == ({"g1": g1}, {"g1": SetVersion("e", 4)})
        assert [a.key for a in asked] == ["g1", "g1", "g9"]
    finally:
        for agent in agents:
            await agent.stop()
        await nc.close()


def test_a_set_follows_its_versions() -> None:
    """``_follows``: (take the message, a message before it is missing)."""
    at = SetVersion("e", 5)

    def msg(seq: int, full: bool = False, epoch: str = "e") -> GroupMembers:
        return GroupMembers(group_id="g", full=full, epoch=epoch, seq=seq)

    assert _follows(at, msg(6)) == (True, False)
    assert _follows(at, msg(5)) == (False, False) and _follows(at, msg(2)) == (False, False)
    assert _follows(at, msg(8)) == (True, True)
    assert _follows(at, msg(4, full=True)) == (False, False)
    assert _follows(at, msg(9, full=True)) == (True, False)
    assert _follows(at, msg(1, epoch="f")) == (True, True)
    assert _follows(at, msg(1, full=True, epoch="f")) == (True, False)
    assert _follows(None, msg(3)) == (True, True)
    assert _follows(at, GroupMembers(group_id="g", full=False)) == (True, False)  # unversioned


async def test_agents_of_one_process_share_their_member_sets(config: Config, nats_url: str) -> None:
    """Agents given one ``MemberSets`` (a simulated-hypervisor process) hold one list per
    distinct member set: from their network specs, and after a change they each take."""
    config.nats.url = nats_url
    config.agent.heartbeat_seconds = 5
    shared = MemberSets()
    nc = await nats.connect(nats_url)
    agents = [AgentService(config, SimulatedComputeDriver(), SimulatedNetworkDriver(), host_id=f"sim-{i}",
                           records=InstanceStateStore(None), nc=nc, member_sets=shared) for i in range(3)]
    networks = [a.network for a in agents]
    assert all(isinstance(n, SimulatedNetworkDriver) for n in networks)
    try:
        for agent in agents:
            await agent.start()
        g1 = sorted(f"10.0.{i // 250}.{i % 250 + 1}" for i in range(500))
        for i, agent in enumerate(agents):
            spec = NetworkSpec(id=f"net-{i}", segmentation_id=100 + i, remote_groups={"g1": list(g1)})
            await nc.publish(subjects.host_cmd(agent.host_id), encode(EnsureNetwork(spec=spec)))
        for i, network in enumerate(networks):
            await network_spec_shows(network, f"net-{i}", lambda spec: spec.remote_groups, {"g1": g1})  # type: ignore[arg-type]
        held = [n.networks[f"net-{i}"].remote_groups["g1"] for i, n in enumerate(networks)]  # type: ignore[attr-defined]
        assert held[1] is held[0] and held[2] is held[0]
        await subscriptions_ready(nc)
        change = GroupMembers(group_id="g1", full=False, added=["10.9.9.9"], removed=[g1[0]])
        await nc.publish(subjects.group_members("g1"), encode(change))
        after = sorted([*g1[1:], "10.9.9.9"])
        for i, network in enumerate(networks):
            await network_spec_shows(network, f"net-{i}", lambda spec: spec.remote_groups, {"g1": after})  # type: ignore[arg-type]
        held = [n.networks[f"net-{i}"].remote_groups["g1"] for i, n in enumerate(networks)]  # type: ignore[attr-defined]
        assert held[1] is held[0] and held[2] is held[0]
    finally:
        for agent in agents:
            await agent.stop()
        await nc.close()


async def test_agents_of_one_connection_share_one_subscription_per_set(config: Config, nats_url: str) -> None:
    """Agents given one ``SharedSubscriptions`` (a simulated-hypervisor process) follow a set's
    subject with one subscription: a message crosses the connection once and reaches every
    agent that carries the network; agents that stop leave the others following, and the last
    one out unsubscribes."""
    config.nats.url = nats_url
    config.agent.heartbeat_seconds = 5
    nc = await nats.connect(nats_url)
    shared = SharedSubscriptions(nc)

    def peers_change(added: str) -> bytes:
        return encode(NetworkPeers(network_id="net-1", full=False, added=[added]))

    agents = [AgentService(config, SimulatedComputeDriver(), SimulatedNetworkDriver(), host_id=f"sim-{i}",
                           records=InstanceStateStore(None), nc=nc, subscriptions=shared) for i in range(3)]
    for i, agent in enumerate(agents):
        agent.address = f"192.0.2.{i + 1}"
    networks = [a.network for a in agents]
    assert all(isinstance(n, SimulatedNetworkDriver) for n in networks)
    publisher = await nats.connect(nats_url)
    try:
        for agent in agents:
            await agent.start()
        for agent in agents:
            spec = NetworkSpec(id="net-1", segmentation_id=100, peers=[])
            await publisher.publish(subjects.host_cmd(agent.host_id), encode(EnsureNetwork(spec=spec)))
        for network in networks:
            await network_spec_shows(network, "net-1", lambda spec: spec.peers, [])  # type: ignore[arg-type]
        subject = subjects.network_peers("net-1")
        for _ in range(500):
            if shared.followers(subject) == 3:
                break
            await asyncio.sleep(0.01)
        assert shared.followers(subject) == 3
        await subscriptions_ready(nc)
        before = nc.stats["in_msgs"]
        await publisher.publish(subject, peers_change("10.9.9.9"))
        for network in networks:
            await network_spec_shows(network, "net-1", lambda spec: spec.peers, ["10.9.9.9"])  # type: ignore[arg-type]
        assert nc.stats["in_msgs"] - before == 1  # once over the wire, not once per agent
        await agents[0].stop()
        assert shared.followers(subject) == 2
        await publisher.publish(subject, peers_change("10.9.9.8"))
        for network in networks[1:]:
            await network_spec_shows(network, "net-1", lambda spec: spec.peers, ["10.9.9.8", "10.9.9.9"])  # type: ignore[arg-type]
        for agent in agents[1:]:
            await agent.stop()
        assert shared.followers(subject) == 0
        await subscriptions_ready(nc)
        before = nc.stats["in_msgs"]
        await publisher.publish(subject, peers_change("10.9.9.7"))
        await publisher.flush()
        await subscriptions_ready(nc)
        assert nc.stats["in_msgs"] == before  # nobody follows it: the subscription is gone
    finally:
        for agent in agents:
            await agent.stop()
        await publisher.close()
        await nc.close()


def test_member_sets_give_one_list_per_set_and_compute_a_change_once() -> None:
    sets = MemberSets(versions=2)
    first = sets.adopt("g", ["a", "b"])
    assert sets.adopt("g", ["a", "b"]) is first
    second = sets.adopt("g", ["a", "c"])
    assert sets.adopt("g", ["a", "b"]) is first  # a lagging agent's set is still shared
    sets.adopt("g", ["d"])
    assert sets.adopt("g", ["a", "c"]) is not second  # two sets kept: the oldest was forgotten
    assert sets.adopt("h", ["a", "b"]) is not first  # per group
    calls: list[list[str]] = []

    def add_x(current: list[str]) -> list[str]:
        calls.append(current)
        return [*current, "x"]

    result = sets.change(first, b"message 1", add_x)
    assert result == ["a", "b", "x"] and sets.change(first, b"message 1", add_x) is result
    assert sets.change(["a", "b"], b"message 1", add_x) == result  # an equal list, not this one
    sets.change(first, b"message 2", add_x)
    assert len(calls) == 3


def test_a_set_change_that_changes_nothing_leaves_the_list_alone() -> None:
    """``_changed_list``: None when a message changes nothing (the spec is not applied again),
    else a new sorted list; the list it was given is never changed in place (specs share it)."""
    current = ["10.0.0.1", "10.0.0.3"]
    assert _changed_list(current, False, [], ["10.0.0.3"], ["10.0.0.2"]) is None
    assert _changed_list(current, True, ["10.0.0.3", "10.0.0.1", "10.0.0.1"], [], []) is None
    assert _changed_list(current, False, [], ["10.0.0.2"], ["10.0.0.1"]) == ["10.0.0.2", "10.0.0.3"]
    assert _changed_list(current, False, [], [], ["10.0.0.3"]) == ["10.0.0.1"]
    assert _changed_list(current, True, ["10.0.0.9"], [], []) == ["10.0.0.9"]
    assert current == ["10.0.0.1", "10.0.0.3"]
