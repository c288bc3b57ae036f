"""Keystone token issue and validation throughput, through the real API over HTTP.

Starts the API (uvicorn, uvloop + httptools) in subprocesses on a migrated, bootstrapped
temporary state directory, then drives it from concurrent keep-alive connections for a fixed
duration: ``POST /identity/v3/auth/tokens`` (password method, demo user, project scope) and
an authenticated ``GET`` (token validation on every request). Prints requests/s, p50/p99.

    .venv/bin/python bench/token_issue.py [--duration 10] [--connections 32] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import free_port


def machine() -> str:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


# --- server side ---------------------------------------------------------------------------------


def prepare(state_dir: Path, port: int) -> None:
    """Migrate and bootstrap the state directory (once, before the workers start)."""
    from cloudland.api.identity.bootstrap import bootstrap_identity
    from cloudland.config import Config
    from cloudland.db.engine import make_engine, make_sessionmaker
    from cloudland.db.migrate import upgrade

    config = Config(state_dir=state_dir)
    config.api.listen_port = port
    upgrade(config.database_url)

    async def boot() -> None:
        engine = make_engine(config.database_url)
        await bootstrap_identity(make_sessionmaker(engine), config)
        await engine.dispose()

    asyncio.run(boot())


def serve(state_dir: Path, port: int) -> None:
    """One API worker; several share the port through SO_REUSEPORT."""
    import logging

    import uvicorn

    from cloudland.api.app import create_app
    from cloudland.config import Config

    logging.getLogger("cloudland").setLevel(logging.WARNING)
    config = Config(state_dir=state_dir)
    config.api.listen_port = port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    app = create_app(config, connect_bus=False)
    server = uvicorn.Server(uvicorn.Config(app, loop="uvloop", http="httptools", log_level="warning",
                                           access_log=False, lifespan="on", backlog=2048))
    server.run(sockets=[sock])


# --- client side ---------------------------------------------------------------------------------


class Connection:
    """A minimal HTTP/1.1 keep-alive client: the load generator must cost less than the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body


def http_request(method: str, path: str, port: int, body: bytes = b"",
                 headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def drive(port: int, raw: bytes, expect: int, connections: int, duration: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal errors
        conn = await Connection.open(port)
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            status, _, _ = await conn.request(raw)
            latencies.append(time.perf_counter() - t0)
            if status != expect:
                errors += 1
        conn.writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the API workers, so the figures can be read per request."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def measured(pids: list[int], port: int, raw: bytes, expect: int, connections: int,
                   duration: float, profile: str | None) -> dict[str, float]:
    await drive(port, raw, expect, connections, 1.0)  # warm every worker's caches first
    spy = None
    if profile:
        spy = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pids[0]),
            "-d", str(int(duration)),
            "-r", "200", "--nonblocking", "--format", "raw" if profile.endswith(".txt") else "flamegraph",
            "-o", profile, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu0 = cpu_seconds(pids)
    result = await drive(port, raw, expect, connections, duration)
    result["server_cpu_us"] = (cpu_seconds(pids) - cpu0) / result["requests"] * 1e6
    if spy is not None:
        await spy.wait()
    return result


async def client_main(pids: list[int], port: int, state_dir: Path, connections: int, duration: float,
                      profile: str | None) -> dict[str, dict[str, float]]:
    password = (state_dir / "keys" / "demo-password").read_text().strip()
    body = json.dumps({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": "demo", "domain": {"name": "Default"}, "password": password}}},
        "scope": {"project": {"name": "demo", "domain": {"name": "Default"}}}}}).encode()
    issue = http_request("POST", "/identity/v3/auth/tokens", port, body)
    conn = await Connection.open(port)
    status, headers, _ = await conn.request(issue)  # the first login pays for argon2
    assert status == 201, status
    token = headers["x-subject-token"]
    conn.writer.close()
    results = {"issue": await measured(pids, port, issue, 201, connections, duration, profile)}
    validate = http_request("GET", "/identity/v3/auth/catalog", port, headers={"X-Auth-Token": token})
    results["validate"] = await measured(pids, port, validate, 200, connections, duration, None)
    return results


def wait_ready(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                if b"200" in s.recv(100):
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("API did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--profile", metavar="FILE",
                        help="py-spy profile of token issue on worker 1 (.svg, or .txt for collapsed stacks)")
    parser.add_argument("--serve", nargs=2, metavar=("STATE_DIR", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]))
        return

    import uvloop

    with tempfile.TemporaryDirectory(prefix="cloudland-bench-") as tmp:
        state_dir = Path(tmp) / "state"
        state_dir.mkdir()
        port = free_port()
        prepare(state_dir, port)
        servers = [subprocess.Popen([sys.executable, __file__, "--serve", str(state_dir), str(port)])
                   for _ in range(args.workers)]
        try:
            wait_ready(port)
            time.sleep(0.5 * args.workers)
            pids = [s.pid for s in servers]
            results = uvloop.run(client_main(pids, port, state_dir, args.connections, args.duration,
                                             args.profile))
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                server.wait(timeout=10)
    print(f"machine: {machine()}")
    print(f"api workers: {args.workers}, client connections: {args.connections}, {args.duration:.0f} s each "
          "(the load generator runs on the same cores)")
    for name, r in results.items():
        what = "POST /v3/auth/tokens (password, project scope)" if name == "issue" else \
            "GET /v3/auth/catalog (token validation)"
        print(f"{name:9s} {r['rps']:7.0f} req/s  p50 {r['p50_ms']:5.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
              f"server CPU {r['server_cpu_us']:4.0f} us/req  errors {int(r['errors'])}/{int(r['requests'])}  "
              f"{what}")
    print(f"load average during the run: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
