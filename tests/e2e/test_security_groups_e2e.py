"""Security groups with real guests on three namespace-hypervisors, driven by the stock
`openstack` CLI. The guests probe each other from user-data scripts (run by the test guest after
it fetched its metadata) and print ``probe <label> open|closed`` whenever a result changes.

vm-web (hv1) is in the group ``web`` only (no ingress rules to start with); vm-client (hv2) is
in ``client``; vm-other (hv3) is in ``default`` and also forges its source address.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

from cloudland.agent.drivers.network import netlink
from tests.e2e.conftest import wait_for
from tests.e2e.multihost import MultiHostCloud, mcloud  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.root]

CIDR4, CIDR6 = "10.94.0.0/24", "fd94::/64"
FORGED = "10.94.0.200"
PROBE = re.compile(r"^probe (\S+) (open|closed)\s*$", re.M)
S: dict[str, Any] = {}  # shared between the ordered tests

WATCH = """#!/bin/sh
W={web}
watch() {{
    label=$1; shift; last=
    while :; do
        if "$@" >/dev/null 2>&1; then r=open; else r=closed; fi
        [ "$r" != "$last" ] && {{ echo "probe $label $r"; last=$r; }}
        sleep 1
    done
}}
"""
CLIENT = WATCH + """watch http80 sh -c "timeout 2 wget -q -O - http://$W/" &
watch icmp ping -c 1 -W 1 $W &
"""
# Forged packets after a real ping resolved vm-web's MAC; ARP always from the real address.
OTHER = WATCH + """echo 2 >/proc/sys/net/ipv4/conf/eth0/arp_announce
ip addr add {forged}/32 dev eth0
watch icmp ping -c 1 -W 1 $W &
( while :; do ping -c 1 -W 1 -I {forged} $W >/dev/null 2>&1; sleep 0.3; done ) &
"""


def _probe(cloud: MultiHostCloud, server: str, label: str) -> str | None:
    states = [m.group(2) for m in PROBE.finditer(cloud.console(server)) if m.group(1) == label]
    return states[-1] if states else None


def _ruleset(cloud: MultiHostCloud, host: str) -> str:
    argv = ["nsenter", f"--net={netlink.netns_path(cloud.hv(host).netns)}", "--", "nft", "list", "ruleset"]
    return subprocess.run(argv, text=True, capture_output=True, check=True, timeout=10).stdout


_CAPTURE_IPV4 = r"""
import socket, sys, time
ifname, sources, seconds = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((ifname, 0))
s.settimeout(0.2)
want = {socket.inet_aton(a): a for a in sources}
counts = dict.fromkeys(sources, 0)
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        frame = s.recv(65535)
    except TimeoutError:
        continue
    if frame[12:14] == b"\x08\x00" and frame[26:30] in want:
        counts[want[frame[26:30]]] += 1
print(",".join(f"{a}={c}" for a, c in counts.items()))
"""


def capture_ipv4_sources(cloud: MultiHostCloud, host: str, ifname: str, sources: list[str],
                         seconds: float) -> dict[str, int]:
    """IPv4 packets leaving or entering ``ifname`` on ``host``, counted per source address."""
    argv = ["nsenter", f"--net={netlink.netns_path(cloud.hv(host).netns)}", "--", sys.executable,
            "-c", _CAPTURE_IPV4, ifname, ",".join(sources), str(seconds)]
    out = subprocess.run(argv, text=True, capture_output=True, check=True, timeout=seconds + 30).stdout
    return {k: int(v) for k, v in (item.split("=") for item in out.strip().split(","))}


def _api(cloud: MultiHostCloud, method: str, path: str, body: dict | None = None) -> dict:
    if "token" not in S:
        token = cloud.openstack("token", "issue", "-f", "value", "-c", "id", cloud="cloudland")
        S["token"] = token.stdout.strip()
    req = urllib.request.Request(f"{cloud.api_url}/network{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"X-Auth-Token": S["token"], "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


def _timed_rule(cloud: MultiHostCloud, host: str, rule: dict[str, Any]) -> tuple[str, float]:
    """Create a rule through the API; seconds until ``host``'s nftables ruleset changed."""
    before = _ruleset(cloud, host)
    started = time.monotonic()
    created = _api(cloud, "POST", "/v2.0/security-group-rules", {"security_group_rule": rule})
    wait_for(lambda: _ruleset(cloud, host) != before, timeout=30, interval=0.02,
             what=f"the rule in {host}'s ruleset")
    return created["security_group_rule"]["id"], time.monotonic() - started


def test_guests_boot_with_groups_and_metadata_on_every_hypervisor(mcloud: MultiHostCloud) -> None:  # noqa: F811
    cloud = mcloud
    hv1, hv2, hv3 = cloud.hosts
    net = cloud.openstack_json("network", "create", "sgnet", cloud="cloudland")
    cloud.openstack("subnet", "create", "--network", "sgnet", "--subnet-range", CIDR4, "sgnet-v4",
                    cloud="cloudland")
    cloud.openstack("subnet", "create", "--network", "sgnet", "--ip-version", "6", "--ipv6-ra-mode", "slaac",
                    "--ipv6-address-mode", "slaac", "--subnet-range", CIDR6, "sgnet-v6", cloud="cloudland")
    S["net"] = net["id"]  # type: ignore[index]
    for group in ("web", "client"):
        S[group] = cloud.openstack_json("security group", "create", group, cloud="cloudland")["id"]  # type: ignore[index]
    web = cloud.openstack_json("server", "create", "--flavor", "m1.nano", "--image", "cloudland-guest",
                               "--network", "sgnet", "--security-group", "web",
                               "--availability-zone", f"nova:{hv1}", "--wait", "vm-web", cloud="cloudland")
    S["web_ip"] = next(a for a in cloud.addresses("vm-web") if ":" not in a)
    udir = cloud.state_dir.parent
    others = (("vm-client", hv2, "client", CLIENT), ("vm-other", hv3, "default", OTHER))
    for name, host, group, script in others:
        path = udir / f"{name}.sh"
        path.write_text(script.format(web=S["web_ip"], forged=FORGED))
        cloud.openstack("server", "create", "--flavor", "m1.nano", "--image", "cloudland-guest", "--network",
                        "sgnet", "--security-group", group, "--availability-zone", f"nova:{host}",
                        "--user-data", str(path), "--wait", name, cloud="cloudland")
    for name in ("vm-web", "vm-client", "vm-other"):
        out = wait_for(lambda n=name: (c := cloud.console(n)) and "cloudland-guest: ready" in c and c,
                       timeout=120, what=f"{name} ready")
        # The metadata service answers on every hypervisor (each host's own proxy).
        sid = web["id"] if name == "vm-web" else cloud.openstack_json(  # type: ignore[index]
            "server", "show", name, cloud="cloudland")["id"]  # type: ignore[index]
        assert f"cloudland-guest: metadata ok {sid}" in out, out
    # vm-web has no ingress rule: nothing reaches it.
    wait_for(lambda: _probe(cloud, "vm-client", "http80") == "closed"
             and _probe(cloud, "vm-client", "icmp") == "closed"
             and _probe(cloud, "vm-other", "icmp") == "closed", timeout=60, what="first probes")
    time.sleep(3)
    assert _probe(cloud, "vm-client", "http80") == "closed"


def test_tcp_port_opens_with_a_rule_and_closes_without(mcloud: MultiHostCloud) -> None:  # noqa: F811
    cloud = mcloud
    hv1 = cloud.hosts[0]
    rule_id, took = _timed_rule(cloud, hv1, {"security_group_id": S["web"], "direction": "ingress",
                                             "ethertype": "IPv4", "protocol": "tcp",
                                             "port_range_min": 80, "port_range_max": 80})
    print(f"\nsecurity group rule create -> in the ruleset of {hv1}: {took * 1000:.0f} ms")
    wait_for(lambda: _probe(cloud, "vm-client", "http80") == "open", timeout=30, what="port 80 open")
    assert _probe(cloud, "vm-client", "icmp") == "closed"  # only TCP 80 was opened
    cloud.openstack("security group rule delete", rule_id, cloud="cloudland")
    wait_for(lambda: _probe(cloud, "vm-client", "http80") == "closed", timeout=30,
             what="port 80 closed again")


def test_remote_group_admits_members_only(mcloud: MultiHostCloud) -> None:  # noqa: F811
    cloud = mcloud
    cloud.openstack("security group rule create", "--ingress", "--protocol", "icmp",
                    "--remote-group", "client", "web", cloud="cloudland")
    wait_for(lambda: _probe(cloud, "vm-client", "icmp") == "open", timeout=30, what="the member's ping")
    time.sleep(4)  # several more rounds of vm-other's pings
    assert _probe(cloud, "vm-other", "icmp") == "closed"
    # Membership follows the port: vm-other joins "client" and is admitted.
    port = cloud.openstack_json("port", "list", "--server", "vm-other", cloud="cloudland")[0]["ID"]  # type: ignore[index]
    S["other_port"] = port
    cloud.openstack("port", "set", "--security-group", "client", port, cloud="cloudland")
    wait_for(lambda: _probe(cloud, "vm-other", "icmp") == "open", timeout=30, what="the new member's ping")


def test_forged_source_address_is_dropped(mcloud: MultiHostCloud) -> None:  # noqa: F811
    cloud = mcloud
    hv3 = cloud.hosts[2]
    vni = cloud.openstack_json("network", "show", S["net"], cloud="cloudland")["provider:segmentation_id"]  # type: ignore[index]
    other_ip = next(a for a in cloud.addresses("vm-other") if ":" not in a)
    # What leaves hv3 for the overlay: vm-other's real pings, none of its forged ones.
    seen = capture_ipv4_sources(cloud, hv3, f"vxlan-{vni}", [other_ip, FORGED], seconds=6)
    assert seen[other_ip] > 0 and seen[FORGED] == 0, seen
    # Without port security (and groups) the same guest's forged packets do leave: the capture
    # above could have seen them.
    cloud.openstack("port", "set", "--no-security-group", "--disable-port-security", S["other_port"],
                    cloud="cloudland")
    wait_for(lambda: capture_ipv4_sources(cloud, hv3, f"vxlan-{vni}", [FORGED], seconds=3)[FORGED] > 0,
             timeout=30, what="forged packets once port security is off")
