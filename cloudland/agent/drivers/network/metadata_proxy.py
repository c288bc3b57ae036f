"""The metadata proxy of one network on one host, and how the agent runs it.

A small asyncio HTTP proxy, one process per network: it listens on 169.254.169.254:80 *inside*
the network's DHCP namespace and connects to the metadata service from the agent's namespace
(the underlay or loopback). It gets the listening socket by ``setns`` into the DHCP namespace,
binding, and ``setns`` back, so no route from the tenant network to the host is needed.
Each request is forwarded as ``GET /internal/metadata/<path>`` with the network id, the
guest's source address and their HMAC (``cloudland.secrets.metadata_signature``); whatever
``X-*`` headers the guest sent are dropped. Only GET and HEAD, request head at most 8 KiB.

Run as ``python -m cloudland.agent.drivers.network.metadata_proxy --netns=… --network-id=…
--upstream=… --key-file=… --pid-file=… --log-file=…``: it binds, daemonises (double fork,
new session), writes its pid file and only then lets the starter exit 0, like dnsmasq.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cloudland.agent.drivers.network import pidfile
from cloudland.secrets import metadata_signature

METADATA_ADDRESS = "169.254.169.254"
METADATA_PORT = 80
MAX_HEAD = 8192
UPSTREAM_TIMEOUT = 10.0
PREFIX = "/internal/metadata"
_CLONE_NEWNET = 0x40000000
log = logging.getLogger("cloudland.metadata_proxy")


@dataclass(frozen=True)
class ProxyFiles:
    directory: Path

    @property
    def pid(self) -> Path:
        return self.directory / "metadata-proxy.pid"

    @property
    def log(self) -> Path:
        return self.directory / "metadata-proxy.log"


def proxy_args(netns_path: str, network_id: str, upstream: str, key_file: Path,
               files: ProxyFiles) -> list[str]:
    return [sys.executable, "-m", "cloudland.agent.drivers.network.metadata_proxy",
            f"--netns={netns_path}", f"--network-id={network_id}", f"--upstream={upstream}",
            f"--key-file={key_file}", f"--pid-file={files.pid}", f"--log-file={files.log}"]


# --- control, from the agent ------------------------------------------------------------


def running(files: ProxyFiles) -> tuple[int, list[str]] | None:
    """(pid, argv) of the live proxy that owns this pid file."""
    return pidfile.running(files.pid)


async def ensure(args: list[str], files: ProxyFiles) -> int:
    """Adopt the running proxy if its command line is ``args``, else (re)start it."""
    found = running(files)
    if found is not None and found[1][1:] == args[1:]:
        return found[0]
    if found is not None:
        await stop(files)
    files.directory.mkdir(parents=True, exist_ok=True)
    files.pid.unlink(missing_ok=True)
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip()
        raise RuntimeError(f"metadata proxy failed ({proc.returncode}): {message}")
    found = running(files)
    if found is None:
        raise RuntimeError(f"metadata proxy started but {files.pid} names no live proxy")
    return found[0]


async def stop(files: ProxyFiles, timeout: float = 5.0) -> None:
    await pidfile.stop(files.pid, timeout)


# --- the proxy process ------------------------------------------------------------------


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def listen_in_netns(netns_path: str, address: str, port: int) -> socket.socket:
    """A listening TCP socket that lives in another network namespace."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # The address may be added a moment after us; bind anyway.
            sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
            sock.bind((address, port))
            sock.listen(128)
            sock.setblocking(False)
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)
    return sock


def _reply(status: str, body: str) -> bytes:
    data = body.encode()
    return (f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n\r\n").encode() + data


class Proxy:
    def __init__(self, network_id: str, upstream: str, key: bytes) -> None:
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bad upstream URL {upstream!r}")
        self.network_id = network_id
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = parts.scheme == "https"
        self.base = parts.path.rstrip("/")
        self.key = key

    def upstream_request(self, method: str, path: str, source: str) -> bytes:
        signature = metadata_signature(self.key, self.network_id, source)
        return (f"{method} {self.base}{PREFIX}{path} HTTP/1.0\r\nHost: {self.host}:{self.port}\r\n"
                f"X-Cloudland-Network-Id: {self.network_id}\r\nX-Forwarded-For: {source}\r\n"
                f"X-Cloudland-Signature: {signature}\r\nConnection: close\r\n\r\n").encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except Exception as e:  # one bad client never stops the proxy
            log.warning("request failed: %s", e)
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = writer.get_extra_info("peername")[0]
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError):
            writer.write(_reply("400 Bad Request", "bad request\n"))
            return
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or parts[0] not in ("GET", "HEAD") or not parts[1].startswith("/"):
            writer.write(_reply("405 Method Not Allowed", "only GET and HEAD\n"))
            return
        method, path = parts[0], parts[1]
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self.ssl or None), UPSTREAM_TIMEOUT)
        except (OSError, TimeoutError) as e:
            log.warning("upstream unreachable: %s", e)
            writer.write(_reply("502 Bad Gateway", "metadata service unreachable\n"))
            return
        try:
            up_writer.write(self.upstream_request(method, path, source))
            await up_writer.drain()
            while chunk := await asyncio.wait_for(up_reader.read(65536), UPSTREAM_TIMEOUT):
                writer.write(chunk)
                await writer.drain()
        finally:
            up_writer.close()


async def _serve(sock: socket.socket, proxy: Proxy) -> None:
    server = await asyncio.start_server(proxy.handle, sock=sock, limit=MAX_HEAD)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _daemonize(pid_file: Path, log_file: Path) -> None:
    """Double fork; the original process exits 0 once the pid file is written."""
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        ok = os.read(r, 1)
        os._exit(0 if ok == b"1" else 1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, pid_file)
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(null)
    os.close(out)
    os.write(w, b"1")
    os.close(w)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Cloudland metadata proxy for one network")
    parser.add_argument("--netns", required=True)
    parser.add_argument("--network-id", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--key-file", required=True, type=Path)
    parser.add_argument("--pid-file", required=True, type=Path)
    parser.add_argument("--log-file", required=True, type=Path)
    parser.add_argument("--address", default=METADATA_ADDRESS)
    parser.add_argument("--port", default=METADATA_PORT, type=int)
    parser.add_argument("--foreground", action="store_true")
    a = parser.parse_args(argv)
    key = bytes.fromhex(a.key_file.read_text().strip())
    proxy = Proxy(a.network_id, a.upstream, key)
    sock = listen_in_netns(a.netns, a.address, a.port)
    if not a.foreground:
        _daemonize(a.pid_file, a.log_file)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_serve(sock, proxy))


if __name__ == "__main__":
    main()
