"""Daemons the agent starts and later adopts by pid file (dnsmasq, the metadata proxy).

A pid file is trusted only while the process it names is alive and was started with
``--pid-file=<that file>``, so a reused pid is never signalled.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path


def cmdline(pid: int) -> list[str] | None:
    """The argv of a live (not zombie) process, or None."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return None
    return [a.decode() for a in raw.split(b"\0") if a]


def running(pid_file: Path) -> tuple[int, list[str]] | None:
    """(pid, argv) of the live daemon that owns ``pid_file``."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    argv = cmdline(pid)
    if argv is None or f"--pid-file={pid_file}" not in argv:
        return None
    return pid, argv


async def stop(pid_file: Path, timeout: float = 5.0) -> None:
    """SIGTERM the daemon, SIGKILL it if it outlives ``timeout``; remove the pid file."""
    found = running(pid_file)
    if found is not None:
        pid = found[0]
        os.kill(pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while cmdline(pid) is not None:
            if loop.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = loop.time() + timeout
            await asyncio.sleep(0.05)
    pid_file.unlink(missing_ok=True)
