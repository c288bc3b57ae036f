"""Security groups with real nftables: a "hypervisor" namespace with a bridge and two veth "VMs"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import msgspec
import pytest

from cloudland.agent.drivers.network.firewall import render
from cloudland.bus.messages import FixedIp, PortSpec, SecurityRuleSpec

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft"),
              pytest.mark.e2e]  # namespaces, nftables and traffic: with the end-to-end set

APPLY = (
    "import sys, msgspec; from cloudland.agent.drivers.network.firewall import Firewall; "
    "from cloudland.bus.messages import PortSpec; "
    "kind = tuple[list[PortSpec], dict[str, list[str]]]; "
    "ports, groups = msgspec.json.decode(sys.stdin.buffer.read(), type=kind); "
    "Firewall().apply(ports, groups)"
)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(args), check=check, capture_output=True, timeout=20)


def port(name: str, ip: str, mac: str, rules: list[SecurityRuleSpec]) -> PortSpec:
    return PortSpec(
        port_id=name + "0" * (36 - len(name)),
        network_id="n",
        mac_address=mac,
        port_security=True,
        fixed_ips=[FixedIp(ip_address=ip, subnet_id="s", cidr="10.0.0.0/24")],
        security_rules=rules,
    )


EGRESS = SecurityRuleSpec(direction="egress")


@pytest.fixture
def lab() -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:6]
    names = {"host": f"fwh{tag}", "a": f"fwa{tag}", "b": f"fwb{tag}"}
    for ns in names.values():
        sh("ip", "netns", "add", ns)
    host = names["host"]
    try:
        sh("ip", "-n", host, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", host, "link", "set", "br0", "up")
        for vm, ip, mac in (("a", "10.0.0.1", "fa:16:3e:00:00:01"), ("b", "10.0.0.2", "fa:16:3e:00:00:02")):
            tap = port(vm, ip, mac, []).tap_name
            sh(
                "ip",
                "-n",
                host,
                "link",
                "add",
                tap,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                names[vm],
            )
            sh("ip", "-n", host, "link", "set", tap, "master", "br0", "up")
            sh("ip", "-n", names[vm], "link", "set", "eth0", "address", mac, "up")
            sh("ip", "-n", names[vm], "addr", "add", f"{ip}/24", "dev", "eth0")
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                names["b"],
                sys.executable,
                "-m",
                "http.server",
                "8080",
                "--bind",
                "10.0.0.2",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield names
        finally:
            server.kill()
            server.wait()
    finally:
        for ns in names.values():
            sh("ip", "netns", "del", ns, check=False)


def apply(lab: dict[str, str], ports: list[PortSpec], groups: dict[str, list[str]] | None = None) -> float:
    started = time.monotonic()
    subprocess.run(
        ["ip", "netns", "exec", lab["host"], sys.executable, "-c", APPLY],
        check=True,
        timeout=20,
        input=msgspec.json.encode((ports, groups or {})),
    )
    return time.monotonic() - started


def connects(lab: dict[str, str], source: str = "") -> bool:
    code = (
        "import socket, sys; s = socket.socket(); s.settimeout(1); "
        f"s.bind(('{source}', 0)); s.connect(('10.0.0.2', 8080))"
    )
    return sh("ip", "netns", "exec", lab["a"], sys.executable, "-c", code, check=False).returncode == 0


def test_render_is_valid_and_deterministic() -> None:
    ports = [
        port(
            "b",
            "10.0.0.2",
            "fa:16:3e:00:00:02",
            [
                EGRESS,
                SecurityRuleSpec(
                    direction="ingress",
                    protocol=6,
                    port_range_min=22,
                    port_range_max=80,
                    remote_group_id="g1",
                ),
                SecurityRuleSpec(direction="ingress", ethertype="IPv6", protocol=58, port_range_min=128),
            ],
        )
    ]
    text = render(ports, {"g1": ["10.0.0.1", "fd00::1"]})
    assert text == render(ports, {"g1": ["10.0.0.1", "fd00::1"]})
    assert "th dport 22-80 accept" in text and "icmpv6 type 128 accept" in text
    check = subprocess.run(["nft", "-c", "-f", "-"], input=text.encode(), capture_output=True, timeout=20)
    assert check.returncode == 0, check.stderr


def test_port_closed_until_rule_opens_it_and_spoofing_dropped(lab: dict[str, str]) -> None:
    deadline = time.monotonic() + 10
    while not connects(lab) and time.monotonic() < deadline:
        time.sleep(0.1)  # the server starts
    assert connects(lab)
    a = port("a", "10.0.0.1", "fa:16:3e:00:00:01", [EGRESS])
    closed = port("b", "10.0.0.2", "fa:16:3e:00:00:02", [EGRESS])
    apply(lab, [a, closed])
    assert not connects(lab)
    tcp = SecurityRuleSpec(direction="ingress", protocol=6, port_range_min=8080, port_range_max=8080)
    took = apply(lab, [a, port("b", "10.0.0.2", "fa:16:3e:00:00:02", [EGRESS, tcp])])
    assert connects(lab) and took < 1.0
    # A spoofed source address from "a" is dropped at its tap.
    sh("ip", "-n", lab["a"], "addr", "add", "10.0.0.99/24", "dev", "eth0")
    assert not connects(lab, "10.0.0.99")
    # remote_group_id: members only.
    member = SecurityRuleSpec(direction="ingress", protocol=6, remote_group_id="g")
    apply(lab, [a, port("b", "10.0.0.2", "fa:16:3e:00:00:02", [EGRESS, member])], {"g": ["10.0.0.3"]})
    assert not connects(lab)
    apply(lab, [a, port("b", "10.0.0.2", "fa:16:3e:00:00:02", [EGRESS, member])], {"g": ["10.0.0.1"]})
    assert connects(lab)
    apply(lab, [a, closed])
    assert not connects(lab)
