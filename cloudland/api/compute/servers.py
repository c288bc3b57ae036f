"""Nova servers: create, list, show, rename, delete, addresses and actions.

The API only writes desired state (and ports); the controller schedules and converges.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import Text, and_, cast, or_, select, tuple_
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from cloudland.api.compute import admission, common, create_batch, server_actions, server_create
from cloudland.api.compute.admission import BuildBacklog
from cloudland.api.compute.create_batch import CreateBatcher
from cloudland.api.compute.server_render import (
    VALUE_COLUMNS,
    load_addresses,
    render_server,
    render_values,
)
from cloudland.api.context import RequestContext, require_context
from cloudland.api.deps import get_db, wake_controller
from cloudland.api.errors import bad_request, forbidden, not_found
from cloudland.api.policy import require_project_scope, require_write
from cloudland.bus import subjects
from cloudland.bus.messages import Wake, encode
from cloudland.config import Config
from cloudland.controller.instance_status import finalize_delete
from cloudland.db.models import Host, Instance

router = APIRouter()

MAX_LIMIT = 1000
_REBOOT_TASKS = ("rebooting", "reboot_pending", "reboot_started")
_HARD_REBOOT_TASKS = ("rebooting_hard", "reboot_pending_hard", "reboot_started_hard")
_STATUS_VM_STATES = {"BUILD": "building", "SHUTOFF": "stopped", "ERROR": "error", "PAUSED": "paused",
                     "SUSPENDED": "suspended", "RESCUE": "rescued", "DELETED": "deleted"}


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        raise bad_request(f"Malformed request body: {e}")


def _base(request: Request) -> str:
    return common.base_url(request)


async def load_server(session: AsyncSession, ctx: RequestContext, server_id: str) -> Instance:
    inst = await session.get(Instance, server_id)
    # A server being deleted stays visible (task_state "deleting") until its host confirms.
    if inst is None or inst.deleted_at is not None or not (ctx.is_admin or ctx.owns(inst.project_id)):
        raise not_found(f"Instance {server_id} could not be found.")
    return inst


def _status_clause(status: str) -> ColumnElement[bool] | None:
    status = status.upper()
    if status == "ACTIVE":
        return and_(Instance.vm_state == "active", or_(
            Instance.task_state.is_(None), Instance.task_state.not_in(_REBOOT_TASKS + _HARD_REBOOT_TASKS)))
    if status == "REBOOT":
        return and_(Instance.vm_state == "active", Instance.task_state.in_(_REBOOT_TASKS))
    if status == "HARD_REBOOT":
        return and_(Instance.vm_state == "active", Instance.task_state.in_(_HARD_REBOOT_TASKS))
    vm_state = _STATUS_VM_STATES.get(status)
    return Instance.vm_state == vm_state if vm_state else None


def _changes_since(raw: str | None) -> datetime | None:
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.strip().replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise bad_request(f"Invalid input for query parameters changes-since. Value: {raw}.")
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def _limit(params: dict[str, str]) -> int:
    raw = params.get("limit")
    if raw is None:
        return MAX_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        raise bad_request("limit param must be an integer")
    if limit < 0:
        raise bad_request("limit param must be positive")
    return min(limit, MAX_LIMIT)


# JSON columns read as text and decoded once per distinct text: most servers share their
# metadata ("{}"), security groups and fault, so a page decodes a handful of values, not 3,000.
_decoded: dict[str, Any] = {}


def _decode(text: str | None, shape: Callable[[Any], Any] = lambda v: v) -> Any:
    """``shape(json.loads(text))``, remembered; the result is shared, only serialised, never changed."""
    if text is None:
        return shape(None)
    key = f"{id(shape)}:{text}"
    found = _decoded.get(key, _decoded)
    if found is _decoded:
        if len(_decoded) > 10_000:
            _decoded.clear()
        found = _decoded[key] = shape(msgspec.json.decode(text))
    return found


def _metadata(value: Any) -> dict[str, Any]:
    return dict(value or {})


def _security_groups(value: Any) -> list[dict[str, str]]:
    return [{"name": name} for name in (value or [])]


_DETAIL_COLUMNS = (*VALUE_COLUMNS, cast(Instance.metadata_, Text), cast(Instance.security_groups, Text),
                   cast(Instance.fault, Text))
_BRIEF_COLUMNS = (Instance.id, Instance.name)
_N_VALUES = len(VALUE_COLUMNS)
_VM_STATE = [c.key for c in VALUE_COLUMNS].index("vm_state")


async def _list(request: Request, session: AsyncSession, ctx: RequestContext, detail: bool) -> Response:
    """One page of servers: Core rows (no ORM objects) rendered to dicts and encoded by msgspec."""
    params = dict(request.query_params)
    changes_since = _changes_since(params.get("changes-since"))
    columns = _DETAIL_COLUMNS if detail else _BRIEF_COLUMNS
    if changes_since is None:
        query = select(*columns).where(Instance.deleted_at.is_(None))
    else:
        # Nova: servers changed since then, deleted ones included (status DELETED).
        query = select(*columns).where(Instance.updated_at >= changes_since)
    all_tenants = params.get("all_tenants")
    if all_tenants is not None and all_tenants.lower() not in ("0", "false", "off", "no"):
        if not ctx.is_admin:
            raise forbidden("Policy doesn't allow os_compute_api:servers:index:get_all_tenants "
                            "to be performed.")
        project = params.get("project_id") or params.get("tenant_id")
        if project:
            query = query.where(Instance.project_id == project)
    else:
        query = query.where(Instance.project_id == require_project_scope(ctx))
    if params.get("name"):
        try:
            re.compile(params["name"])
        except re.error:
            raise bad_request(f"Invalid regular expression for name: {params['name']}")
        query = query.where(Instance.name.regexp_match(params["name"]))
    if params.get("status"):
        clause = _status_clause(params["status"])
        if clause is None:
            return _json_response({"servers": []})
        query = query.where(clause)
    if params.get("image"):
        query = query.where(Instance.image_id == params["image"].rstrip("/").rsplit("/", 1)[-1])
    if params.get("flavor"):
        query = query.where(Instance.flavor_id == params["flavor"].rstrip("/").rsplit("/", 1)[-1])
    if params.get("host") and ctx.is_admin:
        query = query.where(Instance.host == params["host"])
    limit = _limit(params)
    if params.get("marker"):
        marker = (await session.execute(select(Instance.created_at, Instance.id, Instance.project_id)
                                        .where(Instance.id == params["marker"]))).first()
        if marker is None or not (ctx.is_admin or ctx.owns(marker.project_id)):
            raise bad_request(f"marker [{params['marker']}] not found")
        # A row comparison, which PostgreSQL uses as the index condition: the equivalent OR form
        # is a filter, so a page 150,000 rows deep read and dropped all of them first (33 ms).
        query = query.where(tuple_(Instance.created_at, Instance.id) < tuple_(marker.created_at, marker.id))
    query = query.order_by(Instance.created_at.desc(), Instance.id.desc()).limit(limit)
    try:
        rows = (await session.execute(query)).all()
    except DBAPIError:
        if not params.get("name"):
            raise
        # PostgreSQL's regular expressions are POSIX, not Python's.
        raise bad_request(f"Invalid regular expression for name: {params['name']}")
    base = _base(request)
    if detail:
        addresses = await load_addresses(session, [r[0] for r in rows])
        admin = ctx.is_admin
        n = _N_VALUES
        servers = [render_values(r, _decode(r[n], _metadata), _decode(r[n + 1], _security_groups),
                                 _decode(r[n + 2]) if r[_VM_STATE] in ("error", "deleted") else None,
                                 addresses.get(r[0], {}), base, admin=admin) for r in rows]
    else:
        servers = [{"id": sid, "name": name,
                    "links": [{"rel": "self", "href": f"{base}/compute/v2.1/servers/{sid}"},
                              {"rel": "bookmark", "href": f"{base}/compute/servers/{sid}"}]}
                   for sid, name in rows]
    body: dict[str, Any] = {"servers": servers}
    if rows and len(rows) == limit:
        path = "servers/detail" if detail else "servers"
        body["servers_links"] = [common.next_link(request, path, rows[-1][0])]
    return _json_response(body)


def _json_response(body: Any, status_code: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status_code, media_type="application/json")


async def setup(app: FastAPI, config: Config) -> None:
    """Group commit of creates on the databases it has statements for (``create_batch``)."""
    if app.state.engine.dialect.name in create_batch.DIALECTS and config.compute.batch_creates:
        async def written(server_ids: list[str]) -> None:
            bus = app.state.bus
            if bus is not None and bus.is_connected:
                await bus.publish(subjects.CONTROLLER_WAKE, encode(Wake(instance_ids=server_ids)))

        app.state.create_batcher = CreateBatcher(app.state.sessionmaker, config.compute, written)
    app.state.build_backlog = BuildBacklog(app.state.sessionmaker, config.compute.max_pending_builds)


@router.get("/servers")
async def list_servers(request: Request, ctx: RequestContext = Depends(require_context),
                       session: AsyncSession = Depends(get_db)) -> Response:
    return await _list(request, session, ctx, detail=False)


@router.get("/servers/detail")
async def list_servers_detail(request: Request, ctx: RequestContext = Depends(require_context),
                              session: AsyncSession = Depends(get_db)) -> Response:
    return await _list(request, session, ctx, detail=True)


@router.post("/servers", status_code=202)
async def create_server(request: Request, ctx: RequestContext = Depends(require_context)) -> JSONResponse:
    require_write(ctx)
    project_id = require_project_scope(ctx)
    payload = await _json(request)
    backlog: BuildBacklog | None = getattr(request.app.state, "build_backlog", None)
    if backlog is not None:
        await backlog.admit(admission.requested(payload))
    batcher: CreateBatcher | None = getattr(request.app.state, "create_batcher", None)
    req = None
    server_ids: list[str] = []
    if batcher is not None and create_batch.batchable_body(payload):
        # Parsed and written with the other creates of the moment (one statement reads what
        # they all need, one transaction writes them); the batcher wakes the controller.
        server_id, req = await batcher.create(ctx, payload=payload)
        server_ids = [server_id] if server_id else []
    if not server_ids:
        async with request.app.state.sessionmaker() as writer, writer.begin():
            if req is None:
                req = await server_create.parse_create(writer, ctx, payload)
            count = await server_create.allowed_count(writer, project_id, req,
                                                      request.app.state.config.compute)
            server_ids = await server_create.create_instances(writer, ctx, req, count)
        await wake_controller(request, server_ids)
    first, base = server_ids[0], _base(request)
    body = {"id": first, "links": [{"rel": "self", "href": f"{base}/compute/v2.1/servers/{first}"},
                                   {"rel": "bookmark", "href": f"{base}/compute/servers/{first}"}],
            "OS-DCF:diskConfig": "MANUAL",
            "security_groups": [{"name": n} for n in req.security_groups]}
    return _json_response({"server": body}, status_code=202)


@router.get("/servers/{server_id}")
async def show_server(server_id: str, request: Request, ctx: RequestContext = Depends(require_context),
                      session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    inst = await load_server(session, ctx, server_id)
    addresses = await load_addresses(session, [inst.id])
    return {"server": render_server(inst, addresses.get(inst.id, {}), _base(request), admin=ctx.is_admin)}


@router.put("/servers/{server_id}")
async def update_server(server_id: str, request: Request, ctx: RequestContext = Depends(require_context),
                        session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    require_write(ctx)
    payload = await _json(request)
    if not isinstance(payload, dict) or not isinstance(payload.get("server"), dict):
        raise bad_request("Invalid input for request: 'server' is a required property")
    changes = payload["server"]
    async with session.begin():
        inst = await load_server(session, ctx, server_id)
        if "name" in changes:
            name = changes["name"]
            if not isinstance(name, str) or not name.strip() or len(name) > 255:
                raise bad_request(f"Invalid input for field/attribute name. Value: {name}.")
            inst.name = name
    addresses = await load_addresses(session, [inst.id])
    return {"server": render_server(inst, addresses.get(inst.id, {}), _base(request), admin=ctx.is_admin)}


@router.delete("/servers/{server_id}", status_code=204)
async def delete_server(server_id: str, request: Request, ctx: RequestContext = Depends(require_context),
                        session: AsyncSession = Depends(get_db)) -> Response:
    """The server stays visible with task_state "deleting" until the controller has had the
    guest destroyed and its ports freed (or at once when its host is down)."""
    require_write(ctx)
    async with session.begin():
        inst = await load_server(session, ctx, server_id)
        inst.deleted = True
        inst.task_state = "deleting"
        host = await session.get(Host, inst.host) if inst.host else None
        if host is None or host.status != "up":
            # Nova's local delete: nothing runs anywhere we can reach. A guest left on a down
            # host is destroyed when that host reports in again.
            await finalize_delete(session, inst)
    await wake_controller(request, [server_id])
    return Response(status_code=204)


@router.get("/servers/{server_id}/ips")
async def server_ips(server_id: str, ctx: RequestContext = Depends(require_context),
                     session: AsyncSession = Depends(get_db)) -> dict[str, Any]:
    inst = await load_server(session, ctx, server_id)
    addresses = await load_addresses(session, [inst.id])
    return {"addresses": addresses.get(inst.id, {})}


@router.post("/servers/{server_id}/action")
async def server_action(server_id: str, request: Request, ctx: RequestContext = Depends(require_context),
                        session: AsyncSession = Depends(get_db)) -> Response:
    require_write(ctx)
    payload = await _json(request)
    if isinstance(payload, dict) and "os-getConsoleOutput" in payload and len(payload) == 1:
        # A read: no transaction stays open while the host answers.
        inst = await load_server(session, ctx, server_id)
        await session.commit()  # ends the read; expire_on_commit is off
        output = await server_actions.console_output(request, inst, payload["os-getConsoleOutput"])
        return JSONResponse(output, status_code=200)
    async with session.begin():
        inst = await load_server(session, ctx, server_id)
        server_actions.run_action(inst, payload)
    await wake_controller(request, [server_id])
    return Response(status_code=202)
