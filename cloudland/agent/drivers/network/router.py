"""Distributed routers on one hypervisor: a namespace per router, its gateway, NAT and isolation.

Every hypervisor that has ports behind router R runs R itself (``clr-<host>-<router id>``):

- per interface a veth, ``rq<port>`` on the network's bridge and ``qr-<port>`` in the namespace
  with the interface's MAC and gateway address(es) — the same on every host, so a guest's
  gateway is always its own host's router and east-west traffic between a router's subnets on
  one host never leaves it. The router resolves nobody: every port behind it is a static
  neighbour (from the spec), so it sends no ARP/ND across the overlay;
- bridge rules (``bridge cloudland_router``): nothing from the overlay reaches ``rq``, no ARP
  or neighbour discovery from ``rq`` leaves over the overlay, and routed frames that do leave
  (to a guest on another host) carry this host's router MAC instead of the shared gateway MAC,
  so no bridge anywhere learns the gateway MAC behind a VXLAN port (Neutron DVR's host MAC);
- IPv6: forwarding without NAT; for subnets with an ``ipv6_ra_mode`` (SLAAC or stateless
  DHCPv6) a dnsmasq in the namespace sends router advertisements (the DHCP namespace's have
  router lifetime 0), so guests take their own host's router as default IPv6 router;
- the gateway: ``rg<port>`` on the external network's bridge, ``qg-<port>`` in the namespace
  with this host's own external address, a default route to the external subnet's gateway,
  floating IPs as /32 addresses, and ``ip cloudland_nat``: DNAT/SNAT per floating IP, SNAT
  of everything else to this host's gateway address when ``enable_snat``.

``Routers.converge(specs)`` (blocking) makes this host match the routers in its saved
network specs and removes any router namespace of this host that no spec names.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ndmsg import states

from cloudland.agent.drivers.network import dnsmasq, names, netlink, pidfile
from cloudland.bus.messages import (
    FloatingIpSpec,
    NeighborSpec,
    NetworkSpec,
    RouterGatewaySpec,
    RouterInterfaceSpec,
)

log = logging.getLogger(__name__)

BRIDGE_TABLE = "cloudland_router"
NAT_TABLE = "cloudland_nat"
ROUTE_PROTO = 99  # routes this driver owns in a router namespace (default, static routes)
PERMANENT = states["permanent"]
SYSCTLS = ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
           "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.default.send_redirects=0"]


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def netns_prefix(host_tag: str) -> str:
    return f"clr-{names.check_id(host_tag, 'host tag')}-"


def router_netns(host_tag: str, router_id: str) -> str:
    return netns_prefix(host_tag) + names.check_id(router_id, "router id")


def _host_end(prefix: str, port_id: str) -> str:
    return prefix + names.check_id(port_id, "port id")[:11]


@dataclass
class Interface:
    spec: RouterInterfaceSpec
    neighbors: list[NeighborSpec]
    overlay: str | None  # the network's VXLAN device, when it has one


@dataclass
class Router:
    """One router as this host realises it, merged from the specs of all its networks here."""

    id: str
    host_mac: str = ""
    interfaces: dict[str, Interface] = field(default_factory=dict)
    gateway: RouterGatewaySpec | None = None
    enable_snat: bool = True
    routes: list[dict[str, str]] = field(default_factory=list)
    floating_ips: list[FloatingIpSpec] = field(default_factory=list)


def merge(specs: list[NetworkSpec]) -> dict[str, Router]:
    routers: dict[str, Router] = {}
    for spec in sorted(specs, key=lambda s: s.id):
        overlay = (names.vxlan_name(spec.segmentation_id)
                   if spec.network_type == "vxlan" and spec.segmentation_id else None)
        for r in spec.routers:
            router = routers.setdefault(r.id, Router(id=r.id))
            router.interfaces[r.interface.port_id] = Interface(r.interface, r.neighbors, overlay)
            router.host_mac = r.host_mac
            router.gateway = r.gateway or router.gateway
            router.enable_snat = r.enable_snat
            router.routes = r.routes
            fips = {f.floating_ip: f for f in router.floating_ips + r.floating_ips}
            router.floating_ips = sorted(fips.values(), key=lambda f: f.floating_ip)
    return routers


def bridge_script(routers: list[Router]) -> str:
    lines = [f"table bridge {BRIDGE_TABLE} {{}}", f"delete table bridge {BRIDGE_TABLE}",
             f"table bridge {BRIDGE_TABLE} {{",
             "  chain forward { type filter hook forward priority -200; policy accept;"]
    for router in routers:
        for port_id, iface in sorted(router.interfaces.items()):
            if iface.overlay is None:
                continue
            rq, vx = _host_end("rq", port_id), iface.overlay
            lines += [
                f'    iifname "{vx}" oifname "{rq}" drop',
                f'    iifname "{rq}" oifname "{vx}" ether type arp drop',
                f'    iifname "{rq}" oifname "{vx}" icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, '
                "nd-router-advert, nd-redirect } drop",
                f'    iifname "{rq}" oifname "{vx}" ether saddr set {router.host_mac}',
            ]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def nat_script(router: Router) -> str:
    lines = [f"table ip {NAT_TABLE} {{}}", f"delete table ip {NAT_TABLE}", f"table ip {NAT_TABLE} {{"]
    gw = router.gateway
    qg = _host_end("qg-", gw.port_id) if gw else None
    v4 = [a.split("/")[0] for a in (gw.addresses if gw else []) if ":" not in a]
    lines.append("  chain prerouting { type nat hook prerouting priority dstnat; policy accept;")
    if qg:
        lines += [f"    ip daddr {f.floating_ip} dnat to {f.fixed_ip}" for f in router.floating_ips]
    lines += ["  }", "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;"]
    if qg:
        lines += [f'    oifname "{qg}" ip saddr {f.fixed_ip} snat to {f.floating_ip}'
                  for f in router.floating_ips]
        if router.enable_snat and v4:
            lines.append(f'    oifname "{qg}" ip saddr != {v4[0]} snat to {v4[0]}')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _in_netns(ns: str, argv: list[str], stdin: str | None = None) -> None:
    done = subprocess.run(["nsenter", f"--net={netlink.netns_path(ns)}", "--", *argv],
                          input=stdin.encode() if stdin is not None else None, capture_output=True,
                          timeout=30)
    if done.returncode:
        raise RuntimeError(f"{argv[0]} in {ns} failed: {done.stderr.decode(errors='replace').strip()}")


_GARP = r"""
import socket, sys
ifname, ip, mac = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3].replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
addr = socket.inet_aton(ip)
for op in (1, 2):  # a gratuitous request and a gratuitous reply
    target = b"\xff" * 6 if op == 2 else b"\x00" * 6
    arp = b"\x00\x01\x08\x00\x06\x04" + op.to_bytes(2, "big") + mac + addr + target + addr
    s.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)
"""


def gratuitous_arp(ns: str, ifname: str, ip: str, mac: str) -> None:
    """Tell the external network that ``ip`` is here now (a floating IP that moved hosts)."""
    _in_netns(ns, [sys.executable, "-c", _GARP, ifname, ip, mac])


RA_MODES = {"slaac": "ra-only", "dhcpv6-stateless": "ra-stateless"}
RA_INTERVAL_SECONDS = 30
RA_LIFETIME_SECONDS = 1800


def ra_args(router: Router, files: dnsmasq.DhcpFiles, present: set[str] | None = None) -> list[str]:
    """dnsmasq sending this router's advertisements on its ``present`` interfaces (all when
    None); [] when no subnet wants them."""
    ranges, params, interfaces = [], [], []
    for port_id, iface in sorted(router.interfaces.items()):
        qr = _host_end("qr-", port_id)
        if present is not None and qr not in present:
            continue
        modes = [(ipaddress.ip_network(c), RA_MODES[m]) for c, m in sorted(iface.spec.ra_prefixes.items())
                 if m in RA_MODES]
        if not modes:
            continue
        interfaces.append(f"--interface={qr}")
        ranges += [f"--dhcp-range={net.network_address},{mode},{net.prefixlen}" for net, mode in modes]
        params.append(f"--ra-param={qr},mtu:{iface.spec.mtu},{RA_INTERVAL_SECONDS},{RA_LIFETIME_SECONDS}")
    if not ranges:
        return []
    return ["dnsmasq", "--conf-file=/dev/null", "--no-hosts", "--no-resolv", "--port=0", "--bind-interfaces",
            *interfaces, "--except-interface=lo", f"--pid-file={files.pid}", f"--log-facility={files.log}",
            "--user=root", "--group=root", "--enable-ra", *ranges, *params]


def stop_all(state_dir: Path) -> None:
    """Stop every router's dnsmasq under ``state_dir`` (``cloudland down``)."""
    if state_dir.is_dir():
        for directory in state_dir.iterdir():
            pidfile.stop_blocking(dnsmasq.DhcpFiles(directory).pid)


class Routers:
    def __init__(self, host_tag: str, state_dir: Path, nft: str = "nft") -> None:
        self.host_tag = host_tag
        self.state_dir = Path(state_dir)
        self.nft = nft
        self._applied_bridge: str | None = None
        self._converged: dict[str, str] = {}  # router id → the state last applied in full
        self._applied_nat: dict[str, str] = {}
        self._announced: dict[str, set[str]] = {}

    def converge(self, specs: list[NetworkSpec]) -> None:
        routers = merge(specs)
        prefix = netns_prefix(self.host_tag)
        for ns in netlink.list_netns():
            if ns.startswith(prefix) and ns[len(prefix):] not in routers:
                log.info("removing router namespace %s", ns)
                self._remove(ns, ns[len(prefix):])
        present = set(netlink.list_netns())
        for router in routers.values():
            # Most specs change for other reasons (ports, security groups): a router whose own
            # state is what this agent last applied, with its namespace still there, is left
            # alone (namespace work forks pyroute2 helpers: ~0.1 s per interface).
            state = repr(router)
            if self._converged.get(router.id) == state and router_netns(self.host_tag, router.id) in present:
                continue
            try:
                self._ensure(router)
                self._converged[router.id] = state
            except Exception:
                self._converged.pop(router.id, None)
                log.exception("router %s: converging failed", router.id)
        script = bridge_script(list(routers.values()))
        if script != self._applied_bridge:
            done = subprocess.run([self.nft, "-f", "-"], input=script.encode(), capture_output=True)
            if done.returncode:
                raise RuntimeError(f"nft failed: {done.stderr.decode(errors='replace').strip()}")
            self._applied_bridge = script

    def _files(self, router_id: str) -> dnsmasq.DhcpFiles:
        return dnsmasq.DhcpFiles(self.state_dir / names.check_id(router_id, "router id"))

    def _ensure_ra(self, ns: str, router: Router, present: set[str]) -> None:
        files = self._files(router.id)
        args = ra_args(router, files, present)
        found = dnsmasq.running(files)
        if found is not None and args and found[1][1:] == args[1:]:
            return
        pidfile.stop_blocking(files.pid)
        if not args:
            return
        files.directory.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["nsenter", f"--net={netlink.netns_path(ns)}", "--", *args],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        if done.returncode:
            raise RuntimeError(f"router dnsmasq failed: {done.stderr.decode(errors='replace').strip()}")

    def _remove(self, ns: str, router_id: str) -> None:
        self._converged.pop(router_id, None)
        pidfile.stop_blocking(self._files(router_id).pid)
        netlink.remove_netns(ns)  # its ends of the veths go with it, and so do their peers
        self._applied_nat.pop(router_id, None)
        self._announced.pop(router_id, None)

    def _ensure(self, router: Router) -> None:
        ns = router_netns(self.host_tag, router.id)
        fresh = ns not in netlink.list_netns()
        netlink.ensure_netns(ns)
        if fresh:
            _in_netns(ns, ["sysctl", "-qw", *SYSCTLS])
            self._applied_nat.pop(router.id, None)
            self._announced.pop(router.id, None)
        wanted = set()
        with IPRoute() as ipr:
            for port_id, iface in router.interfaces.items():
                bridge = netlink.link_index(ipr, names.bridge_name(iface.spec.network_id))
                if bridge is None:
                    continue
                qr = _host_end("qr-", port_id)
                netlink.ensure_veth_into_netns(ipr, _host_end("rq", port_id), qr, ns, iface.spec.mtu, bridge)
                netlink.configure_netns_interface(ns, qr, iface.spec.mac_address, iface.spec.mtu,
                                                  [ipaddress.ip_interface(a) for a in iface.spec.addresses])
                wanted.add(qr)
            gw = router.gateway
            gw_bridge = netlink.link_index(ipr, names.bridge_name(gw.network_id)) if gw else None
            if gw is not None and gw_bridge is not None:
                qg = _host_end("qg-", gw.port_id)
                netlink.ensure_veth_into_netns(ipr, _host_end("rg", gw.port_id), qg, ns, gw.mtu, gw_bridge)
                addresses = [ipaddress.ip_interface(a) for a in gw.addresses]
                addresses += [ipaddress.ip_interface(f"{f.floating_ip}/32") for f in router.floating_ips]
                netlink.configure_netns_interface(ns, qg, gw.mac_address, gw.mtu, addresses)
                wanted.add(qg)
        with IPRoute(netns=ns, flags=0) as nsr:
            for link in nsr.get_links():
                name = link.get("IFLA_IFNAME")
                if name and name[:3] in ("qr-", "qg-") and name not in wanted:
                    nsr.link("del", index=link["index"])
            self._sync_neighbors(nsr, router)
            gateway_up = gw is not None and _host_end("qg-", gw.port_id) in wanted
            self._sync_routes(nsr, router, gateway_up)
        self._ensure_ra(ns, router, wanted)
        nat = nat_script(router) if gateway_up else ""
        if nat and self._applied_nat.get(router.id) != nat:
            _in_netns(ns, [self.nft, "-f", "-"], nat)
            self._applied_nat[router.id] = nat
        if gw is not None and nat:
            self._announce(ns, router, gw)

    def _sync_neighbors(self, nsr: IPRoute, router: Router) -> None:
        for port_id, iface in router.interfaces.items():
            index = netlink.link_index(nsr, _host_end("qr-", port_id))
            if index is None:
                continue
            subnets = [ipaddress.ip_interface(a).network for a in iface.spec.addresses]
            want = {(n.ip, n.mac.lower()) for n in iface.neighbors
                    if any(ipaddress.ip_address(n.ip) in net for net in subnets)}
            have = set()
            for entry in nsr.get_neighbours(ifindex=index):
                if entry["state"] & PERMANENT and entry.get("NDA_LLADDR"):
                    have.add((entry.get("NDA_DST"), entry.get("NDA_LLADDR")))
            for ip, _ in have - want:
                nsr.neigh("del", dst=ip, ifindex=index, family=_family(ip))
            for ip, mac in want - have:
                nsr.neigh("replace", dst=ip, lladdr=mac, ifindex=index, state=PERMANENT, family=_family(ip))

    def _sync_routes(self, nsr: IPRoute, router: Router, gateway_up: bool) -> None:
        want: dict[tuple[int, str], str] = {}
        if gateway_up and router.gateway is not None:
            for gw_ip in router.gateway.gateway_ips:
                family = _family(gw_ip)
                want.setdefault((family, "::/0" if family == socket.AF_INET6 else "0.0.0.0/0"), gw_ip)
        for r in router.routes:
            dst = str(ipaddress.ip_network(r["destination"], strict=False))
            want[(_family(dst), dst)] = r["nexthop"]
        have: dict[tuple[int, str], str] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in nsr.get_routes(family=family, proto=ROUTE_PROTO):
                default = "::" if family == socket.AF_INET6 else "0.0.0.0"
                dst = f"{route.get('RTA_DST') or default}/{route['dst_len']}"
                have[(family, dst)] = route.get("RTA_GATEWAY") or ""
        for key in have.keys() - want.keys():
            nsr.route("del", dst=key[1], family=key[0], proto=ROUTE_PROTO)
        for (family, dst), via in want.items():
            if have.get((family, dst)) != via:
                try:
                    nsr.route("replace", dst=dst, gateway=via, family=family, proto=ROUTE_PROTO)
                except Exception as exc:  # a nexthop not (yet) reachable: next converge retries
                    log.warning("router %s: route %s via %s: %s", router.id, dst, via, exc)

    def _announce(self, ns: str, router: Router, gw: RouterGatewaySpec) -> None:
        """Gratuitous ARP for addresses new on this host's gateway (floating IPs move)."""
        current = ({a.split("/")[0] for a in gw.addresses if ":" not in a}
                   | {f.floating_ip for f in router.floating_ips})
        done = self._announced.setdefault(router.id, set())
        for ip in sorted(current - done):
            try:
                gratuitous_arp(ns, _host_end("qg-", gw.port_id), ip, gw.mac_address)
            except Exception as exc:
                log.warning("router %s: gratuitous ARP for %s: %s", router.id, ip, exc)
        self._announced[router.id] = current
