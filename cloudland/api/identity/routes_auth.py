"""``/v3/auth/*``: issue, validate and revoke tokens; what a token may be scoped to."""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import select

from cloudland.api.context import RequestContext, require_context
from cloudland.api.errors import ApiError, bad_request, forbidden, not_found
from cloudland.api.identity import render
from cloudland.api.identity.authenticate import authenticate
from cloudland.api.identity.render import JsonResponse
from cloudland.api.identity.service import IdentityService, identity
from cloudland.api.identity.tokens import Resolved, TokenPayload
from cloudland.db.models import Domain, Project, RoleAssignment

router = APIRouter()


def _catalog(svc: IdentityService, request: Request) -> msgspec.Raw | None:
    return None if "nocatalog" in request.query_params else svc.catalog.raw


async def issue_token(request: Request) -> Response:
    svc = identity(request)
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        raise bad_request(f"Malformed request body: {exc}")
    issued = await authenticate(svc, body, request.headers.get("x-auth-token"))
    content = render.token_body(issued.payload, issued.resolved, _catalog(svc, request))
    return JsonResponse(content, status_code=201, headers={"X-Subject-Token": issued.token})


# The hot path: a plain Starlette route skips FastAPI's dependency and validation machinery.
router.add_route("/v3/auth/tokens", issue_token, methods=["POST"], include_in_schema=False)


async def _subject(request: Request, ctx: RequestContext) -> tuple[str, TokenPayload, Resolved]:
    subject = request.headers.get("x-subject-token")
    if not subject:
        raise bad_request("X-Subject-Token header is required.")
    try:
        payload, resolved = await identity(request).tokens.inspect(subject)
    except ApiError:
        raise not_found(f"Could not find token: {subject}")
    if payload.user_id != ctx.user_id and not ctx.is_admin:
        raise forbidden()
    return subject, payload, resolved


@router.get("/v3/auth/tokens")
async def validate_token(request: Request, ctx: RequestContext = Depends(require_context)) -> Response:
    subject, payload, resolved = await _subject(request, ctx)
    content = render.token_body(payload, resolved, _catalog(identity(request), request))
    return JsonResponse(content, headers={"X-Subject-Token": subject})


@router.head("/v3/auth/tokens")
async def check_token(request: Request, ctx: RequestContext = Depends(require_context)) -> Response:
    subject, _, _ = await _subject(request, ctx)
    return Response(status_code=200, headers={"X-Subject-Token": subject})


@router.delete("/v3/auth/tokens", status_code=204)
async def revoke_token(request: Request, ctx: RequestContext = Depends(require_context)) -> Response:
    _, payload, _ = await _subject(request, ctx)
    await identity(request).tokens.revoke(payload)
    return Response(status_code=204)


@router.get("/v3/auth/catalog")
async def auth_catalog(request: Request, ctx: RequestContext = Depends(require_context)) -> Response:
    if ctx.project_id is None and ctx.domain_id is None:
        raise forbidden("A scoped token is required to read the catalog.")
    svc = identity(request)
    return JsonResponse({"catalog": svc.catalog.raw, "links": render.list_links(svc.base, "auth/catalog")})


@router.get("/v3/auth/projects")
async def auth_projects(request: Request, ctx: RequestContext = Depends(require_context)) -> Response:
    svc = identity(request)
    async with svc.sessionmaker() as s:
        targets = (select(RoleAssignment.target_id)
                   .where(RoleAssignment.user_id == ctx.user_id, RoleAssignment.target_type == "project"))
        stmt = (select(Project).where(Project.id.in_(targets), Project.enabled.is_(True))
                .order_by(Project.name))
        rows = (await s.execute(stmt)).scalars().all()
    items = [render.project(svc.base, p) for p in rows]
    return JsonResponse(render.listing(svc.base, "projects", "auth/projects", items))


@router.get("/v3/auth/domains")
async def auth_domains(request: Request, ctx: RequestContext = Depends(require_context)) -> Response:
    svc = identity(request)
    async with svc.sessionmaker() as s:
        targets = (select(RoleAssignment.target_id)
                   .where(RoleAssignment.user_id == ctx.user_id, RoleAssignment.target_type == "domain"))
        stmt = select(Domain).where(Domain.id.in_(targets), Domain.enabled.is_(True)).order_by(Domain.name)
        rows = (await s.execute(stmt)).scalars().all()
    items = [render.domain(svc.base, d) for d in rows]
    return JsonResponse(render.listing(svc.base, "domains", "auth/domains", items))
