"""Per-installation secrets, generated on first use and never committed, and signed URLs."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path


def load_or_create_secret(keys_dir: Path, name: str, nbytes: int = 32) -> bytes:
    """Read ``keys_dir/name``; create it (mode 0600) with random bytes if absent."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = keys_dir / name
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        value = secrets.token_bytes(nbytes)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, value.hex().encode())
        finally:
            os.close(fd)
        return value
    except FileExistsError:  # pragma: no cover - raced with another process
        return bytes.fromhex(path.read_text().strip())


class UrlSigner:
    """HMAC signatures for short-lived URLs (agents fetching image data)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def sign(self, resource: str, ttl: float = 3600) -> tuple[int, str]:
        expires = int(time.time() + ttl)
        return expires, self._mac(resource, expires)

    def verify(self, resource: str, expires: int, signature: str) -> bool:
        if expires < time.time():
            return False
        return hmac.compare_digest(self._mac(resource, expires), signature)

    def _mac(self, resource: str, expires: int) -> str:
        return hmac.new(self._key, f"{resource}|{expires}".encode(), hashlib.sha256).hexdigest()


def url_signer(keys_dir: Path) -> UrlSigner:
    return UrlSigner(load_or_create_secret(keys_dir, "url-signing.key"))


METADATA_PROXY_KEY = "metadata-proxy.key"


def metadata_signature(key: bytes, network_id: str, address: str) -> str:
    """What the metadata proxy sends and the metadata service checks (Neutron's
    X-Instance-ID-Signature, but over the network id and the guest's address)."""
    return hmac.new(key, f"metadata|{network_id}|{address}".encode(), hashlib.sha256).hexdigest()


def metadata_key(keys_dir: Path) -> bytes:
    return load_or_create_secret(keys_dir, METADATA_PROXY_KEY)
