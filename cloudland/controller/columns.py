"""Helpers for the controller's Core statements (no ORM objects on its hot paths).

- ``per_dialect``: statements built once per dialect, with ``column IN (...)`` as one array
  parameter on PostgreSQL (``= ANY(:ids)``): the SQL text is the same whatever the number of
  ids, so it is compiled and prepared once, and no bind is rendered per value. Other databases
  get an expanding ``IN``.
- ``array_rows``: PostgreSQL rows from parallel array parameters (``unnest``), so one
  statement reads or writes a whole batch of keys or values.
- ``json_text`` / ``json_value``: JSON columns read as text and decoded once per distinct text.
  asyncpg would otherwise decode every JSON column of every row, used or not, and most rows share
  a handful of values (``[]``, ``["<the project's default group>"]``, a flavor).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

from sqlalchemy import String, Text, any_, bindparam, cast, func
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

OneOf = Callable[[ColumnElement[Any], str], ColumnElement[bool]]


def _pg_one_of(column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    return column == any_(bindparam(name, type_=postgresql.ARRAY(String)))


def _one_of(column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    return column.in_(bindparam(name, expanding=True))


def on_postgresql(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def per_dialect(build: Callable[[OneOf], Any]) -> Callable[[AsyncSession], Any]:
    """``build(one_of)`` once per dialect, where ``one_of(column, "ids")`` tests membership in the
    list passed as the parameter ``ids``: statements built once and reused (no construction and
    no cache-key walk per execution). Call the result with the session to get the statement."""

    @cache
    def built(pg: bool) -> Any:
        return build(_pg_one_of if pg else _one_of)

    def get(session: AsyncSession) -> Any:
        return built(on_postgresql(session))

    return get


def json_text(column: ColumnElement[Any]) -> ColumnElement[str]:
    """A JSON column as its stored text (decoded by ``json_value`` only where used)."""
    return cast(column, Text)


_MISSING = object()
_decoded: dict[str, Any] = {}
_CACHED_LENGTH = 512  # longer texts (user metadata) are rarely shared: decoded each time


def json_value(text: str | None) -> Any:
    """``json.loads(text)`` (None for SQL NULL), remembered for short texts. The value may be
    shared with other callers: read it, copy it, never change it."""
    if text is None:
        return None
    if len(text) > _CACHED_LENGTH:
        return json.loads(text)
    found = _decoded.get(text, _MISSING)
    if found is _MISSING:
        if len(_decoded) >= 10_000:
            _decoded.clear()
        found = _decoded[text] = json.loads(text)
    return found


def array_rows(alias: str, columns: Mapping[str, Any], with_ordinality: str | None = None) -> Any:
    """``unnest(:<alias>_<c1>, :<alias>_<c2>, ...) [WITH ORDINALITY] AS <alias>(c1, c2, ...)``
    (PostgreSQL): one row per position of parallel arrays, each parameter an array of the
    column's element type."""
    arrays = (bindparam(f"{alias}_{name}", type_=postgresql.ARRAY(element))
              for name, element in columns.items())
    return (func.unnest(*arrays).table_valued(*columns, with_ordinality=with_ordinality)
            .render_derived(alias))
