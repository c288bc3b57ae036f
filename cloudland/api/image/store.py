"""Image data on local disk: streamed in, hashed on the way, renamed into place when complete."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cloudland.api.errors import ApiError
from cloudland.config import Config
from cloudland.db.models import Image, Project

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per disk write/hash step (hashlib releases the GIL on large buffers)
HASH_ALGO = "sha512"
# Glance's default image_size_cap: 1 TiB.
MAX_IMAGE_SIZE = 1 << 40
_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# Formats qemu-img should be told explicitly, so a raw image is never probed as qcow2.
_QEMU_FORMATS = {
    "raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vdi": "vdi", "vhdx": "vhdx", "vhd": "vpc",
    "iso": "raw", "ploop": "parallels",
}


@dataclass(frozen=True)
class StoredData:
    size: int
    checksum: str  # md5 hex, Glance's ``checksum``
    os_hash_value: str  # sha512 hex
    os_hash_algo: str = HASH_ALGO


class _Writer:
    """A temp file plus the running hashes; every method runs in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: IO[bytes] = open(path, "xb")  # closed in finish() or abort()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sha = hashlib.sha512()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.md5.update(data)
        self.sha.update(data)
        self.file.write(data)
        self.size += len(data)

    def finish(self, target: Path) -> StoredData:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.path, target)
        return StoredData(self.size, self.md5.hexdigest(), self.sha.hexdigest())

    def abort(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class ImageStore:
    """Image files under ``root`` (``config.images_dir``), one file per image id."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, image_id: str) -> Path:
        if not _ID_RE.match(image_id):
            raise ValueError(f"invalid image id {image_id!r}")
        return self.root / image_id

    async def exists(self, image_id: str) -> bool:
        return await asyncio.to_thread(self.path(image_id).is_file)

    async def save(self, image_id: str, chunks: AsyncIterable[bytes],
                   max_size: int = MAX_IMAGE_SIZE) -> StoredData:
        """Write the stream to ``<root>/<id>`` atomically, hashing while it streams; 413 past max_size."""
        target = self.path(image_id)
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        temp = self.root / f".{image_id}.{secrets.token_hex(4)}.part"
        writer = await asyncio.to_thread(_Writer, temp)
        try:
            pending: list[bytes] = []
            buffered = 0
            async for chunk in chunks:
                if not chunk:
                    continue
                pending.append(chunk)
                buffered += len(chunk)
                if writer.size + buffered > max_size:
                    raise ApiError(413, f"Image exceeds the storage limit of {max_size} bytes.")
                if buffered >= CHUNK:
                    await asyncio.to_thread(writer.write, b"".join(pending))
                    pending, buffered = [], 0
            if pending:
                await asyncio.to_thread(writer.write, b"".join(pending))
            return await asyncio.to_thread(writer.finish, target)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(writer.abort))
            raise

    async def save_file(self, image_id: str, source: Path) -> StoredData:
        """Copy a local file into the store (hashing it)."""
        return await self.save(image_id, _read_file(source))

    async def delete(self, image_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.path(image_id).unlink)


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk
    finally:
        f.close()


async def virtual_size(path: Path, disk_format: str | None) -> int | None:
    """The guest-visible size from ``qemu-img info``; None when it cannot tell."""
    args = ["qemu-img", "info", "--output=json"]
    fmt = _QEMU_FORMATS.get(disk_format or "")
    if fmt:
        args += ["-f", fmt]
    try:
        proc = await asyncio.create_subprocess_exec(*args, str(path), stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        log.warning("qemu-img not usable: %s", exc)
        return None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    if proc.returncode != 0:
        log.info("qemu-img info failed for %s: %s", path, err.decode(errors="replace").strip())
        return None
    try:
        info: dict[str, Any] = json.loads(out)
        return int(info["virtual-size"])
    except (ValueError, KeyError, TypeError):
        return None


async def bootstrap_image(sessionmaker: async_sessionmaker[AsyncSession], config: Config, name: str,
                          path: Path, disk_format: str = "qcow2") -> str:
    """Publish a local file as a public image called ``name`` unless one exists; return its id."""
    async with sessionmaker() as db:
        existing = await db.scalar(select(Image.id).where(Image.name == name, Image.deleted.is_(False))
                                   .order_by(Image.created_at).limit(1))
        if existing:
            return existing
        owner = await db.scalar(select(Project.id).where(Project.name == config.identity.admin_project))
        image = Image(name=name, owner=owner, status="saving", visibility="public", protected=False,
                      disk_format=disk_format, container_format="bare", min_disk=0, min_ram=0,
                      tags=[], properties={}, deleted=False)
        db.add(image)
        await db.commit()
        store = ImageStore(config.images_dir)
        try:
            data = await store.save_file(image.id, path)
        except BaseException:
            await db.delete(image)
            await db.commit()
            raise
        image.size = data.size
        image.checksum = data.checksum
        image.os_hash_algo = data.os_hash_algo
        image.os_hash_value = data.os_hash_value
        image.virtual_size = await virtual_size(store.path(image.id), disk_format)
        image.status = "active"
        await db.commit()
        return image.id
