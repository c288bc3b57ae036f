"""Helpers shared by the admin routes: policy, request bodies, field checks, commits."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import Request
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.context import RequestContext, require_context
from cloudland.api.errors import bad_request, conflict
from cloudland.api.identity.authenticate import malformed
from cloudland.api.identity.service import IdentityService
from cloudland.api.policy import require_admin


async def admin_context(request: Request) -> RequestContext:
    """FastAPI dependency: a valid token with the admin role (403 otherwise)."""
    ctx = await require_context(request)
    require_admin(ctx)
    return ctx


async def entity_body(request: Request, key: str) -> dict[str, Any]:
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        raise bad_request(f"Malformed request body: {exc}")
    if not isinstance(body, dict) or not isinstance(body.get(key), dict):
        raise bad_request(f"Expecting to find {key} in request body.")
    return body[key]


def check_types(data: dict[str, Any], kind: str, fields: dict[str, type | tuple[type, ...]],
                required: tuple[str, ...] = ()) -> None:
    for name in required:
        if not data.get(name):
            raise malformed(f"{kind}.{name}")
    for name, expected in fields.items():
        if name in data and not isinstance(data[name], expected):
            raise malformed(f"{kind}.{name}")
    name = data.get("name")
    if name is not None and (not name.strip() or len(name) > 255):
        raise malformed(f"{kind}.name")


def truthy(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.lower() not in ("0", "false", "no", "off")


async def commit(svc: IdentityService, session: AsyncSession, what: str) -> None:
    """Commit; a unique-constraint failure is a 409; cached identity data is dropped either way."""
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise conflict(f"Conflict occurred attempting to store {what} - Duplicate entry.")
    finally:
        svc.changed()
