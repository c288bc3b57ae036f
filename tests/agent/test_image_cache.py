"""ImageCache against a real local HTTP server."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cloudland.agent.image_cache import ImageCache, ImageError
from cloudland.bus.messages import ImageRef


@dataclass
class ImageServer:
    """Serves ``files`` over HTTP, slowly enough that concurrent fetches overlap."""

    url: str
    files: dict[str, bytes]
    requests: list[str] = field(default_factory=list)

    def ref(self, name: str, image_id: str | None = None, **overrides: object) -> ImageRef:
        data = self.files[name]
        fields: dict[str, object] = {
            "id": image_id or name, "url": f"{self.url}/{name}", "hash_algo": "sha512",
            "hash_value": hashlib.sha512(data).hexdigest(), "size": len(data),
        }
        fields.update(overrides)
        return ImageRef(**fields)  # type: ignore[arg-type]


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    files: dict[str, bytes] = {"cirros": b"QFI\xfb" + bytes(range(256)) * 4096}
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            data = files.get(self.path.lstrip("/"))
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            half = len(data) // 2
            self.wfile.write(data[:half])
            self.wfile.flush()
            threading.Event().wait(0.2)
            self.wfile.write(data[half:])

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ImageServer(url=f"http://127.0.0.1:{server.server_port}", files=files, requests=requests)
    finally:
        server.shutdown()
        server.server_close()


async def test_download_verifies_and_reuses(tmp_path: Path, image_server: ImageServer) -> None:
    cache = ImageCache(tmp_path / "images")
    ref = image_server.ref("cirros")
    path = await cache.ensure(ref)
    assert path == tmp_path / "images" / "cirros"
    assert path.read_bytes() == image_server.files["cirros"]
    assert await cache.ensure(ref) == path
    # A restarted agent trusts the recorded verification and does not fetch again.
    assert await ImageCache(tmp_path / "images").ensure(ref) == path
    assert len(image_server.requests) == 1
    assert [p.name for p in (tmp_path / "images").iterdir() if p.name.startswith(".")] == []


async def test_concurrent_ensures_share_one_download(tmp_path: Path, image_server: ImageServer) -> None:
    cache = ImageCache(tmp_path / "images")
    ref = image_server.ref("cirros")
    paths = await asyncio.gather(*(cache.ensure(ref) for _ in range(5)))
    assert len(set(paths)) == 1
    assert len(image_server.requests) == 1
    assert cache.downloads == 1


async def test_hash_mismatch_leaves_nothing(tmp_path: Path, image_server: ImageServer) -> None:
    cache = ImageCache(tmp_path / "images")
    ref = image_server.ref("cirros", hash_value="00" * 64)
    with pytest.raises(ImageError, match="checksum mismatch"):
        await cache.ensure(ref)
    assert list((tmp_path / "images").iterdir()) == []
    # The correct reference still works afterwards.
    assert (await cache.ensure(image_server.ref("cirros"))).exists()


async def test_size_mismatch_and_http_errors(tmp_path: Path, image_server: ImageServer) -> None:
    cache = ImageCache(tmp_path / "images")
    with pytest.raises(ImageError, match="size mismatch"):
        await cache.ensure(image_server.ref("cirros", size=10))
    image_server.files["gone"] = b""
    missing = image_server.ref("gone", url=f"{image_server.url}/nope")
    with pytest.raises(ImageError, match="HTTP 404"):
        await cache.ensure(missing)
    with pytest.raises(ImageError, match="unsupported hash algorithm"):
        await cache.ensure(image_server.ref("cirros", hash_algo="nosuchhash"))
    assert list((tmp_path / "images").iterdir()) == []


async def test_corrupted_cached_file_is_fetched_again(tmp_path: Path, image_server: ImageServer) -> None:
    cache = ImageCache(tmp_path / "images")
    ref = image_server.ref("cirros")
    path = await cache.ensure(ref)
    path.write_bytes(b"garbage")
    (tmp_path / "images" / "cirros.verified").unlink()
    assert (await ImageCache(tmp_path / "images").ensure(ref)).read_bytes() == image_server.files["cirros"]
    assert len(image_server.requests) == 2
