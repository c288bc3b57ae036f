"""The NATS tree keeps a host's traffic on its branch (real nats-servers, 3 levels, 3-node core)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from cloudland.bus import subjects
from cloudland.bus.connection import subscriptions_ready
from cloudland.bus.topology import NatsTree, monitor, plan, render_config


def test_plan_and_configs() -> None:
    nodes = plan(["z1/r1", "z1/r2", "z2"], core_nodes=3, base_port=20000)
    assert sorted(nodes) == ["core-0", "core-1", "core-2", "z1", "z1-r1", "z1-r2", "z2"]
    assert nodes["z1-r1"].parent == "z1" and nodes["z1"].parent == "core-0"
    assert nodes["z1"].leaf_port and not nodes["z1-r1"].leaf_port
    z1 = render_config(nodes["z1"], nodes)
    # A zone leaf may reach any core server, and accepts its racks.
    assert all(f"nats-leaf://127.0.0.1:{nodes[c].leaf_port}" in z1 for c in ("core-0", "core-1", "core-2"))
    assert f"listen: 127.0.0.1:{nodes['z1'].leaf_port}" in z1
    assert f"nats-leaf://127.0.0.1:{nodes['z1'].leaf_port}" in render_config(nodes["z1-r1"], nodes)
    assert "nats-route://" in render_config(nodes["core-1"], nodes)


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[NatsTree]:
    t = NatsTree(tmp_path / "nats", ["z1/r1", "z1/r2", "z2/r1"], core_nodes=3)
    t.start()
    try:
        yield t
    finally:
        t.stop()


def in_msgs(tree: NatsTree, name: str) -> int:
    return int(monitor(tree.nodes[name], "varz")["in_msgs"])


async def test_host_traffic_stays_on_its_branch(tree: NatsTree) -> None:
    hv_a = await nats.connect(tree.leaf("z1/r1").url)
    hv_b = await nats.connect(tree.leaf("z1/r2").url)
    hv_c = await nats.connect(tree.leaf("z2/r1").url)
    controller = await nats.connect(tree.nodes["core-1"].url)  # any core server will do
    got: dict[str, int] = {"a": 0, "b": 0, "c": 0, "reports": 0}

    def counter(key: str):  # type: ignore[no-untyped-def]
        async def cb(msg: nats.aio.msg.Msg) -> None:
            got[key] += 1
        return cb

    try:
        await hv_a.subscribe(subjects.host_cmd("a"), cb=counter("a"))
        await hv_b.subscribe(subjects.host_cmd("b"), cb=counter("b"))
        await hv_c.subscribe(subjects.host_cmd("c"), cb=counter("c"))
        await controller.subscribe(subjects.REPORT_ALL, cb=counter("reports"))
        for nc in (hv_a, hv_b, hv_c, controller):
            await subscriptions_ready(nc)
        # Interest propagates asynchronously through the leaves: probe both directions (core to
        # host a, zone 2 up to the controller) until each has carried a message.
        for _ in range(500):
            if not got["a"]:
                await controller.publish(subjects.host_cmd("a"), b"probe")
                await controller.flush()
            if not got["reports"]:
                await hv_c.publish(subjects.report("z2"), b"probe")
                await hv_c.flush()
            await asyncio.sleep(0.02)
            if got["a"] and got["reports"]:
                break
        assert got["a"] and got["reports"], "interest never propagated through the tree"
        await asyncio.sleep(0.3)
        got["a"] = got["reports"] = 0
        before = {name: in_msgs(tree, name) for name in tree.nodes}

        for _ in range(500):
            await controller.publish(subjects.host_cmd("a"), b"x" * 100)
        await controller.flush()
        for _ in range(100):
            await hv_c.publish(subjects.report("z2"), b"heartbeat")
        await hv_c.flush()
        for _ in range(100):
            if got["a"] == 500 and got["reports"] == 100:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        after = {name: in_msgs(tree, name) for name in tree.nodes}
        delta = {name: after[name] - before[name] for name in tree.nodes}

        assert got["a"] == 500 and got["b"] == 0 and got["c"] == 0
        assert got["reports"] == 100
        # host a's branch carried its 500 commands; rack 2 of zone 1 and all of zone 2 saw none.
        assert delta["z1"] >= 500 and delta["z1-r1"] >= 500
        assert delta["z1-r2"] == 0
        # zone 2 carried only its own 100 reports up, never a command for host a.
        assert delta["z2"] == 100 and delta["z2-r1"] == 100
        # Interest flows up: the core knows host a's subject via the zone-1 leaf connection.
        leafz = monitor(tree.nodes["z1"], "leafz", "subs=1")
        assert any(subjects.host_cmd("a") in leaf.get("subscriptions_list", []) for leaf in leafz["leafs"])
    finally:
        for nc in (hv_a, hv_b, hv_c, controller):
            await nc.close()
