"""Keystone's JSON shapes: timestamps, links, entities, token bodies."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from fastapi.responses import Response

from cloudland.api.identity.tokens import Resolved, TokenPayload
from cloudland.db.models import Domain, Project, Role, User

_json = msgspec.json.Encoder()


class JsonResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _json.encode(content)


def timestamp(ts: float) -> str:
    """``%Y-%m-%dT%H:%M:%S.%fZ`` in UTC (hand-formatted: strftime showed up in profiles)."""
    d = datetime.fromtimestamp(ts, UTC)
    return (f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}"
            f".{d.microsecond:06d}Z")


def list_links(base: str, path: str) -> dict[str, Any]:
    return {"self": f"{base}/identity/v3/{path}", "previous": None, "next": None}


def listing(base: str, key: str, path: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: items, "links": list_links(base, path)}


def _self(base: str, path: str) -> dict[str, str]:
    return {"self": f"{base}/identity/v3/{path}"}


def domain(base: str, d: Domain) -> dict[str, Any]:
    return {"id": d.id, "name": d.name, "description": d.description, "enabled": d.enabled,
            "tags": [], "options": {}, "links": _self(base, f"domains/{d.id}")}


def project(base: str, p: Project) -> dict[str, Any]:
    extra = dict(p.extra or {})
    body = {"id": p.id, "name": p.name, "domain_id": p.domain_id, "description": p.description,
            "enabled": p.enabled, "parent_id": extra.pop("parent_id", None) or p.domain_id,
            "is_domain": False, "tags": extra.pop("tags", []), "options": extra.pop("options", {}),
            "links": _self(base, f"projects/{p.id}")}
    return {**extra, **body}


def user(base: str, u: User) -> dict[str, Any]:
    extra = {k: v for k, v in (u.extra or {}).items() if k != "tokens_valid_after"}
    body: dict[str, Any] = {"id": u.id, "name": u.name, "domain_id": u.domain_id, "enabled": u.enabled,
                            "password_expires_at": None, "options": extra.pop("options", {}),
                            "links": _self(base, f"users/{u.id}")}
    if u.default_project_id:
        body["default_project_id"] = u.default_project_id
    if u.description:
        body["description"] = u.description
    if u.email:
        body["email"] = u.email
    return {**extra, **body}


def role(base: str, r: Role) -> dict[str, Any]:
    return {"id": r.id, "name": r.name, "domain_id": None, "description": r.description or None,
            "options": {}, "links": _self(base, f"roles/{r.id}")}


def token_body(payload: TokenPayload, r: Resolved, catalog: msgspec.Raw | None) -> dict[str, Any]:
    token: dict[str, Any] = {
        "methods": list(payload.methods),
        "user": {"domain": {"id": r.user_domain.id, "name": r.user_domain.name},
                 "id": r.user.id, "name": r.user.name, "password_expires_at": None},
        "audit_ids": list(payload.audit_ids),
        "expires_at": timestamp(payload.expires_at),
        "issued_at": timestamp(payload.issued_at),
    }
    if r.project is not None and r.project_domain is not None:
        token["project"] = {"domain": {"id": r.project_domain.id, "name": r.project_domain.name},
                            "id": r.project.id, "name": r.project.name}
        token["is_domain"] = False
    elif r.domain is not None:
        token["domain"] = {"id": r.domain.id, "name": r.domain.name}
    if r.project is not None or r.domain is not None:
        token["roles"] = [{"id": role.id, "name": role.name} for role in r.roles]
        if catalog is not None:
            token["catalog"] = catalog
    return {"token": token}
