"""``/v3/users``: admin CRUD; a user may read itself, list its projects, change its password."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import delete, select

from cloudland.api.context import RequestContext, require_context
from cloudland.api.errors import conflict, forbidden, not_found, unauthorized
from cloudland.api.identity import render
from cloudland.api.identity.admin import admin_context, check_types, commit, entity_body, truthy
from cloudland.api.identity.authenticate import malformed
from cloudland.api.identity.passwords import hash_password_async
from cloudland.api.identity.render import JsonResponse
from cloudland.api.identity.service import identity
from cloudland.db.models import Domain, Project, RoleAssignment, User

router = APIRouter()
NULLABLE_STR = (str, type(None))
FIELDS = {"name": str, "description": NULLABLE_STR, "enabled": bool, "domain_id": str,
          "password": NULLABLE_STR, "default_project_id": NULLABLE_STR, "email": NULLABLE_STR,
          "options": dict}
COLUMNS = ("name", "enabled", "default_project_id", "email")
IGNORED = {"id", "links", "domain_id", "password", "password_expires_at", "description",
           "tokens_valid_after"}


def user_not_found(user_id: str) -> Exception:
    return not_found(f"Could not find user: {user_id}.")


def _duplicate(name: str, domain_id: str) -> Exception:
    return conflict(f"Conflict occurred attempting to store user - Duplicate entry found with "
                    f"name {name} at domain ID {domain_id}.")


def _require_self_or_admin(ctx: RequestContext, user_id: str) -> None:
    if not ctx.is_admin and ctx.user_id != user_id:
        raise forbidden()


async def _set_password(u: User, password: str) -> None:
    u.password_hash = await hash_password_async(password)
    # As Keystone: changing a password revokes the user's existing tokens.
    u.extra = {**(u.extra or {}), "tokens_valid_after": time.time()}


def _extra(data: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(extra)
    out.update({k: v for k, v in data.items() if k not in COLUMNS and k not in IGNORED})
    return out


@router.get("/v3/users")
async def list_users(request: Request, name: str | None = None, domain_id: str | None = None,
                     enabled: str | None = None, ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    stmt = select(User).order_by(User.name)
    if name is not None:
        stmt = stmt.where(User.name == name)
    if domain_id is not None:
        stmt = stmt.where(User.domain_id == domain_id)
    if truthy(enabled) is not None:
        stmt = stmt.where(User.enabled.is_(truthy(enabled)))
    async with svc.sessionmaker() as s:
        rows = (await s.execute(stmt)).scalars().all()
    return JsonResponse(render.listing(svc.base, "users", "users", [render.user(svc.base, u) for u in rows]))


@router.get("/v3/users/{user_id}")
async def get_user(request: Request, user_id: str,
                   ctx: RequestContext = Depends(require_context)) -> Response:
    svc = identity(request)
    _require_self_or_admin(ctx, user_id)
    async with svc.sessionmaker() as s:
        u = await s.get(User, user_id)
    if u is None:
        raise user_not_found(user_id)
    return JsonResponse({"user": render.user(svc.base, u)})


@router.post("/v3/users", status_code=201)
async def create_user(request: Request, ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    data = await entity_body(request, "user")
    check_types(data, "user", FIELDS, required=("name",))
    domain_id = data.get("domain_id") or ctx.project_domain_id or ctx.domain_id or "default"
    async with svc.sessionmaker() as s:
        if await s.get(Domain, domain_id) is None:
            raise not_found(f"Could not find domain: {domain_id}.")
        stmt = select(User.id).where(User.name == data["name"], User.domain_id == domain_id)
        if (await s.execute(stmt)).first():
            raise _duplicate(data["name"], domain_id)
        u = User(name=data["name"], domain_id=domain_id, enabled=data.get("enabled", True),
                 default_project_id=data.get("default_project_id"), email=data.get("email"),
                 description=data.get("description") or "", extra=_extra(data, {}))
        if data.get("password"):
            u.password_hash = await hash_password_async(data["password"])
        s.add(u)
        await commit(svc, s, "user")
    return JsonResponse({"user": render.user(svc.base, u)}, status_code=201)


@router.patch("/v3/users/{user_id}")
async def update_user(request: Request, user_id: str,
                      ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    data = await entity_body(request, "user")
    check_types(data, "user", FIELDS)
    async with svc.sessionmaker() as s:
        u = await s.get(User, user_id)
        if u is None:
            raise user_not_found(user_id)
        if "domain_id" in data and data["domain_id"] != u.domain_id:
            raise malformed("user.domain_id")
        if "name" in data and data["name"] != u.name:
            stmt = select(User.id).where(User.name == data["name"], User.domain_id == u.domain_id)
            if (await s.execute(stmt)).first():
                raise _duplicate(data["name"], u.domain_id)
        for key in COLUMNS:
            if key in data:
                setattr(u, key, data[key])
        if "description" in data:
            u.description = data["description"] or ""
        u.extra = _extra(data, u.extra or {})
        if data.get("password"):
            await _set_password(u, data["password"])
        await commit(svc, s, "user")
    return JsonResponse({"user": render.user(svc.base, u)})


@router.delete("/v3/users/{user_id}", status_code=204)
async def delete_user(request: Request, user_id: str,
                      ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    async with svc.sessionmaker() as s:
        u = await s.get(User, user_id)
        if u is None:
            raise user_not_found(user_id)
        await s.execute(delete(RoleAssignment).where(RoleAssignment.user_id == user_id))
        await s.delete(u)
        await commit(svc, s, "user")
    return Response(status_code=204)


@router.post("/v3/users/{user_id}/password", status_code=204)
async def change_password(request: Request, user_id: str,
                          ctx: RequestContext = Depends(require_context)) -> Response:
    svc = identity(request)
    if ctx.user_id != user_id:
        raise forbidden("You may only change your own password.")
    data = await entity_body(request, "user")
    new, original = data.get("password"), data.get("original_password")
    if not isinstance(new, str) or not new:
        raise malformed("user.password")
    if not isinstance(original, str):
        raise malformed("user.original_password")
    async with svc.sessionmaker() as s:
        u = await s.get(User, user_id)
        if u is None:
            raise user_not_found(user_id)
        if not await svc.passwords.verify(u.id, u.password_hash, original):
            raise unauthorized()
        await _set_password(u, new)
        await commit(svc, s, "user")
    return Response(status_code=204)


@router.get("/v3/users/{user_id}/projects")
async def user_projects(request: Request, user_id: str,
                        ctx: RequestContext = Depends(require_context)) -> Response:
    svc = identity(request)
    _require_self_or_admin(ctx, user_id)
    async with svc.sessionmaker() as s:
        if await s.get(User, user_id) is None:
            raise user_not_found(user_id)
        targets = select(RoleAssignment.target_id).where(RoleAssignment.user_id == user_id,
                                                         RoleAssignment.target_type == "project")
        stmt = select(Project).where(Project.id.in_(targets)).order_by(Project.name)
        rows = (await s.execute(stmt)).scalars().all()
    items = [render.project(svc.base, p) for p in rows]
    return JsonResponse(render.listing(svc.base, "projects", f"users/{user_id}/projects", items))
