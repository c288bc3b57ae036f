"""What the agent must remember about each instance across its own restarts.

One JSON file per instance, ``<directory>/<instance id>.json``: the last spec the agent
applied (so ``EnsureInstanceAbsent``, which carries only the id, knows which ports to
unplug) and the reboot generation already applied (so a restarted agent does not reboot
a guest again). Written atomically (temp file, fsync, rename) and only when it changed.
The files hold user data and keys, so they are private to root.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import msgspec

from cloudland.bus.messages import InstanceSpec

log = logging.getLogger(__name__)


class InstanceRecord(msgspec.Struct, kw_only=True):
    spec: InstanceSpec
    applied_reboot_generation: int = 0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(InstanceRecord)


class InstanceStateStore:
    """Records by instance id, in memory and (unless ``directory`` is None) on disk."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._records: dict[str, InstanceRecord] = {}
        self._written: dict[str, bytes] = {}

    def load(self) -> dict[str, InstanceRecord]:
        """Read every record from disk; unreadable files are logged and skipped."""
        self._records.clear()
        self._written.clear()
        if self.directory is None or not self.directory.is_dir():
            return {}
        for path in self.directory.glob("*.json"):
            data = path.read_bytes()
            try:
                record = _decoder.decode(data)
            except msgspec.DecodeError as e:
                log.error("ignoring unreadable instance record %s: %s", path, e)
                continue
            self._records[record.spec.id] = record
            self._written[record.spec.id] = data
        return dict(self._records)

    def get(self, instance_id: str) -> InstanceRecord | None:
        return self._records.get(instance_id)

    def ids(self) -> list[str]:
        return list(self._records)

    async def save(self, record: InstanceRecord) -> None:
        iid = record.spec.id
        self._records[iid] = record
        if self.directory is None:
            return
        data = _encoder.encode(record)
        if self._written.get(iid) == data:
            return
        await asyncio.to_thread(_write_atomic, self._file(iid), data)
        self._written[iid] = data

    async def forget(self, instance_id: str) -> None:
        self._records.pop(instance_id, None)
        self._written.pop(instance_id, None)
        if self.directory is not None:
            await asyncio.to_thread(self._file(instance_id).unlink, True)

    def _file(self, instance_id: str) -> Path:
        assert self.directory is not None
        if not instance_id or "/" in instance_id or instance_id.startswith("."):
            raise ValueError(f"invalid instance id {instance_id!r}")
        return self.directory / f"{instance_id}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
