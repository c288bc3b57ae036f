"""dnsmasq for one network on one host: its command line, static-lease file and process.

dnsmasq serves only static leases (``static`` ranges) for the ports in the spec, IPv4 and
IPv6 (RA/SLAAC, stateless or stateful DHCPv6). A changed port set is a rewrite of the hosts
file plus SIGHUP; any other change restarts the process.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cloudland.agent.drivers.network import pidfile
from cloudland.bus.messages import NetworkSpec, SubnetSpec

LEASE_SECONDS = 86400
METADATA_ADDRESS = "169.254.169.254"
RA_INTERVAL_SECONDS = 30
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
# Neutron's ipv6 modes -> dnsmasq dhcp-range mode
_V6_MODES = {"slaac": "ra-only", "dhcpv6-stateless": "ra-stateless", "dhcpv6-stateful": "static"}


@dataclass(frozen=True)
class DhcpFiles:
    directory: Path

    @property
    def hosts(self) -> Path:
        return self.directory / "hosts"

    @property
    def pid(self) -> Path:
        return self.directory / "dnsmasq.pid"

    @property
    def leases(self) -> Path:
        return self.directory / "leases"

    @property
    def log(self) -> Path:
        return self.directory / "dnsmasq.log"

    @property
    def start_errors(self) -> Path:
        return self.directory / "start.err"


def _v6_mode(subnet: SubnetSpec) -> str | None:
    mode = subnet.ipv6_address_mode or subnet.ipv6_ra_mode
    return _V6_MODES.get(mode) if mode else None


def served_subnets(spec: NetworkSpec) -> list[SubnetSpec]:
    """Subnets this network's dnsmasq serves, in a stable order."""
    subnets = [
        s for s in spec.subnets if s.enable_dhcp and (s.ip_version == 4 or _v6_mode(s) is not None)
    ]
    return sorted(subnets, key=lambda s: s.id)


def needs_dhcp(spec: NetworkSpec) -> bool:
    return spec.dhcp_port is not None and bool(served_subnets(spec))


def _check_mac(mac: str) -> str:
    if not _MAC.match(mac):
        raise ValueError(f"bad MAC address: {mac!r}")
    return mac.lower()


def hosts_file(spec: NetworkSpec) -> str:
    """One ``MAC,IP`` (or ``MAC,[IPv6]``) line per leased address of this host's ports."""
    leased = {
        s.id for s in served_subnets(spec) if s.ip_version == 4 or _v6_mode(s) == "static"
    }
    lines = []
    for port in sorted(spec.ports, key=lambda p: p.port_id):
        mac = _check_mac(port.mac_address)
        for fip in port.fixed_ips:
            if fip.subnet_id not in leased:
                continue
            ip = ipaddress.ip_address(fip.ip_address)
            lines.append(f"{mac},{ip}" if ip.version == 4 else f"{mac},[{ip}]")
    return "".join(line + "\n" for line in lines)


def metadata_via(spec: NetworkSpec, subnet: SubnetSpec) -> str | None:
    """The DHCP port's address on ``subnet``: the next hop to the metadata proxy."""
    if spec.dhcp_port is None:
        return None
    for fip in spec.dhcp_port.fixed_ips:
        if fip.subnet_id == subnet.id:
            return str(ipaddress.ip_address(fip.ip_address))
    return None


def _v4_options(tag: str, subnet: SubnetSpec, mtu: int, metadata_hop: str | None = None) -> list[str]:
    opts = [f"--dhcp-option=tag:{tag},option:mtu,{mtu}"]
    gateway = str(ipaddress.ip_address(subnet.gateway_ip)) if subnet.gateway_ip else None
    # An empty router option tells dnsmasq not to send its own address as the router.
    opts.append(f"--dhcp-option=tag:{tag},option:router" + (f",{gateway}" if gateway else ""))
    if subnet.dns_nameservers:
        servers = ",".join(str(ipaddress.ip_address(d)) for d in subnet.dns_nameservers)
        opts.append(f"--dhcp-option=tag:{tag},option:dns-server,{servers}")
    if subnet.host_routes or metadata_hop:
        # Clients that get classless routes ignore option 3, so the default route goes in too.
        routes = []
        if metadata_hop:
            # Like Neutron's isolated metadata: 169.254.169.254 via the DHCP namespace's proxy.
            routes += [f"{METADATA_ADDRESS}/32", metadata_hop]
        for route in subnet.host_routes:
            dest = ipaddress.ip_network(route["destination"])
            routes += [str(dest), str(ipaddress.ip_address(route["nexthop"]))]
        if gateway:
            routes += ["0.0.0.0/0", gateway]
        opts.append(f"--dhcp-option=tag:{tag},option:classless-static-route," + ",".join(routes))
    return opts


def dnsmasq_args(spec: NetworkSpec, ifname: str, files: DhcpFiles, metadata: bool = False) -> list[str]:
    args = [
        "dnsmasq",
        "--conf-file=/dev/null",
        "--no-hosts",
        "--no-resolv",
        "--port=0",
        "--bind-interfaces",
        f"--interface={ifname}",
        "--except-interface=lo",
        f"--pid-file={files.pid}",
        f"--dhcp-leasefile={files.leases}",
        f"--dhcp-hostsfile={files.hosts}",
        f"--log-facility={files.log}",
        # The hosts file is re-read on SIGHUP as the running user; the state directory need
        # not be readable by "nobody".
        "--user=root",
        "--group=root",
    ]
    send_ra = False
    for i, subnet in enumerate(served_subnets(spec)):
        tag = f"sn{i}"
        net = ipaddress.ip_network(subnet.cidr, strict=False)
        if net.version == 4:
            args.append(
                f"--dhcp-range=set:{tag},{net.network_address},static,{net.netmask},{LEASE_SECONDS}s"
            )
            hop = metadata_via(spec, subnet) if metadata else None
            args += _v4_options(tag, subnet, spec.mtu, hop)
            continue
        mode = _v6_mode(subnet)
        args.append(
            f"--dhcp-range=set:{tag},{net.network_address},{mode},{net.prefixlen},{LEASE_SECONDS}s"
        )
        if subnet.dns_nameservers:
            servers = ",".join(f"[{ipaddress.ip_address(d)}]" for d in subnet.dns_nameservers)
            args.append(f"--dhcp-option=tag:{tag},option6:dns-server,{servers}")
        send_ra = send_ra or subnet.ipv6_ra_mode is not None
    if send_ra:
        # Router lifetime 0: the DHCP namespace is not the gateway, it only announces the
        # prefix and MTU; the default route comes from the router.
        args += ["--enable-ra", f"--ra-param={ifname},mtu:{spec.mtu},{RA_INTERVAL_SECONDS},0"]
    return args


def write_if_changed(path: Path, content: str) -> bool:
    """Atomically replace ``path`` with ``content``; False if it already had it."""
    try:
        if path.read_text() == content:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_suffix(".tmp")
    tmp.write_text(content)
    os.replace(tmp, path)
    return True


def running(files: DhcpFiles) -> tuple[int, list[str]] | None:
    """(pid, argv) of the live dnsmasq that owns this pid file."""
    return pidfile.running(files.pid)


async def start(netns_path: str, args: list[str], files: DhcpFiles) -> int:
    """Start dnsmasq inside the namespace; it daemonises and writes its pid file."""
    files.pid.unlink(missing_ok=True)
    with open(files.start_errors, "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            "nsenter", f"--net={netns_path}", "--", *args,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
        rc = await proc.wait()
    if rc != 0:
        raise RuntimeError(f"dnsmasq failed ({rc}): {files.start_errors.read_text().strip()}")
    found = running(files)
    if found is None:
        raise RuntimeError(f"dnsmasq started but {files.pid} names no live dnsmasq")
    return found[0]


def reload(pid: int) -> None:
    """Re-read the hosts file."""
    os.kill(pid, signal.SIGHUP)


async def stop(files: DhcpFiles, timeout: float = 5.0) -> None:
    await pidfile.stop(files.pid, timeout)
