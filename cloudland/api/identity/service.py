"""The identity service's per-app state (``app.state.identity``)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cloudland.api.identity.catalog import Catalog
from cloudland.api.identity.passwords import PasswordVerifier
from cloudland.api.identity.store import IdentityStore
from cloudland.api.identity.tokens import TokenProvider
from cloudland.config import Config


@dataclass
class IdentityService:
    config: Config
    sessionmaker: async_sessionmaker[AsyncSession]
    store: IdentityStore
    tokens: TokenProvider
    passwords: PasswordVerifier
    catalog: Catalog

    @property
    def base(self) -> str:
        return self.config.api.base_url()

    def changed(self) -> None:
        """Call after any identity write: drops this process's cached identity data."""
        self.store.invalidate()


def identity(request: Request) -> IdentityService:
    return request.app.state.identity
