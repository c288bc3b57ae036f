"""Per-hypervisor cache of base images, fetched from the image service and verified.

Layout: ``<cache_dir>/<image id>`` is a verified image; ``<image id>.verified`` beside it
records ``<algo>:<hash>:<size>`` so a restarted agent trusts the file without re-hashing.
Downloads go to ``.<image id>.<random>.part`` and are renamed into place only after the
hash and size match, so a crash or a bad download never leaves a usable-looking file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from pathlib import Path
from typing import IO

import httpx

from cloudland.bus.messages import ImageRef

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class ImageError(Exception):
    """The image could not be fetched or did not verify."""


class ImageCache:
    def __init__(self, cache_dir: Path, timeout: float = 60.0) -> None:
        self.cache_dir = cache_dir
        self.timeout = timeout
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        self.downloads = 0  # completed downloads, for tests and metrics
        cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in cache_dir.glob(".*.part"):
            stale.unlink(missing_ok=True)

    def path(self, image_id: str) -> Path:
        if not image_id or "/" in image_id or image_id.startswith("."):
            raise ImageError(f"invalid image id {image_id!r}")
        return self.cache_dir / image_id

    async def ensure(self, ref: ImageRef) -> Path:
        """The verified local copy of ``ref``, downloading it if needed.

        Concurrent calls for the same image share one download; a caller that is
        cancelled does not cancel the download for the others.
        """
        task = self._inflight.get(ref.id)
        if task is None:
            task = asyncio.create_task(self._ensure(ref), name=f"image-{ref.id}")
            self._inflight[ref.id] = task
            task.add_done_callback(lambda t: self._finished(ref.id, t))
        return await asyncio.shield(task)

    def _finished(self, image_id: str, task: asyncio.Task[Path]) -> None:
        if self._inflight.get(image_id) is task:
            del self._inflight[image_id]
        if not task.cancelled():
            task.exception()  # retrieved here so a download nobody awaits any more is not logged as lost

    async def _ensure(self, ref: ImageRef) -> Path:
        target = self.path(ref.id)
        marker = target.with_name(target.name + ".verified")
        expected = _marker_text(ref)
        if target.exists():
            if marker.exists() and marker.read_text().strip() == expected:
                return target
            if await asyncio.to_thread(_file_matches, target, ref):
                marker.write_text(expected + "\n")
                return target
            log.warning("cached image %s does not match its checksum; fetching again", ref.id)
            target.unlink(missing_ok=True)
            marker.unlink(missing_ok=True)
        await self._download(ref, target)
        marker.write_text(expected + "\n")
        self.downloads += 1
        return target

    async def _download(self, ref: ImageRef, target: Path) -> None:
        if not ref.hash_value:
            raise ImageError(f"image {ref.id} has no checksum; refusing to use it")
        hasher = _hasher(ref)
        part = self.cache_dir / f".{ref.id}.{secrets.token_hex(4)}.part"
        size = 0
        try:
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=True) as client:
                async with client.stream("GET", ref.url) as resp:
                    if resp.status_code != 200:
                        raise ImageError(f"image {ref.id}: download failed with HTTP {resp.status_code}")
                    with open(part, "wb") as f:
                        async for chunk in resp.aiter_bytes(_CHUNK):
                            size += len(chunk)
                            if ref.size and size > ref.size:
                                raise ImageError(
                                    f"image {ref.id}: size mismatch (more than the expected {ref.size} bytes)"
                                )
                            # hashlib releases the GIL on large buffers; keep the loop free.
                            await asyncio.to_thread(_write_and_hash, f, hasher, chunk)
                        await asyncio.to_thread(_flush, f)
            if ref.size and size != ref.size:
                raise ImageError(f"image {ref.id}: size mismatch (expected {ref.size} bytes, got {size})")
            actual = hasher.hexdigest()
            if actual != ref.hash_value.lower():
                raise ImageError(
                    f"image {ref.id}: {ref.hash_algo} checksum mismatch "
                    f"(expected {ref.hash_value}, got {actual})"
                )
            os.replace(part, target)
        except httpx.HTTPError as e:
            raise ImageError(f"image {ref.id}: download failed: {e}") from e
        finally:
            part.unlink(missing_ok=True)
        log.info("cached image %s (%d bytes)", ref.id, size)


def _marker_text(ref: ImageRef) -> str:
    return f"{ref.hash_algo}:{ref.hash_value.lower()}:{ref.size}"


def _hasher(ref: ImageRef) -> hashlib._Hash:
    try:
        return hashlib.new(ref.hash_algo)
    except ValueError:
        raise ImageError(f"image {ref.id}: unsupported hash algorithm {ref.hash_algo!r}")


def _write_and_hash(f: IO[bytes], hasher: hashlib._Hash, chunk: bytes) -> None:
    f.write(chunk)
    hasher.update(chunk)


def _flush(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())


def _file_matches(path: Path, ref: ImageRef) -> bool:
    if not ref.hash_value or (ref.size and path.stat().st_size != ref.size):
        return False
    hasher = _hasher(ref)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest() == ref.hash_value.lower()
