"""A real cloud with several namespace-hypervisors (``cloudland up --hypervisors N``) for e2e tests,
and helpers to look inside the hypervisors (FDB, links, captures) and at guest consoles."""

from __future__ import annotations

import ipaddress
import random
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from cloudland.agent.drivers.network import netlink
from cloudland.allinone import topology
from cloudland.allinone.supervisor import read_pid
from cloudland.config import load_config
from tests.conftest import free_port
from tests.e2e.conftest import BIN, RunningCloud

NEIGHBORS = re.compile(r"^cloudland-guest: neighbors (v4|v6) ?(.*)$", re.M)


@dataclass
class MultiHostCloud(RunningCloud):
    hosts: list[str]
    topo: topology.Topology

    def hv(self, host: str) -> topology.Hypervisor:
        return next(h for h in self.topo.hypervisors if h.host_id == host)

    def agent_pid_of(self, host: str) -> int:
        return read_pid(self.state_dir / "run" / f"agent-{host}.pid") or 0

    def instance_dir(self, server_id: str) -> Path:
        raise NotImplementedError("several hypervisors: use the host's state dir")

    def console(self, server: str) -> str:
        return self.openstack("console", "log", "show", server, cloud="cloudland", check=False).stdout

    def server_create(self, name: str, network: str, host: str, image: str = "cloudland-guest") -> dict:
        return self.openstack_json("server", "create", "--flavor", "m1.nano", "--image", image,  # type: ignore[return-value]
                                   "--network", network, "--availability-zone", f"nova:{host}",
                                   "--wait", name, cloud="cloudland")

    def addresses(self, server: str) -> list[str]:
        """The server's fixed IPs (all networks), from the API."""
        ports = self.openstack_json("port", "list", "--server", server, "--long", cloud="cloudland")
        return [ip["ip_address"] for p in ports for ip in p["Fixed IP Addresses"]]  # type: ignore[index, union-attr]


def neighbor_lines(console: str, family: str) -> list[set[str]]:
    """Every ``neighbors <family>`` line of a console, oldest first, as sets of addresses."""
    return [set(m.group(2).split()) for m in NEIGHBORS.finditer(console) if m.group(1) == family]


def fdb_peers(netns: str, vni: int) -> set[str] | None:
    """The flood entries of ``vxlan-<vni>`` inside a hypervisor namespace; None if no device."""
    with IPRoute(netns=netns, flags=0) as ipr:
        index = netlink.link_index(ipr, f"vxlan-{vni}")
        return None if index is None else netlink.fdb_peers(ipr, index)


def links(netns: str) -> set[str]:
    with IPRoute(netns=netns, flags=0) as ipr:
        return {link.get("IFLA_IFNAME") for link in ipr.get_links()}


_CAPTURE = r"""
import socket, sys, time
ifname, macs, seconds = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((ifname, 0))
s.settimeout(0.2)
want = {bytes.fromhex(m.replace(":", "")): m for m in macs}
counts = dict.fromkeys(macs, 0)
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        frame = s.recv(65535)
    except TimeoutError:
        continue
    if frame[6:12] in want:
        counts[want[frame[6:12]]] += 1
print(",".join(f"{m}={c}" for m, c in counts.items()))
"""


def capture(netns: str, ifname: str, macs: list[str], seconds: float) -> dict[str, int]:
    """Frames seen on ``ifname`` (inside ``netns``) per source MAC, for ``seconds``."""
    argv = ["nsenter", f"--net={netlink.netns_path(netns)}", "--", sys.executable, "-c", _CAPTURE,
            ifname, ",".join(macs), str(seconds)]
    out = subprocess.run(argv,
                         text=True, capture_output=True, check=True, timeout=seconds + 30).stdout
    return {k: int(v) for k, v in (item.split("=") for item in out.strip().split(","))}


def _free_underlay() -> str:
    """A 172.31.x.0/24 that no route of this machine covers (parallel clouds pick their own)."""
    with IPRoute() as ipr:
        used = [ipaddress.ip_network(f"{r.get('RTA_DST')}/{r['dst_len']}", strict=False)
                for r in ipr.get_routes(family=2) if r.get("RTA_DST")]
    candidates = [ipaddress.ip_network(f"172.31.{x}.0/24") for x in range(100, 250)]
    random.shuffle(candidates)
    return str(next(c for c in candidates if not any(c.overlaps(u) for u in used)))


@pytest.fixture(scope="module")
def mcloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHostCloud]:
    state_dir = tmp_path_factory.mktemp("mcloud") / "state"
    port, nats_port = free_port(), free_port()
    base = f"mh{uuid.uuid4().hex[:5]}"
    proc = subprocess.run(
        [str(BIN / "cloudland"), "up", "--detach", "--state-dir", str(state_dir), "--port", str(port),
         "--nats-port", str(nats_port), "--host-id", base, "--hypervisors", "3",
         "--underlay-cidr", _free_underlay(), "--no-user-clouds-yaml", "--timeout", "240"],
        text=True, capture_output=True, timeout=600)
    config = load_config(None, state_dir)
    topo = topology.plan(config)
    assert topo is not None
    running = MultiHostCloud(state_dir, f"http://127.0.0.1:{port}", base, topology.host_ids(config), topo)
    try:
        if proc.returncode != 0:
            log = state_dir / "logs" / "cloudland.log"
            tail = log.read_text()[-4000:] if log.exists() else ""
            pytest.fail(f"cloudland up failed:\n{proc.stdout}\n{proc.stderr}\n{tail}")
        yield running
    finally:
        running.cloudland("down", "--timeout", "60")
        # Whatever `down` could not remove (it failed, or `up` never finished).
        topology.destroy(topo)
