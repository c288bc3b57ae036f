"""Nova flavors and their extra specs."""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cloudland.api.compute.common import links, next_link, parse_bool, parse_int
from cloudland.api.context import RequestContext, require_context
from cloudland.api.deps import get_db
from cloudland.api.errors import bad_request, conflict, not_found
from cloudland.api.policy import require_admin
from cloudland.db.models import Flavor

router = APIRouter()

Ctx = Annotated[RequestContext, Depends(require_context)]
Db = Annotated[AsyncSession, Depends(get_db)]

MAX_LIMIT = 1000
MAX_INT = 2**31 - 1
_ID_RE = re.compile(r"^(?! )[a-zA-Z0-9. _-]+(?<! )$")

# name, id, ram MiB, vcpus, disk GiB
DEFAULT_FLAVORS = [
    ("m1.nano", "42", 128, 1, 1),
    ("m1.micro", "84", 192, 1, 1),
    ("m1.tiny", "1", 512, 1, 1),
    ("m1.small", "2", 2048, 1, 20),
    ("m1.medium", "3", 4096, 2, 40),
    ("m1.large", "4", 8192, 4, 80),
    ("m1.xlarge", "5", 16384, 8, 160),
]


def render_flavor(request: Request, flavor: Flavor) -> dict[str, Any]:
    """The full flavor body at 2.1 (also what the servers API embeds or links)."""
    return {
        "id": flavor.id,
        "name": flavor.name,
        "ram": flavor.ram,
        "vcpus": flavor.vcpus,
        "disk": flavor.disk,
        "swap": flavor.swap or "",
        "OS-FLV-EXT-DATA:ephemeral": flavor.ephemeral,
        "os-flavor-access:is_public": flavor.is_public,
        "rxtx_factor": flavor.rxtx_factor,
        "OS-FLV-DISABLED:disabled": flavor.disabled,
        "links": links(request, "flavors", flavor.id),
    }


def _summary(request: Request, flavor: Flavor) -> dict[str, Any]:
    return {"id": flavor.id, "name": flavor.name, "links": links(request, "flavors", flavor.id)}


async def get_flavor(db: AsyncSession, ctx: RequestContext, flavor_id: str) -> Flavor:
    """A flavor the caller may use, or 404 (a name is not an id, as in Nova)."""
    flavor = await db.get(Flavor, flavor_id)
    if flavor is None or (not ctx.is_admin and (not flavor.is_public or flavor.disabled)):
        raise not_found(f"Flavor {flavor_id} could not be found.")
    return flavor


async def _list(request: Request, ctx: RequestContext, db: AsyncSession, *, detail: bool) -> dict[str, Any]:
    params = request.query_params
    query = select(Flavor)
    if ctx.is_admin:
        raw = params.get("is_public")
        if raw is None:
            query = query.where(Flavor.is_public.is_(True))
        elif raw.strip().lower() != "none":
            query = query.where(Flavor.is_public.is_(parse_bool(raw, "is_public")))
    else:
        query = query.where(Flavor.is_public.is_(True), Flavor.disabled.is_(False))
    min_ram = parse_int(params.get("minRam"), "minRam")
    if min_ram is not None:
        query = query.where(Flavor.ram >= min_ram)
    min_disk = parse_int(params.get("minDisk"), "minDisk")
    if min_disk is not None:
        query = query.where(Flavor.disk >= min_disk)
    if "name" in params:
        query = query.where(Flavor.name == params["name"])
    limit = min(parse_int(params.get("limit"), "limit") or MAX_LIMIT, MAX_LIMIT)
    marker = params.get("marker")
    if marker is not None:
        if await db.get(Flavor, marker) is None:
            raise bad_request(f"marker [{marker}] not found")
        query = query.where(Flavor.id > marker)
    rows = list((await db.scalars(query.order_by(Flavor.id).limit(limit + 1))).all())
    render = render_flavor if detail else _summary
    body: dict[str, Any] = {"flavors": [render(request, f) for f in rows[:limit]]}
    if len(rows) > limit:
        collection = "flavors/detail" if detail else "flavors"
        body["flavors_links"] = [next_link(request, collection, rows[limit - 1].id)]
    return body


@router.get("/flavors")
async def list_flavors(request: Request, ctx: Ctx, db: Db) -> dict[str, Any]:
    return await _list(request, ctx, db, detail=False)


@router.get("/flavors/detail")
async def list_flavors_detail(request: Request, ctx: Ctx, db: Db) -> dict[str, Any]:
    return await _list(request, ctx, db, detail=True)


@router.get("/flavors/{flavor_id}")
async def show_flavor(flavor_id: str, request: Request, ctx: Ctx, db: Db) -> dict[str, Any]:
    return {"flavor": render_flavor(request, await get_flavor(db, ctx, flavor_id))}


def _int_field(body: dict[str, Any], key: str, *, minimum: int, default: int | None = None) -> int:
    value = body.get(key, default)
    if value == "" and default is not None:
        value = default
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= MAX_INT:
        raise bad_request(f"Invalid input for field/attribute {key}. Value: {value}. "
                          f"It must be an integer between {minimum} and {MAX_INT}.")
    return value


def _flavor_from_body(payload: Any) -> Flavor:
    body = payload.get("flavor") if isinstance(payload, dict) else None
    if not isinstance(body, dict):
        raise bad_request("Invalid input for field/attribute flavor: a flavor object is required.")
    name = body.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 255 or name != name.strip():
        raise bad_request("Invalid input for field/attribute name: 1 to 255 characters, "
                          "no leading or trailing whitespace.")
    flavor_id = body.get("id")
    if flavor_id is None:
        flavor_id = str(uuid.uuid4())
    elif not isinstance(flavor_id, str) or len(flavor_id) > 255 or not _ID_RE.match(flavor_id):
        raise bad_request(f"Invalid input for field/attribute id. Value: {flavor_id}.")
    rxtx = body.get("rxtx_factor", 1.0)
    if not isinstance(rxtx, int | float) or isinstance(rxtx, bool) or rxtx <= 0:
        raise bad_request(f"Invalid input for field/attribute rxtx_factor. Value: {rxtx}.")
    is_public = body.get("os-flavor-access:is_public", True)
    if not isinstance(is_public, bool):
        is_public = parse_bool(str(is_public), "os-flavor-access:is_public")
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request("Invalid input for field/attribute description.")
    return Flavor(
        id=flavor_id, name=name, description=description, is_public=is_public, rxtx_factor=float(rxtx),
        ram=_int_field(body, "ram", minimum=1), vcpus=_int_field(body, "vcpus", minimum=1),
        disk=_int_field(body, "disk", minimum=0), swap=_int_field(body, "swap", minimum=0, default=0),
        ephemeral=_int_field(body, "OS-FLV-EXT-DATA:ephemeral", minimum=0, default=0),
        disabled=False, extra_specs={},
    )


@router.post("/flavors")
async def create_flavor(request: Request, ctx: Ctx, db: Db) -> dict[str, Any]:
    require_admin(ctx)
    flavor = _flavor_from_body(await request.json())
    clash = await db.scalar(select(Flavor).where(or_(Flavor.id == flavor.id, Flavor.name == flavor.name)))
    if clash is not None:
        if clash.id == flavor.id:
            raise conflict(f"Flavor with ID {flavor.id} already exists.")
        raise conflict(f"Flavor with name {flavor.name} already exists.")
    db.add(flavor)
    await db.commit()
    return {"flavor": render_flavor(request, flavor)}


@router.delete("/flavors/{flavor_id}", status_code=202)
async def delete_flavor(flavor_id: str, ctx: Ctx, db: Db) -> Response:
    require_admin(ctx)
    flavor = await db.get(Flavor, flavor_id)
    if flavor is None:
        raise not_found(f"Flavor {flavor_id} could not be found.")
    await db.delete(flavor)
    await db.commit()
    return Response(status_code=202)


def _specs_body(payload: Any) -> dict[str, str]:
    specs = payload.get("extra_specs") if isinstance(payload, dict) else None
    if not isinstance(specs, dict) or not specs:
        raise bad_request("Invalid input for field/attribute extra_specs.")
    out: dict[str, str] = {}
    for key, value in specs.items():
        if not 1 <= len(key) <= 255 or not re.fullmatch(r"[\w.:\- ]+", key):
            raise bad_request(f"Invalid extra spec key {key!r}.")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise bad_request(f"Invalid extra spec value for {key}.")
        out[key] = str(value)
    return out


@router.get("/flavors/{flavor_id}/os-extra_specs")
async def list_extra_specs(flavor_id: str, ctx: Ctx, db: Db) -> dict[str, Any]:
    return {"extra_specs": dict((await get_flavor(db, ctx, flavor_id)).extra_specs)}


@router.post("/flavors/{flavor_id}/os-extra_specs")
async def create_extra_specs(flavor_id: str, request: Request, ctx: Ctx, db: Db) -> dict[str, Any]:
    require_admin(ctx)
    flavor = await get_flavor(db, ctx, flavor_id)
    specs = _specs_body(await request.json())
    flavor.extra_specs = {**flavor.extra_specs, **specs}
    await db.commit()
    return {"extra_specs": specs}


@router.get("/flavors/{flavor_id}/os-extra_specs/{key}")
async def show_extra_spec(flavor_id: str, key: str, ctx: Ctx, db: Db) -> dict[str, Any]:
    flavor = await get_flavor(db, ctx, flavor_id)
    if key not in flavor.extra_specs:
        raise not_found(f"Flavor {flavor_id} has no extra specs with key {key}.")
    return {key: flavor.extra_specs[key]}


@router.put("/flavors/{flavor_id}/os-extra_specs/{key}")
async def update_extra_spec(flavor_id: str, key: str, request: Request, ctx: Ctx, db: Db) -> dict[str, Any]:
    require_admin(ctx)
    flavor = await get_flavor(db, ctx, flavor_id)
    payload = await request.json()
    if not isinstance(payload, dict) or len(payload) != 1 or key not in payload:
        raise bad_request("Request body and URI mismatch")
    specs = _specs_body({"extra_specs": payload})
    flavor.extra_specs = {**flavor.extra_specs, **specs}
    await db.commit()
    return specs


@router.delete("/flavors/{flavor_id}/os-extra_specs/{key}")
async def delete_extra_spec(flavor_id: str, key: str, ctx: Ctx, db: Db) -> Response:
    require_admin(ctx)
    flavor = await get_flavor(db, ctx, flavor_id)
    if key not in flavor.extra_specs:
        raise not_found(f"Flavor {flavor_id} has no extra specs with key {key}.")
    flavor.extra_specs = {k: v for k, v in flavor.extra_specs.items() if k != key}
    await db.commit()
    return Response(status_code=200)


async def bootstrap_flavors(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    """Create the default flavors that are missing (by id or by name); safe to run on every start."""
    async with sessionmaker() as db:
        existing = (await db.execute(select(Flavor.id, Flavor.name))).all()
        ids = {row.id for row in existing}
        names = {row.name for row in existing}
        for name, flavor_id, ram, vcpus, disk in DEFAULT_FLAVORS:
            if flavor_id not in ids and name not in names:
                db.add(Flavor(id=flavor_id, name=name, ram=ram, vcpus=vcpus, disk=disk, swap=0,
                              ephemeral=0, is_public=True, disabled=False, rxtx_factor=1.0,
                              extra_specs={}))
        await db.commit()

