"""Nova version documents and the microversion negotiation for everything under /compute."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloudland.api.compute.common import (
    MAX_VERSION,
    MIN_VERSION,
    VERSION_UPDATED,
    Microversion,
    compute_url,
)
from cloudland.api.errors import ApiError

router = APIRouter()

SERVICE = "compute"
LEGACY_HEADER = "x-openstack-nova-api-version"
VARY = "OpenStack-API-Version, X-OpenStack-Nova-API-Version"


def _version(request: Request, *, detail: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "v2.1",
        "status": "CURRENT",
        "version": str(MAX_VERSION),
        "min_version": str(MIN_VERSION),
        "updated": VERSION_UPDATED,
        "links": [{"rel": "self", "href": f"{compute_url(request)}/v2.1/"}],
    }
    if detail:
        doc["links"].append({"rel": "describedby", "type": "text/html",
                             "href": "http://docs.openstack.org/"})
        doc["media-types"] = [{"base": "application/json",
                               "type": "application/vnd.openstack.compute+json;version=2.1"}]
    return doc


@router.get("/")
async def list_versions(request: Request) -> JSONResponse:
    return JSONResponse({"versions": [_version(request, detail=False)]})


@router.get("/v2.1")
@router.get("/v2.1/")
async def show_version(request: Request) -> JSONResponse:
    return JSONResponse({"version": _version(request, detail=True)})


def requested_version(headers: dict[str, str]) -> Microversion:
    """The microversion asked for by the (lower-cased) headers; raises 400/406 like Nova."""
    text: str | None = None
    for item in headers.get("openstack-api-version", "").split(","):
        parts = item.strip().split()
        if len(parts) == 2 and parts[0].lower() == SERVICE:
            text = parts[1]
    if text is None:
        text = headers.get(LEGACY_HEADER)
    if text is None:
        return MIN_VERSION
    if text.strip().lower() == "latest":
        return MAX_VERSION
    version = Microversion.parse(text)
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise ApiError(406, f"Version {version} is not supported by the API. "
                            f"Minimum is {MIN_VERSION} and maximum is {MAX_VERSION}.")
    return version


class MicroversionMiddleware:
    """Pure ASGI (streaming-safe): negotiates the version, stores it in ``request.state.microversion``
    and echoes it in the response headers of every /compute request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != "/compute" and not path.startswith("/compute/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            version = requested_version(headers)
        except ApiError as exc:
            await _send_fault(send, exc)
            return
        if path == "/compute":
            # The router cannot hold an empty path under the /compute prefix; serve it as /compute/
            # rather than answering with a redirect.
            scope = {**scope, "path": "/compute/", "raw_path": b"/compute/"}
        scope.setdefault("state", {})["microversion"] = version
        extra = [
            (b"openstack-api-version", f"{SERVICE} {version}".encode()),
            (b"x-openstack-nova-api-version", str(version).encode()),
            (b"vary", VARY.encode()),
        ]

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_version)


async def _send_fault(send: Send, exc: ApiError) -> None:
    # Nova names every status it has no name for (406 included) "computeFault".
    key = "badRequest" if exc.status == 400 else "computeFault"
    body = json.dumps({key: {"code": exc.status, "message": exc.message}}).encode()
    await send({"type": "http.response.start", "status": exc.status, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"vary", VARY.encode()),
    ]})
    await send({"type": "http.response.body", "body": body})


def install_microversions(app: FastAPI) -> None:
    """Called once from ``create_app``."""
    app.add_middleware(MicroversionMiddleware)
