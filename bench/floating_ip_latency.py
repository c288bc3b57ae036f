"""Floating IP associate → reachable from outside, and moving it to a server on another host.

Runs against a running cloud with namespace-hypervisors and its outside host (``cloudland up
--hypervisors N``) that has two ACTIVE servers (test guests: their web page names them) behind
a router with a gateway on ``public``, whose security groups admit TCP port 80. Each round
associates a fresh floating IP with the first server through the API (``PUT
/v2.0/floatingips/{id}``) and fetches ``http://<floating IP>/`` from the outside host until that
server answers, then moves it to the second server and times that too, then deletes it.

    .venv/bin/python bench/floating_ip_latency.py --state-dir /tmp/cl3 --servers vm-a vm-c --rounds 10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from secgroup_rule_latency import api, token_of  # bench/, next to this file

from cloudland.agent.drivers.network import netlink
from cloudland.allinone import topology
from cloudland.config import load_config

# busybox's static wget crashes on -T timeouts; the outside host has our Python.
FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=1).read().decode())"


def answers(netns: str, ip: str, server: str) -> bool:
    """The test guest's HTTP server names its guest: the right server answers, not a stale one."""
    argv = ["nsenter", f"--net={netlink.netns_path(netns)}", "--", sys.executable, "-c", FETCH, f"http://{ip}/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    return done.stdout.strip() == f"cloudland-guest {server}"


def wait_reachable(netns: str, ip: str, server: str, started: float) -> float:
    while not answers(netns, ip, server):
        if time.monotonic() - started > 60:
            raise SystemExit(f"{server} not reachable at {ip} after 60 s")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--servers", nargs=2, required=True, metavar="SERVER")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    config = load_config(None, Path(args.state_dir))
    topo = topology.plan(config)
    if topo is None:
        raise SystemExit("needs a cloud with --hypervisors N (and its outside host)")
    base, token = token_of(config.state_dir)
    net = base + "/network/v2.0"
    listing = api(base + "/compute/v2.1", token, "GET", "/servers/detail?all_tenants=1")
    servers = {s["name"]: s for s in listing["servers"]}
    ports = []
    for name in args.servers:
        port = api(net, token, "GET", f"/ports?device_id={servers[name]['id']}")["ports"][0]
        ports.append(port)
    public = api(net, token, "GET", "/networks?router:external=true&name=public")["networks"][0]
    associate, move = [], []
    for _ in range(args.rounds):
        fip = api(net, token, "POST", "/floatingips", {"floatingip": {"floating_network_id": public["id"]}})
        fip = fip["floatingip"]
        ip = fip["floating_ip_address"]
        started = time.monotonic()
        api(net, token, "PUT", f"/floatingips/{fip['id']}", {"floatingip": {"port_id": ports[0]["id"]}})
        associate.append(wait_reachable(topo.outside_netns, ip, args.servers[0], started))
        started = time.monotonic()
        api(net, token, "PUT", f"/floatingips/{fip['id']}", {"floatingip": {"port_id": ports[1]["id"]}})
        move.append(wait_reachable(topo.outside_netns, ip, args.servers[1], started))
        api(net, token, "DELETE", f"/floatingips/{fip['id']}")
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
          f"Python {platform.python_version()}")
    print(f"servers {args.servers[0]} ({servers[args.servers[0]]['OS-EXT-SRV-ATTR:host']}) and "
          f"{args.servers[1]} ({servers[args.servers[1]]['OS-EXT-SRV-ATTR:host']}); {args.rounds} rounds")
    for name, values in (("associate -> reachable from outside", associate),
                         ("move to the other server -> reachable", move)):
        ms = sorted(v * 1000 for v in values)
        print(f"{name}: median {statistics.median(ms):.0f} ms, min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms")


if __name__ == "__main__":
    main()
