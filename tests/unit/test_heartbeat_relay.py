"""Heartbeat relays (real nats-servers): batching without decoding, local preference of the queue
group across leaf nodes, failover when a leaf's relay stops, and garbage that never poisons."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from cloudland.bus import subjects
from cloudland.bus.connection import subscriptions_ready
from cloudland.bus.heartbeat_relay import HeartbeatRelay, HeartbeatRelays, batch_bytes, plausible
from cloudland.bus.messages import Heartbeat, HeartbeatBatch, InstanceStatus, Resources, decode, encode
from cloudland.bus.topology import NatsTree, monitor
from cloudland.config import Config
from cloudland.controller.service import ControllerService

FLUSH = 0.1


def beat(host: str, seq: int = 0) -> Heartbeat:
    return Heartbeat(host_id=host, zone="nova", address="192.0.2.1", boot_id=f"boot-{seq}",
                     resources=Resources(vcpus=8, memory_mb=4096, disk_gb=100),
                     state_digest="0" * 16, instance_count=seq, driver="simulated", sent_at=time.time())


def test_batch_bytes_decode_to_heartbeats() -> None:
    beats = [beat(f"h-{i}", i) for i in range(3)]
    batch = decode(batch_bytes([encode(b) for b in beats]))
    assert isinstance(batch, HeartbeatBatch)
    assert batch.heartbeats == beats and all(isinstance(b, Heartbeat) for b in batch.heartbeats)
    empty = decode(batch_bytes([]))
    assert isinstance(empty, HeartbeatBatch) and empty.heartbeats == []
    # The envelope is what msgspec itself would write.
    assert msgspec.json.decode(batch_bytes([encode(b) for b in beats])) == msgspec.json.decode(
        encode(HeartbeatBatch(heartbeats=beats)))
    assert plausible(encode(beats[0]))
    assert not any(plausible(p) for p in (b"", b"{", b"garbage", b"[1]", b'"x"', b"{} "))


class Collector:
    """A controller's view: every batch on ``heartbeats.batch``, decoded."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.batches = 0
        self.changed = asyncio.Event()

    async def on_batch(self, msg: Any) -> None:
        batch = decode(msg.data)
        assert isinstance(batch, HeartbeatBatch)
        self.batches += 1
        self.seen.update(hb.host_id for hb in batch.heartbeats)
        self.changed.set()

    async def wait_for(self, pred: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()


async def test_relay_batches_and_drops_garbage(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    relay = HeartbeatRelay(nats_url, flush_seconds=FLUSH)
    got = Collector()
    try:
        await nc.subscribe(subjects.HEARTBEAT_BATCH, cb=got.on_batch)
        await relay.start()
        for i in range(50):
            await nc.publish(subjects.heartbeat("nova"), encode(beat(f"h-{i}")))
        for junk in (b"garbage", b"", b"{half", b"[1,2]"):
            await nc.publish(subjects.heartbeat("nova"), junk)
        await nc.flush()
        await got.wait_for(lambda: len(got.seen) == 50)
        assert got.batches <= 3  # one flush, unless it fell across a period boundary
        assert relay.relayed == 50 and relay.dropped == 4
        # A batch is bounded by max_batch_bytes: larger gatherings go out in several messages.
        relay.max_batch_bytes = 2000
        before = got.batches
        for i in range(50):
            await nc.publish(subjects.heartbeat("nova"), encode(beat(f"big-{i}")))
        await nc.flush()
        await got.wait_for(lambda: sum(1 for h in got.seen if h.startswith("big-")) == 50)
        assert got.batches - before >= 5
        assert max(got.seen.values()) == 1
    finally:
        await relay.stop()
        await nc.close()


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[NatsTree]:
    t = NatsTree(tmp_path / "nats", ["z1/r1", "z1/r2"])
    t.start()
    try:
        yield t
    finally:
        t.stop()


@pytest.fixture
async def clients(tree: NatsTree) -> AsyncIterator[dict[str, Client]]:
    conns = {"a": await nats.connect(tree.leaf("z1/r1").url), "b": await nats.connect(tree.leaf("z1/r2").url),
             "core": await nats.connect(tree.core.url)}
    try:
        yield conns
    finally:
        for nc in conns.values():
            await nc.close()


async def publish(nc: Client, hosts: list[str]) -> None:
    for host in hosts:
        await nc.publish(subjects.heartbeat("nova"), encode(beat(host)))
    await nc.flush()


@pytest.mark.e2e  # a NATS tree of four servers: with the end-to-end set
async def test_local_relay_takes_its_leaf_and_others_take_over(tree: NatsTree,
                                                               clients: dict[str, Client]) -> None:
    """A relay on rack leaf A gets exactly A's heartbeats; once it stops, they reach the
    controllers through another member of the queue group; none twice."""
    got = Collector()
    await clients["core"].subscribe(subjects.HEARTBEAT_BATCH, cb=got.on_batch)
    await subscriptions_ready(clients["core"])
    relay_a = HeartbeatRelay(tree.leaf("z1/r1").url, flush_seconds=FLUSH, name="relay-a")
    relay_b = HeartbeatRelay(tree.leaf("z1/r2").url, flush_seconds=FLUSH, name="relay-b")
    relay_core = HeartbeatRelay(tree.core.url, flush_seconds=FLUSH, name="relay-core")  # the controller's
    relays = [relay_a, relay_b, relay_core]
    try:
        for relay in relays:
            await relay.start()
        # Interest (the queue group members, the batch subscription) spreads asynchronously:
        # probe from both racks until each probe came back as part of a batch.
        for k in range(200):
            await publish(clients["a"], [f"probe-a-{k}"])
            await publish(clients["b"], [f"probe-b-{k}"])
            await asyncio.sleep(0.05)
            probes = {h.split("-")[1] for h in got.seen if h.startswith("probe-")}
            if probes == {"a", "b"}:
                break
        else:
            pytest.fail("heartbeats never came back through the tree")
        await asyncio.sleep(3 * FLUSH)
        counts0 = [r.relayed for r in relays]
        batches0 = got.batches
        zone0 = int(monitor(tree.nodes["z1"], "varz")["in_msgs"])

        a_hosts = [f"a-{i}" for i in range(300)]
        b_hosts = [f"b-{i}" for i in range(200)]
        await publish(clients["a"], a_hosts)
        await publish(clients["b"], b_hosts)
        await got.wait_for(lambda: all(h in got.seen for h in a_hosts + b_hosts))
        await asyncio.sleep(3 * FLUSH)
        counts = [r.relayed - c for r, c in zip(relays, counts0, strict=True)]
        # Local preference: each rack's heartbeats went to the relay on its own leaf, and only there.
        assert counts == [300, 200, 0]
        assert max(got.seen.values()) == 1
        # ... and never travelled further one by one: the zone leaf carried only the batches.
        zone_msgs = int(monitor(tree.nodes["z1"], "varz")["in_msgs"]) - zone0
        assert zone_msgs == got.batches - batches0 < 50, (zone_msgs, got.batches - batches0)

        # Rack A's relay stops: its rack's heartbeats go to another member (B or the core's).
        await relay_a.stop()
        stopped_at = time.monotonic()
        failover = [f"after-{i}" for i in range(50)]
        for host in failover:  # one every 20 ms from the moment it stopped
            await publish(clients["a"], [host])
            await asyncio.sleep(0.02)
        await got.wait_for(lambda: all(h in got.seen for h in failover), timeout=2 + 5 * FLUSH)
        assert time.monotonic() - stopped_at < 1 + 2 + 5 * FLUSH
        assert max(got.seen.values()) == 1
        assert relay_b.relayed + relay_core.relayed - counts0[1] - counts0[2] == 200 + 50
    finally:
        for relay in relays:
            await relay.stop()


async def test_relays_process_serves_several_servers(tree: NatsTree, clients: dict[str, Client]) -> None:
    """``cloudland relay --nats A --nats B``: one relay per server, in one object."""
    got = Collector()
    await clients["core"].subscribe(subjects.HEARTBEAT_BATCH, cb=got.on_batch)
    await subscriptions_ready(clients["core"])
    group = HeartbeatRelays([tree.leaf("z1/r1").url, tree.leaf("z1/r2").url], flush_seconds=FLUSH)
    await group.start()
    try:
        for k in range(200):
            await publish(clients["a"], [f"a-{k}"])
            await publish(clients["b"], [f"b-{k}"])
            await asyncio.sleep(0.05)
            if any(h.startswith("a-") for h in got.seen) and any(h.startswith("b-") for h in got.seen):
                break
        assert all(r.relayed > 0 for r in group.relays)
    finally:
        await group.stop()


class FakeReconciler:
    def __init__(self) -> None:
        self.heartbeats: list[Heartbeat] = []
        self.synced: set[str] = set()
        self.mismatch = False

    def on_heartbeat(self, hb: Heartbeat) -> bool:
        self.heartbeats.append(hb)
        return self.mismatch or hb.host_id not in self.synced

    def on_status(self, status: InstanceStatus) -> None:
        pass


class FakeMsg:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.subject = subjects.HEARTBEAT_BATCH


def controller(tmp_path: Path) -> tuple[ControllerService, FakeReconciler, list[str]]:
    svc = ControllerService(Config(state_dir=tmp_path))
    fake = FakeReconciler()
    svc.reconciler = fake  # type: ignore[assignment]
    requested: list[str] = []
    svc._request_state = requested.append  # type: ignore[method-assign]
    return svc, fake, requested


async def test_controller_survives_bad_batches(tmp_path: Path) -> None:
    svc, fake, _ = controller(tmp_path)

    def good() -> list[bytes]:
        return [encode(beat(f"h-{i}")) for i in range(3)]

    await svc._on_heartbeat_batch(FakeMsg(batch_bytes(good())))  # type: ignore[arg-type]
    assert [hb.host_id for hb in fake.heartbeats] == ["h-0", "h-1", "h-2"]
    assert svc.stats.heartbeats == 3

    # Well-formed JSON that is not a heartbeat: the others of the batch still count.
    fake.heartbeats.clear()
    g = good()
    await svc._on_heartbeat_batch(FakeMsg(batch_bytes([g[0], b'{"kind":"wake"}', b"{}", g[2]])))  # type: ignore[arg-type]
    assert [hb.host_id for hb in fake.heartbeats] == ["h-0", "h-2"]
    assert svc.bad_heartbeats == 2

    # Not JSON at all (a payload that only looked like an object): logged and dropped.
    fake.heartbeats.clear()
    g = good()
    for data in (batch_bytes([g[0], b'{"a":"}', g[1]]), b"garbage", b""):
        await svc._on_heartbeat_batch(FakeMsg(data))  # type: ignore[arg-type]
    assert fake.heartbeats == []
    # A Heartbeat on report.<zone> (an agent's first one, older agents) is still taken.
    await svc._on_report(FakeMsg(encode(beat("h-1"))))  # type: ignore[arg-type]
    assert [hb.host_id for hb in fake.heartbeats] == ["h-1"]


async def test_controller_drops_overtaken_heartbeats(tmp_path: Path) -> None:
    svc, fake, _ = controller(tmp_path)

    def at(sent_at: float, boot: str) -> Heartbeat:
        hb = beat("h")
        hb.sent_at, hb.boot_id = sent_at, boot
        return hb

    now = time.time()
    svc._on_heartbeat(at(now, "new"))
    svc._on_heartbeat(at(now - 0.4, "old"))  # the previous incarnation's, overtaken in a relay
    svc._on_heartbeat(at(now, "new"))  # the same one twice
    assert [hb.boot_id for hb in fake.heartbeats] == ["new"] and svc.stale_heartbeats == 2
    svc._on_heartbeat(at(now - 3600, "new"))  # the host's clock stepped back: taken
    svc._on_heartbeat(at(now - 3599, "new"))
    assert len(fake.heartbeats) == 3


async def test_controller_ignores_digest_races_with_reports(tmp_path: Path) -> None:
    svc, fake, requested = controller(tmp_path)
    fake.synced.add("h")
    fake.mismatch = True
    old = beat("h")
    old.sent_at = time.time() - 0.3  # sent before the status below arrived, delivered after it
    await svc._on_report(FakeMsg(encode(InstanceStatus(host_id="h", instance_id="i", state="running"))))  # type: ignore[arg-type]
    svc._on_heartbeat(old)
    assert requested == []
    await asyncio.sleep(0.1)
    svc._on_heartbeat(beat("h"))  # sent after the report: a real mismatch
    assert requested == ["h"]
    fake.synced.clear()
    svc._on_heartbeat(beat("h"))  # not synced: always asked
    assert requested == ["h", "h"]
