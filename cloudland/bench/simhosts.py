"""Many simulated hypervisors in one process: real ``AgentService`` code over the simulated drivers.

``python -m cloudland.bench.simhosts --nats URL --prefix hv --first 0 --count 500`` runs hosts
``hv-00000`` ... ``hv-00499``; they share ``--connections`` NATS connections (round robin) to
the server given (their rack's leaf). Starts are spread over one heartbeat period so heartbeats
do not arrive in bursts. Prints ``ready <count>`` once every agent announced itself, and stops
them on SIGTERM. Only the benchmark (or a test) ever runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tempfile
from pathlib import Path

from nats.aio.client import Client

from cloudland.agent.drivers.compute.simulated import SimulatedComputeDriver
from cloudland.agent.drivers.network.simulated import SimulatedNetworkDriver
from cloudland.agent.image_cache import ImageCache
from cloudland.agent.instance_state import InstanceStateStore
from cloudland.agent.member_sets import MemberSets
from cloudland.agent.service import AgentService
from cloudland.bus.connection import connect
from cloudland.bus.messages import ImageRef
from cloudland.bus.shared_subscriptions import SharedSubscriptions
from cloudland.config import Config
from cloudland.service_gc import tune_for_service


class NoImageCache(ImageCache):
    """Every image is "cached" already: simulated guests need no bytes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path.parent)
        self.path = path

    async def ensure(self, ref: ImageRef) -> Path:
        return self.path


def host_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}"


def host_address(index: int) -> str:
    """A distinct fake underlay address per host (10.64.0.0/10)."""
    n = (64 << 16) + index + 1
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


async def run(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="simhosts-"))
    config = Config(state_dir=work)
    config.nats.url = args.nats
    config.agent.zone = args.zone
    config.agent.heartbeat_seconds = args.heartbeat
    config.agent.underlay_address = "10.64.0.1"
    config.agent.state_dir = str(work)
    images = NoImageCache(work / "image")
    agents_of: list[list[AgentService]] = [[] for _ in range(args.connections)]

    def reconnect_cb(k: int):  # type: ignore[no-untyped-def]
        async def cb() -> None:
            for agent in agents_of[k]:
                await agent.on_reconnect()
        return cb

    conns: list[Client] = [await connect(args.nats, f"simhosts-{args.prefix}-{args.first}-{k}",
                                         on_reconnect=reconnect_cb(k)) for k in range(args.connections)]
    agents: list[AgentService] = []
    member_sets = MemberSets()  # the agents of a process mostly hold the same sets
    subscriptions = [SharedSubscriptions(nc) for nc in conns]  # and follow the same subjects
    for i in range(args.first, args.first + args.count):
        k = i % args.connections
        agent = AgentService(config, SimulatedComputeDriver(args.vcpus, args.memory_mb, args.disk_gb),
                             SimulatedNetworkDriver(), host_id=host_name(args.prefix, i), image_cache=images,
                             records=InstanceStateStore(None), nc=conns[k], member_sets=member_sets,
                             subscriptions=subscriptions[k])
        agent.address = host_address(i)
        agents_of[k].append(agent)
        agents.append(agent)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Spread the starts (and so the heartbeat phases) over one heartbeat period.
    batch = max(1, len(agents) // 20)
    for start in range(0, len(agents), batch):
        await asyncio.gather(*(a.start() for a in agents[start:start + batch]))
        await asyncio.sleep(args.heartbeat / 20)
    tune_for_service()
    print(f"ready {len(agents)}", flush=True)
    await stop.wait()
    await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)
    for nc in conns:
        await nc.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nats", required=True)
    p.add_argument("--prefix", default="hv")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--zone", default="nova")
    p.add_argument("--heartbeat", type=float, default=2.0)
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("--vcpus", type=int, default=64)
    p.add_argument("--memory-mb", type=int, default=262144)
    p.add_argument("--disk-gb", type=int, default=4096)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        import uvloop

        uvloop.run(run(args))
    except ImportError:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
