"""Policy in one place: who may read and change what.

Roles (Keystone's defaults): ``admin`` everything in every project; ``member`` reads and
changes its own project's resources; ``reader`` only reads them. Another project's resource
is reported as not found (404), never as forbidden, so its existence does not leak.
"""

from __future__ import annotations

from cloudland.api.context import RequestContext
from cloudland.api.errors import ApiError, forbidden


def require_project_scope(ctx: RequestContext) -> str:
    if not ctx.project_id:
        raise forbidden("A project-scoped token is required.")
    return ctx.project_id


def can_see(ctx: RequestContext, owner_project_id: str | None, *, public: bool = False) -> bool:
    return public or ctx.is_admin or ctx.owns(owner_project_id)


def check_visible(ctx: RequestContext, owner_project_id: str | None, not_found: ApiError,
                  *, public: bool = False) -> None:
    if not can_see(ctx, owner_project_id, public=public):
        raise not_found


def require_write(ctx: RequestContext) -> None:
    if not ctx.can_write:
        raise forbidden()


def require_admin(ctx: RequestContext) -> None:
    if not ctx.is_admin:
        raise forbidden()
