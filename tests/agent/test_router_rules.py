"""A distributed router's nftables scripts, checked by the real nft (``nft -c``, in a throwaway
network namespace) and merged from the specs of several networks."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from cloudland.agent.drivers.network.router import bridge_script, merge, nat_script
from cloudland.bus.messages import (
    FloatingIpSpec,
    NeighborSpec,
    NetworkSpec,
    RouterGatewaySpec,
    RouterInterfaceSpec,
    RouterSpec,
)

GW = RouterGatewaySpec(port_id="g" * 36, network_id="ext", mac_address="fa:16:3e:00:00:99",
                       addresses=["198.51.100.11/24"], gateway_ips=["198.51.100.1"])


def _spec(net: str, vni: int, port: str, cidr_gw: str, fips: list[FloatingIpSpec]) -> NetworkSpec:
    router = RouterSpec(id="r1", interface=RouterInterfaceSpec(port_id=port, network_id=net,
                                                               mac_address="fa:16:3e:00:00:01",
                                                               addresses=[cidr_gw]),
                        neighbors=[NeighborSpec(ip="10.1.0.5", mac="fa:16:3e:00:00:05")],
                        gateway=GW, floating_ips=fips, host_mac="fa:16:3f:01:02:03")
    return NetworkSpec(id=net, segmentation_id=vni, routers=[router])


def test_merge_joins_a_routers_networks() -> None:
    fip = FloatingIpSpec(floating_ip="198.51.100.20", fixed_ip="10.1.0.5")
    routers = merge([_spec("n1", 11, "p" * 36, "10.1.0.1/24", [fip]),
                     _spec("n2", 12, "q" * 36, "10.2.0.1/24", [])])
    assert list(routers) == ["r1"]
    r = routers["r1"]
    assert sorted(i.overlay or "" for i in r.interfaces.values()) == ["vxlan-11", "vxlan-12"]
    assert r.floating_ips == [fip] and r.gateway == GW


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"), reason="needs root and nft")
def test_nft_accepts_the_scripts() -> None:
    fip = FloatingIpSpec(floating_ip="198.51.100.20", fixed_ip="10.1.0.5")
    router = merge([_spec("n1", 11, "p" * 36, "10.1.0.1/24", [fip])])["r1"]
    scripts = {"bridge": bridge_script([router]), "nat": nat_script(router)}
    assert 'oifname "vxlan-11" ether saddr set fa:16:3f:01:02:03' in scripts["bridge"]
    assert "dnat to 10.1.0.5" in scripts["nat"] and "snat to 198.51.100.11" in scripts["nat"]
    ns = f"rtest{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for name, script in scripts.items():
            done = subprocess.run(["ip", "netns", "exec", ns, "nft", "-c", "-f", "-"], input=script.encode(),
                                  capture_output=True)
            assert done.returncode == 0, (name, done.stderr.decode(), script)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
