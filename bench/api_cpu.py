"""API CPU per server create and per list page, in one process (no NATS, no controller).

Starts a throwaway PostgreSQL (``cloudland.db.local_postgres``) or uses SQLite, seeds it as
``cloudland bench scale`` does (flavor, image, projects, one network per 50 servers), then
drives the FastAPI app in-process through ``httpx.ASGITransport``: ``--creates`` POST
/servers (``--concurrency`` at a time) and ``--pages`` GET /servers/detail?all_tenants=1&limit=1000
after ``--prefill`` rows. Prints CPU milliseconds per request (the client's share included,
so compare runs of this script with each other, not with the benchmark's API CPU), and with
``--profile DIR`` writes a profile of each phase (pyinstrument if installed, else cProfile).

    .venv/bin/python bench/api_cpu.py --creates 2000 --prefill 100000 --pages 20 [--profile /tmp/p]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

V21 = "/compute/v2.1"


class _Profiler:
    """cProfile (``<dir>/<name>.prof``), or with pyinstrument installed also a sampled call tree
    (``<dir>/<name>.txt``: where the wall time of the one thread goes, idle waits included)."""

    def __init__(self, directory: str | None, name: str) -> None:
        self.dir, self.name = directory, name
        self.cprofile: cProfile.Profile | None = None
        self.sampler: Any = None

    def start(self) -> None:
        if not self.dir:
            return
        try:
            from pyinstrument import Profiler

            self.sampler = Profiler(interval=0.0005, async_mode="disabled")
            self.sampler.start()
        except ImportError:
            self.cprofile = cProfile.Profile()
            self.cprofile.enable()

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
            text = self.sampler.output_text(show_all=True, short_mode=False)
            (Path(self.dir or ".") / f"{self.name}.txt").write_text(text)
        if self.cprofile is not None:
            self.cprofile.disable()
            self.cprofile.dump_stats(str(Path(self.dir or ".") / f"{self.name}.prof"))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from cloudland.api.app import create_app
    from cloudland.bench.scale import LOCAL_POSTGRES, ScaleBench, ScaleOptions
    from cloudland.config import load_config

    work = Path(tempfile.mkdtemp(prefix="cloudland-apicpu-"))
    opts = ScaleOptions(hypervisors=1, vms=max(args.creates, 200), db=LOCAL_POSTGRES if args.postgres else "",
                        work_dir=work, log=lambda m: print(m, file=sys.stderr))
    bench = ScaleBench(opts)
    figures: dict[str, Any] = {}
    try:
        db_url = bench.database_url()
        config_path = bench.write_config(db_url, "nats://127.0.0.1:1")
        password = await bench.seed(config_path)
        if args.prefill:
            await bench.prefill(config_path, args.prefill)
        config = load_config(config_path)
        try:  # as the benchmark's API workers do
            app = create_app(config, connect_bus=False, freeze_gc=True)
        except TypeError:  # a tree from before freeze_gc (before/after comparisons)
            app = create_app(config, connect_bus=False)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
                tokens: dict[int, str] = {}
                for index, project in enumerate(bench.projects):
                    body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
                        "name": "admin", "domain": {"name": "Default"}, "password": password}}},
                        "scope": {"project": {"id": project}}}}
                    reply = await client.post("/identity/v3/auth/tokens", json=body)
                    tokens[index] = reply.headers["x-subject-token"]
                admin = tokens[0]

                async def creates(first: int, count: int) -> list[float]:
                    lat: list[float] = []
                    next_i = first

                    async def worker() -> None:
                        nonlocal next_i
                        while next_i < first + count:
                            i = next_i
                            next_i += 1
                            project, network_id = bench.networks[i % len(bench.networks)]
                            body = {"server": {"name": f"vm-{i}", "imageRef": bench.image_id,
                                               "flavorRef": "bench", "networks": [{"uuid": network_id}]}}
                            t0 = time.perf_counter()
                            r = await client.post(f"{V21}/servers", json=body,
                                                  headers={"X-Auth-Token": tokens[project]})
                            lat.append(time.perf_counter() - t0)
                            if r.status_code != 202:
                                raise RuntimeError(f"create: {r.status_code} {r.text}")

                    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
                    return lat

                await creates(0, min(50, args.creates))  # warm up caches and the pool
                warm = min(50, args.creates)
                prof = _Profiler(args.profile, "create")
                c0, w0 = time.process_time(), time.perf_counter()
                prof.start()
                lat = await creates(warm, args.creates - warm)
                prof.stop()
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                n = max(1, args.creates - warm)
                figures["create_cpu_ms"] = 1000 * cpu / n
                figures["create_per_second"] = n / wall
                figures["create_p50_ms"] = 1000 * statistics.median(lat) if lat else 0
                batcher = getattr(app.state, "create_batcher", None)
                if batcher is not None:  # group commit (cloudland/api/compute/create_batch.py)
                    figures["creates_per_batch"] = batcher.batched / max(1, batcher.batches)
                    figures["batch_fallbacks"] = batcher.fallbacks

                pages: list[float] = []
                prof = _Profiler(args.profile, "list")
                c0 = time.process_time()
                marker = None
                prof.start()
                for _ in range(args.pages):
                    params = {"all_tenants": "1", "limit": "1000"}
                    if marker:
                        params["marker"] = marker
                    t0 = time.perf_counter()
                    r = await client.get(f"{V21}/servers/detail", params=params,
                                         headers={"X-Auth-Token": admin})
                    pages.append(time.perf_counter() - t0)
                    servers = r.json()["servers"]
                    marker = servers[-1]["id"] if len(servers) == 1000 else None
                prof.stop()
                figures["list_cpu_ms"] = 1000 * (time.process_time() - c0) / max(1, args.pages)
                figures["list_page_median_ms"] = 1000 * statistics.median(pages) if pages else 0
                figures["list_page_max_ms"] = 1000 * max(pages) if pages else 0
    finally:
        if bench.pg is not None:
            bench.pg.stop()
            bench.pg.remove()
        shutil.rmtree(work, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--creates", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=20000)
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--sqlite", dest="postgres", action="store_false",
                        help="SQLite instead of PostgreSQL")
    parser.add_argument("--profile", help="Directory for create.prof and list.prof")
    args = parser.parse_args()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    try:
        import uvloop

        figures = uvloop.run(run(args))
    except ImportError:
        figures = asyncio.run(run(args))
    for name, value in figures.items():
        print(f"{name:<22} {value:10.2f}")


if __name__ == "__main__":
    main()
