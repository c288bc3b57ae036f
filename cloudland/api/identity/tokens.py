"""Fernet tokens: issue, validate, revoke.

A token is ``MultiFernet.encrypt(msgpack(payload))``; the payload is a compact array (ids as
16 raw bytes when they are hex UUIDs). Nothing is stored per token: validation decrypts,
checks expiry and the revocation set, then re-checks user, scope and roles through the cached
``IdentityStore``, so disabling a user or removing a role invalidates their tokens.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from cryptography.fernet import InvalidToken
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cloudland.api.context import RequestContext
from cloudland.api.errors import unauthorized
from cloudland.api.identity.keys import load_fernet, rotate_fernet_keys
from cloudland.api.identity.store import (
    DomainInfo,
    IdentityStore,
    ProjectInfo,
    RoleInfo,
    SharedLoads,
    UserInfo,
)
from cloudland.db.models import RevokedToken

__all__ = ["IssuedToken", "Resolved", "TokenPayload", "TokenProvider", "rotate_fernet_keys"]

METHOD_BITS = {"password": 1, "token": 2, "application_credential": 4}
SCOPE_NONE, SCOPE_PROJECT, SCOPE_DOMAIN = 0, 1, 2


def _pack_id(value: str) -> bytes:
    if len(value) == 32:
        try:
            return b"\x01" + bytes.fromhex(value)
        except ValueError:
            pass
    return b"\x00" + value.encode()


def _unpack_id(value: bytes) -> str:
    return value[1:].hex() if value[:1] == b"\x01" else value[1:].decode()


def new_audit_id() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()


class _Wire(msgspec.Struct, array_like=True):
    version: int
    user_id: bytes
    methods: int
    scope_type: int
    scope_id: bytes
    issued_at: float
    expires_at: float
    audit_ids: list[str]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Wire)


@dataclass(frozen=True, slots=True)
class TokenPayload:
    user_id: str
    methods: tuple[str, ...]
    project_id: str | None
    domain_id: str | None
    issued_at: float
    expires_at: float
    audit_ids: tuple[str, ...]

    def to_bytes(self) -> bytes:
        bits = 0
        for m in self.methods:
            bits |= METHOD_BITS[m]
        scope_type, scope_id = SCOPE_NONE, ""
        if self.project_id:
            scope_type, scope_id = SCOPE_PROJECT, self.project_id
        elif self.domain_id:
            scope_type, scope_id = SCOPE_DOMAIN, self.domain_id
        return _encoder.encode(_Wire(1, _pack_id(self.user_id), bits, scope_type, _pack_id(scope_id),
                                     self.issued_at, self.expires_at, list(self.audit_ids)))

    @classmethod
    def from_bytes(cls, data: bytes) -> TokenPayload:
        w = _decoder.decode(data)
        methods = tuple(m for m, bit in METHOD_BITS.items() if w.methods & bit)
        scope_id = _unpack_id(w.scope_id)
        return cls(_unpack_id(w.user_id), methods,
                   scope_id if w.scope_type == SCOPE_PROJECT else None,
                   scope_id if w.scope_type == SCOPE_DOMAIN else None,
                   w.issued_at, w.expires_at, tuple(w.audit_ids))


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a (user, scope) pair means right now: the entities and the roles."""

    user: UserInfo
    user_domain: DomainInfo
    project: ProjectInfo | None
    project_domain: DomainInfo | None
    domain: DomainInfo | None
    roles: tuple[RoleInfo, ...]
    role_names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    payload: TokenPayload
    resolved: Resolved


def utc_naive(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)


class RevocationList:
    """Revoked audit ids, reloaded from the database every ``ttl`` seconds."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], ttl: float) -> None:
        self._sessionmaker = sessionmaker
        self.ttl = ttl
        self._ids: set[str] = set()
        self._next_refresh = 0.0
        self._loads = SharedLoads()  # the requests that find the list due wait for one reload
        self.refreshes = 0

    async def contains(self, audit_id: str) -> bool:
        if time.monotonic() >= self._next_refresh:
            await self._loads.run(None, self.refresh)
        return audit_id in self._ids

    async def refresh(self) -> None:
        self.refreshes += 1
        now = utc_naive(time.time())
        async with self._sessionmaker() as s:
            rows = await s.execute(select(RevokedToken.audit_id).where(RevokedToken.expires_at > now))
            self._ids = {r for (r,) in rows}
        self._next_refresh = time.monotonic() + self.ttl

    async def revoke(self, audit_id: str, expires_at: float) -> None:
        self._ids.add(audit_id)
        async with self._sessionmaker() as s, s.begin():
            await s.execute(delete(RevokedToken).where(RevokedToken.expires_at < utc_naive(time.time())))
            if await s.get(RevokedToken, audit_id) is None:
                s.add(RevokedToken(audit_id=audit_id, expires_at=utc_naive(expires_at)))


class TokenProvider:
    def __init__(self, keys_dir: Path, store: IdentityStore, revocations: RevocationList,
                 ttl_seconds: int) -> None:
        self.keys_dir = keys_dir
        self.store = store
        self.revocations = revocations
        self.ttl_seconds = ttl_seconds
        self._fernet = load_fernet(keys_dir)
        # Decrypting costs more than a dict lookup; validated payloads are remembered.
        self._decoded: OrderedDict[str, TokenPayload] = OrderedDict()
        # (user, project, domain) -> (store generation, monotonic expiry, Resolved); failures are not kept.
        self._resolved: dict[tuple[str, str | None, str | None], tuple[int, float, Resolved]] = {}

    def reload_keys(self) -> None:
        """Pick up rotated keys (call after ``rotate_fernet_keys``)."""
        self._fernet = load_fernet(self.keys_dir)
        self._decoded.clear()

    async def resolve(self, user_id: str, project_id: str | None = None,
                      domain_id: str | None = None) -> Resolved:
        """The user and scope as they are now, or 401 if any of it is gone or disabled."""
        key = (user_id, project_id, domain_id)
        hit = self._resolved.get(key)
        if hit is not None and hit[0] == self.store.generation and hit[1] > time.monotonic():
            return hit[2]
        generation = self.store.generation
        resolved = await self._resolve(user_id, project_id, domain_id)
        if generation == self.store.generation:
            if len(self._resolved) > 100_000:
                self._resolved.clear()
            self._resolved[key] = (generation, time.monotonic() + self.store.ttl, resolved)
        return resolved

    async def _resolve(self, user_id: str, project_id: str | None, domain_id: str | None) -> Resolved:
        store = self.store
        user = await store.user(user_id)
        if user is None or not user.enabled:
            raise unauthorized()
        user_domain = await store.domain(user.domain_id)
        if user_domain is None or not user_domain.enabled:
            raise unauthorized()
        project = project_domain = domain = None
        roles: tuple[RoleInfo, ...] = ()
        if project_id:
            project = await store.project(project_id)
            if project is None or not project.enabled:
                raise unauthorized()
            project_domain = await store.domain(project.domain_id)
            if project_domain is None or not project_domain.enabled:
                raise unauthorized()
            roles = await store.roles(user_id, "project", project_id)
        elif domain_id:
            domain = await store.domain(domain_id)
            if domain is None or not domain.enabled:
                raise unauthorized()
            roles = await store.roles(user_id, "domain", domain_id)
        if (project_id or domain_id) and not roles:
            raise unauthorized()
        return Resolved(user, user_domain, project, project_domain, domain, roles,
                        tuple(r.name for r in roles))

    async def issue(self, user_id: str, methods: list[str] | tuple[str, ...], *,
                    project_id: str | None = None, domain_id: str | None = None,
                    expires_at: float | None = None,
                    parent_audit_id: str | None = None) -> IssuedToken:
        """Issue a token; ``expires_at``/``parent_audit_id`` carry over when re-scoping."""
        resolved = await self.resolve(user_id, project_id, domain_id)
        now = time.time()
        expiry = now + self.ttl_seconds if expires_at is None else min(expires_at, now + self.ttl_seconds)
        audit_ids = (new_audit_id(),) if parent_audit_id is None else (new_audit_id(), parent_audit_id)
        payload = TokenPayload(user_id, tuple(dict.fromkeys(methods)), project_id, domain_id,
                               now, expiry, audit_ids)
        token = self._fernet.encrypt(payload.to_bytes()).decode()
        return IssuedToken(token, payload, resolved)

    def decode(self, token: str) -> TokenPayload:
        """Decrypt and check expiry; 401 if the token is not ours or has expired."""
        payload = self._decoded.get(token)
        if payload is None:
            try:
                payload = TokenPayload.from_bytes(self._fernet.decrypt(token.encode()))
            except (InvalidToken, msgspec.DecodeError, ValueError, UnicodeError, TypeError):
                raise unauthorized() from None
            self._decoded[token] = payload
            if len(self._decoded) > 50_000:
                self._decoded.popitem(last=False)
        if payload.expires_at <= time.time():
            self._decoded.pop(token, None)
            raise unauthorized()
        return payload

    async def inspect(self, token: str) -> tuple[TokenPayload, Resolved]:
        """Full validation: expiry, revocation, and the user/scope still being valid."""
        payload = self.decode(token)
        if await self.revocations.contains(payload.audit_ids[0]):
            raise unauthorized()
        resolved = await self.resolve(payload.user_id, payload.project_id, payload.domain_id)
        if payload.issued_at < resolved.user.tokens_valid_after:
            raise unauthorized()
        return payload, resolved

    async def validate(self, token: str) -> RequestContext:
        payload, r = await self.inspect(token)
        project = r.project
        return RequestContext(
            user_id=r.user.id, user_name=r.user.name, user_domain_id=r.user.domain_id,
            project_id=project.id if project else None,
            project_name=project.name if project else None,
            project_domain_id=project.domain_id if project else None,
            roles=list(r.role_names), audit_id=payload.audit_ids[0],
            expires_at=utc_naive(payload.expires_at),
            domain_id=r.domain.id if r.domain else None)

    async def revoke(self, payload: TokenPayload) -> None:
        await self.revocations.revoke(payload.audit_ids[0], payload.expires_at)
