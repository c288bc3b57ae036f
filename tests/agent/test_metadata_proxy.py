"""The metadata proxy process against the real kernel: a listener inside a namespace, signed
forwarding to an upstream in the test's namespace, adoption and clean stop."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from cloudland.agent.drivers.network import metadata_proxy, netlink, pidfile
from cloudland.secrets import load_or_create_secret, metadata_signature

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"cl-t{secrets.token_hex(4)}-md"
    netns.create(name)
    try:
        with IPRoute(netns=name, flags=0) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            ipr.addr("add", index=lo, address=metadata_proxy.METADATA_ADDRESS, prefixlen=32)
        yield name
    finally:
        netns.remove(name)


def _get_in_netns(ns: str, request: bytes) -> bytes:
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(netlink.netns_path(ns), os.O_RDONLY)
    try:
        metadata_proxy._setns(target)
        try:
            sock = socket.socket()
        finally:
            metadata_proxy._setns(own)
    finally:
        os.close(own)
        os.close(target)
    with sock:
        sock.settimeout(5)
        sock.connect((metadata_proxy.METADATA_ADDRESS, 80))
        sock.sendall(request)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


async def test_proxy_forwards_signed_and_is_adopted_and_stopped(namespace: str, tmp_path: Path) -> None:
    seen: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    key = load_or_create_secret(tmp_path / "keys", "metadata-proxy.key")
    files = metadata_proxy.ProxyFiles(tmp_path / "dhcp")
    args = metadata_proxy.proxy_args(netlink.netns_path(namespace), "net-1", f"http://127.0.0.1:{port}",
                                     tmp_path / "keys" / "metadata-proxy.key", files)
    async with server:
        pid = await metadata_proxy.ensure(args, files)
        try:
            assert await metadata_proxy.ensure(args, files) == pid  # adopted, not restarted
            reply = await asyncio.to_thread(
                _get_in_netns, namespace,
                b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: x\r\n"
                b"X-Cloudland-Network-Id: forged\r\nX-Forwarded-For: 10.9.9.9\r\n\r\n")
            assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"hello")
            head = seen[0].decode()
            assert head.startswith("GET /internal/metadata/openstack/latest/meta_data.json HTTP/1.0")
            source = metadata_proxy.METADATA_ADDRESS
            sig = metadata_signature(key, "net-1", source)
            assert "X-Cloudland-Network-Id: net-1\r\n" in head and "forged" not in head
            assert f"X-Forwarded-For: {source}\r\n" in head and "10.9.9.9" not in head
            assert f"X-Cloudland-Signature: {sig}\r\n" in head
            post = await asyncio.to_thread(_get_in_netns, namespace, b"POST / HTTP/1.0\r\n\r\n")
            assert post.startswith(b"HTTP/1.0 405") and len(seen) == 1
        finally:
            await metadata_proxy.stop(files)
    assert metadata_proxy.running(files) is None
    assert pidfile.cmdline(pid) is None
