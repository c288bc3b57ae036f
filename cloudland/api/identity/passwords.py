"""Password hashing (argon2id) and a verified-credential cache.

Argon2 is deliberately slow (tens of ms), which would make it the whole cost of token issue.
The cache remembers, per process, that HMAC(key, user_id, password) verified against a given
stored hash; the key is random per process and never stored, so the cache reveals nothing
that the hash does not. A changed hash (password change) makes the entry useless at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections import OrderedDict

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()  # argon2id with argon2-cffi's RFC 9106 "low memory" defaults


def hash_password(password: str) -> str:
    return _hasher.hash(password)


async def hash_password_async(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class PasswordVerifier:
    """Checks passwords against stored hashes, remembering successful checks."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, str] = OrderedDict()
        self._max = max_entries

    def _digest(self, user_id: str, password: str) -> bytes:
        msg = user_id.encode() + b"\0" + password.encode()
        return hmac.new(self._key, msg, hashlib.sha256).digest()

    async def verify(self, user_id: str, password_hash: str | None, password: str) -> bool:
        if not password_hash:
            return False
        digest = self._digest(user_id, password)
        known = self._verified.get(digest)
        if known is not None and hmac.compare_digest(known, password_hash):
            return True
        # argon2 releases the GIL; a thread keeps the event loop serving other requests.
        if not await asyncio.to_thread(_verify, password_hash, password):
            return False
        self._verified[digest] = password_hash
        if len(self._verified) > self._max:
            self._verified.popitem(last=False)
        return True
