"""Version discovery: ``GET /identity`` and ``GET /identity/v3``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from cloudland.api.identity.render import JsonResponse
from cloudland.api.identity.service import identity

router = APIRouter()
# ``GET /identity`` (no slash) is added by the package, which owns the prefix.

UPDATED = "2019-01-22T00:00:00Z"


def version(base: str) -> dict[str, Any]:
    return {"id": "v3.14", "status": "stable", "updated": UPDATED,
            "links": [{"rel": "self", "href": f"{base}/identity/v3/"}],
            "media-types": [{"base": "application/json",
                             "type": "application/vnd.openstack.identity-v3+json"}]}


@router.get("/")
async def versions(request: Request) -> Response:
    # Keystone answers 300 Multiple Choices here; clients accept it and it is what they expect.
    body = {"versions": {"values": [version(identity(request).base)]}}
    return JsonResponse(body, status_code=300)


@router.get("/v3")
@router.get("/v3/")
async def v3(request: Request) -> Response:
    return JsonResponse({"version": version(identity(request).base)})
