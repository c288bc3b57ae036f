"""Tenant networks across three namespace-hypervisors (`cloudland up --hypervisors 3`), driven by
the stock `openstack` CLI, with real guests proving reachability through their console
(`cloudland-guest: neighbors v4|v6 ...`, see docs/guest-images.md).

The tests run in order and share the cloud and its servers: vm-a (hv1) and vm-b (hv2) on the
demo project's net1; vm-x (hv2) on the admin project's net2 with the same CIDRs; vm-c joins on
hv3 and leaves again. Placement uses Nova's admin-only `--availability-zone nova:<host>`.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
from pyroute2 import IPRoute

from cloudland.allinone import topology
from tests.e2e.conftest import wait_for
from tests.e2e.multihost import MultiHostCloud, capture, fdb_peers, links, mcloud, neighbor_lines  # noqa: F401

pytestmark = [pytest.mark.e2e, pytest.mark.root]

CIDR4, CIDR6 = "10.93.0.0/24", "fd93::/64"
S: dict[str, Any] = {}  # shared between the ordered tests
# What a hypervisor namespace of the dev topology has without any tenant network.
HOST_LINKS = {"lo", topology.UNDERLAY_IFNAME, topology.EXTERNAL_IFNAME}


def _network(cloud: MultiHostCloud, name: str, cloud_name: str) -> dict:
    net = cloud.openstack_json("network", "create", name, cloud=cloud_name)
    cloud.openstack("subnet", "create", "--network", net["id"], "--subnet-range", CIDR4,  # type: ignore[index]
                    f"{name}-v4", cloud=cloud_name)
    cloud.openstack("subnet", "create", "--network", net["id"], "--ip-version", "6",  # type: ignore[index]
                    "--ipv6-ra-mode", "slaac", "--ipv6-address-mode", "slaac", "--subnet-range", CIDR6,
                    f"{name}-v6", cloud=cloud_name)
    return cloud.openstack_json("network", "show", net["id"], cloud="cloudland")  # type: ignore[index, return-value]


def _v4(addresses: list[str]) -> str:
    return next(a for a in addresses if ":" not in a)


def _v6(addresses: list[str]) -> str:
    return next(a for a in addresses if ":" in a)


def _sees(cloud: MultiHostCloud, server: str, family: str, address: str) -> bool:
    lines = neighbor_lines(cloud.console(server), family)
    return bool(lines) and address in lines[-1]


def _peers(cloud: MultiHostCloud, vni: int) -> dict[str, set[str] | None]:
    return {h: fdb_peers(cloud.hv(h).netns, vni) for h in cloud.hosts}


def test_two_hypervisors_dhcp_v4_v6_reachability(mcloud: MultiHostCloud) -> None:  # noqa: F811
    cloud = mcloud
    hv1, hv2, _ = cloud.hosts
    net = _network(cloud, "net1", "cloudland-demo")
    assert net["mtu"] == 1450 and net["provider:network_type"] == "vxlan"
    S["net1"], S["vni1"] = net["id"], net["provider:segmentation_id"]
    started = time.monotonic()
    a = cloud.server_create("vm-a", net["id"], hv1)
    b = cloud.server_create("vm-b", net["id"], hv2)
    assert (a["OS-EXT-SRV-ATTR:host"], b["OS-EXT-SRV-ATTR:host"]) == (hv1, hv2)
    S["a"], S["b"] = cloud.addresses("vm-a"), cloud.addresses("vm-b")
    # Addresses by DHCP (v4) and SLAAC (v6) are the ones Neutron allocated.
    for name, addrs in (("vm-a", S["a"]), ("vm-b", S["b"])):
        wait_for(lambda n=name, ad=addrs: f"ip eth0 {_v4(ad)}/24" in cloud.console(n), timeout=90,
                 what=f"{name}'s DHCP address")
        wait_for(lambda n=name, ad=addrs: f"ip6 eth0 {_v6(ad)}/64" in cloud.console(n), timeout=60,
                 what=f"{name}'s SLAAC address")
    # Each guest pings the other across the VXLAN, over IPv4 and IPv6.
    wait_for(lambda: _sees(cloud, "vm-a", "v4", _v4(S["b"])) and _sees(cloud, "vm-b", "v4", _v4(S["a"])),
             timeout=60, what="vm-a and vm-b reaching each other over IPv4")
    wait_for(lambda: _sees(cloud, "vm-a", "v6", _v6(S["b"])) and _sees(cloud, "vm-b", "v6", _v6(S["a"])),
             timeout=60, what="vm-a and vm-b reaching each other over IPv6")
    print(f"\ncreate of two servers -> both reach each other: {time.monotonic() - started:.1f}s")
    # Peers are exactly the other hypervisor; hv3 has nothing of net1.
    assert _peers(cloud, S["vni1"]) == {hv1: {cloud.hv(hv2).address}, hv2: {cloud.hv(hv1).address},
                                        cloud.hosts[2]: None}
    # Neutron: the ports of running guests are ACTIVE, bound to their hosts.
    ports = cloud.openstack_json("port", "list", "--server", "vm-a", "--long", cloud="cloudland")
    assert [p["Status"] for p in ports] == ["ACTIVE"]  # type: ignore[index]
    # The tap and the VXLAN device carry the network's MTU (1450, which DHCP advertises).
    with IPRoute(netns=cloud.hv(hv1).netns, flags=0) as ipr:
        mtus = {link.get("IFLA_IFNAME"): link.get("IFLA_MTU") for link in ipr.get_links()}
    assert mtus[f"vxlan-{S['vni1']}"] == 1450
    assert [m for name, m in mtus.items() if name.startswith("tap")] == [1450]


def test_same_cidr_in_two_projects_is_isolated(mcloud: MultiHostCloud) -> None:  # noqa: F811
    cloud = mcloud
    _, hv2, hv3 = cloud.hosts
    net = _network(cloud, "net2", "cloudland")  # the admin project's
    S["net2"], S["vni2"] = net["id"], net["provider:segmentation_id"]
    assert S["vni2"] != S["vni1"]
    cloud.server_create("vm-x", net["id"], hv2)  # the same hypervisor as vm-b
    x = cloud.addresses("vm-x")
    # Same CIDR, same allocation order: vm-x has vm-a's IPv4 address.
    assert _v4(x) == _v4(S["a"])
    wait_for(lambda: f"ip eth0 {_v4(x)}/24" in cloud.console("vm-x"), timeout=90, what="vm-x's DHCP address")
    wait_for(lambda: len(neighbor_lines(cloud.console("vm-x"), "v6")) >= 2, timeout=60,
             what="vm-x's neighbor watch running with IPv6")
    # Meanwhile vm-a and vm-b keep pinging (broadcast, ff02::1) every few seconds. Capture on
    # vm-b's tap (hv2): frames from vm-a arrive, none from vm-x, which sits on the same hypervisor.
    macs = {n: cloud.openstack_json("port", "list", "--server", n, cloud="cloudland")[0]["MAC Address"]  # type: ignore[index]
            for n in ("vm-a", "vm-x")}
    tap_b = next(t for t in links(cloud.hv(hv2).netns)
                 if t.startswith("tap") and t[3:] == _port_id(cloud, "vm-b")[:11])
    seen = capture(cloud.hv(hv2).netns, tap_b, [macs["vm-a"], macs["vm-x"]], seconds=10)
    assert seen[macs["vm-a"]] > 0, seen
    assert seen[macs["vm-x"]] == 0, seen
    # vm-x's pings to its broadcast address and ff02::1 reach nobody of net1 (a ping that fails).
    console = cloud.console("vm-x")
    for addrs in neighbor_lines(console, "v4"):
        assert not addrs & {_v4(S["a"]), _v4(S["b"])}, console
    net1_v6 = {_v6(S["a"]), _v6(S["b"])}
    for addrs in neighbor_lines(console, "v6"):
        assert not addrs & net1_v6, console
    for addrs in neighbor_lines(cloud.console("vm-b"), "v6"):
        assert _v6(x) not in addrs
    # net2 lives on hv2 only: no peers there, no device anywhere else (no flooding).
    assert _peers(cloud, S["vni2"]) == {cloud.hosts[0]: None, hv2: set(), hv3: None}


def _port_id(cloud: MultiHostCloud, server: str) -> str:
    return cloud.openstack_json("port", "list", "--server", server, cloud="cloudland")[0]["ID"]  # type: ignore[index]


def test_third_hypervisor_joins_and_leaves(mcloud: MultiHostCloud) -> None:  # noqa: F811
    cloud = mcloud
    hv1, hv2, hv3 = cloud.hosts
    addr = {h: cloud.hv(h).address for h in cloud.hosts}
    cloud.server_create("vm-c", S["net1"], hv3)
    wait_for(lambda: _peers(cloud, S["vni1"]) == {hv1: {addr[hv2], addr[hv3]}, hv2: {addr[hv1], addr[hv3]},
                                                   hv3: {addr[hv1], addr[hv2]}},
             timeout=30, what="every hypervisor of net1 peering with the other two")
    c = cloud.addresses("vm-c")
    wait_for(lambda: _sees(cloud, "vm-c", "v4", _v4(S["a"])) and _sees(cloud, "vm-c", "v4", _v4(S["b"])),
             timeout=90, what="vm-c reaching vm-a and vm-b")
    wait_for(lambda: _sees(cloud, "vm-a", "v4", _v4(c)), timeout=30, what="vm-a reaching vm-c")

    cloud.openstack("server", "delete", "--wait", "vm-c", cloud="cloudland")
    wait_for(lambda: _peers(cloud, S["vni1"]) == {hv1: {addr[hv2]}, hv2: {addr[hv1]}, hv3: None},
             timeout=30, what="hv3's FDB entries gone everywhere")
    # Nothing of net1 is left on hv3: no bridge, tap, DHCP veth or namespace, no dnsmasq.
    wait_for(lambda: links(cloud.hv(hv3).netns) == HOST_LINKS, timeout=30, what="hv3 clean")
    assert not _dnsmasq_of(cloud, hv3)


def _dnsmasq_of(cloud: MultiHostCloud, host: str) -> list[int]:
    needle = str(cloud.hv(host).state_dir).encode()
    pids = []
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                cmdline = open(f"/proc/{proc}/cmdline", "rb").read()
            except OSError:
                continue
            if cmdline.startswith(b"dnsmasq") and needle in cmdline:
                pids.append(int(proc))
    return pids


def test_agent_restart_rebuilds_network_state(mcloud: MultiHostCloud) -> None:  # noqa: F811
    cloud = mcloud
    hv1, hv2, _ = cloud.hosts
    hv = cloud.hv(hv1)
    # Lose hv1's VXLAN device (and with it the FDB), then restart hv1's agent.
    with IPRoute(netns=hv.netns, flags=0) as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname=f"vxlan-{S['vni1']}")[0])
    old = cloud.agent_pid_of(hv1)
    assert old > 0  # never os.kill(0, ...): that is the whole process group
    os.kill(old, signal.SIGTERM)
    wait_for(lambda: cloud.agent_pid_of(hv1) != old, what="the supervisor restarting hv1's agent")
    wait_for(lambda: fdb_peers(hv.netns, S["vni1"]) == {cloud.hv(hv2).address}, timeout=30,
             what="hv1's VXLAN device and FDB rebuilt")
    # The guests (never restarted) reach each other again, both ways.
    mark = len(cloud.console("vm-a"))
    wait_for(lambda: _sees(cloud, "vm-a", "v4", _v4(S["b"])) and _sees(cloud, "vm-b", "v4", _v4(S["a"])),
             timeout=60, what="connectivity after the agent restart")
    assert cloud.console("vm-a")[:mark].count("cloudland-guest: booted") == 1


def test_cli_bad_input_is_rejected_and_nothing_half_created(mcloud: MultiHostCloud) -> None:  # noqa: F811
    cloud = mcloud

    def fails(*args: str) -> str:
        proc = cloud.openstack(*args, check=False)
        assert proc.returncode != 0, proc.stdout
        return proc.stderr

    def names(kind: str, *args: str) -> list[str]:
        return cloud.openstack(kind, "list", *args, "-f", "value", "-c", "Name").stdout.split()

    networks = names("network")
    subnet = ["subnet", "create", "--network", "net1", "bad", "--subnet-range"]
    port = ["port", "create", "--network", "net1", "bad", "--fixed-ip"]
    for args, error in [
        ([*subnet, "10.93.0.0/33"], "BadRequestException: 400"),  # invalid CIDR
        ([*subnet, "10.93.0.128/25"], "overlaps with another subnet"),
        ([*port, "ip-address=10.94.0.5"], "BadRequestException: 400"),  # outside every subnet
        ([*port, f"ip-address={_v4(S['b'])}"], "ConflictException: 409"),  # in use (vm-b's)
        (["network", "delete", "net1"], "409"),  # ports on it
    ]:
        stderr = fails(*args)
        assert error in stderr, (args, stderr)
    assert "bad" not in names("subnet") + names("port")
    assert names("network") == networks
    # A /30 has one address besides the gateway, and the DHCP port holds it: the pool is exhausted.
    cloud.openstack("network", "create", "tiny")
    cloud.openstack("subnet", "create", "--network", "tiny", "--subnet-range", "10.95.0.0/30", "tiny-v4")
    assert "409" in fails("port", "create", "--network", "tiny", "p1")
    assert names("port", "--network", "tiny") == [""] or "p1" not in names("port", "--network", "tiny")
    cloud.openstack("network", "delete", "tiny")
    assert names("network") == networks


def test_deleting_everything_leaves_nothing_on_any_hypervisor(mcloud: MultiHostCloud) -> None:  # noqa: F811
    cloud = mcloud
    cloud.openstack("server", "delete", "--wait", "vm-a", "vm-b", "vm-x", cloud="cloudland")
    cloud.openstack("network", "delete", S["net1"], S["net2"], cloud="cloudland")
    for host in cloud.hosts:
        wait_for(lambda h=host: links(cloud.hv(h).netns) == HOST_LINKS, timeout=30,
                 what=f"{host} without tenant devices")
        assert not _dnsmasq_of(cloud, host)
