"""The all-in-one cloud driven by the unmodified `openstack` CLI, booting real QEMU guests."""

from __future__ import annotations

import os
import signal

import pytest

from cloudland.guest import BOOT_MARKER
from cloudland.guest.build import build_test_guest
from tests.e2e.conftest import RunningCloud, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def qemu_pid(cloud: RunningCloud, server_id: str) -> int | None:
    pidfile = cloud.instance_dir(server_id) / "qemu.pid"
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


def console(cloud: RunningCloud, server: str, check: bool = True) -> str:
    return cloud.openstack("console", "log", "show", server, check=check).stdout


def server_field(cloud: RunningCloud, server: str, field: str) -> str:
    return cloud.openstack_json("server", "show", server)[field]  # type: ignore[index]


def test_image_upload_server_lifecycle_and_console(cloud: RunningCloud) -> None:
    image = cloud.openstack_json("image", "create", "--disk-format", "qcow2", "--container-format", "bare",
                                 "--file", str(build_test_guest()), "e2e-guest")
    assert image["status"] == "active"  # type: ignore[index]

    server = cloud.openstack_json("server", "create", "--flavor", "m1.nano", "--image", "e2e-guest",
                                  "--network", "demo-net", "--wait", "vm1")
    assert server["status"] == "ACTIVE"  # type: ignore[index]
    server_id = server["id"]  # type: ignore[index]
    assert qemu_pid(cloud, server_id)

    log = wait_for(lambda: (out := console(cloud, "vm1")) and BOOT_MARKER in out and out,
                   timeout=120, what="the boot marker on the console")
    # The guest configured its NIC by DHCP from the network's dnsmasq.
    wait_for(lambda: "cloudland-guest: ip eth0 10.0.0." in console(cloud, "vm1"), timeout=60,
             what="a DHCP address on the console")
    assert log.count(BOOT_MARKER) == 1

    cloud.openstack("server", "stop", "vm1")
    wait_for(lambda: server_field(cloud, "vm1", "status") == "SHUTOFF", what="SHUTOFF")
    assert qemu_pid(cloud, server_id) is None

    cloud.openstack("server", "start", "vm1")
    wait_for(lambda: server_field(cloud, "vm1", "status") == "ACTIVE", what="ACTIVE after start")
    wait_for(lambda: console(cloud, "vm1").count(BOOT_MARKER) == 2, what="second boot")

    cloud.openstack("server", "reboot", "vm1")
    wait_for(lambda: server_field(cloud, "vm1", "status") == "ACTIVE", what="ACTIVE after reboot")
    wait_for(lambda: console(cloud, "vm1").count(BOOT_MARKER) == 3, what="third boot")

    overlay = cloud.instance_dir(server_id) / "disk.qcow2"
    assert overlay.exists()
    cloud.openstack("server", "delete", "--wait", "vm1")
    wait_for(lambda: qemu_pid(cloud, server_id) is None and not overlay.exists(), timeout=60,
             what="QEMU and the overlay gone")
    assert "vm1" not in cloud.openstack("server", "list", "-f", "value", "-c", "Name").stdout
    cloud.openstack("image", "delete", "e2e-guest")


def test_agent_restart_keeps_guest_running_and_manageable(cloud: RunningCloud) -> None:
    server = cloud.openstack_json("server", "create", "--flavor", "m1.nano", "--image", "cloudland-guest",
                                  "--network", "demo-net", "--wait", "vm-restart")
    server_id = server["id"]  # type: ignore[index]
    guest = qemu_pid(cloud, server_id)
    assert guest

    old_agent = cloud.agent_pid()
    assert old_agent > 0  # never os.kill(0, ...): that is the whole process group
    os.kill(old_agent, signal.SIGTERM)
    wait_for(lambda: cloud.agent_pid() != old_agent, what="the supervisor restarting the agent")
    # The guest was not touched, and the cloud still manages it through the new agent.
    assert qemu_pid(cloud, server_id) == guest
    assert server_field(cloud, "vm-restart", "status") == "ACTIVE"
    # Until the new agent has subscribed, the API answers 409 "host is not responding".
    wait_for(lambda: BOOT_MARKER in console(cloud, "vm-restart", check=False),
             what="console via the new agent")
    cloud.openstack("server", "stop", "vm-restart")
    wait_for(lambda: server_field(cloud, "vm-restart", "status") == "SHUTOFF", what="SHUTOFF")
    cloud.openstack("server", "delete", "--wait", "vm-restart")
    wait_for(lambda: qemu_pid(cloud, server_id) is None, what="guest gone")


def test_clouds_yaml_and_name_lookups(cloud: RunningCloud) -> None:
    # Both clouds.yaml entries work; the admin sees the demo project's resources, not the other way.
    assert "demo" in cloud.openstack("project", "list", "-f", "value", "-c", "Name", cloud="cloudland").stdout
    missing = cloud.openstack("server", "show", "no-such-server", check=False)
    assert missing.returncode != 0 and "No Server found" in missing.stderr
    flavors = cloud.openstack("flavor", "list", "-f", "value", "-c", "Name").stdout.split()
    assert "m1.nano" in flavors and "m1.tiny" in flavors
