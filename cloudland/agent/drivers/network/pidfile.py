"""Daemons the agent starts and later adopts by pid file (dnsmasq, the metadata proxy).

A pid file is trusted only while the process it names is alive and was started with
``--pid-file=<that file>``, so a reused pid is never signalled.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
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


def _terminate(pid_file: Path) -> int | None:
    """SIGTERM the daemon; its pid (None if none) for the caller to wait on."""
    found = running(pid_file)
    if found is None:
        return None
    os.kill(found[0], signal.SIGTERM)
    return found[0]


def stop_blocking(pid_file: Path, timeout: float = 5.0) -> None:
    """``stop`` for code running in a worker thread."""
    pid = _terminate(pid_file)
    if pid is not None:
        deadline = time.monotonic() + timeout
        while cmdline(pid) is not None:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
            time.sleep(0.05)
    pid_file.unlink(missing_ok=True)


async def stop(pid_file: Path, timeout: float = 5.0) -> None:
    """SIGTERM the daemon, SIGKILL it if it outlives ``timeout``; remove the pid file."""
    pid = _terminate(pid_file)
    if pid is not None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while cmdline(pid) is not None:
            if loop.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = loop.time() + timeout
            await asyncio.sleep(0.05)
    pid_file.unlink(missing_ok=True)
