"""Fernet key repository: per-installation keys in ``<keys_dir>/fernet``, rotated like Keystone.

Files are named by integer; the highest number is the primary (signs new tokens), the others
still validate. ``rotate_fernet_keys`` writes a new primary and drops the oldest beyond
``max_active``, so a token outlives a rotation as long as fewer than ``max_active - 1``
rotations happen within its lifetime.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, MultiFernet


def _key_files(repo: Path) -> list[tuple[int, Path]]:
    found = []
    for path in repo.iterdir():
        if path.name.isdigit():
            found.append((int(path.name), path))
    return sorted(found)


def _write_key(repo: Path, number: int) -> None:
    """Write key ``number`` atomically; if another process got there first, keep its key."""
    tmp = repo / f".{number}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, Fernet.generate_key())
    finally:
        os.close(fd)
    try:
        os.link(tmp, repo / str(number))  # atomic and never overwrites (API workers start together)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _repo(keys_dir: Path) -> Path:
    repo = keys_dir / "fernet"
    repo.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(repo, 0o700)
    return repo


def ensure_fernet_keys(keys_dir: Path) -> None:
    """Create the repository with one key on first use."""
    repo = _repo(keys_dir)
    if not _key_files(repo):
        _write_key(repo, 1)


def rotate_fernet_keys(keys_dir: Path, max_active: int = 3) -> None:
    """Add a new primary key; keep at most ``max_active`` keys (the newest ones)."""
    if max_active < 2:
        raise ValueError("max_active must be at least 2 so issued tokens survive a rotation")
    ensure_fernet_keys(keys_dir)
    repo = _repo(keys_dir)
    files = _key_files(repo)
    _write_key(repo, files[-1][0] + 1)
    for _, path in _key_files(repo)[:-max_active]:
        path.unlink()


def load_fernet(keys_dir: Path) -> MultiFernet:
    """All keys, primary first (MultiFernet encrypts with the first, decrypts with any)."""
    ensure_fernet_keys(keys_dir)
    files = _key_files(_repo(keys_dir))
    return MultiFernet([Fernet(path.read_bytes().strip()) for _, path in reversed(files)])
