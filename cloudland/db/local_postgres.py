"""A throwaway PostgreSQL server for tests and benchmarks (Debian's ``postgresql`` package).

``LocalPostgres(work_dir).start()`` runs ``initdb`` and ``pg_ctl`` from
``/usr/lib/postgresql/<version>/bin`` on ``work_dir`` with a free port, trust authentication on
127.0.0.1 and durability off (fsync, synchronous_commit): it is for tests and benchmarks only.
PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` system user
(``runuser``) and ``work_dir`` is handed to it. Every command is an argument list.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

PG_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "cloudland"


def pg_bin_dir() -> Path | None:
    """The newest installed server's bin directory, or None."""
    if not PG_ROOT.is_dir():
        return None
    versions = sorted((p for p in PG_ROOT.iterdir() if (p / "bin" / "initdb").exists()),
                      key=lambda p: int(p.name) if p.name.isdigit() else 0)
    return versions[-1] / "bin" if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    def __init__(self, work_dir: Path, port: int = 0, run_as: str = "postgres",
                 settings: dict[str, str] | None = None) -> None:
        bin_dir = pg_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package `postgresql`)")
        self.bin_dir = bin_dir
        self.work_dir = work_dir
        self.data_dir = work_dir / "data"
        self.port = port or _free_port()
        self.run_as = run_as if os.geteuid() == 0 else None
        self.settings = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                         "max_connections": "300", "shared_buffers": "256MB",
                         **(settings or {})}

    def url(self, database: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _argv(self, tool: str, *args: str) -> list[str]:
        argv = [str(self.bin_dir / tool), *args]
        return ["runuser", "-u", self.run_as, "--", *argv] if self.run_as else argv

    def start(self, timeout: float = 30.0) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as:
            user = pwd.getpwnam(self.run_as)
            os.chown(self.work_dir, user.pw_uid, user.pw_gid)
        # The server must be able to reach its directory: open the path's ancestors for traversal.
        for parent in self.work_dir.resolve().parents:
            if parent != Path("/") and parent.stat().st_mode & 0o001 == 0:
                os.chmod(parent, parent.stat().st_mode | 0o001)
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(self._argv("initdb", "-D", str(self.data_dir), "-U", SUPERUSER,
                                      "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"),
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        options += f" -p {self.port} -c listen_addresses=127.0.0.1 -k {self.work_dir}"
        subprocess.run(self._argv("pg_ctl", "-D", str(self.data_dir), "-l", str(self.work_dir / "log"),
                                  "-o", options, "-w", "-t", str(int(timeout)), "start"),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
                return
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not listen on {self.port}; see {self.work_dir / 'log'}")

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run(self._argv("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"),
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = subprocess.run(self._argv("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER,
                                        "-d", database, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql),
                             check=True, capture_output=True, text=True)
        return out.stdout

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create ``name`` (optionally a copy of ``template``); returns its asyncpg URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"bad database name {name!r}")
        sql = f'CREATE DATABASE "{name}"'
        if template:
            sql += f' TEMPLATE "{template}"'
        self.psql(sql)
        return self.url(name)
