"""Security group rule create (and delete) → the rule in effect on every affected hypervisor.

Runs against a running cloud with namespace-hypervisors (``cloudland up --hypervisors N``)
that has servers: for each round it creates an ingress rule in a security group of those
servers through the API and polls ``nft list ruleset`` in every hypervisor namespace hosting
one of the group's ports until each shows the change, then deletes it and times that too.

    .venv/bin/python bench/secgroup_rule_latency.py --state-dir /var/lib/cloudland --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from cloudland.agent.drivers.network import netlink
from cloudland.allinone import topology
from cloudland.config import load_config


def api(base: str, token: str, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
    req = urllib.request.Request(base + path, method=method, headers={
        "X-Auth-Token": token, "Content-Type": "application/json"},
        data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


def token_of(state_dir: Path) -> tuple[str, str]:
    cloud = yaml.safe_load((state_dir / "clouds.yaml").read_text())["clouds"]["cloudland"]
    auth = cloud["auth"]
    body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": auth["username"], "password": auth["password"], "domain": {"name": "Default"}}}},
        "scope": {"project": {"name": auth["project_name"], "domain": {"name": "Default"}}}}}
    base = auth["auth_url"].rsplit("/identity", 1)[0]
    req = urllib.request.Request(auth["auth_url"].rstrip("/") + "/v3/auth/tokens", method="POST",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return base, resp.headers["X-Subject-Token"]


def ruleset(netns: str) -> str:
    argv = ["nsenter", f"--net={netlink.netns_path(netns)}", "--", "nft", "list", "ruleset"]
    return subprocess.run(argv, text=True, capture_output=True, check=True, timeout=10).stdout


def wait_changed(namespaces: list[str], before: dict[str, str], started: float) -> float:
    pending = set(namespaces)
    while pending:
        for ns in list(pending):
            if ruleset(ns) != before[ns]:
                pending.discard(ns)
        if time.monotonic() - started > 30:
            raise SystemExit(f"no change after 30 s on {sorted(pending)}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/cloudland"))
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    config = load_config(None, args.state_dir)
    topo = topology.plan(config)
    if topo is None:
        raise SystemExit("needs a cloud with --hypervisors N (namespace hypervisors)")
    netns_of = {h.host_id: h.netns for h in topo.hypervisors}
    base, token = token_of(args.state_dir)
    net = base + "/network/v2.0"
    ports = [p for p in api(net, token, "GET", "/ports")["ports"]
             if p["device_owner"].startswith("compute:") and p["security_groups"] and p["binding:host_id"]]
    if not ports:
        raise SystemExit("no bound server ports with security groups: create servers first")
    group = ports[0]["security_groups"][0]
    hosts = sorted({p["binding:host_id"] for p in ports if group in p["security_groups"]})
    namespaces = [netns_of[h] for h in hosts]
    created, deleted = [], []
    for i in range(args.rounds):
        before = {ns: ruleset(ns) for ns in namespaces}
        started = time.monotonic()
        rule = api(net, token, "POST", "/security-group-rules", {"security_group_rule": {
            "security_group_id": group, "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
            "port_range_min": 10000 + i, "port_range_max": 10000 + i}})["security_group_rule"]
        created.append(wait_changed(namespaces, before, started))
        before = {ns: ruleset(ns) for ns in namespaces}
        started = time.monotonic()
        api(net, token, "DELETE", f"/security-group-rules/{rule['id']}")
        deleted.append(wait_changed(namespaces, before, started))
    print(f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
          f"{platform.processor() or 'cpu ?'}, Python {platform.python_version()}")
    print(f"group {group} on {len(hosts)} hypervisor(s): {', '.join(hosts)}; {args.rounds} rounds")
    for name, values in (("rule create -> in effect everywhere", created),
                         ("rule delete -> gone everywhere", deleted)):
        ms = sorted(v * 1000 for v in values)
        print(f"{name}: median {statistics.median(ms):.0f} ms, min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms")


if __name__ == "__main__":
    main()
