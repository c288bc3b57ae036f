"""The API process: every OpenStack service under one port, path prefixes per service."""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloudland.api import compute, identity, image, internal, metadata, network
from cloudland.api.errors import ApiError, render_error
from cloudland.bus.connection import connect
from cloudland.config import Config
from cloudland.db.engine import make_engine, make_sessionmaker
from cloudland.service_gc import tune_for_service

log = logging.getLogger(__name__)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "Invalid input for request: " + "; ".join(parts)


def create_app(config: Config, *, connect_bus: bool = True, tune_gc: bool = False) -> FastAPI:
    """``tune_gc``: ``service_gc.tune_for_service`` once started (for a process that serves
    only this app, such as an API worker; not for tests, which create many apps)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        engine = make_engine(config.database_url)
        app.state.engine = engine
        app.state.sessionmaker = make_sessionmaker(engine)
        app.state.bus = await connect(config.nats.url, "cloudland-api") if connect_bus else None
        for service in (identity, compute, image, network, internal, metadata):
            await service.setup(app, config)
        if tune_gc:
            tune_for_service()
        try:
            yield
        finally:
            if app.state.bus is not None:
                await app.state.bus.drain()
            await engine.dispose()

    app = FastAPI(title="Cloudland API", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.config = config

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):  # type: ignore[no-untyped-def]
        return render_error(request.url.path, exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):  # type: ignore[no-untyped-def]
        return render_error(request.url.path, 400, _validation_message(exc))

    @app.exception_handler(json.JSONDecodeError)
    async def _bad_json(request: Request, exc: json.JSONDecodeError):  # type: ignore[no-untyped-def]
        return render_error(request.url.path, 400, f"Malformed request body: {exc.msg}")

    @app.exception_handler(UnicodeDecodeError)
    async def _bad_encoding(request: Request, exc: UnicodeDecodeError):  # type: ignore[no-untyped-def]
        return render_error(request.url.path, 400, "Malformed request body: not valid UTF-8 JSON")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):  # type: ignore[no-untyped-def]
        message = exc.detail if isinstance(exc.detail, str) else "Error"
        if exc.status_code == 404 and message == "Not Found":
            message = "The resource could not be found."
        return render_error(request.url.path, exc.status_code, message,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):  # type: ignore[no-untyped-def]
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return render_error(request.url.path, 500, "An unexpected error occurred.")

    @app.get("/", include_in_schema=False)
    async def root() -> JSONResponse:
        return JSONResponse({"name": "cloudland", "services": ["identity", "compute", "network", "image"]})

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    # Compute first: routes are matched in order, and server creates and lists are most requests.
    for service in (compute, identity, image, network, internal, metadata):
        app.include_router(service.router)
    compute.versions.install_microversions(app)
    return app
