"""``/v3/domains``: admin CRUD; a domain must be disabled before it is deleted."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import delete, select

from cloudland.api.context import RequestContext, require_context
from cloudland.api.errors import conflict, forbidden, not_found
from cloudland.api.identity import render
from cloudland.api.identity.admin import admin_context, check_types, commit, entity_body, truthy
from cloudland.api.identity.render import JsonResponse
from cloudland.api.identity.service import identity
from cloudland.db.models import Domain, Project, RoleAssignment, User

router = APIRouter()
FIELDS = {"name": str, "description": str, "enabled": bool, "id": str}


def domain_not_found(domain_id: str) -> Exception:
    return not_found(f"Could not find domain: {domain_id}.")


@router.get("/v3/domains")
async def list_domains(request: Request, name: str | None = None, enabled: str | None = None,
                       ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    stmt = select(Domain).order_by(Domain.name)
    if name is not None:
        stmt = stmt.where(Domain.name == name)
    if truthy(enabled) is not None:
        stmt = stmt.where(Domain.enabled.is_(truthy(enabled)))
    async with svc.sessionmaker() as s:
        rows = (await s.execute(stmt)).scalars().all()
    items = [render.domain(svc.base, d) for d in rows]
    return JsonResponse(render.listing(svc.base, "domains", "domains", items))


@router.get("/v3/domains/{domain_id}")
async def get_domain(request: Request, domain_id: str,
                     ctx: RequestContext = Depends(require_context)) -> Response:
    svc = identity(request)
    async with svc.sessionmaker() as s:
        d = await s.get(Domain, domain_id)
    if d is None:
        raise domain_not_found(domain_id)
    if not ctx.is_admin and domain_id not in (ctx.user_domain_id, ctx.project_domain_id, ctx.domain_id):
        raise forbidden()
    return JsonResponse({"domain": render.domain(svc.base, d)})


@router.post("/v3/domains", status_code=201)
async def create_domain(request: Request, ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    data = await entity_body(request, "domain")
    check_types(data, "domain", FIELDS, required=("name",))
    d = Domain(name=data["name"], description=data.get("description", ""), enabled=data.get("enabled", True))
    if data.get("id"):
        d.id = data["id"]
    async with svc.sessionmaker() as s:
        if (await s.execute(select(Domain.id).where(Domain.name == d.name))).first():
            raise conflict(f"Conflict occurred attempting to store domain - Duplicate entry found "
                           f"with name {d.name}.")
        s.add(d)
        await commit(svc, s, "domain")
    return JsonResponse({"domain": render.domain(svc.base, d)}, status_code=201)


@router.patch("/v3/domains/{domain_id}")
async def update_domain(request: Request, domain_id: str,
                        ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    data = await entity_body(request, "domain")
    check_types(data, "domain", FIELDS)
    async with svc.sessionmaker() as s:
        d = await s.get(Domain, domain_id)
        if d is None:
            raise domain_not_found(domain_id)
        for key in ("name", "description", "enabled"):
            if key in data:
                setattr(d, key, data[key])
        await commit(svc, s, "domain")
    return JsonResponse({"domain": render.domain(svc.base, d)})


@router.delete("/v3/domains/{domain_id}", status_code=204)
async def delete_domain(request: Request, domain_id: str,
                        ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    async with svc.sessionmaker() as s:
        d = await s.get(Domain, domain_id)
        if d is None:
            raise domain_not_found(domain_id)
        if d.enabled:
            raise forbidden("Cannot delete a domain that is enabled, please disable it first.")
        # As Keystone: deleting a domain deletes its projects and users.
        projects = select(Project.id).where(Project.domain_id == domain_id)
        users = select(User.id).where(User.domain_id == domain_id)
        await s.execute(delete(RoleAssignment).where(RoleAssignment.user_id.in_(users)))
        await s.execute(delete(RoleAssignment).where(RoleAssignment.target_id.in_(projects)))
        await s.execute(delete(RoleAssignment).where(RoleAssignment.target_type == "domain",
                                                     RoleAssignment.target_id == domain_id))
        await s.execute(delete(Project).where(Project.domain_id == domain_id))
        await s.execute(delete(User).where(User.domain_id == domain_id))
        await s.delete(d)
        await commit(svc, s, "domain")
    return Response(status_code=204)
