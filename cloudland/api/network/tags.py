"""Neutron's tag extension (standard-attr-tag):
/v2.0/{networks,subnets,ports,routers,floatingips}/{id}/tags."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import String, and_, cast, not_, or_
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.context import RequestContext, require_context
from cloudland.api.deps import get_db
from cloudland.api.errors import ApiError
from cloudland.api.network import access, router_rules
from cloudland.api.network.query import ListParams
from cloudland.api.network.validation import as_list, as_str, invalid
from cloudland.api.policy import require_write
from cloudland.db.models import FloatingIp, Network, Port, Router, Subnet

router = APIRouter()

MAX_TAG = 255


async def _owned(session: AsyncSession, ctx: RequestContext, collection: str,
                 resource_id: str, write: bool) -> Network | Subnet | Port | Router | FloatingIp:
    if collection == "networks":
        net = await access.get_network(session, ctx, resource_id)
        if write:
            access.require_network_owner(ctx, net)
        return net
    if collection == "subnets":
        subnet, net = await access.get_subnet(session, ctx, resource_id)
        if write and not (ctx.is_admin or ctx.owns(subnet.project_id)):
            access.require_network_owner(ctx, net)
        return subnet
    if collection == "ports":
        return await access.get_port(session, ctx, resource_id)
    if collection == "routers":
        return await router_rules.get_router(session, ctx, resource_id)
    if collection == "floatingips":
        return await router_rules.get_floatingip(session, ctx, resource_id)
    raise ApiError(404, "The resource could not be found.", "HTTPNotFound")


def _collection(request: Request) -> str:
    """The collection name from the path: .../v2.0/<collection>/<id>/tags[/<tag>]."""
    parts = request.url.path.split("/")
    return parts[parts.index("tags") - 2]


def _tag(value: Any) -> str:
    tag = as_str(value, "tags", MAX_TAG)
    if not tag or "," in tag or "/" in tag:
        raise invalid(f"Invalid input for operation: '{value}' is not a valid tag.", "InvalidInput")
    return tag


async def list_tags(request: Request, resource_id: str, ctx: RequestContext = Depends(require_context),
                    session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    collection = _collection(request)
    obj = await _owned(session, ctx, collection, resource_id, write=False)
    return {"tags": list(obj.tags or [])}


async def check_tag(request: Request, resource_id: str, tag: str,
                    ctx: RequestContext = Depends(require_context),
                    session: AsyncSession = Depends(get_db)) -> Response:
    collection = _collection(request)
    obj = await _owned(session, ctx, collection, resource_id, write=False)
    if tag not in (obj.tags or []):
        raise ApiError(404, f"Tag {tag} could not be found for {collection[:-1]} {resource_id}.",
                       "TagNotFound")
    return Response(status_code=204)


async def replace_tags(request: Request, resource_id: str,
                       ctx: RequestContext = Depends(require_context),
                       session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    require_write(ctx)
    collection = _collection(request)
    obj = await _owned(session, ctx, collection, resource_id, write=True)
    body = await request.json()
    if not isinstance(body, dict) or "tags" not in body:
        raise invalid("Invalid input for tags: a 'tags' list is required.")
    tags = sorted({_tag(t) for t in as_list(body["tags"], "tags")})
    obj.tags = tags
    obj.revision_number = (obj.revision_number or 0) + 1
    await session.commit()
    return {"tags": tags}


async def add_tag(request: Request, resource_id: str, tag: str,
                  ctx: RequestContext = Depends(require_context),
                  session: AsyncSession = Depends(get_db)) -> Response:
    require_write(ctx)
    collection = _collection(request)
    obj = await _owned(session, ctx, collection, resource_id, write=True)
    tag = _tag(tag)
    if tag not in (obj.tags or []):
        obj.tags = sorted([*(obj.tags or []), tag])
        obj.revision_number = (obj.revision_number or 0) + 1
        await session.commit()
    return Response(status_code=201)


async def delete_tags(request: Request, resource_id: str, ctx: RequestContext = Depends(require_context),
                      session: AsyncSession = Depends(get_db)) -> Response:
    require_write(ctx)
    collection = _collection(request)
    obj = await _owned(session, ctx, collection, resource_id, write=True)
    obj.tags = []
    obj.revision_number = (obj.revision_number or 0) + 1
    await session.commit()
    return Response(status_code=204)


async def delete_tag(request: Request, resource_id: str, tag: str,
                     ctx: RequestContext = Depends(require_context),
                     session: AsyncSession = Depends(get_db)) -> Response:
    require_write(ctx)
    collection = _collection(request)
    obj = await _owned(session, ctx, collection, resource_id, write=True)
    if tag not in (obj.tags or []):
        raise ApiError(404, f"Tag {tag} could not be found for {collection[:-1]} {resource_id}.",
                       "TagNotFound")
    obj.tags = [t for t in obj.tags if t != tag]
    obj.revision_number = (obj.revision_number or 0) + 1
    await session.commit()
    return Response(status_code=204)


for _collection_name in ("networks", "subnets", "ports", "routers", "floatingips"):
    _base = f"/{_collection_name}/{{resource_id}}/tags"
    router.add_api_route(_base, list_tags, methods=["GET"])
    router.add_api_route(_base + "/{tag}", check_tag, methods=["GET"], status_code=204)
    router.add_api_route(_base, replace_tags, methods=["PUT"])
    router.add_api_route(_base + "/{tag}", add_tag, methods=["PUT"], status_code=201)
    router.add_api_route(_base, delete_tags, methods=["DELETE"], status_code=204)
    router.add_api_route(_base + "/{tag}", delete_tag, methods=["DELETE"], status_code=204)


def tag_filter(column: Any, params: ListParams) -> Any:
    """WHERE clause for ``tags``, ``tags-any``, ``not-tags``, ``not-tags-any`` (comma-separated), or None.

    Tags are a JSON list of strings; matching the JSON-encoded tag in its text works the same on
    SQLite and PostgreSQL without JSON operators.
    """
    text = cast(column, String)

    def has(tag: str) -> Any:
        return text.contains(json.dumps(tag), autoescape=True)

    def tags_of(key: str) -> list[str]:
        return [t for value in params.filters.get(key, []) for t in value.split(",") if t]

    clauses = []
    if tags := tags_of("tags"):
        clauses.append(and_(*[has(t) for t in tags]))
    if tags := tags_of("tags-any"):
        clauses.append(or_(*[has(t) for t in tags]))
    if tags := tags_of("not-tags"):
        clauses.append(not_(and_(*[has(t) for t in tags])))
    if tags := tags_of("not-tags-any"):
        clauses.append(not_(or_(*[has(t) for t in tags])))
    return and_(*clauses) if clauses else None
