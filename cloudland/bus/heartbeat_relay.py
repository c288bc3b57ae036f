"""Heartbeat relays: one NATS message per relay and flush period instead of one per heartbeat.

Agents publish heartbeats on ``heartbeat.<zone>``. A relay subscribes ``heartbeat.*`` in the
queue group ``heartbeat-relay``, so each heartbeat goes to exactly one relay, and NATS picks the
member on the publisher's own server when there is one (also across leaf nodes): a relay next to
a rack's leaf server takes that rack's heartbeats, and they never travel further one by one.
Every ``flush_seconds`` the relay publishes what it took as one ``HeartbeatBatch`` on
``heartbeats.batch``, which every controller subscribes to.

The relay never decodes a heartbeat: it keeps the payload bytes and joins them into the
batch's JSON envelope. A payload that is not obviously a JSON object (first byte ``{``, last
``}``) is dropped, so one stray message does not make the whole batch undecodable; the
controller still survives (and logs) a batch that fails to decode.

Every controller runs one relay in-process (its own connection), so a setup without leaf
relays (all-in-one, a flat NATS) needs no other process, and heartbeats still arrive when a
leaf's relay stops (the queue group then delivers to another member). ``cloudland relay
--nats URL ...`` runs relays on their own, next to each rack's leaf server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cloudland.bus import subjects
from cloudland.bus.connection import connect, subscriptions_ready
from cloudland.bus.messages import HeartbeatBatch, encode

log = logging.getLogger(__name__)

DEFAULT_FLUSH_SECONDS = 0.5
# Upper bound of one batch message (the server's max_payload lowers it further).
MAX_BATCH_BYTES = 512 * 1024
# The envelope around the joined heartbeats: {"kind":"heartbeat_batch","heartbeats":[ ... ]}
_HEAD = encode(HeartbeatBatch())[:-1] + b',"heartbeats":['
_TAIL = b"]}"
_LBRACE, _RBRACE = ord("{"), ord("}")


def batch_bytes(payloads: Sequence[bytes]) -> bytes:
    """A ``HeartbeatBatch`` message holding these encoded heartbeats, without decoding them."""
    return _HEAD + b",".join(payloads) + _TAIL


def plausible(payload: bytes) -> bool:
    """Cheap check that a payload is a JSON object (no decoding)."""
    return len(payload) >= 2 and payload[0] == _LBRACE and payload[-1] == _RBRACE


class HeartbeatRelay:
    """Takes heartbeats on one NATS server and forwards them in batches.

    ``url``: the server to connect to (the relay owns that connection); or ``nc``: a
    connection to share, which the relay neither opens nor closes.
    """

    def __init__(self, url: str | None = None, *, nc: Client | None = None,
                 flush_seconds: float = DEFAULT_FLUSH_SECONDS, max_batch_bytes: int = MAX_BATCH_BYTES,
                 name: str = "cloudland-heartbeat-relay") -> None:
        if (url is None) == (nc is None):
            raise ValueError("give either url or nc")
        if flush_seconds <= 0:
            raise ValueError("flush_seconds must be positive")
        self.url = url
        self.name = name
        self.flush_seconds = flush_seconds
        self.max_batch_bytes = max_batch_bytes
        self.nc: Client | None = nc
        self._owned = nc is None
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        # Counters (for tests and figures).
        self.relayed = 0  # heartbeats forwarded
        self.batches = 0  # batch messages published
        self.dropped = 0  # payloads skipped as not a JSON object
        self.lost = 0  # heartbeats of batches that could not be published

    async def start(self) -> None:
        if self.nc is None:
            assert self.url is not None
            self.nc = await connect(self.url, self.name)
        self._sub = await self.nc.subscribe(subjects.HEARTBEAT_ALL, queue=subjects.HEARTBEAT_RELAY_QUEUE,
                                            cb=self._on_heartbeat)
        await subscriptions_ready(self.nc)
        self._task = asyncio.create_task(self._flush_loop(), name=f"{self.name}-flush")

    async def stop(self) -> None:
        """Unsubscribe (the queue group's other members take over), forward what is pending, close."""
        if self._sub is not None:
            # Drain: the server stops sending, and what it sent already is still taken.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._sub.drain(), 5)
            self._sub = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()
        if self.nc is not None and self._owned:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5)
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None

    async def _on_heartbeat(self, msg: Msg) -> None:
        data = msg.data
        if not plausible(data):
            self.dropped += 1
            return
        self._pending.append(data)
        self._pending_bytes += len(data) + 1
        if self._pending_bytes >= self._limit():
            await self.flush()

    def _limit(self) -> int:
        server = self.nc.max_payload if self.nc is not None else self.max_batch_bytes
        return max(1024, min(self.max_batch_bytes, server) - len(_HEAD) - len(_TAIL))

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            try:
                await self.flush()
            except Exception:
                log.exception("%s: flush failed", self.name)

    async def flush(self) -> None:
        """Publish what was gathered (in several batches if it is larger than one message may be)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        nc = self.nc
        if nc is None or not nc.is_connected:
            # Heartbeats are periodic: the next ones replace these.
            self.lost += len(pending)
            return
        limit = self._limit()
        start, size = 0, 0
        for i, payload in enumerate(pending):
            if size and size + len(payload) + 1 > limit:
                await self._publish(nc, pending[start:i])
                start, size = i, 0
            size += len(payload) + 1
        await self._publish(nc, pending[start:])

    async def _publish(self, nc: Client, payloads: list[bytes]) -> None:
        try:
            await nc.publish(subjects.HEARTBEAT_BATCH, batch_bytes(payloads))
        except Exception as e:
            self.lost += len(payloads)
            log.warning("%s: cannot publish a batch of %d heartbeats: %s", self.name, len(payloads), e)
            return
        self.relayed += len(payloads)
        self.batches += 1


class HeartbeatRelays:
    """One relay per server URL in one process (``cloudland relay``)."""

    def __init__(self, urls: Sequence[str], flush_seconds: float = DEFAULT_FLUSH_SECONDS) -> None:
        self.relays = [HeartbeatRelay(url, flush_seconds=flush_seconds, name=f"cloudland-relay-{k}")
                       for k, url in enumerate(urls)]

    async def start(self) -> None:
        await asyncio.gather(*(r.start() for r in self.relays))
        log.info("heartbeat relays ready on %s", ", ".join(str(r.url) for r in self.relays))

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.relays), return_exceptions=True)
