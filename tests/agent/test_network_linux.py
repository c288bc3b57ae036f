"""LinuxNetworkDriver against the real kernel: bridges, VXLAN, taps, namespaces, dnsmasq.

Every test works with names derived from a random ``uid`` and removes every device,
namespace and process carrying it, also on failure.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
from pyroute2 import IPRoute, netns

from cloudland.agent.drivers.network import dnsmasq, names, netlink
from cloudland.agent.drivers.network.linux import LinuxNetworkDriver
from cloudland.bus.messages import FixedIp, NetworkSpec, PortSpec, SubnetSpec

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("dnsmasq"), reason="needs root and dnsmasq"),
]

CIDR4 = "10.61.0.0/24"
GATEWAY4 = "10.61.0.1"
DHCP_IP4 = "10.61.0.2"


# --- helpers ----------------------------------------------------------------------------------


class Topology:
    """Builds test-only namespaces and veths; knows the uid to clean up by."""

    def __init__(self, uid: str, tmp: Path) -> None:
        self.uid = uid
        self.tmp = tmp
        self.network_id = f"{uid}-0000-4000-8000-000000000001"
        self.host_tag = f"t{uid}"
        self._veths = 0

    def ns(self, role: str) -> str:
        name = f"cl-t{self.uid}-{role}"
        netns.create(name)
        return name

    def port(self, n: int, ip: str, subnet_id: str = "sub4", cidr: str = CIDR4) -> PortSpec:
        return PortSpec(
            port_id=f"{self.uid}{n:03d}-port",
            network_id=self.network_id,
            mac_address=f"fa:16:3e:{int(self.uid[:2], 16):02x}:00:{n:02x}",
            fixed_ips=[FixedIp(ip_address=ip, subnet_id=subnet_id, cidr=cidr, gateway_ip=GATEWAY4)],
        )

    def spec(self, ports: list[PortSpec], **kw: object) -> NetworkSpec:
        subnet = SubnetSpec(
            id="sub4",
            cidr=CIDR4,
            gateway_ip=GATEWAY4,
            dns_nameservers=["192.0.2.53"],
            host_routes=[{"destination": "172.31.0.0/16", "nexthop": "10.61.0.254"}],
        )
        defaults: dict = {
            "id": self.network_id,
            "segmentation_id": 4000 + int(self.uid[:3], 16),
            "mtu": 1400,
            "subnets": [subnet],
            "ports": ports,
            "dhcp_port": self.port(0, DHCP_IP4),
        }
        defaults.update(kw)
        return NetworkSpec(**defaults)

    def vm(self, mac: str, bridge: str, host_ns: str | None = None, mtu: int = 1400) -> str:
        """A namespace standing in for a guest: eth0 with ``mac``, peer on ``bridge``."""
        self._veths += 1
        vm_ns = self.ns(f"vm{self._veths}")
        host_end = f"v{self.uid}{self._veths}"
        with IPRoute(netns=host_ns, flags=0) if host_ns else IPRoute() as ipr:
            peer = {"ifname": "eth0", "net_ns_fd": vm_ns}
            ipr.link("add", ifname=host_end, kind="veth", mtu=mtu, peer=peer)
            idx = ipr.link_lookup(ifname=host_end)[0]
            br = ipr.link_lookup(ifname=bridge)[0]
            ipr.link("set", index=idx, master=br, state="up")
        with IPRoute(netns=vm_ns, flags=0) as ipr:
            idx = ipr.link_lookup(ifname="eth0")[0]
            ipr.link("set", index=idx, address=mac, mtu=mtu, state="up")
        return vm_ns

    async def udhcpc(self, vm_ns: str, tries: int = 3) -> dict[str, str] | None:
        """busybox udhcpc in ``vm_ns``; the variables its script saw on "bound", or None."""
        out = self.tmp / f"lease-{vm_ns}.env"
        out.unlink(missing_ok=True)
        script = self.tmp / "udhcpc.sh"
        script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > "{out}"\nexit 0\n')
        script.chmod(0o755)
        argv = [
            "nsenter", f"--net={netlink.netns_path(vm_ns)}", "busybox", "udhcpc", "-i", "eth0",
            "-n", "-q", "-f", "-t", str(tries), "-T", "1", "-s", str(script),
            "-O", "mtu", "-O", "staticroutes",
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        await asyncio.wait_for(proc.wait(), 30)
        if not out.exists():
            return None
        return dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)

    def cleanup(self) -> None:
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"dnsmasq") and str(self.tmp).encode() in cmdline:
                os.kill(int(pid_dir.name), signal.SIGKILL)
        for name in netns.listnetns():
            if name.startswith(f"cl-t{self.uid}"):
                netns.remove(name)
        with IPRoute() as ipr:
            for link in ipr.get_links():
                if self.uid in link.get("IFLA_IFNAME"):
                    netlink.delete_link(ipr, link.get("IFLA_IFNAME"))


def root_links_with(text: str) -> list[str]:
    with IPRoute() as ipr:
        return [n for n in (link.get("IFLA_IFNAME") for link in ipr.get_links()) if text in n]


def dnsmasq_pids(text: str) -> list[int]:
    pids = []
    for pid_dir in Path("/proc").iterdir():
        try:
            cmdline = (pid_dir / "cmdline").read_bytes()
        except OSError:
            continue
        if pid_dir.name.isdigit() and cmdline.startswith(b"dnsmasq") and text.encode() in cmdline:
            pids.append(int(pid_dir.name))
    return pids


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    t = Topology(secrets.token_hex(4), tmp_path)
    try:
        yield t
    finally:
        t.cleanup()


@pytest.fixture
async def driver(topo: Topology, tmp_path: Path) -> AsyncIterator[LinuxNetworkDriver]:
    d = LinuxNetworkDriver(tmp_path / "state", topo.host_tag)
    await d.init_host()
    yield d
    for network_id in await d.list_networks():
        await d.remove_network(network_id)


# --- single host --------------------------------------------------------------------------------


@pytest.mark.e2e
async def test_dhcp_static_leases_and_hup(driver: LinuxNetworkDriver, topo: Topology) -> None:
    p1, p2 = topo.port(1, "10.61.0.11"), topo.port(2, "10.61.0.12")
    spec = topo.spec([p1])
    await driver.ensure_network(spec)
    bridge = names.bridge_name(spec.id)

    vm1 = await asyncio.to_thread(topo.vm, p1.mac_address, bridge)
    lease = await topo.udhcpc(vm1)
    assert lease is not None
    assert lease["ip"] == "10.61.0.11"
    assert lease["router"] == GATEWAY4
    assert lease["mtu"] == "1400"
    assert lease["subnet"] == "255.255.255.0"
    assert lease["dns"].split() == ["192.0.2.53"]
    assert lease["staticroutes"].split() == ["172.31.0.0/16", "10.61.0.254", "0.0.0.0/0", GATEWAY4]
    assert lease["serverid"] == DHCP_IP4

    # A MAC this host does not serve gets nothing.
    vm2 = await asyncio.to_thread(topo.vm, p2.mac_address, bridge)
    assert await topo.udhcpc(vm2, tries=2) is None

    files = driver._dhcp_files(spec.id)
    pid = dnsmasq.running(files)[0]  # type: ignore[index]
    await driver.ensure_network(topo.spec([p1, p2]))
    assert dnsmasq.running(files)[0] == pid  # type: ignore[index]  # HUP, not a restart
    lease = await topo.udhcpc(vm2)
    assert lease is not None and lease["ip"] == "10.61.0.12"


async def test_network_devices_and_idempotence(driver: LinuxNetworkDriver, topo: Topology) -> None:
    spec = topo.spec([topo.port(1, "10.61.0.11")])
    await driver.ensure_network(spec)
    await driver.ensure_network(spec)
    assert await driver.list_networks() == [spec.id]
    ns = names.dhcp_netns(topo.host_tag, spec.id)
    assert ns in netns.listnetns()

    def inspect() -> None:
        with IPRoute() as ipr:
            br = ipr.link("get", index=netlink.link_index(ipr, names.bridge_name(spec.id)))[0]
            assert br.get("IFLA_MTU") == 1400
            assert br.get("IFLA_OPERSTATE") != "DOWN"
            veth = ipr.link("get", index=netlink.link_index(ipr, names.dhcp_veth_host(spec.id)))[0]
            assert veth.get("IFLA_MASTER") == br["index"]
            slave = dict(veth.get("IFLA_LINKINFO").get("IFLA_INFO_SLAVE_DATA")["attrs"])
            assert slave["IFLA_BRPORT_ISOLATED"] == 1
            # No underlay address: no VXLAN device.
            assert netlink.link_index(ipr, names.vxlan_name(spec.segmentation_id or 1)) is None
        with IPRoute(netns=ns, flags=0) as ipr:
            idx = netlink.link_index(ipr, names.dhcp_veth_ns(spec.id))
            link = ipr.link("get", index=idx)[0]
            assert link.get("IFLA_ADDRESS") == spec.dhcp_port.mac_address  # type: ignore[union-attr]
            assert link.get("IFLA_MTU") == 1400
            assert [a.get("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=2)] == [DHCP_IP4]

    await asyncio.to_thread(inspect)


async def test_remove_network_leaves_nothing(driver: LinuxNetworkDriver, topo: Topology) -> None:
    spec = topo.spec([topo.port(1, "10.61.0.11")])
    await driver.ensure_network(spec)
    tap = await driver.plug_port(topo.port(1, "10.61.0.11"))
    assert dnsmasq_pids(str(topo.tmp))
    await driver.remove_network(spec.id)
    await driver.unplug_port(topo.port(1, "10.61.0.11").port_id)
    assert tap not in await asyncio.to_thread(root_links_with, topo.uid)
    assert await asyncio.to_thread(root_links_with, topo.uid) == []
    assert [n for n in netns.listnetns() if topo.uid in n] == []
    assert dnsmasq_pids(str(topo.tmp)) == []
    assert await driver.list_networks() == []
    assert not (topo.tmp / "state" / "dhcp" / spec.id).exists()
    await driver.remove_network(spec.id)  # absent: no-op


async def test_restart_adopts_dnsmasq(driver: LinuxNetworkDriver, topo: Topology, tmp_path: Path) -> None:
    p1 = topo.port(1, "10.61.0.11")
    spec = topo.spec([p1])
    await driver.ensure_network(spec)
    files = driver._dhcp_files(spec.id)
    pid = dnsmasq.running(files)[0]  # type: ignore[index]

    restarted = LinuxNetworkDriver(tmp_path / "state", topo.host_tag)
    await restarted.init_host()
    assert await restarted.list_networks() == [spec.id]
    assert dnsmasq.running(files)[0] == pid  # type: ignore[index]
    assert dnsmasq_pids(str(topo.tmp)) == [pid]
    # A changed port set on the adopted process is a reload, too.
    await restarted.ensure_network(topo.spec([p1, topo.port(2, "10.61.0.12")]))
    assert dnsmasq.running(files)[0] == pid  # type: ignore[index]
    assert "10.61.0.12" in files.hosts.read_text()

    # Orphaned DHCP namespace of this host (no spec) is removed by init_host.
    orphan = names.dhcp_netns(topo.host_tag, f"{topo.uid}-orphan")
    netns.create(orphan)
    await restarted.init_host()
    assert orphan not in netns.listnetns()


async def test_plug_unplug_tap(driver: LinuxNetworkDriver, topo: Topology) -> None:
    port = topo.port(7, "10.61.0.17")
    port.mtu = 1380
    tap = await driver.plug_port(port)  # network not ensured yet: minimal bridge
    assert tap == port.tap_name
    assert await driver.plug_port(port) == tap

    def inspect() -> None:
        with IPRoute() as ipr:
            link = ipr.link("get", index=netlink.link_index(ipr, tap))[0]
            assert link.get("IFLA_LINKINFO").get("IFLA_INFO_KIND") == "tun"
            assert link.get("IFLA_MTU") == 1380
            assert link.get("IFLA_MASTER") == netlink.link_index(ipr, names.bridge_name(port.network_id))

    await asyncio.to_thread(inspect)
    await driver.unplug_port(port.port_id)
    await driver.unplug_port(port.port_id)
    assert tap not in await asyncio.to_thread(root_links_with, topo.uid)


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="needs qemu-system-x86_64")
async def test_qemu_opens_tap(driver: LinuxNetworkDriver, topo: Topology) -> None:
    tap = await driver.plug_port(topo.port(8, "10.61.0.18"))
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none",
        "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=n0", "-S",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*argv, stderr=subprocess.PIPE)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(proc.wait(), 1.5)
    finally:
        if proc.returncode is None:
            proc.kill()
        _, err = await proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()


@pytest.mark.e2e
async def test_ipv6_slaac(driver: LinuxNetworkDriver, topo: Topology) -> None:
    prefix = ipaddress.ip_network(f"fd{topo.uid[:2]}:{topo.uid[2:6]}::/64")
    v6 = SubnetSpec(
        id="sub6", cidr=str(prefix), ip_version=6, gateway_ip=str(prefix[1]),
        ipv6_ra_mode="slaac", ipv6_address_mode="slaac",
    )  # fmt: skip
    dhcp_port = topo.port(0, DHCP_IP4)
    dhcp_port.fixed_ips.append(
        FixedIp(ip_address=str(prefix[2]), subnet_id="sub6", cidr=str(prefix), ip_version=6)
    )
    spec = topo.spec([topo.port(1, "10.61.0.11")], dhcp_port=dhcp_port)
    spec.subnets.append(v6)
    await driver.ensure_network(spec)
    assert "--enable-ra" in dnsmasq.running(driver._dhcp_files(spec.id))[1]  # type: ignore[index]

    vm = await asyncio.to_thread(topo.vm, spec.ports[0].mac_address, names.bridge_name(spec.id))

    def addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        with IPRoute(netns=vm, flags=0) as ipr:
            return [ipaddress.ip_address(a.get("IFA_ADDRESS")) for a in ipr.get_addr(family=10)]

    found: list = []
    for _ in range(100):
        found = await asyncio.to_thread(addresses)
        if any(a in prefix for a in found):
            break
        await asyncio.sleep(0.2)
    assert any(a in prefix for a in found), found

    def bridge_v6() -> list:
        with IPRoute() as ipr:
            return list(ipr.get_addr(family=10, index=netlink.link_index(ipr, names.bridge_name(spec.id))))

    assert await asyncio.to_thread(bridge_v6) == []  # the hypervisor is not on the tenant network


# --- two hosts over VXLAN -----------------------------------------------------------------------

_AGENT = """
import asyncio, json, sys
from pathlib import Path
import msgspec
from cloudland.agent.drivers.network.linux import LinuxNetworkDriver
from cloudland.bus.messages import NetworkSpec
a = json.loads(sys.argv[1])
d = LinuxNetworkDriver(Path(a["state_dir"]), a["host_tag"], a["underlay"])
if a["op"] == "ensure":
    asyncio.run(d.ensure_network(msgspec.convert(a["spec"], NetworkSpec)))
else:
    asyncio.run(d.remove_network(a["network_id"]))
"""


async def run_agent(host_ns: str, topo: Topology, underlay: str, op: str, **kw: object) -> None:
    """One driver call inside ``host_ns``, as an agent running in that namespace would."""
    args = {
        "state_dir": str(topo.tmp / host_ns),
        "host_tag": f"t{topo.uid}{host_ns[-1]}",
        "underlay": underlay,
        "op": op,
        **{k: msgspec.to_builtins(v) for k, v in kw.items()},
    }
    proc = await asyncio.create_subprocess_exec(
        "nsenter", f"--net={netlink.netns_path(host_ns)}", sys.executable, "-c", _AGENT, json.dumps(args),
        stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def ping(vm_ns: str, ip: str) -> bool:
    argv = ["nsenter", f"--net={netlink.netns_path(vm_ns)}", "busybox", "ping", "-c", "1", "-W", "2", ip]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return await proc.wait() == 0


@pytest.mark.e2e
async def test_two_hosts_vxlan(topo: Topology) -> None:
    host_a, host_b = topo.ns("hA"), topo.ns("hB")
    ip_a, ip_b, stale = "192.0.2.1", "192.0.2.2", "192.0.2.99"

    def underlay() -> None:
        with IPRoute(netns=host_a, flags=0) as ipr:
            ipr.link("add", ifname="underlay", kind="veth", peer={"ifname": "underlay", "net_ns_fd": host_b})
        for ns, ip in ((host_a, ip_a), (host_b, ip_b)):
            with IPRoute(netns=ns, flags=0) as ipr:
                for name in ("lo", "underlay"):
                    ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
                ipr.addr("add", index=ipr.link_lookup(ifname="underlay")[0], address=ip, prefixlen=24)

    await asyncio.to_thread(underlay)

    pa, pb, pc = topo.port(1, "10.61.0.11"), topo.port(2, "10.61.0.12"), topo.port(3, "10.61.0.13")
    spec_a = topo.spec([pa], peers=[ip_b, stale, ip_a])
    spec_b = topo.spec([pb], peers=[ip_a])
    await run_agent(host_a, topo, ip_a, "ensure", spec=spec_a)
    await run_agent(host_b, topo, ip_b, "ensure", spec=spec_b)
    vxlan = names.vxlan_name(spec_a.segmentation_id)  # type: ignore[arg-type]

    def peers(ns: str) -> set[str]:
        with IPRoute(netns=ns, flags=0) as ipr:
            return netlink.fdb_peers(ipr, netlink.link_index(ipr, vxlan))  # type: ignore[arg-type]

    assert await asyncio.to_thread(peers, host_a) == {ip_b, stale}
    assert await asyncio.to_thread(peers, host_b) == {ip_a}
    await run_agent(host_a, topo, ip_a, "ensure", spec=topo.spec([pa, pc], peers=[ip_b]))
    assert await asyncio.to_thread(peers, host_a) == {ip_b}

    bridge = names.bridge_name(spec_a.id)
    vm_a = await asyncio.to_thread(topo.vm, pa.mac_address, bridge, host_ns=host_a)
    vm_b = await asyncio.to_thread(topo.vm, pb.mac_address, bridge, host_ns=host_b)
    lease = await topo.udhcpc(vm_b)
    assert lease is not None and lease["ip"] == "10.61.0.12"
    # VM traffic crosses the VXLAN...

    def address(vm: str, ip: str) -> None:
        with IPRoute(netns=vm, flags=0) as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=ip, prefixlen=24)

    await asyncio.to_thread(address, vm_a, "10.61.0.11")
    await asyncio.to_thread(address, vm_b, "10.61.0.12")
    assert await ping(vm_b, "10.61.0.11")
    # ...but host A's DHCP server does not: pc is served only by A, and sits on B.
    vm_c = await asyncio.to_thread(topo.vm, pc.mac_address, bridge, host_ns=host_b)
    assert await topo.udhcpc(vm_c, tries=2) is None

    await run_agent(host_a, topo, ip_a, "remove", network_id=spec_a.id)
    await run_agent(host_b, topo, ip_b, "remove", network_id=spec_a.id)

    def links(ns: str) -> set[str]:
        with IPRoute(netns=ns, flags=0) as ipr:
            return {link.get("IFLA_IFNAME") for link in ipr.get_links()}

    # Only the underlay and the test's own "VM" veths are left.
    assert await asyncio.to_thread(links, host_a) == {"lo", "underlay", f"v{topo.uid}1"}
    assert await asyncio.to_thread(links, host_b) == {"lo", "underlay", f"v{topo.uid}2", f"v{topo.uid}3"}
    assert [n for n in netns.listnetns() if "dhcp" in n and topo.uid in n] == []
    assert dnsmasq_pids(str(topo.tmp)) == []


async def test_ipv6_dhcpv6_modes_start(driver: LinuxNetworkDriver, topo: Topology) -> None:
    """dnsmasq accepts stateful and stateless DHCPv6 ranges; stateful ports get [v6] leases."""
    stateful = ipaddress.ip_network(f"fd{topo.uid[:2]}:{topo.uid[2:6]}:1::/64")
    stateless = ipaddress.ip_network(f"fd{topo.uid[:2]}:{topo.uid[2:6]}:2::/64")
    subnets = [
        SubnetSpec(
            id="sub6a", cidr=str(stateful), ip_version=6, dns_nameservers=["2001:db8::53"],
            ipv6_ra_mode="dhcpv6-stateful", ipv6_address_mode="dhcpv6-stateful",
        ),
        SubnetSpec(
            id="sub6b", cidr=str(stateless), ip_version=6,
            ipv6_ra_mode="dhcpv6-stateless", ipv6_address_mode="dhcpv6-stateless",
        ),
    ]  # fmt: skip
    dhcp_port = topo.port(0, str(stateful[2]), "sub6a", str(stateful))
    dhcp_port.fixed_ips.append(FixedIp(ip_address=str(stateless[2]), subnet_id="sub6b", cidr=str(stateless)))
    vm_port = topo.port(1, str(stateful[11]), "sub6a", str(stateful))
    vm_port.fixed_ips.append(FixedIp(ip_address=str(stateless[11]), subnet_id="sub6b", cidr=str(stateless)))
    spec = topo.spec([vm_port], subnets=subnets, dhcp_port=dhcp_port)
    await driver.ensure_network(spec)
    files = driver._dhcp_files(spec.id)
    _, argv = dnsmasq.running(files)  # type: ignore[misc]
    assert f"--dhcp-range=set:sn0,{stateful.network_address},static,64,86400s" in argv
    assert f"--dhcp-range=set:sn1,{stateless.network_address},ra-stateless,64,86400s" in argv
    assert "--dhcp-option=tag:sn0,option6:dns-server,[2001:db8::53]" in argv
    # Only the stateful subnet hands out addresses.
    assert files.hosts.read_text() == f"{vm_port.mac_address},[{stateful[11]}]\n"
