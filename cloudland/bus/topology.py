"""The NATS tree: a core (one server or a cluster) and leaf-node servers per zone and rack.

A topology is a list of paths such as ``["zone1/rack1", "zone1/rack2", "zone2/rack1"]``:
every path element is a leaf server whose parent is the element before it (the first element's
parent is the core), so that example is three levels: core ← zone1, zone2 ← racks. Agents
connect to the server of their rack; controllers and the API to the core. NATS propagates
subscription interest along leaf connections, so a message to ``host.<id>.cmd`` is forwarded
only down the branch where that host subscribed, and ``report.<zone>`` only up to the servers
with a subscriber (the controllers at the core).

``NatsTree(work_dir, paths, core_nodes=3).start()`` writes one config per server
(``<work_dir>/<name>.conf``) and starts the bundled ``nats-server`` for each, with a
monitoring port (``/varz``, ``/connz``, ``/subsz``, ``/leafz``). Servers are numbered from
``base_port``; ``describe()`` lists names, client URLs and monitoring URLs.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudland.allinone.nats import nats_server_binary

CORE_PREFIX = "core"
CLUSTER_NAME = "cloudland"


@dataclass
class NatsNode:
    name: str  # "core-0", or the leaf path with "-" for "/": "zone1-rack1"
    parent: str | None  # the leaf's hub: a leaf name, or None for core servers
    client_port: int = 0
    monitor_port: int = 0
    leaf_port: int = 0  # accepts leaf connections (core servers and non-rack leaves)
    cluster_port: int = 0  # core cluster routes (core_nodes > 1)
    children: list[str] = field(default_factory=list)

    @property
    def is_core(self) -> bool:
        return self.parent is None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def leaf_name(path: str) -> str:
    return path.strip("/").replace("/", "-")


def plan(paths: list[str], core_nodes: int = 1, base_port: int = 0) -> dict[str, NatsNode]:
    """The servers of a topology, with ports (consecutive from ``base_port``, else free ones)."""
    if core_nodes < 1:
        raise ValueError("core_nodes must be at least 1")
    nodes: dict[str, NatsNode] = {}
    for i in range(core_nodes):
        nodes[f"{CORE_PREFIX}-{i}"] = NatsNode(name=f"{CORE_PREFIX}-{i}", parent=None)
    for path in paths:
        parts = [p for p in path.strip("/").split("/") if p]
        if not parts:
            raise ValueError(f"empty topology path {path!r}")
        parent: str | None = None
        for depth in range(1, len(parts) + 1):
            name = "-".join(parts[:depth])
            if name.startswith(CORE_PREFIX + "-"):
                raise ValueError(f"leaf names may not start with {CORE_PREFIX}-: {name}")
            if name not in nodes:
                nodes[name] = NatsNode(name=name, parent=parent or f"{CORE_PREFIX}-0")
            if parent is not None and name not in nodes[parent].children:
                nodes[parent].children.append(name)
            parent = name
    needed = sum(2 + (1 if n.is_core or any(m.parent == n.name for m in nodes.values()) else 0)
                 + (1 if n.is_core and core_nodes > 1 else 0) for n in nodes.values())
    ports = iter(range(base_port, base_port + needed) if base_port else _free_ports(needed))
    for node in nodes.values():
        node.client_port, node.monitor_port = next(ports), next(ports)
        if node.is_core or any(m.parent == node.name for m in nodes.values()):
            node.leaf_port = next(ports)
        if node.is_core and core_nodes > 1:
            node.cluster_port = next(ports)
    return nodes


def render_config(node: NatsNode, nodes: dict[str, NatsNode]) -> str:
    """nats-server configuration text for one server."""
    lines = [f"server_name: {node.name}", f"listen: 127.0.0.1:{node.client_port}",
             f"http: 127.0.0.1:{node.monitor_port}",
             "max_payload: 8MB", "write_deadline: \"10s\"", "ping_interval: \"20s\""]
    leaf = []
    if node.leaf_port:
        leaf.append(f"  listen: 127.0.0.1:{node.leaf_port}")
    if not node.is_core:
        assert node.parent is not None
        hubs = ([n for n in nodes.values() if n.is_core] if nodes[node.parent].is_core
                else [nodes[node.parent]])
        urls = ", ".join(f'"nats-leaf://127.0.0.1:{h.leaf_port}"' for h in hubs)
        leaf.append(f"  remotes: [ {{ urls: [ {urls} ] }} ]")
        leaf.append("  reconnect: \"1s\"")
    if leaf:
        lines += ["leafnodes {", *leaf, "}"]
    if node.cluster_port:
        routes = ", ".join(f'"nats-route://127.0.0.1:{n.cluster_port}"'
                           for n in nodes.values() if n.is_core and n.name != node.name)
        lines += ["cluster {", f"  name: {CLUSTER_NAME}", f"  listen: 127.0.0.1:{node.cluster_port}",
                  f"  routes: [ {routes} ]", "}"]
    return "\n".join(lines) + "\n"


def _depth(node: NatsNode, nodes: dict[str, NatsNode]) -> int:
    depth = 0
    while node.parent is not None:
        node = nodes[node.parent]
        depth += 1
    return depth


class NatsTree:
    """Writes the configs and runs one ``nats-server`` per node (core first, then each level)."""

    def __init__(self, work_dir: Path, paths: list[str], core_nodes: int = 1, base_port: int = 0) -> None:
        self.work_dir = work_dir
        self.nodes = plan(paths, core_nodes, base_port)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def core(self) -> NatsNode:
        return self.nodes[f"{CORE_PREFIX}-0"]

    def core_urls(self) -> list[str]:
        return [n.url for n in self.nodes.values() if n.is_core]

    def leaf(self, path: str) -> NatsNode:
        return self.nodes[leaf_name(path)]

    def write_configs(self) -> dict[str, Path]:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        written = {}
        for node in self.nodes.values():
            path = self.work_dir / f"{node.name}.conf"
            path.write_text(render_config(node, self.nodes))
            written[node.name] = path
        return written

    def start(self, timeout: float = 20.0) -> None:
        configs = self.write_configs()
        binary = nats_server_binary()
        ordered = sorted(self.nodes.values(), key=lambda n: _depth(n, self.nodes))
        try:
            for node in ordered:
                log = open(self.work_dir / f"{node.name}.log", "ab")
                self.processes[node.name] = subprocess.Popen(
                    [binary, "-c", str(configs[node.name])], stdout=log, stderr=log,
                    stdin=subprocess.DEVNULL, start_new_session=True)
                log.close()
            deadline = time.monotonic() + timeout
            for node in ordered:
                self._wait_ready(node, deadline)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, node: NatsNode, deadline: float) -> None:
        """Listening, and a leaf connected to its hub (so interest can propagate)."""
        while time.monotonic() < deadline:
            proc = self.processes[node.name]
            if proc.poll() is not None:
                raise RuntimeError(f"nats-server {node.name} exited with {proc.returncode}; "
                                   f"see {self.work_dir / (node.name + '.log')}")
            with contextlib.suppress(OSError, ValueError):
                varz = monitor(node, "varz")
                if node.is_core or int(varz.get("leafnodes", 0)) >= 1:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"nats-server {node.name} not ready in time")

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes = {}

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": n.name, "parent": n.parent, "url": n.url, "monitor": n.monitor_url,
                 "leaf_port": n.leaf_port or None} for n in self.nodes.values()]


def monitor(node: NatsNode, endpoint: str, query: str = "") -> dict[str, Any]:
    """A monitoring endpoint of one server (``varz``, ``connz``, ``subsz``, ``leafz``)."""
    url = f"{node.monitor_url}/{endpoint}" + (f"?{query}" if query else "")
    with urllib.request.urlopen(url, timeout=5) as resp:
        return dict(json.loads(resp.read()))
