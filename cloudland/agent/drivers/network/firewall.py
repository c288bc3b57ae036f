"""Security groups on one hypervisor: two nftables tables, replaced atomically with ``nft -f -``.

``bridge cloudland``: per-tap anti-spoofing (MAC, IPv4/IPv6 source, ARP) for frames from a
guest, and a packet mark naming the port a frame enters from (low 16 bits) and the port it
leaves by (high 16 bits). ``inet cloudland``: the stateful part, which br_netfilter
(``bridge-nf-call-iptables``) runs for bridged IP traffic; the bridge family has no conntrack
here (no nf_conntrack_bridge), and the inet hooks only see the bridge, not its ports, hence the
mark. Egress rules ``return`` (so the destination port's ingress rules still apply), ingress
rules ``accept``; both end in ``drop``.

Tenants may use the same addresses on one host, so every network's bridge gets its own
conntrack zone (set in ``raw`` prerouting, before conntrack runs): a connection of one tenant
never makes another tenant's identical 5-tuple "established".
"""

from __future__ import annotations

import ipaddress
import subprocess
import zlib
from pathlib import Path

from cloudland.agent.drivers.network import names
from cloudland.bus.messages import PortSpec, SecurityRuleSpec

TABLE = "cloudland"
SYSCTLS = ("net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables")


def _family(ethertype: str) -> str:
    return "ip6" if ethertype == "IPv6" else "ip"


def _set_name(group_id: str, ethertype: str) -> str:
    return f"rg_{group_id.replace('-', '')[:16]}_{'v6' if ethertype == 'IPv6' else 'v4'}"


def _rule(rule: SecurityRuleSpec, verdict: str) -> str:
    fam = _family(rule.ethertype)
    parts = ["meta nfproto ipv6" if fam == "ip6" else "meta nfproto ipv4"]
    addr = "saddr" if rule.direction == "ingress" else "daddr"
    if rule.remote_ip_prefix:
        parts.append(f"{fam} {addr} {rule.remote_ip_prefix}")
    elif rule.remote_group_id:
        parts.append(f"{fam} {addr} @{_set_name(rule.remote_group_id, rule.ethertype)}")
    if rule.protocol is not None:
        parts.append(f"meta l4proto {rule.protocol}")
        low, high = rule.port_range_min, rule.port_range_max
        if rule.protocol in (1, 58):
            kind = "icmp" if rule.protocol == 1 else "icmpv6"
            if low is not None:
                parts.append(f"{kind} type {low}")
            if high is not None:
                parts.append(f"{kind} code {high}")
        elif low is not None:
            parts.append(f"th dport {low}" if low == high else f"th dport {low}-{high}")
    return " ".join(parts) + f" {verdict}"


def _addresses(port: PortSpec) -> tuple[list[str], list[str], list[str]]:
    """(MACs, IPv4 sources, IPv6 sources) the port may send from."""
    macs, v4, v6 = [port.mac_address], [], []
    for ip in port.fixed_ips:
        (v6 if ip.ip_version == 6 else v4).append(ip.ip_address)
    mac = int(port.mac_address.replace(":", ""), 16) ^ (1 << 41)  # EUI-64 link-local
    v6.append(
        str(ipaddress.IPv6Address((0xFE80 << 112) | ((mac >> 24) << 40) | (0xFFFE << 24) | (mac & 0xFFFFFF)))
    )
    for pair in port.allowed_address_pairs:
        net = ipaddress.ip_network(pair["ip_address"], strict=False)
        (v6 if net.version == 6 else v4).append(str(net))
        if pair.get("mac_address"):
            macs.append(pair["mac_address"])
    return sorted(set(macs)), v4, v6


def _elements(items: list[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def conntrack_zones(network_ids: list[str]) -> dict[str, int]:
    """A conntrack zone (1..65535) per network, stable as long as the network's id is: taken
    from the id, moved to the next free zone on a clash between this host's networks."""
    zones: dict[str, int] = {}
    used: set[int] = set()
    for network_id in sorted(set(network_ids)):
        zone = zlib.crc32(network_id.encode()) % 65535 + 1
        while zone in used:
            zone = zone % 65535 + 1
        zones[network_id] = zone
        used.add(zone)
    return zones


def render(ports: list[PortSpec], remote_groups: dict[str, list[str]]) -> str:
    """The complete ruleset (both tables) for these ports; an ``nft -f`` script."""
    filtered = [p for p in sorted(ports, key=lambda p: p.port_id) if p.port_security]
    index = {p.port_id: i + 1 for i, p in enumerate(filtered)}
    br = [
        f"table bridge {TABLE} {{}}",
        f"delete table bridge {TABLE}",
        f"table bridge {TABLE} {{",
        "  chain prerouting { type filter hook prerouting priority -300; policy accept;",
    ]
    br += [f'    iifname "{p.tap_name}" jump from_{index[p.port_id]}' for p in filtered]
    br += ["  }", "  chain forward { type filter hook forward priority -300; policy accept;"]
    br += [
        f'    oifname "{p.tap_name}" meta mark set meta mark or 0x{index[p.port_id] << 16:x}'
        for p in filtered
    ]
    br.append("  }")
    for p in filtered:
        macs, v4, v6 = _addresses(p)
        br += [
            f"  chain from_{index[p.port_id]} {{",
            f"    meta mark set 0x{index[p.port_id]:x}",
            f"    ether saddr != {_elements(macs)} drop",
            "    ether type arp arp saddr ether != " + _elements(macs) + " drop",
            ("    ether type arp arp saddr ip != " + _elements(v4) + " drop")
            if v4
            else "    ether type arp drop",
            "    ip saddr 0.0.0.0 udp sport 68 udp dport 67 return",
            ("    ether type ip ip saddr != " + _elements(v4) + " drop") if v4 else "    ether type ip drop",
            "    ether type ip6 ip6 saddr :: icmpv6 type { nd-neighbor-solicit, mld2-listener-report, "
            "mld-listener-report, nd-router-solicit } return",
            "    ether type ip6 ip6 saddr != " + _elements(v6) + " drop",
            "    icmpv6 type { nd-router-advert, nd-redirect } drop",
            "    udp sport 67 drop",
            "    udp sport 547 drop",
            "  }",
        ]
    br.append("}")
    inet = [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    for group, members in sorted(remote_groups.items()):
        for ethertype in ("IPv4", "IPv6"):
            kind = "ipv6_addr" if ethertype == "IPv6" else "ipv4_addr"
            items = [m for m in members if (":" in m) == (ethertype == "IPv6")]
            elements = f" elements = {_elements(items)};" if items else ""
            inet.append(f"  set {_set_name(group, ethertype)} {{ type {kind}; flags interval;{elements} }}")
    zones = conntrack_zones([p.network_id for p in ports])
    inet.append("  chain zones { type filter hook prerouting priority raw; policy accept;")
    inet += [f'    iifname "{names.bridge_name(n)}" ct zone set {z}' for n, z in zones.items()]
    inet.append("  }")
    inet += [
        "  chain forward { type filter hook forward priority 0; policy accept;",
        "    meta mark 0 accept",
        "    ct state established,related accept",
        "    ct state invalid drop",
    ]
    if filtered:
        inet.append(
            "    meta mark and 0xffff vmap { "
            + ", ".join(f"0x{i:x} : jump egress_{i}" for i in index.values())
            + " }"
        )
        inet.append(
            "    meta mark and 0xffff0000 vmap { "
            + ", ".join(f"0x{i << 16:x} : jump ingress_{i}" for i in index.values())
            + " }"
        )
    inet.append("  }")
    for p in filtered:
        i = index[p.port_id]
        inet += [
            f"  chain egress_{i} {{",
            "    udp sport 68 udp dport 67 return",
            "    udp sport 546 udp dport 547 return",
            "    icmpv6 type { nd-neighbor-solicit, "
            "nd-neighbor-advert, nd-router-solicit, mld2-listener-report, mld-listener-report } return",
        ]
        inet += ["    " + _rule(r, "return") for r in p.security_rules if r.direction == "egress"]
        inet += [
            "    drop",
            "  }",
            f"  chain ingress_{i} {{",
            "    udp sport 67 udp dport 68 accept",
            "    udp sport 547 udp dport 546 accept",
            "    icmpv6 type { nd-neighbor-solicit, "
            "nd-neighbor-advert, nd-router-advert, mld-listener-query } accept",
        ]
        inet += ["    " + _rule(r, "accept") for r in p.security_rules if r.direction == "ingress"]
        inet += ["    drop", "  }"]
    inet.append("}")
    return "\n".join(br + inet) + "\n"


class Firewall:
    """Applies ``render`` in the agent's network namespace; an unchanged ruleset is not re-applied."""

    def __init__(self, nft: str = "nft") -> None:
        self.nft = nft
        self.applied: str | None = None

    def apply(self, ports: list[PortSpec], remote_groups: dict[str, list[str]]) -> bool:
        script = render(ports, remote_groups)
        if script == self.applied:
            return False
        if not (Path("/proc/sys") / SYSCTLS[0]).exists():
            # Bridged traffic reaches the inet hooks only through br_netfilter: without it the
            # rules would silently never match. Load it, or fail loudly.
            subprocess.run(["modprobe", "br_netfilter"], capture_output=True)
            if not (Path("/proc/sys") / SYSCTLS[0]).exists():
                raise RuntimeError("security groups need the br_netfilter kernel module "
                                   "(modprobe br_netfilter)")
        for name in SYSCTLS:
            path = Path("/proc/sys") / name
            if path.read_text().strip() != "1":
                path.write_text("1\n")
        done = subprocess.run([self.nft, "-f", "-"], input=script.encode(), capture_output=True)
        if done.returncode:
            raise RuntimeError(f"nft failed: {done.stderr.decode(errors='replace').strip()}")
        self.applied = script
        return True

    def clear(self) -> None:
        script = (
            f"table bridge {TABLE} {{}}\ndelete table bridge {TABLE}\n"
            f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n"
        )
        subprocess.run([self.nft, "-f", "-"], input=script.encode(), check=True, capture_output=True)
        self.applied = None
