"""One NATS subscription per subject for the many followers of one connection.

A host follows the sets of the networks it carries and of the remote groups their rules name
(``net.<id>.peers``, ``sg.<id>.members``). A real host runs one agent; a simulated-hypervisor
process runs a thousand on a couple of connections, and many of them follow the same subjects:
a project's member set was followed by some forty agents of each process, and NATS sent each
message forty times down the same connection, where nats-py queued it forty times for forty
tasks. ``SharedSubscriptions`` makes that one subscription whose messages are handed to every
follower in turn, in the order they came, and decoded once for all of them (``decoded``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cloudland.bus.messages import Message, decode

log = logging.getLogger(__name__)

Callback = Callable[[Msg], Awaitable[None]]


class Following:
    """One follower's share of a subject; ``unsubscribe()`` ends it."""

    def __init__(self, shared: SharedSubscriptions, subject: str, callback: Callback) -> None:
        self._shared = shared
        self.subject = subject
        self.callback = callback
        self.active = True

    async def unsubscribe(self) -> None:
        await self._shared._leave(self)


class _Subject:
    def __init__(self) -> None:
        self.followers: list[Following] = []
        self.subscribed: asyncio.Future[Subscription] | None = None


class SharedSubscriptions:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._subjects: dict[str, _Subject] = {}
        self._last: tuple[Msg, Message] | None = None  # the message being handed round, decoded

    def decoded(self, msg: Msg) -> Message:
        """``msg`` decoded (``bus.messages.decode``): once for all its followers. (The decoded
        message is theirs together: never change it.)"""
        last = self._last
        if last is None or last[0] is not msg:
            last = self._last = (msg, decode(msg.data))
        return last[1]

    def followers(self, subject: str) -> int:
        entry = self._subjects.get(subject)
        return len(entry.followers) if entry else 0

    async def subscribe(self, subject: str, cb: Callback) -> Following:
        """Follow ``subject``: ``cb`` gets each message from now on (the first follower of a
        subject subscribes on the connection, the others join it)."""
        following = Following(self, subject, cb)
        entry = self._subjects.get(subject)
        if entry is None:
            entry = self._subjects[subject] = _Subject()
            entry.followers.append(following)

            async def deliver(msg: Msg, entry: _Subject = entry) -> None:
                await self._deliver(entry, msg)

            entry.subscribed = asyncio.ensure_future(self.nc.subscribe(subject, cb=deliver))
        else:
            entry.followers.append(following)
        assert entry.subscribed is not None
        try:
            await asyncio.shield(entry.subscribed)
        except Exception:
            await self._leave(following)
            raise
        return following

    async def _deliver(self, entry: _Subject, msg: Msg) -> None:
        for following in tuple(entry.followers):
            if not following.active:  # left while an earlier follower took the message
                continue
            try:
                await following.callback(msg)
            except Exception:
                log.exception("a follower of %s failed on a message", msg.subject)

    async def _leave(self, following: Following) -> None:
        entry = self._subjects.get(following.subject)
        if not following.active or entry is None:
            return
        following.active = False
        entry.followers.remove(following)
        if entry.followers:
            return
        del self._subjects[following.subject]  # a new follower from now on subscribes anew
        assert entry.subscribed is not None
        try:
            sub = await entry.subscribed
            await sub.unsubscribe()
        except Exception as e:
            log.debug("unsubscribing from %s: %s", following.subject, e)
