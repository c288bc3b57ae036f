"""Neutron list semantics: filters, repeated ``fields=``, sorting and marker pagination."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from sqlalchemy import Select, and_, false, or_
from sqlalchemy.orm import InstrumentedAttribute

from cloudland.api.network.validation import as_bool, invalid

RESERVED = {"fields", "limit", "marker", "sort_key", "sort_dir", "page_reverse"}


@dataclass(frozen=True)
class Attr:
    """A filterable API attribute backed by a column; ``sortable`` only for non-null columns."""

    column: InstrumentedAttribute[Any]
    kind: type = str
    sortable: bool = True
    admin_only: bool = False


@dataclass
class ListParams:
    fields: list[str] = field(default_factory=list)
    limit: int | None = None
    marker: str | None = None
    sorts: list[tuple[str, str]] = field(default_factory=list)
    filters: dict[str, list[str]] = field(default_factory=dict)


def parse_list_params(request: Request) -> ListParams:
    q = request.query_params
    params = ListParams(fields=[f for f in q.getlist("fields") if f])
    if q.get("limit"):
        try:
            params.limit = int(q["limit"])
        except ValueError:
            raise invalid(f"Limit must be an integer 0 or greater and not '{q['limit']}'")
        if params.limit < 0:
            raise invalid(f"Limit must be an integer 0 or greater and not '{q['limit']}'")
        params.limit = params.limit or None
    params.marker = q.get("marker") or None
    keys, dirs = q.getlist("sort_key"), q.getlist("sort_dir")
    if dirs and len(dirs) != len(keys):
        raise invalid("The number of sort_keys and sort_dirs must be same")
    for i, key in enumerate(keys):
        direction = dirs[i] if dirs else "asc"
        if direction not in ("asc", "desc"):
            raise invalid(f"{direction} is invalid attribute for sort_dir")
        params.sorts.append((key, direction))
    for key in q:
        if key not in RESERVED:
            params.filters[key] = q.getlist(key)
    return params


def _convert(value: str, kind: type) -> Any:
    if kind is bool:
        return as_bool(value, "filter")
    if kind is int:
        try:
            return int(value)
        except ValueError:
            raise invalid(f"'{value}' is not an integer")
    return value


def apply_filters(stmt: Select[Any], params: ListParams, attrs: dict[str, Attr], *,
                  admin: bool) -> Select[Any]:
    """Equality filters on known attributes (repeated values mean any of them); others are ignored."""
    for name, values in params.filters.items():
        attr = attrs.get(name)
        if attr is None or (attr.admin_only and not admin):
            continue
        converted = [_convert(v, attr.kind) for v in values]
        stmt = stmt.where(attr.column.in_(converted) if len(converted) > 1 else attr.column == converted[0])
    return stmt


def apply_sort_and_page(stmt: Select[Any], params: ListParams, attrs: dict[str, Attr], id_column: Any,
                        marker_row: Any | None) -> Select[Any]:
    """ORDER BY the requested keys plus id, and continue after ``marker_row`` (keyset pagination)."""
    order: list[tuple[Any, str]] = []
    for key, direction in params.sorts:
        attr = attrs.get(key)
        if attr is None or not attr.sortable:
            raise invalid(f"{key} is invalid attribute for sort_key")
        order.append((attr.column, direction))
    if not any(col is id_column for col, _ in order):
        order.append((id_column, order[0][1] if order else "asc"))
    if marker_row is not None:
        values = [getattr(marker_row, col.key) for col, _ in order]
        clauses = []
        for i, (col, direction) in enumerate(order):
            equal = [order[j][0] == values[j] for j in range(i)]
            beyond = col > values[i] if direction == "asc" else col < values[i]
            clauses.append(and_(*equal, beyond))
        stmt = stmt.where(or_(*clauses) if clauses else false())
    stmt = stmt.order_by(*[col.asc() if d == "asc" else col.desc() for col, d in order])
    if params.limit:
        stmt = stmt.limit(params.limit)
    return stmt


def public_base(request: Request) -> str:
    configured = request.app.state.config.api.public_url.rstrip("/")
    return configured or str(request.base_url).rstrip("/")


def list_body(request: Request, collection: str, items: list[dict[str, Any]],
              params: ListParams) -> dict[str, Any]:
    """``{collection: [...]}`` with ``fields=`` applied and a ``<collection>_links`` next link."""
    body: dict[str, Any] = {collection: [select_fields(item, params.fields) for item in items]}
    if params.limit and len(items) == params.limit:
        query = [(k, v) for k, v in request.query_params.multi_items() if k != "marker"]
        query.append(("marker", items[-1]["id"]))
        href = f"{public_base(request)}{request.url.path}?{urlencode(query)}"
        body[f"{collection}_links"] = [{"rel": "next", "href": href}]
    return body


def select_fields(item: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    if not fields:
        return item
    return {k: v for k, v in item.items() if k in fields}
