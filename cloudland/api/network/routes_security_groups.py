"""Neutron security groups: /v2.0/security-groups and /v2.0/security-group-rules."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy import String, cast, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.context import RequestContext, require_context
from cloudland.api.deps import get_db, wake_controller
from cloudland.api.errors import ApiError
from cloudland.api.network.query import (
    Attr,
    apply_filters,
    apply_sort_and_page,
    list_body,
    parse_list_params,
    select_fields,
)
from cloudland.api.network.render import timestamp
from cloudland.api.network.secgroup_rules import (
    check_duplicate,
    default_rules,
    ensure_default_group,
    group_not_found,
    rule_not_found,
    rule_values,
)
from cloudland.api.network.validation import as_bool, as_str, check_project, read_body
from cloudland.api.policy import require_write
from cloudland.db.models import DefaultSecurityGroup, Port, SecurityGroup, SecurityGroupRule

router = APIRouter()

QUOTAS = {"security_group": (SecurityGroup, 10), "security_group_rule": (SecurityGroupRule, 100)}
GROUP_ATTRS = {
    "id": Attr(SecurityGroup.id),
    "name": Attr(SecurityGroup.name),
    "description": Attr(SecurityGroup.description),
    "project_id": Attr(SecurityGroup.project_id),
    "tenant_id": Attr(SecurityGroup.project_id),
    "stateful": Attr(SecurityGroup.stateful, bool),
    "revision_number": Attr(SecurityGroup.revision_number, int),
    "created_at": Attr(SecurityGroup.created_at),
    "updated_at": Attr(SecurityGroup.updated_at),
}
R = SecurityGroupRule
RULE_ATTRS = {
    "id": Attr(R.id),
    "security_group_id": Attr(R.security_group_id),
    "direction": Attr(R.direction),
    "ethertype": Attr(R.ethertype),
    "protocol": Attr(R.protocol, sortable=False),
    "port_range_min": Attr(R.port_range_min, int, sortable=False),
    "port_range_max": Attr(R.port_range_max, int, sortable=False),
    "remote_ip_prefix": Attr(R.remote_ip_prefix, sortable=False),
    "remote_group_id": Attr(R.remote_group_id, sortable=False),
    "description": Attr(R.description),
    "project_id": Attr(R.project_id),
    "tenant_id": Attr(R.project_id),
    "revision_number": Attr(R.revision_number, int),
    "created_at": Attr(R.created_at),
    "updated_at": Attr(R.updated_at),
}


def rule_view(rule: SecurityGroupRule, default_ids: set[str]) -> dict[str, Any]:
    return {
        "id": rule.id,
        "security_group_id": rule.security_group_id,
        "direction": rule.direction,
        "ethertype": rule.ethertype,
        "protocol": rule.protocol,
        "port_range_min": rule.port_range_min,
        "port_range_max": rule.port_range_max,
        "remote_ip_prefix": rule.remote_ip_prefix,
        "normalized_cidr": rule.remote_ip_prefix,
        "remote_group_id": rule.remote_group_id,
        "remote_address_group_id": None,
        "description": rule.description or "",
        "project_id": rule.project_id,
        "tenant_id": rule.project_id,
        "belongs_to_default_sg": rule.security_group_id in default_ids,
        "created_at": timestamp(rule.created_at),
        "updated_at": timestamp(rule.updated_at),
        "revision_number": rule.revision_number or 0,
    }


def group_view(group: SecurityGroup, rules: list[SecurityGroupRule], default_ids: set[str]) -> dict[str, Any]:
    return {
        "id": group.id,
        "name": group.name,
        "description": group.description or "",
        "project_id": group.project_id,
        "tenant_id": group.project_id,
        "stateful": group.stateful,
        "shared": False,
        "tags": list(group.tags or []),
        "security_group_rules": [rule_view(r, default_ids) for r in rules],
        "created_at": timestamp(group.created_at),
        "updated_at": timestamp(group.updated_at),
        "revision_number": group.revision_number or 0,
    }


async def _default_ids(session: AsyncSession, project_ids: set[str]) -> set[str]:
    rows = await session.scalars(
        select(DefaultSecurityGroup.security_group_id).where(DefaultSecurityGroup.project_id.in_(project_ids))
    )
    return set(rows)


async def _views(session: AsyncSession, groups: list[SecurityGroup]) -> list[dict[str, Any]]:
    rules: dict[str, list[SecurityGroupRule]] = {g.id: [] for g in groups}
    for rule in await session.scalars(
        select(R).where(R.security_group_id.in_(list(rules))).order_by(R.created_at, R.id)
    ):
        rules[rule.security_group_id].append(rule)
    defaults = await _default_ids(session, {g.project_id for g in groups})
    return [group_view(g, rules[g.id], defaults) for g in groups]


async def get_group(session: AsyncSession, ctx: RequestContext, group_id: str) -> SecurityGroup:
    group = await session.get(SecurityGroup, group_id)
    if group is None or not (ctx.is_admin or ctx.owns(group.project_id)):
        raise group_not_found(group_id)
    return group


async def _check_quota(session: AsyncSession, resource: str, project_id: str, adding: int = 1) -> None:
    model, limit = QUOTAS[resource]
    used = await session.scalar(select(func.count()).select_from(model).where(model.project_id == project_id))
    if (used or 0) + adding > limit:
        raise ApiError(409, f"Quota exceeded for resources: ['{resource}'].", "OverQuota")


async def notify(request: Request, session: AsyncSession, group_ids: set[str],
                 networks_also: set[str] | None = None) -> None:
    """Wake the controllers for every network with a bound port in (or admitted by) these groups,
    and for ``networks_also`` (a port's own network, when its filtering changed)."""
    referring = set(
        await session.scalars(select(R.security_group_id).where(R.remote_group_id.in_(group_ids)))
    )
    affected = group_ids | referring
    if not affected and not networks_also:
        return
    # The JSON-encoded id in the list's text narrows the rows in the database (every bound port
    # of a 500,000-server cloud read into the API was seconds per rule); the list decides.
    listed = cast(Port.security_groups, String)
    rows = await session.execute(
        select(Port.network_id, Port.security_groups).where(
            Port.binding_host_id != "", Port.port_security_enabled.is_(True),
            or_(False, *(listed.contains(json.dumps(g), autoescape=True) for g in sorted(affected))),
        )
    )
    networks = {net for net, groups in rows if affected & set(groups or [])} | (networks_also or set())
    if networks:
        await wake_controller(request, [], sorted(networks))


# --- groups -----------------------------------------------------------------------------------


@router.get("/security-groups")
async def list_groups(
    request: Request, ctx: RequestContext = Depends(require_context), session: AsyncSession = Depends(get_db)
) -> dict[str, Any]:
    if ctx.project_id:
        await ensure_default_group(session, ctx.project_id)
        await session.commit()
    params = parse_list_params(request)
    stmt = select(SecurityGroup)
    if not ctx.is_admin:
        stmt = stmt.where(SecurityGroup.project_id == ctx.project_id)
    stmt = apply_filters(stmt, params, GROUP_ATTRS, admin=ctx.is_admin)
    marker = await get_group(session, ctx, params.marker) if params.marker else None
    groups = list(
        await session.scalars(apply_sort_and_page(stmt, params, GROUP_ATTRS, SecurityGroup.id, marker))
    )
    return list_body(request, "security_groups", await _views(session, groups), params)


@router.get("/security-groups/{group_id}")
async def show_group(
    group_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> dict[str, Any]:
    group = await get_group(session, ctx, group_id)
    view = (await _views(session, [group]))[0]
    return {"security_group": select_fields(view, parse_list_params(request).fields)}


@router.post("/security-groups", status_code=201)
async def create_group(
    request: Request, ctx: RequestContext = Depends(require_context), session: AsyncSession = Depends(get_db)
) -> dict[str, Any]:
    require_write(ctx)
    attrs = await read_body(
        request, "security_group", {"name", "description", "project_id", "tenant_id", "stateful"}
    )
    project_id = check_project(ctx.project_id, ctx.is_admin, attrs)
    name = as_str(attrs.get("name"), "name")
    await ensure_default_group(session, project_id)
    if name == "default":
        raise ApiError(409, "Default security group already exists.", "SecurityGroupDefaultAlreadyExists")
    await _check_quota(session, "security_group", project_id)
    group = SecurityGroup(
        project_id=project_id,
        name=name,
        description=as_str(attrs.get("description"), "description", 255),
        stateful=as_bool(attrs.get("stateful", True), "stateful"),
    )
    session.add(group)
    await session.flush()
    session.add_all(default_rules(group, is_default=False))
    await session.commit()
    return {"security_group": (await _views(session, [group]))[0]}


@router.put("/security-groups/{group_id}")
async def update_group(
    group_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> dict[str, Any]:
    require_write(ctx)
    group = await get_group(session, ctx, group_id)
    attrs = await read_body(request, "security_group", {"name", "description", "stateful"})
    if "name" in attrs:
        name = as_str(attrs["name"], "name")
        if (
            group.name == "default"
            and name != "default"
            and group.id in await _default_ids(session, {group.project_id})
        ):
            raise ApiError(
                409, "Updating default security group not allowed.", "SecurityGroupCannotUpdateDefault"
            )
        group.name = name
    if "description" in attrs:
        group.description = as_str(attrs["description"], "description", 255)
    if "stateful" in attrs:
        group.stateful = as_bool(attrs["stateful"], "stateful")
    group.revision_number = (group.revision_number or 0) + 1
    await session.commit()
    return {"security_group": (await _views(session, [group]))[0]}


@router.delete("/security-groups/{group_id}", status_code=204)
async def delete_group(
    group_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> Response:
    require_write(ctx)
    group = await get_group(session, ctx, group_id)
    if group.id in await _default_ids(session, {group.project_id}) and not ctx.is_admin:
        raise ApiError(
            409,
            "Insufficient rights for removing default security group.",
            "SecurityGroupCannotRemoveDefault",
        )
    in_use = await session.scalars(select(Port.security_groups).where(Port.project_id == group.project_id))
    if any(group.id in (groups or []) for groups in in_use):
        raise ApiError(409, f"Security Group {group.id} in use.", "SecurityGroupInUse")
    await notify(request, session, {group.id})
    await session.delete(group)
    for rule in await session.scalars(select(R).where(R.security_group_id == group.id)):
        await session.delete(rule)
    await session.commit()
    return Response(status_code=204)


# --- rules ------------------------------------------------------------------------------------


async def get_rule(session: AsyncSession, ctx: RequestContext, rule_id: str) -> SecurityGroupRule:
    rule = await session.get(R, rule_id)
    if rule is None or not (ctx.is_admin or ctx.owns(rule.project_id)):
        raise rule_not_found(rule_id)
    return rule


@router.get("/security-group-rules")
async def list_rules(
    request: Request, ctx: RequestContext = Depends(require_context), session: AsyncSession = Depends(get_db)
) -> dict[str, Any]:
    params = parse_list_params(request)
    stmt = select(R)
    if not ctx.is_admin:
        stmt = stmt.where(R.project_id == ctx.project_id)
    stmt = apply_filters(stmt, params, RULE_ATTRS, admin=ctx.is_admin)
    marker = await get_rule(session, ctx, params.marker) if params.marker else None
    rules = list(await session.scalars(apply_sort_and_page(stmt, params, RULE_ATTRS, R.id, marker)))
    defaults = await _default_ids(session, {r.project_id for r in rules})
    return list_body(request, "security_group_rules", [rule_view(r, defaults) for r in rules], params)


@router.get("/security-group-rules/{rule_id}")
async def show_rule(
    rule_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> dict[str, Any]:
    rule = await get_rule(session, ctx, rule_id)
    view = rule_view(rule, await _default_ids(session, {rule.project_id}))
    return {"security_group_rule": select_fields(view, parse_list_params(request).fields)}


@router.post("/security-group-rules", status_code=201)
async def create_rule(
    request: Request, ctx: RequestContext = Depends(require_context), session: AsyncSession = Depends(get_db)
) -> dict[str, Any]:
    require_write(ctx)
    attrs = await read_body(
        request,
        "security_group_rule",
        set(RULE_ATTRS) - {"id", "revision_number", "created_at", "updated_at"},
    )
    if not attrs.get("security_group_id"):
        raise ApiError(
            400,
            "Failed to parse request. Required attribute 'security_group_id' not specified",
            "HTTPBadRequest",
        )
    group = await get_group(session, ctx, as_str(attrs["security_group_id"], "security_group_id", 36))
    values = rule_values(attrs)
    if values["remote_group_id"]:
        await get_group(session, ctx, values["remote_group_id"])
    await check_duplicate(session, group.id, values)
    await _check_quota(session, "security_group_rule", group.project_id)
    rule = R(security_group_id=group.id, project_id=group.project_id, **values)
    session.add(rule)
    group.revision_number = (group.revision_number or 0) + 1
    await session.commit()
    await notify(request, session, {group.id})
    return {"security_group_rule": rule_view(rule, await _default_ids(session, {rule.project_id}))}


@router.delete("/security-group-rules/{rule_id}", status_code=204)
async def delete_rule(
    rule_id: str,
    request: Request,
    ctx: RequestContext = Depends(require_context),
    session: AsyncSession = Depends(get_db),
) -> Response:
    require_write(ctx)
    rule = await get_rule(session, ctx, rule_id)
    group_id = rule.security_group_id
    await session.delete(rule)
    await session.commit()
    await notify(request, session, {group_id})
    return Response(status_code=204)
