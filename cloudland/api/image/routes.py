"""Glance v2 HTTP handlers under /image."""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import Text, and_, cast, false, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement
from starlette.requests import ClientDisconnect

from cloudland.api.context import RequestContext, require_context
from cloudland.api.deps import get_db
from cloudland.api.errors import ApiError, bad_request, conflict, forbidden, not_found
from cloudland.api.image import fields
from cloudland.api.image.render import IMAGE_SCHEMA, IMAGES_SCHEMA, render_image, versions_doc
from cloudland.api.image.store import ImageStore, virtual_size
from cloudland.api.policy import require_write
from cloudland.db.models import Image

router = APIRouter(prefix="/image")

Ctx = Annotated[RequestContext, Depends(require_context)]
Db = Annotated[AsyncSession, Depends(get_db)]

DEFAULT_LIMIT = 25
MAX_LIMIT = 1000
# Sort keys and the expression they sort by; nullable columns are coalesced so SQLite and
# PostgreSQL agree on where NULLs go (and keyset pagination can compare them).
SORT_KEYS: dict[str, ColumnElement[Any]] = {
    "name": func.coalesce(Image.name, ""),
    "status": Image.status,
    "container_format": func.coalesce(Image.container_format, ""),
    "disk_format": func.coalesce(Image.disk_format, ""),
    "size": func.coalesce(Image.size, -1),
    "id": Image.id,
    "created_at": Image.created_at,
    "updated_at": Image.updated_at,
    "visibility": Image.visibility,
    "owner": func.coalesce(Image.owner, ""),
    "min_disk": Image.min_disk,
    "min_ram": Image.min_ram,
}
FILTERS = {"name": Image.name, "status": Image.status, "owner": Image.owner, "id": Image.id,
           "disk_format": Image.disk_format, "container_format": Image.container_format}


def image_store(request: Request) -> ImageStore:
    return ImageStore(request.app.state.config.images_dir)


def _image_root(request: Request) -> str:
    public = request.app.state.config.api.public_url.rstrip("/")
    return f"{public or str(request.base_url).rstrip('/')}/image"


# --- discovery and schemas --------------------------------------------------------------------


@router.get("")
@router.get("/")
@router.get("/v2")
@router.get("/v2/")
async def versions(request: Request) -> JSONResponse:
    return JSONResponse(versions_doc(_image_root(request)), status_code=300)


@router.get("/v2/schemas/image")
async def image_schema(ctx: Ctx) -> dict[str, Any]:
    return IMAGE_SCHEMA


@router.get("/v2/schemas/images")
async def images_schema(ctx: Ctx) -> dict[str, Any]:
    return IMAGES_SCHEMA


# --- access rules -----------------------------------------------------------------------------


def _visible_clause(ctx: RequestContext) -> ColumnElement[bool]:
    """Images a caller may see in a default list: its project's and public ones (admins: all)."""
    if ctx.is_admin:
        return Image.deleted.is_(False)
    owned = Image.owner == ctx.project_id if ctx.project_id else false()
    return and_(Image.deleted.is_(False), or_(owned, Image.visibility == "public"))


def _can_see(ctx: RequestContext, image: Image) -> bool:
    return ctx.is_admin or image.visibility in ("public", "community") or ctx.owns(image.owner)


async def load_image(db: AsyncSession, ctx: RequestContext, image_id: str) -> Image:
    """A visible, not deleted image, or Glance's 404."""
    image = await db.get(Image, image_id)
    if image is None or image.deleted or not _can_see(ctx, image):
        raise not_found(f"No image found with ID {image_id}")
    return image


def _require_modify(ctx: RequestContext, image: Image) -> None:
    require_write(ctx)
    if not (ctx.is_admin or ctx.owns(image.owner)):
        raise forbidden("You are not permitted to modify this image.")


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"Malformed JSON in request body: {exc}") from None


# --- images -----------------------------------------------------------------------------------


@router.post("/v2/images", status_code=201)
async def create_image(request: Request, ctx: Ctx, db: Db) -> JSONResponse:
    require_write(ctx)
    core, props = fields.parse_create(await _json(request), ctx)
    if "os_hidden" in core:
        props["os_hidden"] = core.pop("os_hidden")
    values: dict[str, Any] = {"visibility": "shared", "protected": False, "min_disk": 0, "min_ram": 0,
                              "tags": [], "owner": ctx.project_id, **core}
    image = Image(status="queued", deleted=False, properties=props, **values)
    if image.id and await db.get(Image, image.id) is not None:
        raise conflict(f"Image with identifier {image.id} already exists!")
    db.add(image)
    try:
        await db.commit()
    except IntegrityError:
        raise conflict(f"Image with identifier {image.id} already exists!") from None
    return JSONResponse(render_image(image), status_code=201,
                        headers={"Location": f"{_image_root(request)}/v2/images/{image.id}"})


def _sort(params: Any) -> list[tuple[str, str]]:
    """[(key, dir)] from ``sort=k:dir,...`` or repeated ``sort_key``/``sort_dir``; id breaks ties."""
    pairs: list[tuple[str, str]] = []
    if "sort" in params:
        if "sort_key" in params or "sort_dir" in params:
            raise bad_request("The 'sort' parameter cannot be combined with sort_key or sort_dir.")
        for item in params["sort"].split(","):
            key, _, direction = item.strip().partition(":")
            pairs.append((key, direction or "desc"))
    else:
        keys = params.getlist("sort_key") or ["created_at"]
        dirs = params.getlist("sort_dir") or ["desc"]
        if len(dirs) not in (1, len(keys)):
            raise bad_request("The number of sort_dir values must be 1 or match sort_key.")
        pairs = [(k, dirs[i] if len(dirs) > 1 else dirs[0]) for i, k in enumerate(keys)]
    for key, direction in pairs:
        if key not in SORT_KEYS:
            raise bad_request(f"Invalid sort key: {key}. It is not one of {', '.join(sorted(SORT_KEYS))}.")
        if direction not in ("asc", "desc"):
            raise bad_request(f"Invalid sort direction: {direction}")
    if "id" not in (k for k, _ in pairs):
        pairs.append(("id", pairs[-1][1]))
    return pairs


def _after(marker: Image, pairs: list[tuple[str, str]]) -> ColumnElement[bool]:
    """Rows strictly after ``marker`` in the sort order (keyset pagination)."""
    marker_values = {
        "name": marker.name or "", "status": marker.status, "container_format": marker.container_format or "",
        "disk_format": marker.disk_format or "", "size": -1 if marker.size is None else marker.size,
        "id": marker.id, "created_at": marker.created_at, "updated_at": marker.updated_at,
        "visibility": marker.visibility, "owner": marker.owner or "", "min_disk": marker.min_disk,
        "min_ram": marker.min_ram,
    }
    clauses = []
    for i, (key, direction) in enumerate(pairs):
        column, value = SORT_KEYS[key], marker_values[key]
        equal_before = [SORT_KEYS[k] == marker_values[k] for k, _ in pairs[:i]]
        beyond = column > value if direction == "asc" else column < value
        clauses.append(and_(*equal_before, beyond))
    return or_(*clauses)


def _filters(params: Any, ctx: RequestContext) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    visibility = params.get("visibility")
    if visibility is None:
        where.append(_visible_clause(ctx))
    elif visibility == "all":
        where.append(Image.deleted.is_(False))
        if not ctx.is_admin:
            owned = Image.owner == ctx.project_id if ctx.project_id else false()
            where.append(or_(owned, Image.visibility.in_(("public", "community"))))
    elif visibility in fields.VISIBILITIES:
        where += [Image.deleted.is_(False), Image.visibility == visibility]
        if visibility in ("private", "shared") and not ctx.is_admin:
            where.append(Image.owner == ctx.project_id if ctx.project_id else false())
    else:
        raise bad_request(f"Invalid visibility value: {visibility}")
    for name, column in FILTERS.items():
        value = params.get(name)
        if value is None:
            continue
        if value.startswith("in:"):
            where.append(column.in_([v.strip('"') for v in value[3:].split(",")]))
        else:
            where.append(column == value)
    if "protected" in params:
        raw = params["protected"].lower()
        if raw not in ("true", "false"):
            raise bad_request(f"Invalid value for protected: {params['protected']}")
        where.append(Image.protected.is_(raw == "true"))
    for name, op in (("size_min", "ge"), ("size_max", "le")):
        if name in params:
            try:
                bound = int(params[name])
            except ValueError:
                raise bad_request(f"Invalid value for {name}: {params[name]}") from None
            where.append(Image.size >= bound if op == "ge" else Image.size <= bound)
    for tag in params.getlist("tag"):
        # Tags live in a JSON list: match the serialized element, then re-check exactly below.
        pattern = json.dumps(tag).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append(cast(Image.tags, Text).like(f"%{pattern}%", escape="\\"))
    return where


@router.get("/v2/images")
async def list_images(request: Request, ctx: Ctx, db: Db) -> dict[str, Any]:
    params = request.query_params
    try:
        limit = int(params.get("limit", DEFAULT_LIMIT))
    except ValueError:
        raise bad_request("limit param must be an integer") from None
    if limit < 0:
        raise bad_request("limit param must be positive")
    limit = min(limit, MAX_LIMIT)
    pairs = _sort(params)
    query = select(Image).where(*_filters(params, ctx))
    marker_id = params.get("marker")
    if marker_id:
        marker = await db.get(Image, marker_id)
        if marker is None or marker.deleted or not _can_see(ctx, marker):
            raise bad_request(f"Invalid marker. Image {marker_id} could not be found.")
        query = query.where(_after(marker, pairs))
    order = [SORT_KEYS[k].asc() if d == "asc" else SORT_KEYS[k].desc() for k, d in pairs]
    rows = list((await db.scalars(query.order_by(*order).limit(limit + 1))).all())
    has_more = len(rows) > limit
    rows = rows[:limit]
    tags = set(params.getlist("tag"))
    body: dict[str, Any] = {
        "images": [render_image(i) for i in rows if tags <= set(i.tags or [])],
        "first": "/v2/images",
        "schema": "/v2/schemas/images",
    }
    if has_more and rows:
        query_items = [(k, v) for k, v in params.multi_items() if k != "marker"]
        query_items.append(("marker", rows[-1].id))
        body["next"] = f"/v2/images?{urlencode(query_items)}"
    return body


@router.get("/v2/images/{image_id}")
async def show_image(image_id: str, ctx: Ctx, db: Db) -> dict[str, Any]:
    return render_image(await load_image(db, ctx, image_id))


@router.patch("/v2/images/{image_id}")
async def update_image(image_id: str, request: Request, ctx: Ctx, db: Db) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in fields.PATCH_TYPES:
        raise ApiError(415, f"Unsupported Content-Type {content_type}; use "
                            "application/openstack-images-v2.1-json-patch.")
    image = await load_image(db, ctx, image_id)
    _require_modify(ctx, image)
    ops = await _json(request)
    props = dict(image.properties or {})
    core: dict[str, Any] = {k: getattr(image, k) for k in fields.CORE if k != "os_hidden"}
    core["os_hidden"] = bool(props.pop("os_hidden", False))
    core["status"] = image.status
    fields.apply_patch(ops, core, props, ctx)
    props["os_hidden"] = core.pop("os_hidden")
    if not props["os_hidden"]:
        del props["os_hidden"]
    core.pop("status")
    for key, value in core.items():
        setattr(image, key, value)
    image.properties = props
    await db.commit()
    return render_image(image)


@router.delete("/v2/images/{image_id}", status_code=204)
async def delete_image(image_id: str, request: Request, ctx: Ctx, db: Db) -> Response:
    image = await load_image(db, ctx, image_id)
    _require_modify(ctx, image)
    if image.protected:
        raise forbidden(f"Image {image_id} is protected and cannot be deleted.")
    image.deleted = True
    image.status = "deleted"
    await db.commit()
    await image_store(request).delete(image_id)
    return Response(status_code=204)


# --- data -------------------------------------------------------------------------------------


async def _set_status(db: AsyncSession, image_id: str, old: str, new: str, **values: Any) -> bool:
    """Compare-and-set the status, so two uploads never both proceed."""
    result = await db.execute(update(Image).where(Image.id == image_id, Image.status == old,
                                                  Image.deleted.is_(False))
                              .values(status=new, **values))
    await db.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


@router.put("/v2/images/{image_id}/file", status_code=204)
async def upload_image(image_id: str, request: Request, ctx: Ctx, db: Db) -> Response:
    image = await load_image(db, ctx, image_id)
    _require_modify(ctx, image)
    if not await _set_status(db, image_id, "queued", "saving"):
        await db.refresh(image)
        raise conflict(f"Image status transition from {image.status} to saving is not allowed")
    store = image_store(request)
    try:
        data = await store.save(image_id, request.stream())
    except ClientDisconnect:
        await _set_status(db, image_id, "saving", "queued")
        raise bad_request("The client closed the connection during the upload.") from None
    except BaseException:
        await _set_status(db, image_id, "saving", "queued")
        raise
    vsize = await virtual_size(store.path(image_id), image.disk_format)
    if not await _set_status(db, image_id, "saving", "active", size=data.size, checksum=data.checksum,
                             os_hash_algo=data.os_hash_algo, os_hash_value=data.os_hash_value,
                             virtual_size=vsize):
        await store.delete(image_id)
        raise ApiError(410, "Image was deleted during upload.")
    return Response(status_code=204)


def file_response(store: ImageStore, image: Image) -> FileResponse:
    """The image data, streamed from disk with Glance's headers (Range requests work too)."""
    headers = {"Content-MD5": image.checksum} if image.checksum else {}
    return FileResponse(store.path(image.id), media_type="application/octet-stream", headers=headers)


@router.get("/v2/images/{image_id}/file", response_model=None)
async def download_image(image_id: str, request: Request, ctx: Ctx, db: Db) -> Response:
    image = await load_image(db, ctx, image_id)
    store = image_store(request)
    if image.status != "active" or not await store.exists(image_id):
        return Response(status_code=204)
    return file_response(store, image)


# --- tags -------------------------------------------------------------------------------------


@router.put("/v2/images/{image_id}/tags/{tag}", status_code=204)
async def add_tag(image_id: str, tag: str, ctx: Ctx, db: Db) -> Response:
    image = await load_image(db, ctx, image_id)
    _require_modify(ctx, image)
    if len(tag) > 255:
        raise bad_request("Tags must be at most 255 characters.")
    if tag not in image.tags:
        image.tags = [*image.tags, tag]
        await db.commit()
    return Response(status_code=204)


@router.delete("/v2/images/{image_id}/tags/{tag}", status_code=204)
async def delete_tag(image_id: str, tag: str, ctx: Ctx, db: Db) -> Response:
    image = await load_image(db, ctx, image_id)
    _require_modify(ctx, image)
    if tag not in image.tags:
        raise not_found(f"Tag {tag} not found on image {image_id}")
    image.tags = [t for t in image.tags if t != tag]
    await db.commit()
    return Response(status_code=204)
