"""Connecting to NATS with reconnect-forever defaults."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client

log = logging.getLogger(__name__)


async def connect(
    url: str,
    name: str,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
) -> Client:
    async def _disconnected() -> None:
        log.warning("%s: disconnected from NATS", name)

    async def _reconnected() -> None:
        log.info("%s: reconnected to NATS", name)
        if on_reconnect:
            await on_reconnect()

    async def _error(e: Exception) -> None:
        log.debug("%s: NATS error: %s", name, e)

    return await nats.connect(
        servers=[url],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        disconnected_cb=_disconnected,
        reconnected_cb=_reconnected,
        error_cb=_error,
    )


async def subscriptions_ready(nc: Client) -> None:
    """Return once the server holds every subscription sent so far on ``nc``.

    nats-py (2.16) writes ``flush()``'s PING straight to the socket, ahead of commands still
    queued for its flusher task, so one ``flush()`` can return before an earlier SUB reached the
    server, and another connection's publish can then miss it. The flusher is woken before the
    first PING's reply can be read, so the second PING travels behind the SUBs.
    """
    await nc.flush()
    await nc.flush()
