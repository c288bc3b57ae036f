"""The host index's heartbeat order (down detection without walking every host), its row writes,
and the placement kept across passes (the same picks as one built afresh)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from sqlalchemy import select

from cloudland.bus.messages import Heartbeat, Resources
from cloudland.config import ControllerConfig
from cloudland.controller.hosts import HostIndex, HostInfo
from cloudland.controller.scheduler import Placement
from cloudland.db.models import Host


def beat(host: str, boot: str = "b1", ram: int = 4096, address: str = "192.0.2.1") -> Heartbeat:
    return Heartbeat(host_id=host, zone="nova", address=address, boot_id=boot,
                     resources=Resources(vcpus=4, memory_mb=ram, disk_gb=40), state_digest="")


def test_hosts_go_down_longest_silent_first_and_a_heartbeat_moves_the_deadline() -> None:
    now = [0.0]
    index = HostIndex(down_after=10, clock=lambda: now[0])
    for t, host in enumerate(["a", "b", "c", "d"]):
        now[0] = float(t)
        index.observe(beat(host))
    now[0] = 3.5
    index.observe(beat("a"))  # a: deadline 13.5, now the last in line
    now[0] = 10.5
    assert not index.overdue() and index.sweep() == []  # b's deadline is 11
    now[0] = 10.9
    index.observe(beat("c"))  # c: deadline 20.9
    now[0] = 11.2
    assert index.overdue()
    assert index.sweep() == ["b"] and not index.is_up("b") and index.is_up("c")
    now[0] = 13.6
    assert index.sweep() == ["d", "a"]  # d (silent since 3) before a (since 3.5)
    assert not index.overdue() and index.sweep() == []
    now[0] = 14.0
    assert index.observe(beat("b")).came_up  # back: in line again, last
    now[0] = 21.0
    assert index.overdue() and index.sweep() == ["c"]
    now[0] = 24.1
    assert index.sweep() == ["b"] and not index.overdue()
    assert [h.id for h in index.up_hosts()] == []


def test_order_matches_a_scan_of_all_hosts() -> None:
    """Random heartbeats: what ``sweep`` returns is what checking every host would find."""
    rng = random.Random(7)
    now = [0.0]
    index = HostIndex(down_after=5, clock=lambda: now[0])
    for _ in range(3000):
        now[0] += rng.random() * 0.05
        index.observe(beat(f"h{rng.randrange(60)}"))
        if rng.random() < 0.02:
            now[0] += rng.random() * 4
        expected = {h.id for h in index.hosts.values() if h.up and now[0] - h.last_seen > 5}
        assert index.overdue() == bool(expected)
        gone = index.sweep()
        assert set(gone) == expected and len(gone) == len(expected)
        seen = [index.hosts[h].last_seen for h in gone]
        assert seen == sorted(seen)


def test_changes_reach_the_placement_once() -> None:
    index = HostIndex(down_after=10, clock=lambda: 0.0)
    index.observe(beat("a"))
    index.observe(beat("b"))
    assert index.take_changed() == {"a", "b"} and index.take_changed() == set()
    index.observe(beat("a"))
    assert index.take_changed() == set()  # nothing changed
    index.observe(beat("a", ram=8192))
    index.set_disabled({"b"})
    assert index.take_changed() == {"a", "b"}
    index.set_disabled({"b"})
    assert index.take_changed() == set()
    index.set_disabled(set())
    assert index.take_changed() == {"b"} and index.get("b").enabled  # type: ignore[union-attr]


@pytest.mark.both_databases
async def test_persist_writes_changes_whole_and_refreshes_only_the_heartbeat(app: Any) -> None:
    now = [100.0]
    index = HostIndex(down_after=10, write_every=60, clock=lambda: now[0])
    index.observe(beat("a"))
    index.observe(beat("b"))

    async def persist() -> int:
        async with app.state.sessionmaker() as s, s.begin():
            return await index.persist(s)

    async def rows() -> dict[str, Host]:
        async with app.state.sessionmaker() as s:
            return {h.id: h for h in await s.scalars(select(Host))}

    assert await persist() == 2 and await persist() == 0
    first = await rows()
    assert first["a"].status == "up" and first["a"].info == {"boot_id": "b1", "driver": "qemu"}
    now[0] += 61
    index.observe(beat("a"))  # a periodic refresh
    index.observe(beat("b", address="192.0.2.2"))  # a change
    assert await persist() == 2
    second = await rows()
    assert second["a"].last_heartbeat > first["a"].last_heartbeat and second["a"].address == "192.0.2.1"
    assert second["b"].address == "192.0.2.2"
    now[0] += 11
    assert index.sweep() == ["a", "b"]
    assert await persist() == 2
    assert {h.status for h in (await rows()).values()} == {"down"}

    # A restarted controller loads the rows; a refresh after that changes only last_heartbeat.
    index = HostIndex(down_after=10, write_every=60, clock=lambda: now[0])
    index.load((await rows()).values())
    index.observe(beat("a"))  # came up: written whole
    assert await persist() == 1 and (await rows())["a"].status == "up"
    now[0] += 61
    index.observe(beat("a"))
    assert await persist() == 1
    assert (await rows())["a"].status == "up"


async def test_refreshes_are_spread_over_passes(app: Any) -> None:
    now = [0.0]
    index = HostIndex(down_after=1000, write_every=60, clock=lambda: now[0])
    for k in range(1500):
        index.observe(beat(f"h{k}"))
    async with app.state.sessionmaker() as s, s.begin():
        assert await index.persist(s) == 1500  # new rows are never held back
    now[0] += 61
    for k in range(1500):
        index.observe(beat(f"h{k}"))
    index.observe(beat("h7", ram=1))  # changed: written now, whatever the batch
    async with app.state.sessionmaker() as s, s.begin():
        assert await index.persist(s) == 1001
    async with app.state.sessionmaker() as s, s.begin():
        assert await index.persist(s) == 499
    async with app.state.sessionmaker() as s, s.begin():
        assert await index.persist(s) == 0


def host(name: str, ram: int, vcpus: int = 8, zone: str = "nova") -> HostInfo:
    return HostInfo(id=name, zone=zone, vcpus=vcpus, memory_mb=ram, disk_gb=100, up=True)


def test_kept_placement_picks_like_a_fresh_one() -> None:
    """Passes of picks, claims that fail, usage changes, hosts going down, disabled and resized:
    the placement updated with only the changed hosts picks exactly like one built each pass."""
    rng = random.Random(3)
    ratios = ControllerConfig(cpu_allocation_ratio=2.0, ram_allocation_ratio=1.5)
    hosts = [host(f"h{k:03d}", rng.choice([2048, 4096, 8192]), zone=rng.choice(["nova", "z2"]))
             for k in range(200)]
    usage: dict[str, list[int]] = {}
    kept = Placement(hosts, usage, ratios)
    flavors: list[dict[str, Any]] = [
        {"vcpus": 1, "ram": 512, "disk": 10}, {"vcpus": 2, "ram": 2048, "disk": 20},
        {"vcpus": 1, "ram": 0, "disk": 1}, {"vcpus": 4, "ram": 1024}]
    for _ in range(60):
        changed: set[str] = set()
        for h in rng.sample(hosts, 5):
            what = rng.randrange(4)
            if what == 0:
                h.up = not h.up
            elif what == 1:
                h.enabled = not h.enabled
            elif what == 2:
                h.memory_mb = rng.choice([2048, 4096, 8192])
            else:
                usage[h.id] = [0, 0, 0]  # a usage refresh: deletes show
            changed.add(h.id)
        kept.update([h for h in hosts if h.id in changed], usage)
        fresh = Placement(hosts, {h: tuple(u) for h, u in usage.items()}, ratios)
        picked: list[tuple[str, dict[str, Any]]] = []
        for _ in range(rng.randrange(1, 40)):
            flavor = rng.choice(flavors)
            zone = rng.choice([None, "nova", "z2"])
            forced = rng.choice(hosts).id if rng.random() < 0.1 else None
            choice = kept.pick(flavor, zone, forced)
            assert choice == fresh.pick(flavor, zone, forced)
            if choice is not None:
                picked.append((choice, flavor))
        for host_id, flavor in picked:
            if rng.random() < 0.8:  # claimed; the others were placed elsewhere meanwhile
                used = usage.setdefault(host_id, [0, 0, 0])
                used[0] += flavor["vcpus"]
                used[1] += flavor["ram"]
                used[2] += flavor.get("disk", 0)
        kept.update([h for h in hosts if h.id in {p for p, _ in picked}], usage)
    assert len(kept.heap) <= 2 * len(kept.free) + 1024
