"""``cloudland bench ...`` and ``cloudland nats ...`` commands."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Annotated

import typer

bench_app = typer.Typer(help="Benchmarks of the whole control plane.", no_args_is_help=True)
nats_app = typer.Typer(help="The NATS tree (core and leaf servers).", no_args_is_help=True)


@bench_app.command("scale")
def scale(
    hypervisors: Annotated[int, typer.Option(min=1, help="Simulated hypervisors")] = 1000,
    vms: Annotated[int, typer.Option(min=1, help="Servers to launch")] = 20000,
    rate: Annotated[float, typer.Option(help="Creates per second (0: as fast as possible)")] = 0.0,
    db: Annotated[str, typer.Option(
        help="Database: postgresql://user@host/db, local-postgres (start a throwaway server), "
             "or empty for SQLite")] = "",
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the figures as JSON")] = None,
    api_workers: Annotated[int, typer.Option(min=1, help="API worker processes")] = 2,
    clients: Annotated[int, typer.Option(min=1, help="Concurrent API clients")] = 64,
    projects: Annotated[int, typer.Option(help="Projects (0: one per 2,000 VMs)")] = 0,
    hosts_per_rack: Annotated[int, typer.Option(min=1, help="Hypervisors per rack leaf server")] = 1000,
    hosts_per_process: Annotated[int, typer.Option(help="Simulated hypervisors per process (0: auto)")] = 0,
    heartbeat: Annotated[float, typer.Option(help="Heartbeat period, seconds")] = 2.0,
    host_down: Annotated[float, typer.Option(help="controller.host_down_seconds")] = 10.0,
    work_dir: Annotated[Path | None, typer.Option(help="Keep everything here (default: a temp dir)")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the last server")] = 1800.0,
    vms_per_network: Annotated[int, typer.Option(min=1, help="Servers per tenant network")] = 50,
    prefill: Annotated[int, typer.Option(help="Server rows written to the database first (ERROR, "
                                              "unscheduled): list latency at size")] = 0,
    remote_group_rules: Annotated[bool, typer.Option(
        help="The default group admits its own members (Neutron's default); off: it admits "
             "10.0.0.0/8 instead, so no member sets are kept")] = True,
    relays: Annotated[bool, typer.Option(
        "--relays/--no-relays", help="Heartbeat relays on the rack leaves (else the controller's "
                                     "in-process relay takes every heartbeat)")] = True,
    max_pending_builds: Annotated[int, typer.Option(
        min=0, help="compute.max_pending_builds: creates get 429 while this many servers wait to "
                    "be placed (the clients send them again after Retry-After); 0: no limit")] = 10000,
) -> None:
    """Launch VMS servers on HYPERVISORS simulated hypervisors through the real API; print figures."""
    from cloudland.bench.scale import ScaleOptions, report, run_scale

    opts = ScaleOptions(hypervisors=hypervisors, vms=vms, rate=rate, db=db, json_path=json_path,
                        api_workers=api_workers, clients=clients, projects=projects,
                        hosts_per_rack=hosts_per_rack, hosts_per_process=hosts_per_process,
                        heartbeat_seconds=heartbeat, host_down_seconds=host_down, work_dir=work_dir,
                        timeout=timeout, vms_per_network=vms_per_network, prefill=prefill,
                        remote_group_rules=remote_group_rules, relays=relays,
                        max_pending_builds=max_pending_builds,
                        log=lambda m: typer.echo(f"[{time.strftime('%H:%M:%S')}] {m}"))
    try:
        import uvloop

        figures = uvloop.run(run_scale(opts))
    except ImportError:
        figures = asyncio.run(run_scale(opts))
    typer.echo(report(figures))


@nats_app.command("tree")
def tree(
    paths: Annotated[list[str], typer.Argument(help="Leaf paths, e.g. zone1/rack1 zone1/rack2 zone2/rack1")],
    work_dir: Annotated[Path, typer.Option(help="Where configs, logs and pid files go")] = Path("nats-tree"),
    core_nodes: Annotated[int, typer.Option(min=1, help="Core cluster size (3 in production)")] = 1,
    base_port: Annotated[int, typer.Option(help="First port (consecutive); 0: free ports")] = 0,
    config_only: Annotated[bool, typer.Option(help="Write the configs, start nothing")] = False,
) -> None:
    """Write nats-server configs for a core and leaf servers, and run them until Ctrl-C."""
    from cloudland.bus.topology import NatsTree

    t = NatsTree(work_dir, paths, core_nodes=core_nodes, base_port=base_port)
    if config_only:
        for name, path in t.write_configs().items():
            typer.echo(f"{name}: {path}")
        return
    t.start()
    try:
        for node in t.describe():
            typer.echo(f"{node['name']:<20} {node['url']:<26} monitor {node['monitor']}"
                       + (f"  (hub: {node['parent']})" if node["parent"] else ""))
        stop = [False]
        signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
        while not stop[0]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        t.stop()
