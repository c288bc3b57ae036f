"""Who is calling: the request context every authenticated handler receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from fastapi import Request

from cloudland.api.errors import unauthorized


@dataclass(frozen=True)
class RequestContext:
    user_id: str
    user_name: str
    user_domain_id: str
    project_id: str | None  # None for domain- or un-scoped tokens
    project_name: str | None
    project_domain_id: str | None
    roles: list[str] = field(default_factory=list)
    audit_id: str = ""
    expires_at: datetime | None = None
    domain_id: str | None = None  # set for domain-scoped tokens

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def can_write(self) -> bool:
        return self.is_admin or "member" in self.roles

    def owns(self, project_id: str | None) -> bool:
        return project_id is not None and project_id == self.project_id


async def require_context(request: Request) -> RequestContext:
    """FastAPI dependency: validate X-Auth-Token, or answer 401."""
    token = request.headers.get("x-auth-token")
    if not token:
        raise unauthorized()
    ctx = await request.app.state.tokens.validate(token)
    request.state.context = ctx
    return ctx
