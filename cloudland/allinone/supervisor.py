"""``cloudland up``: the whole cloud on one machine.

One supervisor process runs the bundled nats-server (child), the API and the controller
(tasks in its own event loop) and one hypervisor agent (child, restarted if it dies). It
writes ``run/supervisor.pid`` and, once every hypervisor has reported in, ``run/ready``.

With ``allinone.hypervisors`` = N > 1 it first builds the dev/test topology (``topology.py``:
N network namespaces on an underlay bridge) and runs one agent per namespace, started with
``nsenter --net=<namespace>``, each with its own host id, state directory and underlay
address; NATS and the API also listen on the bridge's address, where the agents reach them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import httpx
from sqlalchemy import select

from cloudland.agent.drivers.network import netlink
from cloudland.allinone import topology
from cloudland.allinone.bootstrap import BootstrapResult, bootstrap_cloud
from cloudland.allinone.nats import NatsServer
from cloudland.config import Config
from cloudland.db.engine import make_engine, make_sessionmaker
from cloudland.db.models import Host

log = logging.getLogger(__name__)


def run_dir(config: Config) -> Path:
    return config.state_dir / "run"


def logs_dir(config: Config) -> Path:
    return config.state_dir / "logs"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def write_pid(path: Path, pid: int) -> None:
    """Record ``pid`` with its start time, so that a reused pid is never mistaken for it."""
    path.write_text(f"{pid} {_start_time(pid) or ''}\n")


def read_pid(path: Path) -> int | None:
    """The pid in ``path`` if that very process (same start time) is still alive."""
    try:
        pid_text, _, started = path.read_text().strip().partition(" ")
        pid = int(pid_text)
    except (FileNotFoundError, ValueError):
        return None
    current = _start_time(pid)
    if current is None or current != started:
        return None
    return pid


class ChildProcess:
    """A child that is restarted with backoff when it exits unexpectedly."""

    def __init__(self, name: str, argv: list[str], log_path: Path, pid_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.pid_path = pid_path
        self.process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._keep_running())

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            process = await asyncio.create_subprocess_exec(*self.argv, stdout=out, stderr=out,
                                                           stdin=asyncio.subprocess.DEVNULL)
        write_pid(self.pid_path, process.pid)
        return process

    async def _keep_running(self) -> None:
        backoff = 0.5
        while not self._stopping:
            self.process = await self._spawn()
            started = asyncio.get_running_loop().time()
            code = await self.process.wait()
            if self._stopping:
                break
            log.warning("%s exited with %s; restarting", self.name, code)
            if asyncio.get_running_loop().time() - started > 30:
                backoff = 0.5
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10)

    async def stop(self, timeout: float = 20) -> None:
        self._stopping = True
        if self.process and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.pid_path.unlink(missing_ok=True)


class AllInOne:
    def __init__(self, config: Config, *, guest_image: Path | None, user_clouds_yaml: bool,
                 config_path: Path | None = None) -> None:
        self.config = config
        self.guest_image = guest_image
        self.user_clouds_yaml = user_clouds_yaml
        self.config_path = config_path
        self.bootstrap: BootstrapResult | None = None
        self._stop = asyncio.Event()

    def _cli(self, *args: str) -> list[str]:
        argv = [sys.executable, "-m", "cloudland", *args, "--state-dir", str(self.config.state_dir)]
        if self.config_path:
            argv += ["--config", str(self.config_path)]
        return argv

    def _agents(self, topo: topology.Topology | None, nats_url: str, api_url: str) -> list[ChildProcess]:
        cfg = self.config
        if topo is None:
            return [ChildProcess("agent", self._cli("agent"), logs_dir(cfg) / "agent.log",
                                 run_dir(cfg) / "agent.pid")]
        return [
            ChildProcess(f"agent {hv.host_id}",
                         ["nsenter", f"--net={hv.netns_path}", "--",
                          *self._cli("agent", "--host-id", hv.host_id, "--underlay-address", hv.address,
                                     "--nats-url", nats_url, "--api-url", api_url,
                                     "--physical-network",
                                     f"{topology.PHYSICAL_NETWORK}={topology.EXTERNAL_IFNAME}")],
                         logs_dir(cfg) / f"agent-{hv.host_id}.log", agent_pid_path(cfg, hv.host_id))
            for hv in topo.hypervisors
        ] + [
            ChildProcess("outside host", ["nsenter", f"--net={netlink.netns_path(topo.outside_netns)}", "--",
                                          sys.executable, "-m", "cloudland.allinone.outside", "--port", "80"],
                         logs_dir(cfg) / "outside.log", run_dir(cfg) / "outside.pid")
        ]

    async def run(self) -> None:
        from cloudland.allinone.embedded_http import bind_sockets, http_server
        from cloudland.api.app import create_app
        from cloudland.controller.service import ControllerService

        cfg = self.config
        rdir = run_dir(cfg)
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "ready").unlink(missing_ok=True)
        write_pid(rdir / "supervisor.pid", os.getpid())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

        topo = topology.plan(cfg)
        listen = [cfg.api.listen_host]
        nats_host = "127.0.0.1"
        if topo is not None:
            await asyncio.to_thread(topology.build, topo)
            # The control plane as the agents in the namespaces see it: the bridge's address.
            cfg = cfg.model_copy(deep=True)
            listen.append(topo.gateway_ip)
            cfg.api.internal_url = cfg.api.internal_url or f"http://{topo.gateway_ip}:{cfg.api.listen_port}"
            if cfg.nats.bundled:
                nats_host = topo.gateway_ip
                cfg.nats.url = f"nats://{nats_host}:{cfg.nats.bundled_port}"
        nats = None
        if cfg.nats.bundled:
            nats = NatsServer(port=cfg.nats.bundled_port, work_dir=cfg.state_dir / "nats", host=nats_host)
            await nats.start()
        self.bootstrap = await bootstrap_cloud(cfg, guest_image=self.guest_image,
                                               user_clouds_yaml=self.user_clouds_yaml,
                                               external=topo.outside if topo else None,
                                               external6=topo.outside6 if topo else None)
        server = http_server(create_app(cfg, tune_gc=True), cfg.api.listen_host, cfg.api.listen_port)
        api_task = asyncio.create_task(server.serve(sockets=bind_sockets(listen, cfg.api.listen_port)))
        controller = ControllerService(cfg)
        await controller.start()
        agents = self._agents(topo, cfg.nats.url, cfg.api.agent_url())
        for agent in agents:
            await agent.start()
        try:
            ready = asyncio.create_task(self._wait_ready())
            stopped = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({ready, stopped, api_task}, return_when=asyncio.FIRST_COMPLETED)
            if ready in done and ready.exception() is None:
                (rdir / "ready").write_text(cfg.api.base_url())
                log.info("cloudland is up at %s", cfg.api.base_url())
            if api_task in done:
                raise RuntimeError("the API server stopped; see the log above")
            await self._stop.wait()
        finally:
            log.info("stopping")
            (rdir / "ready").unlink(missing_ok=True)
            await asyncio.gather(*(agent.stop() for agent in agents))
            await controller.stop()
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(api_task, 10)
            if nats:
                await nats.stop()
            (rdir / "supervisor.pid").unlink(missing_ok=True)

    async def _wait_ready(self) -> None:
        """The API answers and every local hypervisor has reported in."""
        cfg = self.config
        engine = make_engine(cfg.database_url)
        sessionmaker = make_sessionmaker(engine)
        wanted = set(topology.host_ids(cfg))
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        r = await client.get(cfg.api.base_url() + "/healthz")
                        if r.status_code == 200:
                            async with sessionmaker() as s:
                                up = set(await s.scalars(select(Host.id).where(
                                    Host.id.in_(wanted), Host.status == "up")))
                            if up == wanted:
                                return
                    await asyncio.sleep(0.2)
        finally:
            await engine.dispose()


def agent_pid_path(config: Config, host_id: str) -> Path:
    """Where the supervisor keeps the pid of the agent of ``host_id``."""
    if config.allinone.hypervisors == 1:
        return run_dir(config) / "agent.pid"
    return run_dir(config) / f"agent-{host_id}.pid"


async def stop_guests(config: Config, timeout: float) -> int:
    """Power off the local hypervisors' guests (disks are kept); returns how many."""
    if config.agent.compute_driver != "qemu":
        return 0
    from cloudland.agent.drivers.compute.qemu import QemuDriver

    async def one(host_id: str) -> int:
        driver = QemuDriver(config.agent_state_dir(host_id), accel=config.agent.accel)
        await driver.init_host()
        try:
            running = [i for i, s in (await driver.list_instances()).items() if s in ("running", "paused")]
            await asyncio.gather(*(driver.power_off(i, timeout) for i in running))
            return len(running)
        finally:
            await driver.close()

    return sum(await asyncio.gather(*(one(h) for h in topology.host_ids(config))))


def remove_topology(config: Config) -> bool:
    """Remove the namespaces and the underlay of ``--hypervisors N``; False if there were none.
    With one hypervisor, stop its DHCP and metadata services (the next start rebuilds them)."""
    topo = topology.plan(config)
    if topo is None:
        topology.stop_dhcp(config.host_id(), config.agent_state_dir(config.host_id()))
        return False
    if not topology.exists(topo):
        return False
    topology.destroy(topo)
    return True
