"""``cloudland up``: the whole cloud on one machine.

One supervisor process runs the bundled nats-server (child), the API and the controller
(tasks in its own event loop) and one hypervisor agent (child, restarted if it dies). It
writes ``run/supervisor.pid`` and, once a hypervisor has reported in, ``run/ready``.
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


def read_pid(path: Path) -> int | None:
    """The pid in ``path`` if that process is alive."""
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


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
        self.pid_path.write_text(str(process.pid))
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

    async def run(self) -> None:
        from cloudland.allinone.embedded_http import http_server
        from cloudland.api.app import create_app
        from cloudland.controller.service import ControllerService

        cfg = self.config
        rdir = run_dir(cfg)
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "ready").unlink(missing_ok=True)
        (rdir / "supervisor.pid").write_text(str(os.getpid()))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

        nats = None
        if cfg.nats.bundled:
            nats = NatsServer(port=cfg.nats.bundled_port, work_dir=cfg.state_dir / "nats")
            await nats.start()
        self.bootstrap = await bootstrap_cloud(cfg, guest_image=self.guest_image,
                                               user_clouds_yaml=self.user_clouds_yaml)
        server = http_server(create_app(cfg), cfg.api.listen_host, cfg.api.listen_port)
        api_task = asyncio.create_task(server.serve())
        controller = ControllerService(cfg)
        await controller.start()
        agent = ChildProcess("agent", self._cli("agent"), logs_dir(cfg) / "agent.log", rdir / "agent.pid")
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
            await agent.stop()
            await controller.stop()
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(api_task, 10)
            if nats:
                await nats.stop()
            (rdir / "supervisor.pid").unlink(missing_ok=True)

    async def _wait_ready(self) -> None:
        """The API answers and the local hypervisor has reported in."""
        cfg = self.config
        engine = make_engine(cfg.database_url)
        sessionmaker = make_sessionmaker(engine)
        host_id = cfg.host_id()
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        r = await client.get(cfg.api.base_url() + "/healthz")
                        if r.status_code == 200:
                            async with sessionmaker() as s:
                                host = await s.scalar(select(Host).where(Host.id == host_id))
                            if host is not None and host.status == "up":
                                return
                    await asyncio.sleep(0.2)
        finally:
            await engine.dispose()


async def stop_guests(config: Config, timeout: float) -> int:
    """Power off the local hypervisor's guests (disks are kept); returns how many."""
    if config.agent.compute_driver != "qemu":
        return 0
    from cloudland.agent.drivers.compute.qemu import QemuDriver

    driver = QemuDriver(config.agent_state_dir(config.host_id()), accel=config.agent.accel)
    await driver.init_host()
    try:
        running = [i for i, s in (await driver.list_instances()).items() if s in ("running", "paused")]
        await asyncio.gather(*(driver.power_off(i, timeout) for i in running))
        return len(running)
    finally:
        await driver.close()
