"""The Linux data plane of one hypervisor: bridges, VXLAN with static FDB, taps, DHCP.

Runs in the agent's network namespace, whatever that is. Per network:
``brq<id>`` bridge, ``vxlan-<vni>`` (no learning, all-zeros FDB entry per peer), and for
DHCP a namespace ``cl-<host>-dhcp-<id>`` joined to the bridge by a veth, running dnsmasq.
The DHCP veth and the VXLAN port are isolated bridge ports, so this host's DHCP server
(same address on every host) is never heard by, and never hears, other hosts.
Each NetworkSpec is kept as JSON under ``state_dir`` so a restarted agent finds its
networks again and adopts running dnsmasq processes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
from pathlib import Path

import msgspec
from pyroute2 import IPRoute

from cloudland.agent.drivers.network import dnsmasq, metadata_proxy, names, netlink
from cloudland.agent.drivers.network.base import NetworkDriver
from cloudland.agent.drivers.network.firewall import Firewall
from cloudland.agent.drivers.network.router import Routers
from cloudland.bus.messages import NetworkSpec, PortSpec

log = logging.getLogger(__name__)


class LinuxNetworkDriver(NetworkDriver):
    name = "linux"

    def __init__(self, state_dir: Path, host_tag: str, underlay_address: str | None = None,
                 metadata_upstream: str | None = None, metadata_key_file: Path | None = None,
                 enforce_security_groups: bool = False,
                 physical_networks: dict[str, str] | None = None) -> None:
        self.state_dir = Path(state_dir)
        # The metadata service's base URL and the proxy's signing key: both or no metadata proxy.
        self.metadata_upstream = metadata_upstream if metadata_key_file is not None else None
        self.metadata_key_file = Path(metadata_key_file).absolute() if metadata_key_file else None
        self.host_tag = names.check_id(host_tag, "host tag")
        self.underlay_address = str(ipaddress.ip_address(underlay_address)) if underlay_address else None
        self._specs_dir = self.state_dir / "networks"
        self._dhcp_dir = self.state_dir / "dhcp"
        self._locks: dict[str, asyncio.Lock] = {}
        # Off by default until the rules are proven with real guests across hypervisors
        # (docs/networking.md, "Security groups").
        self.enforce_security_groups = enforce_security_groups
        self._firewall = Firewall()
        self._host_wide_lock = asyncio.Lock()
        # Provider (flat / VLAN) networks: physical network name → this host's uplink interface.
        self.physical_networks = dict(physical_networks or {})
        self._routers = Routers(self.host_tag, self.state_dir / "routers")

    # --- state files ------------------------------------------------------------------

    def _spec_path(self, network_id: str) -> Path:
        return self._specs_dir / f"{names.check_id(network_id, 'network id')}.json"

    def _dhcp_files(self, network_id: str) -> dnsmasq.DhcpFiles:
        return dnsmasq.DhcpFiles(self._dhcp_dir / names.check_id(network_id, "network id"))

    def _load_spec(self, network_id: str) -> NetworkSpec | None:
        try:
            return msgspec.json.decode(self._spec_path(network_id).read_bytes(), type=NetworkSpec)
        except FileNotFoundError:
            return None

    def _save_spec(self, spec: NetworkSpec) -> None:
        self._specs_dir.mkdir(parents=True, exist_ok=True)
        dnsmasq.write_if_changed(self._spec_path(spec.id), msgspec.json.encode(spec).decode())

    def _lock(self, network_id: str) -> asyncio.Lock:
        return self._locks.setdefault(network_id, asyncio.Lock())

    # --- contract -----------------------------------------------------------------------

    async def init_host(self) -> None:
        """Re-apply every persisted network (rebuilds after a reboot, adopts dnsmasq
        after an agent restart) and drop this host's DHCP namespaces that have no spec."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        known = set(await self.list_networks())
        for network_id in sorted(known):
            spec = self._load_spec(network_id)
            if spec is not None:
                try:
                    await self.ensure_network(spec)
                except Exception:
                    log.exception("network %s: re-applying persisted spec failed", network_id)
        prefix = names.dhcp_netns_prefix(self.host_tag)
        for ns in await asyncio.to_thread(netlink.list_netns):
            if ns.startswith(prefix) and ns[len(prefix) :] not in known:
                network_id = ns[len(prefix) :]
                log.info("removing orphaned DHCP namespace %s", ns)
                async with self._lock(network_id):
                    await self._remove_dhcp(network_id)

    async def list_networks(self) -> list[str]:
        if not self._specs_dir.is_dir():
            return []
        return sorted(p.stem for p in self._specs_dir.glob("*.json"))

    async def ensure_network(self, spec: NetworkSpec) -> None:
        names.check_id(spec.id, "network id")
        async with self._lock(spec.id):
            self._save_spec(spec)
            await asyncio.to_thread(self._ensure_l2, spec)
            # A network carried only for a router (no ports here) needs no DHCP on this host.
            if dnsmasq.needs_dhcp(spec) and spec.ports:
                await self._ensure_dhcp(spec)
            else:
                await self._remove_dhcp(spec.id)
        await self._apply_host_wide()

    async def remove_network(self, network_id: str) -> None:
        names.check_id(network_id, "network id")
        async with self._lock(network_id):
            spec = self._load_spec(network_id)
            await self._remove_dhcp(network_id)
            await asyncio.to_thread(self._remove_l2, network_id, spec)
            self._spec_path(network_id).unlink(missing_ok=True)
        self._locks.pop(network_id, None)
        await self._apply_host_wide()

    async def _apply_host_wide(self) -> None:
        """What spans this host's networks, from the saved specs (read once): the security groups
        of every port (``firewall.py``) and the routers (``router.py``)."""
        async with self._host_wide_lock:  # the newest snapshot is applied last
            specs = [s for n in await self.list_networks() if (s := self._load_spec(n)) is not None]
            if self.enforce_security_groups:
                await self._apply_firewall(specs)
            try:
                await asyncio.to_thread(self._routers.converge, specs)
            except Exception:
                log.exception("routers: converging failed")

    async def _apply_firewall(self, specs: list[NetworkSpec]) -> None:
        ports = [p for s in specs for p in s.ports]
        if self._firewall.applied is None and not any(p.port_security for p in ports):
            return
        groups: dict[str, list[str]] = {}
        for s in specs:
            for group, members in s.remote_groups.items():
                groups[group] = sorted(set(groups.get(group, [])) | set(members))
        try:
            await asyncio.to_thread(self._firewall.apply, ports, groups)
        except Exception:
            log.exception("security groups: applying the nftables ruleset failed")

    async def plug_port(self, port: PortSpec) -> str:
        tap = names.tap_name(port.port_id)
        async with self._lock(port.network_id):
            await asyncio.to_thread(self._plug, port, tap)
        return tap

    async def unplug_port(self, port_id: str) -> None:
        tap = names.tap_name(port_id)

        def unplug() -> None:
            with IPRoute() as ipr:
                netlink.delete_link(ipr, tap)

        await asyncio.to_thread(unplug)

    # --- layer 2 (blocking, run in a thread) ---------------------------------------------

    def _vxlan_wanted(self, spec: NetworkSpec) -> bool:
        return (
            spec.network_type == "vxlan"
            and spec.segmentation_id is not None
            and self.underlay_address is not None
        )

    def _ensure_l2(self, spec: NetworkSpec) -> None:
        bridge = names.bridge_name(spec.id)
        vxlan = names.vxlan_name(spec.segmentation_id) if self._vxlan_wanted(spec) else None
        with IPRoute() as ipr:
            br_index = netlink.ensure_bridge(ipr, bridge, spec.mtu)
            for port, kind in netlink.bridge_ports(ipr, br_index):
                if kind == "vxlan" and port != vxlan:
                    netlink.delete_link(ipr, port)
            if spec.network_type in ("flat", "vlan"):
                self._ensure_uplink(ipr, spec, br_index)
            if vxlan is None:
                return
            assert spec.segmentation_id is not None and self.underlay_address is not None
            vx_index = netlink.ensure_vxlan(
                ipr, vxlan, spec.segmentation_id, self.underlay_address, spec.mtu, br_index
            )
            netlink.set_isolated(ipr, vx_index, True)
            peers = [p for p in spec.peers if str(ipaddress.ip_address(p)) != self.underlay_address]
            netlink.sync_fdb(ipr, vx_index, peers)

    def _remove_l2(self, network_id: str, spec: NetworkSpec | None) -> None:
        bridge = names.bridge_name(network_id)
        with IPRoute() as ipr:
            br_index = netlink.link_index(ipr, bridge)
            if br_index is not None:
                for port, kind in netlink.bridge_ports(ipr, br_index):
                    if kind == "vxlan":
                        netlink.delete_link(ipr, port)
            if spec is not None and spec.segmentation_id is not None and spec.network_type == "vxlan":
                # The VNI is the network's, so the device is ours even when detached.
                netlink.delete_link(ipr, names.vxlan_name(spec.segmentation_id))
            netlink.delete_link(ipr, bridge)

    def _ensure_uplink(self, ipr: IPRoute, spec: NetworkSpec, br_index: int) -> None:
        """A flat network's bridge enslaves this host's uplink for its physical network; a VLAN
        network's bridge a VLAN device on it."""
        uplink = self.physical_networks.get(spec.physical_network or "")
        if uplink is None:
            if spec.physical_network:
                log.warning("network %s: physical network %r has no uplink on this host "
                            "(agent.physical_networks)", spec.id, spec.physical_network)
            return
        index = netlink.link_index(ipr, uplink)
        if index is None:
            log.warning("network %s: uplink %s does not exist", spec.id, uplink)
            return
        if spec.network_type == "vlan" and spec.segmentation_id:
            name = f"{uplink[:9]}.{spec.segmentation_id}"
            vlan = netlink.link_index(ipr, name)
            if vlan is None:
                ipr.link("add", ifname=name, kind="vlan", link=index, vlan_id=spec.segmentation_id)
                vlan = netlink.link_index(ipr, name)
                assert vlan is not None
            ipr.link("set", index=index, state="up")
            index = vlan
        ipr.link("set", index=index, master=br_index, state="up")

    def _plug(self, port: PortSpec, tap: str) -> None:
        bridge = names.bridge_name(port.network_id)
        with IPRoute() as ipr:
            br_index = netlink.link_index(ipr, bridge)
            if br_index is None:
                br_index = netlink.ensure_bridge(ipr, bridge, port.mtu)
            netlink.ensure_tap(ipr, tap, port.mtu, br_index)

    # --- DHCP ---------------------------------------------------------------------------

    def _metadata_wanted(self, spec: NetworkSpec) -> bool:
        """A metadata proxy where some served IPv4 subnet has the DHCP port on it."""
        return self.metadata_upstream is not None and any(
            s.ip_version == 4 and dnsmasq.metadata_via(spec, s) for s in dnsmasq.served_subnets(spec))

    def _proxy_files(self, network_id: str) -> metadata_proxy.ProxyFiles:
        return metadata_proxy.ProxyFiles(self._dhcp_files(network_id).directory)

    def _ensure_dhcp_links(self, spec: NetworkSpec, ns: str) -> None:
        assert spec.dhcp_port is not None
        host_if, ns_if = names.dhcp_veth_host(spec.id), names.dhcp_veth_ns(spec.id)
        netlink.ensure_netns(ns)
        with IPRoute() as ipr:
            br_index = netlink.link_index(ipr, names.bridge_name(spec.id))
            assert br_index is not None
            veth = netlink.ensure_veth_into_netns(ipr, host_if, ns_if, ns, spec.mtu, br_index)
            netlink.set_isolated(ipr, veth, True)
        addresses = [
            ipaddress.ip_interface((fip.ip_address, ipaddress.ip_network(fip.cidr, strict=False).prefixlen))
            for fip in spec.dhcp_port.fixed_ips
        ]
        if self._metadata_wanted(spec):
            addresses.append(ipaddress.ip_interface(f"{metadata_proxy.METADATA_ADDRESS}/32"))
        netlink.configure_netns_interface(ns, ns_if, spec.dhcp_port.mac_address, spec.mtu, addresses)

    async def _ensure_dhcp(self, spec: NetworkSpec) -> None:
        ns = names.dhcp_netns(self.host_tag, spec.id)
        await asyncio.to_thread(self._ensure_dhcp_links, spec, ns)
        files = self._dhcp_files(spec.id)
        files.directory.mkdir(parents=True, exist_ok=True)
        metadata = self._metadata_wanted(spec)
        args = dnsmasq.dnsmasq_args(spec, names.dhcp_veth_ns(spec.id), files, metadata=metadata)
        hosts_changed = dnsmasq.write_if_changed(files.hosts, dnsmasq.hosts_file(spec))
        found = dnsmasq.running(files)
        if found is not None and found[1][1:] == args[1:]:
            if hosts_changed:
                dnsmasq.reload(found[0])
        else:
            if found is not None:
                log.info("network %s: dnsmasq configuration changed, restarting", spec.id)
                await dnsmasq.stop(files)
            await dnsmasq.start(netlink.netns_path(ns), args, files)
        await self._ensure_metadata_proxy(spec, ns, metadata)

    async def _ensure_metadata_proxy(self, spec: NetworkSpec, ns: str, wanted: bool) -> None:
        files = self._proxy_files(spec.id)
        if not wanted:
            await metadata_proxy.stop(files)
            return
        assert self.metadata_upstream is not None and self.metadata_key_file is not None
        args = metadata_proxy.proxy_args(
            netlink.netns_path(ns), spec.id, self.metadata_upstream, self.metadata_key_file, files)
        await metadata_proxy.ensure(args, files)

    async def _remove_dhcp(self, network_id: str) -> None:
        files = self._dhcp_files(network_id)
        await metadata_proxy.stop(self._proxy_files(network_id))
        await dnsmasq.stop(files)
        ns = names.dhcp_netns(self.host_tag, network_id)

        def remove_links() -> None:
            netlink.remove_netns(ns)
            with IPRoute() as ipr:
                netlink.delete_link(ipr, names.dhcp_veth_host(network_id))

        await asyncio.to_thread(remove_links)
        shutil.rmtree(files.directory, ignore_errors=True)
