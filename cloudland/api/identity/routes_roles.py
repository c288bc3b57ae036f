"""``/v3/roles``, role grants on projects and domains, and ``/v3/role_assignments``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.context import RequestContext
from cloudland.api.errors import ApiError, conflict, not_found
from cloudland.api.identity import render
from cloudland.api.identity.admin import admin_context, check_types, commit, entity_body, truthy
from cloudland.api.identity.render import JsonResponse
from cloudland.api.identity.service import identity
from cloudland.db.models import Domain, Project, Role, RoleAssignment, User

router = APIRouter()
FIELDS = {"name": str, "description": (str, type(None)), "options": dict}
TARGETS = {"projects": ("project", Project), "domains": ("domain", Domain)}


def role_not_found(role_id: str) -> ApiError:
    return not_found(f"Could not find role: {role_id}.")


@router.get("/v3/roles")
async def list_roles(request: Request, name: str | None = None,
                     ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    stmt = select(Role).order_by(Role.name)
    if name is not None:
        stmt = stmt.where(Role.name == name)
    async with svc.sessionmaker() as s:
        rows = (await s.execute(stmt)).scalars().all()
    return JsonResponse(render.listing(svc.base, "roles", "roles", [render.role(svc.base, r) for r in rows]))


@router.get("/v3/roles/{role_id}")
async def get_role(request: Request, role_id: str, ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    async with svc.sessionmaker() as s:
        r = await s.get(Role, role_id)
    if r is None:
        raise role_not_found(role_id)
    return JsonResponse({"role": render.role(svc.base, r)})


@router.post("/v3/roles", status_code=201)
async def create_role(request: Request, ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    data = await entity_body(request, "role")
    check_types(data, "role", FIELDS, required=("name",))
    async with svc.sessionmaker() as s:
        if (await s.execute(select(Role.id).where(Role.name == data["name"]))).first():
            raise conflict(f"Conflict occurred attempting to store role - Duplicate entry found with "
                           f"name {data['name']}.")
        r = Role(name=data["name"], description=data.get("description") or "")
        s.add(r)
        await commit(svc, s, "role")
    return JsonResponse({"role": render.role(svc.base, r)}, status_code=201)


@router.patch("/v3/roles/{role_id}")
async def update_role(request: Request, role_id: str,
                      ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    data = await entity_body(request, "role")
    check_types(data, "role", FIELDS)
    async with svc.sessionmaker() as s:
        r = await s.get(Role, role_id)
        if r is None:
            raise role_not_found(role_id)
        if "name" in data:
            r.name = data["name"]
        if "description" in data:
            r.description = data["description"] or ""
        await commit(svc, s, "role")
    return JsonResponse({"role": render.role(svc.base, r)})


@router.delete("/v3/roles/{role_id}", status_code=204)
async def delete_role(request: Request, role_id: str,
                      ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    async with svc.sessionmaker() as s:
        r = await s.get(Role, role_id)
        if r is None:
            raise role_not_found(role_id)
        await s.execute(delete(RoleAssignment).where(RoleAssignment.role_id == role_id))
        await s.delete(r)
        await commit(svc, s, "role")
    return Response(status_code=204)


async def _check_grant_parts(s: AsyncSession, collection: str, target_id: str, user_id: str,
                             role_id: str | None) -> str:
    if collection not in TARGETS:
        raise not_found("The resource could not be found.")
    target_type, model = TARGETS[collection]
    if await s.get(model, target_id) is None:
        raise not_found(f"Could not find {target_type}: {target_id}.")
    if await s.get(User, user_id) is None:
        raise not_found(f"Could not find user: {user_id}.")
    if role_id is not None and await s.get(Role, role_id) is None:
        raise role_not_found(role_id)
    return target_type


def _grant_key(target_type: str, target_id: str, user_id: str, role_id: str) -> dict[str, str]:
    return {"user_id": user_id, "target_type": target_type, "target_id": target_id, "role_id": role_id}


@router.put("/v3/{collection}/{target_id}/users/{user_id}/roles/{role_id}", status_code=204)
async def grant_role(request: Request, collection: str, target_id: str, user_id: str, role_id: str,
                     ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    async with svc.sessionmaker() as s:
        target_type = await _check_grant_parts(s, collection, target_id, user_id, role_id)
        key = _grant_key(target_type, target_id, user_id, role_id)
        if await s.get(RoleAssignment, key) is None:
            s.add(RoleAssignment(**key))
            await commit(svc, s, "role assignment")
    return Response(status_code=204)


@router.head("/v3/{collection}/{target_id}/users/{user_id}/roles/{role_id}", status_code=204)
async def check_grant(request: Request, collection: str, target_id: str, user_id: str, role_id: str,
                      ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    async with svc.sessionmaker() as s:
        target_type = await _check_grant_parts(s, collection, target_id, user_id, role_id)
        if await s.get(RoleAssignment, _grant_key(target_type, target_id, user_id, role_id)) is None:
            raise not_found(f"Could not find role assignment with role: {role_id}, user: {user_id}.")
    return Response(status_code=204)


@router.delete("/v3/{collection}/{target_id}/users/{user_id}/roles/{role_id}", status_code=204)
async def revoke_grant(request: Request, collection: str, target_id: str, user_id: str, role_id: str,
                       ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    async with svc.sessionmaker() as s:
        target_type = await _check_grant_parts(s, collection, target_id, user_id, role_id)
        grant = await s.get(RoleAssignment, _grant_key(target_type, target_id, user_id, role_id))
        if grant is None:
            raise not_found(f"Could not find role assignment with role: {role_id}, user: {user_id}.")
        await s.delete(grant)
        await commit(svc, s, "role assignment")
    return Response(status_code=204)


@router.get("/v3/{collection}/{target_id}/users/{user_id}/roles")
async def list_grants(request: Request, collection: str, target_id: str, user_id: str,
                      ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    async with svc.sessionmaker() as s:
        target_type = await _check_grant_parts(s, collection, target_id, user_id, None)
        stmt = (select(Role).join(RoleAssignment, RoleAssignment.role_id == Role.id)
                .where(RoleAssignment.user_id == user_id, RoleAssignment.target_type == target_type,
                       RoleAssignment.target_id == target_id).order_by(Role.name))
        rows = (await s.execute(stmt)).scalars().all()
    items = [render.role(svc.base, r) for r in rows]
    path = f"{collection}/{target_id}/users/{user_id}/roles"
    return JsonResponse(render.listing(svc.base, "roles", path, items))


async def _names(s: AsyncSession, grants: list[RoleAssignment]) -> dict[tuple[str, str], dict[str, Any]]:
    """Names for include_names: (kind, id) -> {name, domain?}."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    domains = {d.id: d.name for d in (await s.execute(select(Domain))).scalars()}
    user_ids = {g.user_id for g in grants}
    for u in (await s.execute(select(User).where(User.id.in_(user_ids)))).scalars():
        out[("user", u.id)] = {"name": u.name,
                               "domain": {"id": u.domain_id, "name": domains.get(u.domain_id)}}
    role_ids = {g.role_id for g in grants}
    for r in (await s.execute(select(Role).where(Role.id.in_(role_ids)))).scalars():
        out[("role", r.id)] = {"name": r.name}
    project_ids = {g.target_id for g in grants if g.target_type == "project"}
    for p in (await s.execute(select(Project).where(Project.id.in_(project_ids)))).scalars():
        out[("project", p.id)] = {"name": p.name,
                                  "domain": {"id": p.domain_id, "name": domains.get(p.domain_id)}}
    for domain_id, name in domains.items():
        out[("domain", domain_id)] = {"name": name}
    return out


@router.get("/v3/role_assignments")
async def list_role_assignments(request: Request,
                                ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    q = request.query_params
    stmt = select(RoleAssignment)
    if q.get("user.id"):
        stmt = stmt.where(RoleAssignment.user_id == q["user.id"])
    if q.get("role.id"):
        stmt = stmt.where(RoleAssignment.role_id == q["role.id"])
    for kind in ("project", "domain"):
        if q.get(f"scope.{kind}.id"):
            stmt = stmt.where(RoleAssignment.target_type == kind,
                              RoleAssignment.target_id == q[f"scope.{kind}.id"])
    if "group.id" in q:
        stmt = stmt.where(RoleAssignment.user_id.is_(None))  # no groups
    include_names = "include_names" in q and truthy(q.get("include_names") or "true")
    async with svc.sessionmaker() as s:
        grants = list((await s.execute(stmt)).scalars().all())
        names = await _names(s, grants) if include_names else {}
    items = []
    base = f"{svc.base}/identity/v3"
    for g in grants:
        collection = "projects" if g.target_type == "project" else "domains"
        item = {"role": {"id": g.role_id, **names.get(("role", g.role_id), {})},
                "user": {"id": g.user_id, **names.get(("user", g.user_id), {})},
                "scope": {g.target_type: {"id": g.target_id, **names.get((g.target_type, g.target_id), {})}},
                "links": {"assignment":
                          f"{base}/{collection}/{g.target_id}/users/{g.user_id}/roles/{g.role_id}"}}
        items.append(item)
    return JsonResponse(render.listing(svc.base, "role_assignments", "role_assignments", items))
