"""Create → ACTIVE and create → boot marker on the console, through the real API.

Starts an all-in-one cloud in a temporary state directory (or uses ``--clouds-yaml``),
creates servers one at a time from the test guest image and prints the medians next to the
time raw QEMU takes to reach the same marker (bench/raw_qemu_boot.py), the physical limit.

    .venv/bin/python bench/server_boot.py [--count 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloudland.guest import BOOT_MARKER
from tests.conftest import free_port

BIN = Path(sys.executable).parent


def machine() -> str:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {qemu.splitlines()[0]}"


def login(auth: dict) -> tuple[str, dict[str, str]]:
    body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": auth["username"], "password": auth["password"], "domain": {"name": "Default"}}}},
        "scope": {"project": {"name": auth["project_name"], "domain": {"name": "Default"}}}}}
    r = httpx.post(auth["auth_url"] + "/v3/auth/tokens", json=body)
    r.raise_for_status()
    catalog = {e["type"]: next(ep["url"] for ep in e["endpoints"] if ep["interface"] == "public")
               for e in r.json()["token"]["catalog"]}
    return r.headers["X-Subject-Token"], catalog


def boot_once(client: httpx.Client, compute: str, image_id: str, network_id: str,
              n: int) -> tuple[float, float]:
    body = {"server": {"name": f"bench-{n}", "imageRef": image_id, "flavorRef": "42",
                       "networks": [{"uuid": network_id}]}}
    t0 = time.monotonic()
    r = client.post(f"{compute}/servers", json=body)
    r.raise_for_status()
    server_id = r.json()["server"]["id"]
    active = marker = None
    while marker is None:
        if active is None:
            status = client.get(f"{compute}/servers/{server_id}").json()["server"]["status"]
            if status == "ACTIVE":
                active = time.monotonic() - t0
            elif status == "ERROR":
                raise RuntimeError(f"server {server_id} went to ERROR")
        if active is not None:
            out = client.post(f"{compute}/servers/{server_id}/action",
                              json={"os-getConsoleOutput": {"length": None}})
            if out.status_code == 200 and BOOT_MARKER in out.json()["output"]:
                marker = time.monotonic() - t0
        time.sleep(0.02)
        if time.monotonic() - t0 > 300:
            raise RuntimeError("timed out")
    client.delete(f"{compute}/servers/{server_id}")
    while client.get(f"{compute}/servers/{server_id}").status_code != 404:
        time.sleep(0.1)
    return active, marker


def raw_qemu_boot() -> float:
    """One boot of the same image with plain QEMU and the driver's guest settings."""
    import importlib.util

    from cloudland.agent.drivers.compute.accel import choose_accel
    from cloudland.guest.build import build_test_guest

    spec = importlib.util.spec_from_file_location("raw_qemu_boot", Path(__file__).parent / "raw_qemu_boot.py")
    raw = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(raw)  # type: ignore[union-attr]
    extra = ["-device", "VGA", "-object", "rng-random,id=rng0,filename=/dev/urandom",
             "-device", "virtio-rng-pci,rng=rng0"]
    return raw.boot_once("qemu-system-x86_64", build_test_guest(), choose_accel("auto"), 128, 1, extra,
                         120.0, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--clouds-yaml", type=Path, help="use a running cloud instead of starting one")
    args = parser.parse_args()

    state_dir = None
    clouds = args.clouds_yaml
    if clouds is None:
        state_dir = Path(tempfile.mkdtemp(prefix="cloudland-bench-")) / "state"
        subprocess.run([str(BIN / "cloudland"), "up", "--detach", "--state-dir", str(state_dir),
                        "--port", str(free_port()), "--nats-port", str(free_port()),
                        "--host-id", "bench-host", "--no-user-clouds-yaml"], check=True,
                       stdout=subprocess.DEVNULL)
        clouds = state_dir / "clouds.yaml"
    results, raws = [], []
    try:
        auth = yaml.safe_load(clouds.read_text())["clouds"]["cloudland-demo"]["auth"]
        token, catalog = login(auth)
        with httpx.Client(headers={"X-Auth-Token": token}, timeout=30) as client:
            images = client.get(f"{catalog['image']}/v2/images?name=cloudland-guest").json()["images"]
            nets = client.get(f"{catalog['network']}/v2.0/networks?name=demo-net").json()["networks"]
            boot_once(client, catalog["compute"], images[0]["id"], nets[0]["id"], -1)  # warm the image cache
            # Interleaved, so that load changes on the machine hit both sides alike.
            for i in range(args.count):
                raws.append(raw_qemu_boot())
                results.append(boot_once(client, catalog["compute"], images[0]["id"], nets[0]["id"], i))
                print(f"run {i + 1:2d}: raw {raws[-1]:.2f} s, ACTIVE {results[-1][0]:.2f} s, "
                      f"marker {results[-1][1]:.2f} s", flush=True)
    finally:
        if state_dir:
            subprocess.run([str(BIN / "cloudland"), "down", "--state-dir", str(state_dir)], check=False,
                           capture_output=True)
    actives = [a for a, _ in results]
    markers = [m for _, m in results]
    print(f"machine: {machine()}, load {os.getloadavg()[0]:.2f}")
    print(f"servers: {args.count}, one at a time, flavor m1.nano (128 MiB), test guest image, cache warm")
    for label, values in (("create -> ACTIVE", actives), ("create -> boot marker", markers),
                          ("raw QEMU -> boot marker", raws)):
        print(f"{label:24s} median {statistics.median(values):.2f} s  "
              f"(min {min(values):.2f}, max {max(values):.2f})")
    print(f"overhead vs raw QEMU (medians): "
          f"{100 * (statistics.median(markers) / statistics.median(raws) - 1):+.0f}%")


if __name__ == "__main__":
    main()
