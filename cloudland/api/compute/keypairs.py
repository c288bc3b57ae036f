"""Nova keypairs (microversion 2.1 shapes: no ``type``)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
from typing import Annotated, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.compute.common import naive_time
from cloudland.api.context import RequestContext, require_context
from cloudland.api.deps import get_db
from cloudland.api.errors import bad_request, conflict, forbidden, not_found
from cloudland.db.models import Keypair

router = APIRouter()

Ctx = Annotated[RequestContext, Depends(require_context)]
Db = Annotated[AsyncSession, Depends(get_db)]

# Nova's default per-user keypair quota.
KEYPAIR_QUOTA = 100
_NAME_RE = re.compile(r"^(?! )[a-zA-Z0-9. _-]+(?<! )$")


def fingerprint(public_key: str) -> str:
    """Nova's fingerprint: colon-separated MD5 of the key blob; 400 when the key does not parse."""
    try:
        serialization.load_ssh_public_key(public_key.strip().encode())
        blob = base64.b64decode(public_key.split()[1], validate=True)
    except (ValueError, IndexError, binascii.Error, TypeError):
        raise bad_request("Keypair data is invalid: failed to generate fingerprint") from None
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def generate_key_pair() -> tuple[str, str]:
    """(private PEM, public OpenSSH) for a new RSA 2048 key; PEM like Nova, for paramiko too."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return private, f"{public} Generated-by-Cloudland"


def _user_for(ctx: RequestContext, request: Request) -> str:
    """Admins may act on another user's keypairs with ``?user_id=``."""
    user_id = request.query_params.get("user_id")
    if user_id and user_id != ctx.user_id:
        if not ctx.is_admin:
            raise forbidden()
        return user_id
    return ctx.user_id


async def get_keypair(db: AsyncSession, user_id: str, name: str) -> Keypair:
    """The named keypair of ``user_id`` or 404 (the servers API uses it for ``key_name``)."""
    keypair = await db.scalar(select(Keypair).where(Keypair.user_id == user_id, Keypair.name == name))
    if keypair is None:
        raise not_found(f"Keypair {name} not found for user {user_id}")
    return keypair


def _brief(keypair: Keypair) -> dict[str, Any]:
    return {"name": keypair.name, "public_key": keypair.public_key, "fingerprint": keypair.fingerprint}


@router.get("/os-keypairs")
async def list_keypairs(request: Request, ctx: Ctx, db: Db) -> dict[str, Any]:
    user_id = _user_for(ctx, request)
    rows = await db.scalars(select(Keypair).where(Keypair.user_id == user_id).order_by(Keypair.name))
    return {"keypairs": [{"keypair": _brief(k)} for k in rows]}


@router.get("/os-keypairs/{name}")
async def show_keypair(name: str, request: Request, ctx: Ctx, db: Db) -> dict[str, Any]:
    keypair = await get_keypair(db, _user_for(ctx, request), name)
    return {"keypair": {
        **_brief(keypair),
        "user_id": keypair.user_id,
        "id": keypair.id,
        "created_at": naive_time(keypair.created_at),
        "deleted": False,
        "deleted_at": None,
        "updated_at": None,
    }}


def _parse_create(payload: Any) -> tuple[str, str | None]:
    body = payload.get("keypair") if isinstance(payload, dict) else None
    if not isinstance(body, dict):
        raise bad_request("Invalid input for field/attribute keypair: a keypair object is required.")
    unknown = set(body) - {"name", "public_key"}
    if unknown:
        raise bad_request(f"Invalid input for field/attribute keypair. Additional properties are not "
                          f"allowed ({', '.join(sorted(unknown))} were unexpected)")
    name = body.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 255 or not _NAME_RE.match(name):
        raise bad_request("Keypair data is invalid: Keypair name contains unsafe characters")
    public_key = body.get("public_key")
    if public_key is not None and not isinstance(public_key, str):
        raise bad_request("Invalid input for field/attribute public_key.")
    return name, public_key


@router.post("/os-keypairs")
async def create_keypair(request: Request, ctx: Ctx, db: Db) -> dict[str, Any]:
    name, public_key = _parse_create(await request.json())
    user_id = ctx.user_id
    if await db.scalar(select(Keypair.id).where(Keypair.user_id == user_id, Keypair.name == name)):
        raise conflict(f"Key pair '{name}' already exists.")
    count = await db.scalar(select(func.count()).select_from(Keypair).where(Keypair.user_id == user_id))
    if (count or 0) >= KEYPAIR_QUOTA:
        raise forbidden("Quota exceeded, too many key pairs.", kind="OverQuota")
    private_key = None
    if public_key is None:
        private_key, public_key = await asyncio.to_thread(generate_key_pair)
    public_key = public_key.strip()
    keypair = Keypair(name=name, user_id=user_id, public_key=public_key,
                      fingerprint=fingerprint(public_key), type="ssh")
    db.add(keypair)
    try:
        await db.commit()
    except IntegrityError:
        raise conflict(f"Key pair '{name}' already exists.") from None
    result = {**_brief(keypair), "user_id": user_id}
    if private_key is not None:
        result["private_key"] = private_key
    return {"keypair": result}


@router.delete("/os-keypairs/{name}", status_code=202)
async def delete_keypair(name: str, request: Request, ctx: Ctx, db: Db) -> Response:
    keypair = await get_keypair(db, _user_for(ctx, request), name)
    await db.delete(keypair)
    await db.commit()
    return Response(status_code=202)
