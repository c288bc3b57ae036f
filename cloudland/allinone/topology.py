"""Several hypervisors on one machine (the dev/test topology of ``cloudland up --hypervisors N``).

Each hypervisor is a network namespace ``clhv-<host_id>`` with one veth (``underlay`` inside)
into a bridge ``clu<tag>`` in the root namespace. The bridge has the first address of
``allinone.underlay_cidr`` (the agents reach NATS and the API there), hypervisor k the
(k+1)-th (its ``agent.underlay_address``, the VXLAN endpoint). Everything is built with
pyroute2 and idempotently; ``destroy`` removes it, the hypervisors' DHCP namespaces and
their dnsmasq processes included. Blocking functions: run them in a thread.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, netns

from cloudland.agent.drivers.network import names, netlink
from cloudland.config import Config

log = logging.getLogger(__name__)

UNDERLAY_IFNAME = "underlay"
EXTERNAL_IFNAME = "ext0"  # a hypervisor's uplink to the external network
PHYSICAL_NETWORK = "public"
OUTSIDE_IFNAME = "eth0"


@dataclass(frozen=True)
class Hypervisor:
    host_id: str
    netns: str
    address: str  # underlay address inside the namespace
    veth: str  # root end of its underlay veth
    state_dir: Path  # the agent's state directory
    ext_veth: str = ""  # root end of its external uplink veth (``ext0`` inside)

    @property
    def netns_path(self) -> str:
        return netlink.netns_path(self.netns)


@dataclass(frozen=True)
class Topology:
    bridge: str
    gateway: ipaddress.IPv4Interface  # root side: NATS and the API listen on its address
    hypervisors: list[Hypervisor]
    external_bridge: str = ""  # the external network's segment (root namespace)
    outside_netns: str = ""  # the "outside" host: the internet of this topology
    outside: ipaddress.IPv4Interface | None = None  # its address (the external subnet's gateway)
    outside6: ipaddress.IPv6Interface | None = None  # and its IPv6 address (the IPv6 subnet's)

    @property
    def gateway_ip(self) -> str:
        return str(self.gateway.ip)

    @property
    def outside_ip(self) -> str:
        assert self.outside is not None
        return str(self.outside.ip)


def host_ids(config: Config) -> list[str]:
    """The ids of the all-in-one's hypervisors: the configured one, or ``<id>-1 … <id>-N``."""
    base = config.host_id()
    n = config.allinone.hypervisors
    return [base] if n == 1 else [f"{base}-{k}" for k in range(1, n + 1)]


def plan(config: Config) -> Topology | None:
    """The namespaces, names and addresses for ``config``; None for a single hypervisor."""
    n = config.allinone.hypervisors
    if n == 1:
        return None
    net = ipaddress.ip_network(config.allinone.underlay_cidr)
    if net.version != 4 or net.num_addresses < n + 3:
        raise ValueError(f"allinone.underlay_cidr {net} is not an IPv4 network with room for {n} hosts")
    tag = hashlib.sha256(str(config.state_dir.resolve()).encode()).hexdigest()[:6]
    hosts = []
    for k, host_id in enumerate(host_ids(config), start=1):
        names.check_id(host_id, "host id")
        hosts.append(Hypervisor(host_id=host_id, netns=f"clhv-{host_id}", address=str(net[1 + k]),
                                veth=f"clu{tag}h{k}", state_dir=config.agent_state_dir(host_id),
                                ext_veth=f"cle{tag}h{k}"))
    ext = ipaddress.ip_network(config.allinone.external_cidr)
    if ext.version != 4 or ext.num_addresses < 16:
        raise ValueError(f"allinone.external_cidr {ext} is not an IPv4 network of at least 16 addresses")
    ext6 = ipaddress.ip_network(config.allinone.external_cidr6)
    if ext6.version != 6 or ext6.prefixlen > 120:
        raise ValueError(f"allinone.external_cidr6 {ext6} is not an IPv6 network")
    return Topology(bridge=f"clu{tag}", gateway=ipaddress.IPv4Interface((net[1], net.prefixlen)),
                    hypervisors=hosts, external_bridge=f"cle{tag}", outside_netns=f"clout-{tag}",
                    outside=ipaddress.IPv4Interface((ext[1], ext.prefixlen)),
                    outside6=ipaddress.IPv6Interface((ext6[1], ext6.prefixlen)))


def _ensure_address(ipr: IPRoute, index: int, iface: ipaddress.IPv4Interface) -> None:
    have = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=2)}
    if (str(iface.ip), iface.network.prefixlen) not in have:
        ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)


def _ensure_bridge(ipr: IPRoute, name: str) -> int:
    index = netlink.link_index(ipr, name)
    if index is None:
        ipr.link("add", ifname=name, kind="bridge")
        index = netlink.link_index(ipr, name)
        assert index is not None
    ipr.link("set", index=index, state="up")
    return index


def _ensure_veth_pair(ipr: IPRoute, root_end: str, ns: str, inner: str, bridge: int) -> None:
    index = netlink.link_index(ipr, root_end)
    if index is None:
        with IPRoute(netns=ns, flags=0) as nsr:
            netlink.delete_link(nsr, inner)
        ipr.link("add", ifname=root_end, kind="veth", peer={"ifname": inner, "net_ns_fd": ns})
        index = netlink.link_index(ipr, root_end)
        assert index is not None
    ipr.link("set", index=index, master=bridge, state="up")
    with IPRoute(netns=ns, flags=0) as nsr:
        inner_index = netlink.link_index(nsr, inner)
        if inner_index is None:
            raise RuntimeError(f"{inner} missing in namespace {ns}")
        nsr.link("set", index=inner_index, state="up")


def build_external(topo: Topology) -> None:
    """The external segment: a bridge, the outside host on it, every hypervisor's ``ext0``."""
    if not topo.external_bridge or topo.outside is None:
        return
    with IPRoute() as ipr:
        br = _ensure_bridge(ipr, topo.external_bridge)
        netlink.ensure_netns(topo.outside_netns)
        _ensure_veth_pair(ipr, f"{topo.external_bridge}o", topo.outside_netns, OUTSIDE_IFNAME, br)
        with IPRoute(netns=topo.outside_netns, flags=0) as nsr:
            lo = netlink.link_index(nsr, "lo")
            assert lo is not None
            nsr.link("set", index=lo, state="up")
            eth = netlink.link_index(nsr, OUTSIDE_IFNAME)
            assert eth is not None
            _ensure_address(nsr, eth, topo.outside)
            if topo.outside6 is not None:
                have = {a.get("IFA_ADDRESS") for a in nsr.get_addr(index=eth, family=socket.AF_INET6)}
                if str(topo.outside6.ip) not in have:
                    nsr.addr("add", index=eth, address=str(topo.outside6.ip),
                             prefixlen=topo.outside6.network.prefixlen, flags=netlink.IFA_F_NODAD)
        for hv in topo.hypervisors:
            _ensure_veth_pair(ipr, hv.ext_veth, hv.netns, EXTERNAL_IFNAME, br)


def build(topo: Topology) -> None:
    """Create whatever is missing: the bridge, the namespaces, the veths and addresses."""
    _build_underlay(topo)
    build_external(topo)


def _build_underlay(topo: Topology) -> None:
    with IPRoute() as ipr:
        br = netlink.link_index(ipr, topo.bridge)
        if br is None:
            ipr.link("add", ifname=topo.bridge, kind="bridge")
            br = netlink.link_index(ipr, topo.bridge)
            assert br is not None
        _ensure_address(ipr, br, topo.gateway)
        ipr.link("set", index=br, state="up")
        for hv in topo.hypervisors:
            netlink.ensure_netns(hv.netns)
            index = netlink.link_index(ipr, hv.veth)
            if index is None:
                with IPRoute(netns=hv.netns, flags=0) as nsr:
                    netlink.delete_link(nsr, UNDERLAY_IFNAME)
                ipr.link("add", ifname=hv.veth, kind="veth",
                         peer={"ifname": UNDERLAY_IFNAME, "net_ns_fd": hv.netns})
                index = netlink.link_index(ipr, hv.veth)
                assert index is not None
            ipr.link("set", index=index, master=br, state="up")
            with IPRoute(netns=hv.netns, flags=0) as nsr:
                lo = netlink.link_index(nsr, "lo")
                assert lo is not None
                nsr.link("set", index=lo, state="up")
                inner = netlink.link_index(nsr, UNDERLAY_IFNAME)
                if inner is None:
                    raise RuntimeError(f"{UNDERLAY_IFNAME} missing in namespace {hv.netns}")
                plen = topo.gateway.network.prefixlen
                _ensure_address(nsr, inner, ipaddress.IPv4Interface((hv.address, plen)))
                nsr.link("set", index=inner, state="up")


def stop_dhcp(host_id: str, agent_state_dir: Path) -> None:
    """Kill the hypervisor's dnsmasq and metadata proxy processes and remove its DHCP namespaces (the agent's
    saved network specs stay: the next start rebuilds from them)."""
    from cloudland.agent.drivers.network import dnsmasq, metadata_proxy
    from cloudland.agent.factory import host_tag

    dhcp_root = agent_state_dir / "network" / "dhcp"
    if dhcp_root.is_dir():
        for directory in dhcp_root.iterdir():
            for files, running in ((dnsmasq.DhcpFiles(directory), dnsmasq.running),
                                   (metadata_proxy.ProxyFiles(directory), metadata_proxy.running)):
                found = running(files)  # type: ignore[arg-type]
                if found is not None:
                    os.kill(found[0], signal.SIGTERM)
                    files.pid.unlink(missing_ok=True)
    from cloudland.agent.drivers.network.router import netns_prefix, stop_all

    stop_all(agent_state_dir / "network" / "routers")

    prefixes = (names.dhcp_netns_prefix(host_tag(host_id)), netns_prefix(host_tag(host_id)))
    for ns in netns.listnetns():
        if ns.startswith(prefixes):  # DHCP and router namespaces (rebuilt from the specs)
            netns.remove(ns)


def destroy(topo: Topology) -> None:
    """Remove the namespaces (with every device in them), the DHCP namespaces and the bridge."""
    for hv in topo.hypervisors:
        stop_dhcp(hv.host_id, hv.state_dir)
        netlink.remove_netns(hv.netns)
    if topo.outside_netns:
        netlink.remove_netns(topo.outside_netns)
    with IPRoute() as ipr:
        for hv in topo.hypervisors:
            netlink.delete_link(ipr, hv.veth)
            if hv.ext_veth:
                netlink.delete_link(ipr, hv.ext_veth)
        netlink.delete_link(ipr, topo.bridge)
        if topo.external_bridge:
            netlink.delete_link(ipr, f"{topo.external_bridge}o")
            netlink.delete_link(ipr, topo.external_bridge)


def exists(topo: Topology) -> bool:
    return any(hv.netns in netns.listnetns() for hv in topo.hypervisors)
