"""Blocking pyroute2 helpers for bridges, VXLAN, FDB, taps, veths and namespaces.

All functions work in the calling process's network namespace (the agent's) unless they
take a namespace name. Callers run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
from collections.abc import Iterable
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

ZERO_MAC = "00:00:00:00:00:00"
VXLAN_PORT = 4789
IFA_F_NODAD = 0x02
_ENODEV = 19


def _after_fork_in_child() -> None:
    """pyroute2 does namespace work (``IPRoute(netns=...)``, ``netns.create``) in forked
    children and stops them with SIGTERM. Such a child must not run the parent's Python signal
    handlers: their C half writes the signal number to the inherited asyncio wakeup socket, and
    the *parent* would then stop as if it had received SIGTERM (the agent or ``cloudland up``
    exiting with 0 at random)."""
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, signal.SIG_DFL)


os.register_at_fork(after_in_child=_after_fork_in_child)


def netns_path(name: str) -> str:
    return os.path.join(netns.NETNS_RUN_DIR, name)


def list_netns() -> list[str]:
    return netns.listnetns()


def ensure_netns(name: str) -> None:
    if name not in netns.listnetns():
        netns.create(name)


def remove_netns(name: str) -> None:
    if name in netns.listnetns():
        netns.remove(name)


def link_index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _link(ipr: IPRoute, index: int) -> Any:
    return ipr.link("get", index=index)[0]


def _kind(link: Any) -> str | None:
    info = link.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info else None


def delete_link(ipr: IPRoute, name: str) -> None:
    index = link_index(ipr, name)
    if index is None:
        return
    try:
        ipr.link("del", index=index)
    except NetlinkError as e:
        if e.code != _ENODEV:
            raise


def disable_ipv6(name: str) -> None:
    """No IPv6 (link-local or SLAAC from a tenant's RA) on the hypervisor's side of a
    tenant network: the host must not be addressable from guests."""
    path = f"/proc/sys/net/ipv6/conf/{name.replace('.', '/')}/disable_ipv6"
    try:
        with open(path, "w") as f:
            f.write("1")
    except FileNotFoundError:
        pass  # IPv6 disabled in this kernel or namespace


def bridge_ports(ipr: IPRoute, bridge_index: int) -> list[tuple[str, str | None]]:
    """(name, kind) of every interface enslaved to the bridge."""
    return [
        (link.get("IFLA_IFNAME"), _kind(link))
        for link in ipr.get_links()
        if link.get("IFLA_MASTER") == bridge_index
    ]


def ensure_bridge(ipr: IPRoute, name: str, mtu: int) -> int:
    index = link_index(ipr, name)
    if index is not None and _kind(_link(ipr, index)) != "bridge":
        delete_link(ipr, name)
        index = None
    if index is None:
        ipr.link("add", ifname=name, kind="bridge", mtu=mtu)
        index = link_index(ipr, name)
        assert index is not None
    disable_ipv6(name)
    ipr.link("set", index=index, mtu=mtu, state="up")
    return index


def _vxlan_matches(link: Any, vni: int, local: str) -> bool:
    if _kind(link) != "vxlan":
        return False
    data = link.get("IFLA_LINKINFO").get("IFLA_INFO_DATA")
    have_local = data.get("IFLA_VXLAN_LOCAL") or data.get("IFLA_VXLAN_LOCAL6")
    return (
        data.get("IFLA_VXLAN_ID") == vni
        and have_local == local
        and data.get("IFLA_VXLAN_PORT") == VXLAN_PORT
        and not data.get("IFLA_VXLAN_LEARNING")
    )


def ensure_vxlan(ipr: IPRoute, name: str, vni: int, local: str, mtu: int, bridge_index: int) -> int:
    """A non-learning VXLAN device on the bridge; recreated if its VNI or local address differ."""
    index = link_index(ipr, name)
    if index is not None and not _vxlan_matches(_link(ipr, index), vni, local):
        delete_link(ipr, name)
        index = None
    if index is None:
        local_key = "vxlan_local6" if ipaddress.ip_address(local).version == 6 else "vxlan_local"
        ipr.link(
            "add",
            ifname=name,
            kind="vxlan",
            vxlan_id=vni,
            vxlan_port=VXLAN_PORT,
            vxlan_learning=0,
            mtu=mtu,
            **{local_key: local},
        )
        index = link_index(ipr, name)
        assert index is not None
    disable_ipv6(name)
    ipr.link("set", index=index, master=bridge_index, mtu=mtu, state="up")
    return index


def fdb_peers(ipr: IPRoute, vxlan_index: int) -> set[str]:
    """Destinations of the all-zeros (flood) FDB entries of a VXLAN device."""
    peers = set()
    for entry in ipr.fdb("dump", ifindex=vxlan_index):
        if entry.get("ifindex") != vxlan_index:
            continue
        dst = entry.get("NDA_DST")
        if entry.get("NDA_LLADDR") == ZERO_MAC and dst:
            peers.add(dst)
    return peers


def sync_fdb(ipr: IPRoute, vxlan_index: int, peers: Iterable[str]) -> None:
    """Make the all-zeros FDB entries exactly ``peers``: add missing, delete stale."""
    want = {str(ipaddress.ip_address(p)) for p in peers}
    have = {str(ipaddress.ip_address(p)) for p in fdb_peers(ipr, vxlan_index)}
    for dst in sorted(want - have):
        ipr.fdb("append", ifindex=vxlan_index, lladdr=ZERO_MAC, dst=dst)
    for dst in sorted(have - want):
        ipr.fdb("del", ifindex=vxlan_index, lladdr=ZERO_MAC, dst=dst)


def set_isolated(ipr: IPRoute, index: int, isolated: bool) -> None:
    """Bridge port isolation: isolated ports never forward to each other."""
    ipr.brport("set", index=index, isolated=1 if isolated else 0)


def ensure_tap(ipr: IPRoute, name: str, mtu: int, bridge_index: int) -> int:
    """A persistent tap (QEMU opens it with ifname=, script=no) on the bridge."""
    index = link_index(ipr, name)
    if index is not None and _kind(_link(ipr, index)) != "tun":
        delete_link(ipr, name)
        index = None
    if index is None:
        ipr.link("add", ifname=name, kind="tuntap", mode="tap")
        index = link_index(ipr, name)
        assert index is not None
    disable_ipv6(name)
    ipr.link("set", index=index, master=bridge_index, mtu=mtu, state="up")
    return index


def ensure_veth_into_netns(
    ipr: IPRoute, host_name: str, ns_ifname: str, ns_name: str, mtu: int, bridge_index: int
) -> int:
    """A veth pair with one end on the bridge and the other in namespace ``ns_name``."""
    index = link_index(ipr, host_name)
    if index is not None and _kind(_link(ipr, index)) != "veth":
        delete_link(ipr, host_name)
        index = None
    if index is not None:
        with IPRoute(netns=ns_name, flags=0) as nsr:
            peer_missing = link_index(nsr, ns_ifname) is None
        if peer_missing:
            delete_link(ipr, host_name)
            index = None
    if index is None:
        with IPRoute(netns=ns_name, flags=0) as nsr:
            delete_link(nsr, ns_ifname)
        ipr.link(
            "add",
            ifname=host_name,
            kind="veth",
            mtu=mtu,
            peer={"ifname": ns_ifname, "net_ns_fd": ns_name, "mtu": mtu},
        )
        index = link_index(ipr, host_name)
        assert index is not None
    disable_ipv6(host_name)
    ipr.link("set", index=index, master=bridge_index, mtu=mtu, state="up")
    return index


IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


def configure_netns_interface(
    ns_name: str, ifname: str, mac: str, mtu: int, addresses: list[IPInterface]
) -> None:
    """Set MAC, MTU and exactly ``addresses`` (link-local IPv6 untouched) on ``ifname``."""
    with IPRoute(netns=ns_name, flags=0) as nsr:
        lo = link_index(nsr, "lo")
        if lo is not None:
            nsr.link("set", index=lo, state="up")
        index = link_index(nsr, ifname)
        if index is None:
            raise RuntimeError(f"{ifname} missing in namespace {ns_name}")
        link = _link(nsr, index)
        if link.get("IFLA_ADDRESS") != mac.lower():
            nsr.link("set", index=index, state="down")
            nsr.link("set", index=index, address=mac)
        nsr.link("set", index=index, mtu=mtu, state="up")
        want = {(str(a.ip), a.network.prefixlen) for a in addresses}
        have = set()
        for addr in nsr.get_addr(index=index):
            ip = ipaddress.ip_address(addr.get("IFA_ADDRESS"))
            if ip.version == 6 and ip.is_link_local:
                continue
            have.add((str(ip), addr["prefixlen"]))
        for ip, plen in have - want:
            nsr.addr("del", index=index, address=ip, prefixlen=plen)
        for ip, plen in want - have:
            # The DHCP port has the same address on every host; DAD would only delay it.
            extra = {"flags": IFA_F_NODAD} if ":" in ip else {}
            nsr.addr("add", index=index, address=ip, prefixlen=plen, **extra)
