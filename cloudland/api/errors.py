"""OpenStack error bodies, rendered in the style of the service that the path belongs to.

Raise ``ApiError`` anywhere in the API; the exception handlers in ``app.py`` render it as
Keystone (``{"error": {...}}``), Nova/Cinder (``{"itemNotFound": {...}}``), Neutron
(``{"NeutronError": {...}}``) or Glance (plain text with a status line) from the path prefix.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi.responses import JSONResponse, PlainTextResponse, Response

NOVA_KEYS = {
    400: "badRequest",
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    405: "badMethod",
    409: "conflictingRequest",
    413: "overLimit",
    415: "badMediaType",
    422: "unprocessableEntity",
    429: "overLimit",
    500: "computeFault",
    501: "notImplemented",
    503: "serviceUnavailable",
}

NEUTRON_TYPES = {
    400: "BadRequest",
    401: "NotAuthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "OverQuota",
    500: "InternalError",
    503: "ServiceUnavailable",
}


class ApiError(Exception):
    """An error with an HTTP status; ``kind`` refines the Neutron type (e.g. NetworkNotFound)."""

    def __init__(self, status: int, message: str, kind: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers or {}


def bad_request(message: str, kind: str | None = None) -> ApiError:
    return ApiError(400, message, kind)


def not_found(message: str, kind: str | None = None) -> ApiError:
    return ApiError(404, message, kind)


def conflict(message: str, kind: str | None = None) -> ApiError:
    return ApiError(409, message, kind)


def forbidden(message: str = "Policy does not allow this request.", kind: str | None = None) -> ApiError:
    return ApiError(403, message, kind or "PolicyNotAuthorized")


def unauthorized(message: str = "The request you have made requires authentication.") -> ApiError:
    return ApiError(401, message, headers={"WWW-Authenticate": 'Keystone uri="/identity"'})


def service_of(path: str) -> str:
    for prefix in ("identity", "compute", "network", "image", "volume"):
        if path == f"/{prefix}" or path.startswith(f"/{prefix}/"):
            return prefix
    return "other"


def render_error(path: str, status: int, message: str, kind: str | None = None,
                 headers: dict[str, str] | None = None) -> Response:
    service = service_of(path)
    title = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    if service == "network":
        body = {"NeutronError": {"type": kind or NEUTRON_TYPES.get(status, "NeutronError"),
                                 "message": message, "detail": ""}}
        return JSONResponse(body, status_code=status, headers=headers)
    if service in ("compute", "volume"):
        key = NOVA_KEYS.get(status, "computeFault" if status >= 500 else "badRequest")
        return JSONResponse({key: {"code": status, "message": message}}, status_code=status, headers=headers)
    if service == "image":
        text = f"{status} {title}\n\n{message}\n\n   "
        return PlainTextResponse(text, status_code=status, headers=headers)
    return JSONResponse({"error": {"code": status, "title": title, "message": message}},
                        status_code=status, headers=headers)
