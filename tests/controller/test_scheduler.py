"""Placement and the host index without I/O; the claim against a real database."""

from __future__ import annotations

from typing import Any

from cloudland.bus.messages import Heartbeat, Resources
from cloudland.config import ControllerConfig
from cloudland.controller.hosts import HostIndex, HostInfo
from cloudland.controller.scheduler import Placement


def host(name: str, ram: int, vcpus: int = 8, disk: int = 100, zone: str = "nova") -> HostInfo:
    return HostInfo(id=name, zone=zone, vcpus=vcpus, memory_mb=ram, disk_gb=disk, up=True)


FLAVOR: dict[str, Any] = {"vcpus": 1, "ram": 1024, "disk": 10}


def test_spread_by_free_ram_and_usage() -> None:
    placement = Placement([host("a", 4096), host("b", 8192)], {"b": (0, 6144, 0)}, ControllerConfig())
    assert placement.pick(FLAVOR) == "a"  # a: 4096 free, b: 2048 free
    assert placement.pick(FLAVOR) == "a"  # 3072 vs 2048
    assert placement.pick(FLAVOR) == "a"  # 2048 vs 2048: either; a sorts first
    assert placement.pick(FLAVOR) == "b"
    assert placement.pick(FLAVOR) in ("a", "b")
    assert placement.pick(FLAVOR) in ("a", "b")
    assert placement.pick(FLAVOR) is None


def test_filters_cpu_disk_zone_down_disabled() -> None:
    ratios = ControllerConfig(cpu_allocation_ratio=1.0)
    hosts = [host("cpu", 65536, vcpus=1), host("disk", 32768, disk=5), host("zone", 16384, zone="z2"),
             host("ok", 2048)]
    down = host("down", 99999)
    down.up = False
    off = host("off", 99999)
    off.enabled = False
    placement = Placement([*hosts, down, off], {}, ratios)
    assert placement.pick({"vcpus": 2, "ram": 1024, "disk": 10}) == "zone"
    assert placement.pick({"vcpus": 2, "ram": 1024, "disk": 10}, "nova") == "zone"
    assert placement.pick({"vcpus": 5, "ram": 1024, "disk": 10}, "z2") is None  # 4 of 8 left
    assert placement.pick({"vcpus": 1, "ram": 1024, "disk": 1}, "z2") == "zone"
    assert placement.pick({"vcpus": 1, "ram": 60000, "disk": 1}) == "cpu"


def test_host_index_up_down_and_restart() -> None:
    now = [100.0]
    index = HostIndex(down_after=10, write_every=5, clock=lambda: now[0])

    def beat(boot: str = "b1", ram: int = 1024) -> Heartbeat:
        return Heartbeat(host_id="h", zone="nova", address="192.0.2.1", boot_id=boot,
                         resources=Resources(vcpus=2, memory_mb=ram, disk_gb=10), state_digest="")

    first = index.observe(beat())
    assert first.came_up and first.restarted and index.is_up("h")
    info = index.get("h")
    assert info is not None
    info.dirty = False
    info.written_at = now[0]
    now[0] += 1
    assert index.observe(beat()) == (False, False) and not info.dirty  # throttled
    now[0] += 5
    index.observe(beat())
    assert info.dirty  # periodic refresh
    info.dirty = False
    index.observe(beat(ram=2048))
    assert info.dirty  # resources changed
    assert index.observe(beat("b2")).restarted
    now[0] += 11
    assert index.sweep() == ["h"] and not index.is_up("h")
    assert index.observe(beat("b2")).came_up
