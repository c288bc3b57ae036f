"""Distributed routers, SNAT and floating IPs with real guests on three namespace-hypervisors,
driven by the stock `openstack` CLI. The topology's "outside" host (`cloudland up
--hypervisors N`) is the external network's gateway; it answers ping and HTTP with the address
it saw (``cloudland-outside: you are <ip>``).

vm-a (hv1, net1) and vm-b (hv1, net2) share a hypervisor; vm-c (hv2, net2) does not. One router
joins net1 and net2 and has its gateway on `public`. The guests' user-data scripts probe each
other and the outside host and print ``probe <label> open|closed`` / ``outside <answer>``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from typing import Any

import pytest

from cloudland.agent.drivers.network import netlink
from tests.e2e.conftest import wait_for
from tests.e2e.multihost import MultiHostCloud, mcloud  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.root]

PROBE = re.compile(r"^probe (\S+) (open|closed)\s*$", re.M)
OUTSIDE = re.compile(r"^(outside6?) (.*?)\s*$", re.M)
S: dict[str, Any] = {}

SCRIPT = """#!/bin/sh
watch() {{
    label=$1; shift; last=
    while :; do
        if "$@" >/dev/null 2>&1; then r=open; else r=closed; fi
        [ "$r" != "$last" ] && {{ echo "probe $label $r"; last=$r; }}
        sleep 1
    done
}}
outside() {{  # label URL: what the outside host says about us, printed when it changes
    last=
    while :; do
        r=$(timeout 3 wget -q -O - "$2" 2>/dev/null | sed -n 's/^cloudland-outside: //p')
        [ "$r" != "$last" ] && {{ echo "$1 ${{r:-none}}"; last=$r; }}
        sleep 1
    done
}}
outside outside http://{outside}/ &
outside outside6 "http://[{outside6}]/" &
{pings}
"""


def _ns(cloud: MultiHostCloud, host: str | None = None) -> str:
    return cloud.topo.outside_netns if host is None else cloud.hv(host).netns


def _run_in(ns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net={netlink.netns_path(ns)}", "--", *argv], text=True,
                          capture_output=True, timeout=timeout)


def _probe(cloud: MultiHostCloud, server: str, label: str) -> str | None:
    states = [m.group(2) for m in PROBE.finditer(cloud.console(server)) if m.group(1) == label]
    return states[-1] if states else None


def _outside(cloud: MultiHostCloud, server: str, label: str = "outside") -> str | None:
    answers = [answer for which, answer in OUTSIDE.findall(cloud.console(server)) if which == label]
    return answers[-1] if answers else None


_CAPTURE = r"""
import socket, sys, time
ifnames, seconds = sys.argv[1].split(","), float(sys.argv[2])
pairs = [tuple(p.split(">")) for p in sys.argv[3].split(",") if p]
macs = [bytes.fromhex(m.replace(":", "")) for m in sys.argv[4].split(",") if m]
socks = []
for name in ifnames:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind((name, 0)); s.setblocking(False); socks.append(s)
want = {(socket.inet_aton(a), socket.inet_aton(b)): f"{a}>{b}" for a, b in pairs}
counts = dict.fromkeys([*want.values(), *(m.hex() for m in macs)], 0)
end = time.monotonic() + seconds
while time.monotonic() < end:
    got = False
    for s in socks:
        try:
            frame = s.recv(65535)
        except BlockingIOError:
            continue
        got = True
        if frame[6:12] in macs:
            counts[frame[6:12].hex()] += 1
        if frame[12:14] == b"\x08\x00" and (frame[26:30], frame[30:34]) in want:
            counts[want[(frame[26:30], frame[30:34])]] += 1
    if not got:
        time.sleep(0.01)
print(" ".join(f"{k}={v}" for k, v in counts.items()))
"""


def capture(cloud: MultiHostCloud, host: str, ifnames: list[str], seconds: float,
            pairs: list[tuple[str, str]] = (), macs: list[str] = ()) -> dict[str, int]:  # type: ignore[assignment]
    """Frames on ``ifnames`` of ``host``: IPv4 packets per (source, destination) pair, and
    frames per source MAC (keys: "a>b", MAC as 12 hex digits)."""
    proc = _run_in(_ns(cloud, host), sys.executable, "-c", _CAPTURE, ",".join(ifnames), str(seconds),
                   ",".join(f"{a}>{b}" for a, b in pairs), ",".join(macs), timeout=seconds + 30)
    assert proc.returncode == 0, proc.stderr
    return {k: int(v) for k, v in (item.split("=") for item in proc.stdout.split())}


def _v4(cloud: MultiHostCloud, server: str) -> str:
    return next(a for a in cloud.addresses(server) if ":" not in a)


def _create(cloud: MultiHostCloud, name: str, network: str, host: str, pings: dict[str, str]) -> None:
    path = cloud.state_dir.parent / f"{name}.sh"
    lines = "\n".join(f"watch {label} ping -c 1 -W 1 {ip} &" for label, ip in pings.items())
    assert cloud.topo.outside6 is not None
    path.write_text(SCRIPT.format(outside=cloud.topo.outside_ip, outside6=cloud.topo.outside6.ip,
                                  pings=lines))
    cloud.openstack("server", "create", "--flavor", "m1.nano", "--image", "cloudland-guest",
                    "--network", network, "--availability-zone", f"nova:{host}", "--user-data", str(path),
                    "--wait", name, cloud="cloudland")


def _gateway_ips(cloud: MultiHostCloud, version: int = 4) -> set[str]:
    router = cloud.openstack_json("router", "show", "r1", cloud="cloudland")
    info = router["external_gateway_info"]  # type: ignore[index]
    return {ip["ip_address"] for ip in info["external_fixed_ips"]
            if (":" in ip["ip_address"]) == (version == 6)}


def test_router_joins_subnets_and_snats_to_the_outside(mcloud: MultiHostCloud) -> None:  # noqa: F811
    cloud = mcloud
    hv1, hv2, _ = cloud.hosts
    public = cloud.openstack_json("network", "show", "public", cloud="cloudland")
    assert public["router:external"] is True  # type: ignore[index]
    for k in (1, 2):
        cloud.openstack("network", "create", f"rnet{k}", cloud="cloudland")
        cloud.openstack("subnet", "create", "--network", f"rnet{k}", "--subnet-range", f"10.95.{k}.0/24",
                        f"rsub{k}", cloud="cloudland")
        cloud.openstack("subnet", "create", "--network", f"rnet{k}", "--ip-version", "6", "--ipv6-ra-mode",
                        "slaac", "--ipv6-address-mode", "slaac", "--subnet-range", f"fd95:{k}::/64",
                        f"rsub{k}-v6", cloud="cloudland")
    cloud.openstack("router", "create", "r1", cloud="cloudland")
    cloud.openstack("router", "set", "--external-gateway", "public", "r1", cloud="cloudland")
    for k in (1, 2):
        cloud.openstack("router", "add", "subnet", "r1", f"rsub{k}", cloud="cloudland")
        cloud.openstack("router", "add", "subnet", "r1", f"rsub{k}-v6", cloud="cloudland")
    # Guests answer pings and HTTP from anywhere (the default group admits only its members).
    for args in (["--protocol", "icmp"], ["--protocol", "tcp", "--dst-port", "80"]):
        cloud.openstack("security group rule create", "--ingress", *args, "default", cloud="cloudland")

    _create(cloud, "vm-b", "rnet2", hv1, {})
    _create(cloud, "vm-c", "rnet2", hv2, {})
    S["b"], S["c"] = _v4(cloud, "vm-b"), _v4(cloud, "vm-c")
    c6 = next(a for a in cloud.addresses("vm-c") if ":" in a)
    _create(cloud, "vm-a", "rnet1", hv1, {"b": S["b"], "c": S["c"], "c6": c6})
    S["a"] = _v4(cloud, "vm-a")
    # East-west across the router: on one hypervisor and across two, IPv4 and IPv6 (routed, no
    # NAT: the guests' default IPv6 route comes from their own host's router advertisements).
    wait_for(lambda: _probe(cloud, "vm-a", "b") == "open" and _probe(cloud, "vm-a", "c") == "open",
             timeout=120, what="vm-a reaching vm-b and vm-c through the router")
    wait_for(lambda: _probe(cloud, "vm-a", "c6") == "open", timeout=60, what="vm-a reaching vm-c over IPv6")
    # North-south without a floating IP: SNAT to the router's address on that hypervisor.
    gateways = _gateway_ips(cloud)
    for name in ("vm-a", "vm-c"):
        answer = wait_for(lambda n=name: (o := _outside(cloud, n)) and o.startswith("you are") and o,
                          timeout=60, what=f"{name} reaching the outside host")
        assert answer.split()[-1] in gateways, (answer, gateways)
    # vm-a (hv1) and vm-c (hv2) leave with their own hypervisor's gateway address.
    assert _outside(cloud, "vm-a") != _outside(cloud, "vm-c")
    # IPv6 is routed, not translated: the outside host sees the guest's own address once it
    # routes the tenant prefixes to the router (as an operator, or BGP, would).
    gateways6 = sorted(_gateway_ips(cloud, 6))
    assert gateways6, "gateway ports have an IPv6 address on public"
    for k in (1, 2):
        proc = _run_in(_ns(cloud), "ip", "-6", "route", "replace", f"fd95:{k}::/64", "via", gateways6[0])
        assert proc.returncode == 0, proc.stderr
    a6 = next(a for a in cloud.addresses("vm-a") if ":" in a)
    wait_for(lambda: _outside(cloud, "vm-a", "outside6") == f"you are {a6}", timeout=60,
             what="vm-a reaching the outside host over IPv6 with its own address")


def test_east_west_on_one_hypervisor_stays_there(mcloud: MultiHostCloud) -> None:  # noqa: F811
    cloud = mcloud
    hv1 = cloud.hosts[0]
    vnis = [cloud.openstack_json("network", "show", f"rnet{k}",  # type: ignore[index]
                                 cloud="cloudland")["provider:segmentation_id"] for k in (1, 2)]
    iface_macs = [p["MAC Address"] for p in cloud.openstack_json(  # type: ignore[union-attr]
        "port", "list", "--router", "r1", cloud="cloudland") if p["MAC Address"]]  # type: ignore[index]
    seen = capture(cloud, hv1, [f"vxlan-{v}" for v in vnis], 8,
                   pairs=[(S["a"], S["b"]), (S["b"], S["a"]), (S["a"], S["c"])], macs=iface_macs)
    # vm-a pings vm-b every second: none of it on the overlay. vm-a's pings to vm-c (hv2) are,
    # and the shared gateway MAC never is (routed frames leave with this host's router MAC).
    assert seen[f"{S['a']}>{S['b']}"] == 0 and seen[f"{S['b']}>{S['a']}"] == 0, seen
    assert seen[f"{S['a']}>{S['c']}"] > 0, seen
    assert all(seen[m.replace(":", "")] == 0 for m in iface_macs), seen


def _reachable_from_outside(cloud: MultiHostCloud, ip: str) -> bool:
    return _run_in(_ns(cloud), "busybox", "ping", "-c", "1", "-W", "1", ip).returncode == 0


def _http_from_outside(cloud: MultiHostCloud, ip: str) -> str:
    code = "import urllib.request,sys; print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"
    return _run_in(_ns(cloud), sys.executable, "-c", code, f"http://{ip}/").stdout


def test_floating_ip_reaches_a_guest_and_moves_between_hypervisors(mcloud: MultiHostCloud) -> None:  # noqa: F811
    cloud = mcloud
    fip = cloud.openstack_json("floating ip", "create", "public", cloud="cloudland")
    address = fip["floating_ip_address"]  # type: ignore[index]
    assert not _reachable_from_outside(cloud, address)
    started = time.monotonic()
    cloud.openstack("server", "add", "floating", "ip", "vm-a", address, cloud="cloudland")
    wait_for(lambda: _reachable_from_outside(cloud, address), timeout=30, interval=0.1,
             what="the floating IP answering from outside")
    print(f"\nfloating IP associate -> reachable from outside: {time.monotonic() - started:.2f}s")
    assert _http_from_outside(cloud, address).strip() == "cloudland-guest vm-a"
    # vm-a now leaves with its floating IP.
    wait_for(lambda: _outside(cloud, "vm-a") == f"you are {address}", timeout=30,
             what="SNAT to the floating IP")

    cloud.openstack("server", "remove", "floating", "ip", "vm-a", address, cloud="cloudland")
    wait_for(lambda: not _reachable_from_outside(cloud, address), timeout=30, what="the floating IP released")
    started = time.monotonic()
    cloud.openstack("server", "add", "floating", "ip", "vm-c", address, cloud="cloudland")
    wait_for(lambda: _reachable_from_outside(cloud, address), timeout=30, interval=0.1,
             what="the floating IP on vm-c (hv2)")
    print(f"floating IP moved to another hypervisor -> reachable: {time.monotonic() - started:.2f}s")
    wait_for(lambda: _http_from_outside(cloud, address).strip() == "cloudland-guest vm-c", timeout=30,
             what="the floating IP answering from vm-c")
    wait_for(lambda: _outside(cloud, "vm-c") == f"you are {address}", timeout=30,
             what="vm-c leaving with the floating IP")
    assert _outside(cloud, "vm-a") in {f"you are {ip}" for ip in _gateway_ips(cloud)}


def test_static_routes_reach_every_hypervisor_of_the_router(mcloud: MultiHostCloud) -> None:  # noqa: F811
    from cloudland.agent.drivers.network.router import router_netns
    from cloudland.agent.factory import host_tag

    cloud = mcloud
    hv1, hv2, _ = cloud.hosts
    router_id = cloud.openstack_json("router", "show", "r1", cloud="cloudland")["id"]  # type: ignore[index]
    namespaces = [router_netns(host_tag(h), router_id) for h in (hv1, hv2)]

    def routes() -> list[str]:
        return [_run_in(ns, "ip", "route", "show", "10.99.0.0/24").stdout.strip() for ns in namespaces]

    cloud.openstack("router", "set", "--route", "destination=10.99.0.0/24,gateway=10.95.2.50", "r1",
                    cloud="cloudland")
    wait_for(lambda: all("via 10.95.2.50" in r for r in routes()), timeout=30,
             what="the static route on hv1 and hv2")
    cloud.openstack("router", "unset", "--route", "destination=10.99.0.0/24,gateway=10.95.2.50", "r1",
                    cloud="cloudland")
    wait_for(lambda: routes() == ["", ""], timeout=30, what="the static route gone everywhere")
    # A nexthop outside the router's subnets: Neutron's 400, nothing applied.
    proc = cloud.openstack("router", "set", "--route", "destination=10.98.0.0/24,gateway=192.0.2.9", "r1",
                           cloud="cloudland", check=False)
    assert proc.returncode != 0 and "nexthop" in proc.stderr.lower(), proc.stderr
