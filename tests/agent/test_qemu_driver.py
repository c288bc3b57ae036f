"""The QEMU driver against real QEMU and the real test guest (TCG here)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from cloudland.agent.drivers.compute.qemu import QemuDriver
from cloudland.bus.messages import FixedIp, InstanceSpec, PortSpec
from cloudland.guest import BOOT_MARKER, DHCP_FAILED_MARKER, IP_MARKER_PREFIX, POWEROFF_MARKER
from cloudland.guest.build import build_test_guest

pytestmark = [pytest.mark.e2e, pytest.mark.root]

if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None:
    pytest.skip("needs root and qemu-system-x86_64", allow_module_level=True)


@pytest.fixture(scope="session")
def guest_image() -> Path:
    return build_test_guest()


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[QemuDriver]:
    drv = QemuDriver(tmp_path / "agent")
    await drv.init_host()
    yield drv
    # Never leave guests behind, whatever the test did.
    for instance_id in list((await drv.list_instances()).keys()):
        await drv.destroy(instance_id)


def make_spec(ports: list[PortSpec] | None = None) -> InstanceSpec:
    return InstanceSpec(id=str(uuid.uuid4()), name="test", project_id="p", vcpus=1, memory_mb=256,
                        disk_gb=1, image=None, ports=ports or [])


async def wait_console(drv: QemuDriver, instance_id: str, check: Callable[[str], bool],
                       timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = await drv.console_output(instance_id, None) or ""
        if check(out):
            return out
        await asyncio.sleep(0.2)
    raise AssertionError(f"console never matched; got:\n{out[-3000:]}")


async def disk_info(path: Path) -> dict:
    proc = await asyncio.to_thread(subprocess.run, ["qemu-img", "info", "-U", "--output=json", str(path)],
                                   capture_output=True, check=True)
    return json.loads(proc.stdout)


def boots(n: int) -> Callable[[str], bool]:
    return lambda out: out.count(BOOT_MARKER) >= n


async def test_lifecycle(driver: QemuDriver, guest_image: Path, tmp_path: Path) -> None:
    spec = make_spec()
    await driver.prepare(spec, guest_image)
    paths = driver.paths(spec.id)
    info = await disk_info(paths.disk)
    assert info["backing-filename"] == str(guest_image.absolute())
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == 1 << 30
    assert await driver.power_state(spec.id) == "stopped"
    await driver.prepare(spec, guest_image)  # idempotent: keeps the disk

    start = time.monotonic()
    await driver.power_on(spec)
    await driver.power_on(spec)  # no-op while running
    assert await driver.power_state(spec.id) == "running"
    await wait_console(driver, spec.id, boots(1))
    print(f"create→boot marker via driver: {time.monotonic() - start:.2f}s")
    assert {p.name for p in paths.dir.iterdir()} >= {
        "disk.qcow2", "spec.json", "qemu.pid", "qmp.sock", "console.log", "vnc.sock"}
    cmdline = Path(f"/proc/{driver.pid(spec.id)}/cmdline").read_bytes().split(b"\0")
    assert b"type=1,manufacturer=Cloudland,product=OpenStack Nova,serial=%s,uuid=%s" % (
        spec.id.encode(), spec.id.encode()) in cmdline

    # Pause / resume shows up in power_state.
    await driver.qmp(spec.id, "stop")
    assert await driver.power_state(spec.id) == "paused"
    await driver.qmp(spec.id, "cont")
    assert await driver.power_state(spec.id) == "running"

    # Graceful stop: the guest sees the ACPI power button and powers itself off.
    start = time.monotonic()
    await driver.power_off(spec.id, timeout=30)
    assert time.monotonic() - start < 25
    assert await driver.power_state(spec.id) == "stopped"
    assert (await driver.console_output(spec.id, None) or "").count(POWEROFF_MARKER) == 1

    # Start again: the console log keeps both boots.
    await driver.power_on(spec)
    await wait_console(driver, spec.id, boots(2))

    # Hard reboot: same QEMU process, guest reset.
    pid = driver.pid(spec.id)
    await driver.reboot(spec.id, hard=True)
    await wait_console(driver, spec.id, boots(3))
    assert driver.pid(spec.id) == pid

    # Soft reboot: graceful power cycle into a new QEMU.
    await driver.reboot(spec.id, hard=False)
    out = await wait_console(driver, spec.id, boots(4))
    assert out.count(POWEROFF_MARKER) == 2
    assert driver.pid(spec.id) not in (None, pid)

    last = await driver.console_output(spec.id, 2)
    assert last is not None and len(last.splitlines()) == 2

    # Agent restart: a new driver on the same state dir re-attaches without touching the guest.
    pid = driver.pid(spec.id)
    restarted = QemuDriver(tmp_path / "agent")
    await restarted.init_host()
    assert await restarted.list_instances() == {spec.id: "running"}
    assert restarted.pid(spec.id) == pid
    await restarted.power_off(spec.id, timeout=30)
    assert await driver.power_state(spec.id) == "stopped"
    assert (await restarted.console_output(spec.id, None) or "").count(POWEROFF_MARKER) == 3

    # Destroy kills a running guest and removes everything.
    await restarted.power_on(spec)
    pid = restarted.pid(spec.id)
    assert pid is not None
    await restarted.destroy(spec.id)
    assert not paths.dir.exists()
    assert not Path(f"/proc/{pid}/cmdline").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes()
    assert await restarted.power_state(spec.id) == "absent"
    assert await restarted.console_output(spec.id, 10) is None
    await restarted.destroy(spec.id)  # no-op when absent


async def test_disk_grows_to_flavor_size(driver: QemuDriver, guest_image: Path, tmp_path: Path) -> None:
    raw = tmp_path / "base.raw"
    await asyncio.to_thread(subprocess.run, ["qemu-img", "convert", "-O", "raw", str(guest_image), str(raw)],
                            check=True)
    spec = make_spec()
    spec.disk_gb = 2
    await driver.prepare(spec, raw)
    info = await disk_info(driver.paths(spec.id).disk)
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == 2 << 30


@pytest.fixture
def tap() -> Iterator[PortSpec]:
    from pyroute2 import IPRoute

    port = PortSpec(port_id=uuid.uuid4().hex, network_id="n", mac_address="fa:16:3e:00:00:01", mtu=1450)
    with IPRoute() as ipr:
        ipr.link("add", ifname=port.tap_name, kind="tuntap", mode="tap")
        idx = ipr.link_lookup(ifname=port.tap_name)[0]
        ipr.link("set", index=idx, state="up")
    try:
        yield port
    finally:
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=port.tap_name):
                ipr.link("del", index=idx)


async def test_nic_without_dhcp(driver: QemuDriver, guest_image: Path, tap: PortSpec) -> None:
    spec = make_spec([tap])
    await driver.prepare(spec, guest_image)
    await driver.power_on(spec)
    out = await wait_console(driver, spec.id, lambda o: DHCP_FAILED_MARKER in o)
    assert BOOT_MARKER in out
    await driver.destroy(spec.id)


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq")
async def test_nic_with_dhcp(driver: QemuDriver, guest_image: Path, tap: PortSpec, tmp_path: Path) -> None:
    from pyroute2 import IPRoute

    def add_address() -> None:  # the sync IPRoute needs a thread without a running loop
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=tap.tap_name)[0]
            ipr.addr("add", index=idx, address="198.51.100.1", prefixlen=24)
            ipr.addr("add", index=idx, address="2001:db8:c1::1", prefixlen=64)

    await asyncio.to_thread(add_address)
    dnsmasq = await asyncio.create_subprocess_exec(
        "dnsmasq", "--keep-in-foreground", "--no-daemon", "--conf-file=/dev/null", "--port=0",
        "--bind-interfaces", f"--interface={tap.tap_name}", "--except-interface=lo",
        f"--pid-file={tmp_path / 'dnsmasq.pid'}", f"--dhcp-leasefile={tmp_path / 'leases'}",
        "--dhcp-range=198.51.100.0,static,255.255.255.0", "--enable-ra", "--dhcp-range=2001:db8:c1::,ra-only",
        f"--dhcp-host={tap.mac_address},198.51.100.10", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        tap.fixed_ips = [FixedIp(ip_address="198.51.100.10", subnet_id="s", cidr="198.51.100.0/24")]
        spec = make_spec([tap])
        await driver.prepare(spec, guest_image)
        await driver.power_on(spec)
        out = await wait_console(driver, spec.id,
                                 lambda o: "cloudland-guest: ready" in o and "ip6 eth0" in o)
        print(out)
        assert f"{IP_MARKER_PREFIX}198.51.100.10/24" in out
        assert "cloudland-guest: ip6 eth0 2001:db8:c1:0:f816:3eff:fe00:1/64" in out
        assert "cloudland-guest: no metadata" in out
        await driver.destroy(spec.id)
    finally:
        dnsmasq.terminate()
        await dnsmasq.wait()
