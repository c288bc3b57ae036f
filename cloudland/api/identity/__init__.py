"""OpenStack identity API (Keystone v3) under /identity."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from cloudland.api.identity import (
    routes_auth,
    routes_domains,
    routes_projects,
    routes_roles,
    routes_users,
    routes_versions,
)
from cloudland.api.identity.catalog import Catalog
from cloudland.api.identity.passwords import PasswordVerifier
from cloudland.api.identity.service import IdentityService
from cloudland.api.identity.store import IdentityStore
from cloudland.api.identity.tokens import RevocationList, TokenProvider
from cloudland.config import Config

# How long another API process may serve stale identity data or miss a revocation (seconds).
CACHE_TTL_SECONDS = 5.0

router = APIRouter(prefix="/identity")
router.add_api_route("", routes_versions.versions, methods=["GET"], include_in_schema=False)
for _module in (routes_versions, routes_auth, routes_domains, routes_projects, routes_users, routes_roles):
    router.include_router(_module.router)


async def setup(app: FastAPI, config: Config) -> None:
    """Create the token provider (``app.state.tokens``) and the identity service state."""
    sessionmaker = app.state.sessionmaker
    store = IdentityStore(sessionmaker, ttl=CACHE_TTL_SECONDS)
    tokens = TokenProvider(config.keys_dir, store, RevocationList(sessionmaker, CACHE_TTL_SECONDS),
                           config.identity.token_ttl_seconds)
    app.state.tokens = tokens
    app.state.identity = IdentityService(config, sessionmaker, store, tokens, PasswordVerifier(),
                                         Catalog(config))
