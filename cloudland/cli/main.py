"""The ``cloudland`` command."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import tomli_w
import typer
from rich.console import Console

from cloudland.bench.cli import bench_app, nats_app
from cloudland.config import Config, load_config
from cloudland.service_gc import tune_for_service

app = typer.Typer(help="Cloudland: a lightweight, OpenStack-compatible cloud.", no_args_is_help=True)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
image_app = typer.Typer(help="Guest images.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(image_app, name="image")
app.add_typer(bench_app, name="bench")
app.add_typer(nats_app, name="nats")
console = Console()

StateDir = Annotated[Path | None, typer.Option(
    "--state-dir", help="State directory [default: /var/lib/cloudland]")]
ConfigPath = Annotated[Path | None, typer.Option("--config", help="TOML config file")]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "nats", "alembic", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config(state_dir: Path | None, config_path: Path | None) -> Config:
    return load_config(config_path, state_dir)


def _run(coro) -> None:  # type: ignore[no-untyped-def]
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass


async def _serve_until_signal(service) -> None:  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    def stopping(sig: signal.Signals) -> None:
        logging.getLogger("cloudland").info("%s received: stopping", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping, sig)
    await service.start()
    tune_for_service()
    try:
        await stop.wait()
    finally:
        await service.stop()


@app.command()
def up(
    state_dir: StateDir = None,
    config_path: ConfigPath = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Return once the cloud is healthy")] = False,
    port: Annotated[int | None, typer.Option(help="API port (first start only)")] = None,
    nats_port: Annotated[int | None, typer.Option(help="Bundled NATS port (first start only)")] = None,
    host_id: Annotated[str | None, typer.Option(help="Hypervisor id (first start only)")] = None,
    accel: Annotated[str | None, typer.Option(help="auto | kvm | tcg (first start only)")] = None,
    hypervisors: Annotated[int | None, typer.Option(
        min=1, max=200, help="Hypervisors, each an agent in its own namespace (first start only)")] = None,
    underlay_cidr: Annotated[str | None, typer.Option(
        help="IPv4 underlay of --hypervisors N (first start only) [default: 172.31.250.0/24]")] = None,
    guest_image: Annotated[bool, typer.Option(help="Build and publish the test guest image")] = True,
    user_clouds_yaml: Annotated[bool, typer.Option(
        help="Also write ~/.config/openstack/clouds.yaml")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds --detach waits for health")] = 300,
) -> None:
    """Run the all-in-one cloud: NATS, API, controller and one hypervisor agent (or N, each in
    its own network namespace, with --hypervisors N)."""
    from cloudland.allinone.supervisor import AllInOne, read_pid, run_dir

    cfg = _init_config(state_dir, config_path, port, nats_port, host_id, accel, hypervisors, underlay_cidr)
    pid = read_pid(run_dir(cfg) / "supervisor.pid")
    if pid:
        console.print(f"Cloudland is already running (pid {pid}).")
        _print_usage(cfg, user_clouds_yaml)
        return
    if detach:
        _detach_up(cfg, config_path, guest_image, user_clouds_yaml, timeout)
        return
    _setup_logging()
    image_path = None
    if guest_image:
        from cloudland.guest.build import build_test_guest

        image_path = build_test_guest()
    aio = AllInOne(cfg, guest_image=image_path, user_clouds_yaml=user_clouds_yaml, config_path=config_path)
    _run(aio.run())


def _init_config(state_dir: Path | None, config_path: Path | None, port: int | None,
                 nats_port: int | None, host_id: str | None, accel: str | None,
                 hypervisors: int | None = None, underlay_cidr: str | None = None) -> Config:
    """Load the config; on first start write ``<state_dir>/cloudland.toml`` with the options given."""
    cfg = _config(state_dir, config_path)
    if config_path is None and not (cfg.state_dir / "cloudland.toml").exists():
        data: dict = {"state_dir": str(cfg.state_dir)}
        if port:
            data["api"] = {"listen_port": port}
        if nats_port:
            data["nats"] = {"url": f"nats://127.0.0.1:{nats_port}", "bundled_port": nats_port}
        agent = {k: v for k, v in (("host_id", host_id), ("accel", accel)) if v}
        if agent:
            data["agent"] = agent
        allinone = {k: v for k, v in (("hypervisors", hypervisors), ("underlay_cidr", underlay_cidr)) if v}
        if allinone:
            data["allinone"] = allinone
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        (cfg.state_dir / "cloudland.toml").write_text(
            "# Written by the first `cloudland up`; see docs/configuration.md\n" + tomli_w.dumps(data))
        state_dir = cfg.state_dir
        cfg = _config(state_dir, None)
    elif hypervisors is not None and hypervisors != cfg.allinone.hypervisors:
        console.print(f"[red]This cloud has {cfg.allinone.hypervisors} hypervisor(s); --hypervisors "
                      f"applies to a first start only (see allinone.hypervisors in the config).[/red]")
        raise typer.Exit(2)
    return cfg


def _detach_up(cfg: Config, config_path: Path | None, guest_image: bool, user_clouds_yaml: bool,
               timeout: float) -> None:
    from cloudland.allinone.supervisor import logs_dir, run_dir

    if guest_image:
        from cloudland.guest.build import build_test_guest

        with console.status("Preparing the test guest image (cached after the first time)..."):
            build_test_guest()
    argv = [sys.executable, "-m", "cloudland", "up", "--state-dir", str(cfg.state_dir)]
    if config_path:
        argv += ["--config", str(config_path)]
    argv.append("--guest-image" if guest_image else "--no-guest-image")
    argv.append("--user-clouds-yaml" if user_clouds_yaml else "--no-user-clouds-yaml")
    logs_dir(cfg).mkdir(parents=True, exist_ok=True)
    log_path = logs_dir(cfg) / "cloudland.log"
    ready = run_dir(cfg) / "ready"
    ready.unlink(missing_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    with console.status("Starting Cloudland..."):
        while time.monotonic() < deadline:
            if ready.exists():
                break
            if proc.poll() is not None:
                console.print(f"[red]Cloudland failed to start (exit {proc.returncode}). "
                              f"Last lines of {log_path}:[/red]")
                console.print("\n".join(log_path.read_text(errors="replace").splitlines()[-30:]))
                raise typer.Exit(1)
            time.sleep(0.2)
        else:
            console.print(f"[red]Cloudland did not become healthy in {timeout:.0f}s; see {log_path}[/red]")
            raise typer.Exit(1)
    _print_usage(cfg, user_clouds_yaml)


def _print_usage(cfg: Config, user_clouds_yaml: bool = True) -> None:
    bin_dir = Path(sys.executable).parent
    clouds = cfg.state_dir / "clouds.yaml"
    where = "also merged into ~/.config/openstack/clouds.yaml" if user_clouds_yaml else "not in ~/.config"
    env = "" if user_clouds_yaml else f" OS_CLIENT_CONFIG_FILE={clouds}"
    console.print(f"""[bold green]Cloudland is up.[/bold green]
  API (OpenStack-compatible): {cfg.api.base_url()}
  clouds.yaml: {clouds} ({where})
  clouds: cloudland (admin), cloudland-demo (project demo)
  logs: {cfg.state_dir / 'logs'}

Try it with the stock OpenStack CLI:
  export PATH={bin_dir}:$PATH OS_CLOUD=cloudland-demo{env}
  openstack image list
  openstack server create --flavor m1.nano --image cloudland-guest --network demo-net --wait vm1
  openstack console log show vm1
  openstack server delete --wait vm1

Stop it with: {bin_dir / 'cloudland'} down --state-dir {cfg.state_dir}""")


@app.command()
def down(
    state_dir: StateDir = None,
    config_path: ConfigPath = None,
    keep_guests: Annotated[bool, typer.Option(help="Leave guests running")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the cloud to stop")] = 60,
) -> None:
    """Stop what `cloudland up` started. Guests are powered off (their disks are kept) and
    the next `cloudland up` starts them again. With several hypervisors their namespaces and
    the underlay are removed too (rebuilt by the next `up`), unless --keep-guests."""
    from cloudland.allinone.supervisor import read_pid, remove_topology, run_dir, stop_guests

    cfg = _config(state_dir, config_path)
    pid = read_pid(run_dir(cfg) / "supervisor.pid")
    if pid is None:
        console.print("Cloudland is not running.")
    else:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while read_pid(run_dir(cfg) / "supervisor.pid") == pid and time.monotonic() < deadline:
            time.sleep(0.2)
        if read_pid(run_dir(cfg) / "supervisor.pid") == pid:
            console.print(f"[red]Cloudland (pid {pid}) did not stop in {timeout:.0f}s[/red]")
            raise typer.Exit(1)
        console.print("Cloudland stopped.")
    if not keep_guests:
        n = asyncio.run(stop_guests(cfg, timeout=min(cfg.compute.shutdown_timeout, 30)))
        if n:
            console.print(f"Powered off {n} guest(s); their disks are kept.")
        if remove_topology(cfg):
            console.print("Removed the hypervisor namespaces and the underlay.")


@app.command()
def status(state_dir: StateDir = None, config_path: ConfigPath = None) -> None:
    """Say whether the all-in-one cloud is running."""
    from cloudland.allinone.supervisor import read_pid, run_dir

    cfg = _config(state_dir, config_path)
    pid = read_pid(run_dir(cfg) / "supervisor.pid")
    if pid and (run_dir(cfg) / "ready").exists():
        console.print(f"running (pid {pid}) at {cfg.api.base_url()}")
    elif pid:
        console.print(f"starting (pid {pid})")
    else:
        console.print("stopped")
        raise typer.Exit(3)


@app.command()
def api(state_dir: StateDir = None, config_path: ConfigPath = None) -> None:
    """Run the API server (all OpenStack services on one port)."""
    import uvicorn

    from cloudland.api.app import create_app

    _setup_logging()
    cfg = _config(state_dir, config_path)
    uvicorn.run(create_app(cfg, tune_gc=True), host=cfg.api.listen_host, port=cfg.api.listen_port,
                log_level="warning", access_log=False)


@app.command()
def controller(state_dir: StateDir = None, config_path: ConfigPath = None) -> None:
    """Run a controller (scheduler and reconcilers)."""
    from cloudland.controller.service import ControllerService

    _setup_logging()
    _run(_serve_until_signal(ControllerService(_config(state_dir, config_path))))


@app.command()
def relay(
    nats: Annotated[list[str], typer.Option(
        "--nats", help="NATS server to relay the heartbeats of (repeatable: one relay per server); "
                       "normally the leaf server of a rack")],
    flush: Annotated[float, typer.Option(
        "--flush", min=0.01, help="Seconds between batches")] = 0.5,
) -> None:
    """Run heartbeat relays: the agents' heartbeats on a server, forwarded in batches."""
    from cloudland.bus.heartbeat_relay import HeartbeatRelays

    _setup_logging()
    _run(_serve_until_signal(HeartbeatRelays(nats, flush_seconds=flush)))


@app.command()
def agent(
    state_dir: StateDir = None,
    config_path: ConfigPath = None,
    host_id: Annotated[str | None, typer.Option(help="Overrides agent.host_id")] = None,
    underlay_address: Annotated[str | None, typer.Option(help="Overrides agent.underlay_address")] = None,
    nats_url: Annotated[str | None, typer.Option(help="Overrides nats.url")] = None,
    api_url: Annotated[str | None, typer.Option(
        help="Overrides api.internal_url (where the agent's metadata proxies reach the API)")] = None,
    physical_network: Annotated[list[str] | None, typer.Option(
        help="NAME=INTERFACE: the uplink of a flat/VLAN physical network (repeatable; "
             "adds to agent.physical_networks)")] = None,
) -> None:
    """Run the hypervisor agent (as root). Guests keep running when it stops."""
    from cloudland.agent.factory import build_drivers
    from cloudland.agent.service import AgentService

    _setup_logging()
    cfg = _config(state_dir, config_path)
    if host_id:
        cfg.agent.host_id = host_id
    if underlay_address:
        cfg.agent.underlay_address = underlay_address
    if nats_url:
        cfg.nats.url = nats_url
    if api_url:
        cfg.api.internal_url = api_url
    for mapping in physical_network or []:
        name, sep, interface = mapping.partition("=")
        if not sep or not name or not interface:
            raise typer.BadParameter(f"expected NAME=INTERFACE, got {mapping!r}")
        cfg.agent.physical_networks[name] = interface
    host_id = cfg.host_id()
    compute, network = build_drivers(cfg, host_id)
    _run(_serve_until_signal(AgentService(cfg, compute, network, host_id=host_id)))


@db_app.command("upgrade")
def db_upgrade(state_dir: StateDir = None, config_path: ConfigPath = None) -> None:
    """Apply database migrations."""
    from cloudland.db.migrate import upgrade

    cfg = _config(state_dir, config_path)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    upgrade(cfg.database_url)
    console.print("database is up to date")


@image_app.command("build-test-guest")
def build_test_guest_cmd(force: Annotated[bool, typer.Option(help="Rebuild even if cached")] = False) -> None:
    """Build (or find cached) the tiny test guest: Debian cloud kernel + busybox."""
    from cloudland.guest.build import build_test_guest

    path = build_test_guest(force=force)
    console.print(str(path))


if __name__ == "__main__":
    app()
