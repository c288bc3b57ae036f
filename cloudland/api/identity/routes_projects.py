"""``/v3/projects``: admin CRUD; a project-scoped user may read its own project."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import delete, select

from cloudland.api.context import RequestContext, require_context
from cloudland.api.errors import bad_request, conflict, forbidden, not_found
from cloudland.api.identity import render
from cloudland.api.identity.admin import admin_context, check_types, commit, entity_body, truthy
from cloudland.api.identity.render import JsonResponse
from cloudland.api.identity.service import identity
from cloudland.db.models import Domain, Project, RoleAssignment

router = APIRouter()
FIELDS = {"name": str, "description": str, "enabled": bool, "domain_id": str, "parent_id": (str, type(None)),
          "tags": list, "options": dict, "is_domain": bool}
COLUMNS = ("name", "description", "enabled")
IGNORED = {"id", "links", "domain_id", "is_domain", "parent_id"}


def project_not_found(project_id: str) -> Exception:
    return not_found(f"Could not find project: {project_id}.")


def _duplicate(name: str, domain_id: str) -> Exception:
    return conflict(f"Conflict occurred attempting to store project - Duplicate entry found with "
                    f"name {name} at domain ID {domain_id}.")


def _extra(data: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(extra)
    out.update({k: v for k, v in data.items() if k not in COLUMNS and k not in IGNORED})
    return out


@router.get("/v3/projects")
async def list_projects(request: Request, name: str | None = None, domain_id: str | None = None,
                        enabled: str | None = None, ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    stmt = select(Project).order_by(Project.name)
    if name is not None:
        stmt = stmt.where(Project.name == name)
    if domain_id is not None:
        stmt = stmt.where(Project.domain_id == domain_id)
    if truthy(enabled) is not None:
        stmt = stmt.where(Project.enabled.is_(truthy(enabled)))
    async with svc.sessionmaker() as s:
        rows = (await s.execute(stmt)).scalars().all()
    items = [render.project(svc.base, p) for p in rows]
    return JsonResponse(render.listing(svc.base, "projects", "projects", items))


@router.get("/v3/projects/{project_id}")
async def get_project(request: Request, project_id: str,
                      ctx: RequestContext = Depends(require_context)) -> Response:
    svc = identity(request)
    async with svc.sessionmaker() as s:
        p = await s.get(Project, project_id)
    if p is None:
        raise project_not_found(project_id)
    if not ctx.is_admin and project_id != ctx.project_id:
        raise forbidden()
    return JsonResponse({"project": render.project(svc.base, p)})


@router.post("/v3/projects", status_code=201)
async def create_project(request: Request, ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    data = await entity_body(request, "project")
    check_types(data, "project", FIELDS, required=("name",))
    if data.get("is_domain"):
        raise bad_request("Projects acting as domains are not supported.")
    domain_id = data.get("domain_id") or ctx.project_domain_id or ctx.domain_id or "default"
    async with svc.sessionmaker() as s:
        if await s.get(Domain, domain_id) is None:
            raise not_found(f"Could not find domain: {domain_id}.")
        parent_id = data.get("parent_id")
        extra = _extra(data, {})
        if parent_id and parent_id != domain_id:
            parent = await s.get(Project, parent_id)
            if parent is None or parent.domain_id != domain_id:
                raise not_found(f"Could not find project: {parent_id}.")
            extra["parent_id"] = parent_id
        stmt = select(Project.id).where(Project.name == data["name"], Project.domain_id == domain_id)
        if (await s.execute(stmt)).first():
            raise _duplicate(data["name"], domain_id)
        p = Project(name=data["name"], domain_id=domain_id, description=data.get("description", ""),
                    enabled=data.get("enabled", True), extra=extra)
        s.add(p)
        await commit(svc, s, "project")
    return JsonResponse({"project": render.project(svc.base, p)}, status_code=201)


@router.patch("/v3/projects/{project_id}")
async def update_project(request: Request, project_id: str,
                         ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    data = await entity_body(request, "project")
    check_types(data, "project", FIELDS)
    async with svc.sessionmaker() as s:
        p = await s.get(Project, project_id)
        if p is None:
            raise project_not_found(project_id)
        if "domain_id" in data and data["domain_id"] != p.domain_id:
            raise bad_request("Update of `domain_id` is not allowed.")
        if "name" in data and data["name"] != p.name:
            stmt = select(Project.id).where(Project.name == data["name"], Project.domain_id == p.domain_id)
            if (await s.execute(stmt)).first():
                raise _duplicate(data["name"], p.domain_id)
        for key in COLUMNS:
            if key in data:
                setattr(p, key, data[key])
        p.extra = _extra(data, p.extra or {})
        await commit(svc, s, "project")
    return JsonResponse({"project": render.project(svc.base, p)})


@router.delete("/v3/projects/{project_id}", status_code=204)
async def delete_project(request: Request, project_id: str,
                         ctx: RequestContext = Depends(admin_context)) -> Response:
    svc = identity(request)
    async with svc.sessionmaker() as s:
        p = await s.get(Project, project_id)
        if p is None:
            raise project_not_found(project_id)
        await s.execute(delete(RoleAssignment).where(RoleAssignment.target_type == "project",
                                                     RoleAssignment.target_id == project_id))
        await s.delete(p)
        await commit(svc, s, "project")
    return Response(status_code=204)
