"""Network convergence figures (prints them; asserts nothing).

1. FDB fan-out: one tenant network spans N simulated hypervisors (AgentService with the
   simulated drivers, all in this process, a real nats-server and the real controller on
   SQLite). A guest appears on hypervisor N+1 (and later goes): time until every other
   hypervisor has received the NetworkSpec whose ``peers`` include (exclude) its address.
2. Guest ping (``--guests``, root): ``cloudland up --hypervisors 2`` in a temporary directory;
   vm1 on hv1 runs; vm2 is created on hv2: time from the create request to vm2's console
   showing vm1 as an IPv4 neighbour (its first successful ping across the VXLAN), and to vm1
   showing vm2.

    .venv/bin/python bench/network_convergence.py [--hosts 100] [--guests]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import select, update

from cloudland.agent.drivers.compute.simulated import SimulatedComputeDriver
from cloudland.agent.drivers.network.simulated import SimulatedNetworkDriver
from cloudland.agent.instance_state import InstanceStateStore
from cloudland.agent.service import AgentService
from cloudland.allinone.bootstrap import bootstrap_cloud
from cloudland.allinone.nats import NatsServer
from cloudland.api.network import ipam
from cloudland.bus.messages import Wake, encode
from cloudland.config import Config
from cloudland.controller.service import ControllerService
from cloudland.db.engine import make_engine, make_sessionmaker
from cloudland.db.models import Instance, Network


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def fdb_fanout(hosts: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cl-fanout-"))
    nats_port = free_port()
    config = Config.model_validate({
        "state_dir": str(tmp), "nats": {"url": f"nats://127.0.0.1:{nats_port}"},
        "agent": {"compute_driver": "simulated", "heartbeat_seconds": 1.0, "memory_mb": 65536},
        "controller": {"reconcile_seconds": 1.0}})
    nats = NatsServer(port=nats_port, work_dir=tmp / "nats")
    await nats.start()
    boot = await bootstrap_cloud(config, guest_image=None, user_clouds_yaml=False)
    controller = ControllerService(config)
    await controller.start()
    agents: list[AgentService] = []
    for k in range(hosts + 1):
        cfg = config.model_copy(deep=True)
        cfg.agent.underlay_address = f"10.{200 + k // 250}.{k % 250}.1"
        agents.append(AgentService(cfg, SimulatedComputeDriver(), SimulatedNetworkDriver(),
                                   host_id=f"sim{k:03d}", records=InstanceStateStore(None)))
    await asyncio.gather(*(a.start() for a in agents))
    engine = make_engine(config.database_url)
    sessionmaker = make_sessionmaker(engine)
    net_id = boot.demo_network_id

    async def add(host: str) -> str:
        async with sessionmaker() as s, s.begin():
            network = await s.get(Network, net_id)
            assert network is not None
            inst = Instance(name=host, project_id=boot.demo_project_id, user_id="bench", flavor_id="1",
                            flavor={"vcpus": 1, "ram": 128, "disk": 1}, requested_host=host,
                            vm_state="building", task_state="scheduling", desired_power="running")
            s.add(inst)
            await s.flush()
            await ipam.create_port(s, network=network, project_id=boot.demo_project_id, device_id=inst.id,
                                   device_owner="compute:nova")
            return inst.id

    async def wake(ids: list[str]) -> None:
        assert agents[0].nc is not None
        await agents[0].nc.publish("controller.wake", encode(Wake(instance_ids=ids)))

    def peers(agent: AgentService) -> set[str]:
        spec = agent.network.networks.get(net_id)  # type: ignore[attr-defined]
        return set(spec.peers) if spec else set()

    async def until(predicate, timeout: float = 120) -> float:  # type: ignore[no-untyped-def]
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout:
                raise TimeoutError("no convergence")
            await asyncio.sleep(0.005)
        return time.monotonic() - start

    try:
        await asyncio.sleep(2.5)  # the controller schedules once it has seen heartbeats
        ids = [await add(f"sim{k:03d}") for k in range(hosts)]
        await wake(ids)
        t = await until(lambda: all(len(peers(a)) == hosts - 1 for a in agents[:hosts]), timeout=300)
        print(f"initial: {hosts} hosts, full mesh of peers after {t:.2f}s")
        await asyncio.sleep(2)
        new = agents[hosts]
        started = time.monotonic()
        iid = await add(new.host_id)
        await wake([iid])
        joined = await until(lambda: all(new.address in peers(a) for a in agents[:hosts]))
        print(f"join: guest on a new hypervisor -> all {hosts} others have its FDB entry: "
              f"{joined * 1000:.0f} ms (from the DB commit: {(time.monotonic() - started) * 1000:.0f} ms)")
        await asyncio.sleep(2)
        async with sessionmaker() as s, s.begin():
            await s.execute(update(Instance).where(Instance.id == iid)
                            .values(deleted=True, task_state="deleting"))
        await wake([iid])
        left = await until(lambda: all(new.address not in peers(a) for a in agents[:hosts]))
        print(f"leave: guest deleted -> its FDB entry gone from all {hosts} others: {left * 1000:.0f} ms")
        async with sessionmaker() as s:
            n = len(list(await s.scalars(select(Instance.id).where(Instance.deleted_at.is_(None)))))
        print(f"({n} live instances, {hosts + 1} simulated hypervisors, one network)")
    finally:
        await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
        await controller.stop()
        await engine.dispose()
        await nats.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def guest_ping() -> None:
    bin_dir = Path(sys.executable).parent
    tmp = Path(tempfile.mkdtemp(prefix="cl-ping-"))
    state = tmp / "state"
    env = {**os.environ, "OS_CLIENT_CONFIG_FILE": str(state / "clouds.yaml"), "OS_CLOUD": "cloudland"}

    def openstack(*args: str) -> dict:
        out = subprocess.run([str(bin_dir / "openstack"), *args, "-f", "json"], env=env, check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)

    argv = [str(bin_dir / "cloudland"), "up", "--detach", "--state-dir", str(state),
            "--port", str(free_port()), "--nats-port", str(free_port()), "--host-id", "bp",
            "--hypervisors", "2", "--underlay-cidr", "172.31.99.0/24", "--no-user-clouds-yaml"]
    up = subprocess.run(argv, capture_output=True, text=True)
    try:
        if up.returncode != 0:
            raise SystemExit(f"cloudland up failed: {up.stdout}{up.stderr}")
        net = openstack("network", "show", "demo-net")

        def server(name: str, host: str) -> tuple[str, Path]:
            s = openstack("server", "create", "--flavor", "m1.nano", "--image", "cloudland-guest",
                          "--network", net["id"], "--availability-zone", f"nova:{host}", name)
            return s["id"], state / "agent" / host / "instances" / s["id"] / "console.log"

        def sees(log: Path, address: str) -> bool:
            try:
                text = log.read_text(errors="replace")
            except FileNotFoundError:
                return False
            lines = re.findall(r"neighbors v4 (.*)", text)
            return bool(lines) and address in lines[-1].split()

        _, log1 = server("vm1", "bp-1")
        while "ip eth0" not in (log1.read_text(errors="replace") if log1.exists() else ""):
            time.sleep(0.2)
        ip1 = re.search(r"ip eth0 ([0-9.]+)/", log1.read_text()).group(1)  # type: ignore[union-attr]
        started = time.monotonic()
        _, log2 = server("vm2", "bp-2")
        while not sees(log2, ip1):
            time.sleep(0.1)
        t2 = time.monotonic() - started
        ip2 = re.search(r"ip eth0 ([0-9.]+)/", log2.read_text()).group(1)  # type: ignore[union-attr]
        while not sees(log1, ip2):
            time.sleep(0.1)
        t1 = time.monotonic() - started
        print(f"server create on hv2 -> its first ping to vm1 on hv1 answered: {t2:.1f}s; "
              f"-> vm1's broadcast ping answered by vm2: {t1:.1f}s (TCG guests; the guest pings every ~4 s)")
    finally:
        subprocess.run([str(bin_dir / "cloudland"), "down", "--state-dir", str(state)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--guests", action="store_true", help="also measure real guests (root, ~1 min)")
    args = parser.parse_args()
    print(machine())
    asyncio.run(fdb_fanout(args.hosts))
    if args.guests:
        guest_ping()


if __name__ == "__main__":
    main()
