"""Names of the kernel objects and files of one network on one hypervisor.

Interface names are per network namespace (the agent's), so they only need to fit in 15
characters. Namespace names share the global /run/netns, so they carry the host tag.
"""

from __future__ import annotations

import re

IFNAMSIZ = 15
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_id(value: str, what: str = "id") -> str:
    """Ids end up in file paths, namespace names and interface names: allow only safe ones."""
    if not _SAFE.match(value) or ".." in value:
        raise ValueError(f"unsafe {what}: {value!r}")
    return value


def bridge_name(network_id: str) -> str:
    return "brq" + check_id(network_id, "network id")[:11]


def vxlan_name(vni: int) -> str:
    if not 0 < vni < 2**24:
        raise ValueError(f"VNI out of range: {vni}")
    return f"vxlan-{vni}"


def tap_name(port_id: str) -> str:
    # Same rule as PortSpec.tap_name, usable when only the id is known (unplug).
    return "tap" + check_id(port_id, "port id")[:11]


def dhcp_veth_host(network_id: str) -> str:
    """Host end of the DHCP veth (on the bridge)."""
    return "dhcp" + check_id(network_id, "network id")[:11]


def dhcp_veth_ns(network_id: str) -> str:
    """Namespace end of the DHCP veth (dnsmasq's interface)."""
    return "ns-" + check_id(network_id, "network id")[:11]


def dhcp_netns_prefix(host_tag: str) -> str:
    return f"cl-{check_id(host_tag, 'host tag')}-dhcp-"


def dhcp_netns(host_tag: str, network_id: str) -> str:
    return dhcp_netns_prefix(host_tag) + check_id(network_id, "network id")
