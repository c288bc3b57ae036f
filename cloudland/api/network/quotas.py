"""Per-project resource limits (Neutron's defaults); exceeding one is 409 OverQuota."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.errors import ApiError
from cloudland.db.models import Network, Port, Subnet

DEFAULTS: dict[str, tuple[type[Network] | type[Subnet] | type[Port], int]] = {
    "network": (Network, 100),
    "subnet": (Subnet, 100),
    "port": (Port, 500),
}


async def check_quota(session: AsyncSession, resource: str, project_id: str, adding: int = 1) -> None:
    model, limit = DEFAULTS[resource]
    if limit < 0:
        return
    used = await session.scalar(select(func.count()).select_from(model).where(model.project_id == project_id))
    if (used or 0) + adding > limit:
        raise ApiError(409, f"Quota exceeded for resources: ['{resource}'].", "OverQuota")
