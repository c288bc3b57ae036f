"""Sets the controller publishes to whoever follows them: ``BroadcastSets``.

Two kinds of set go out this way, one message per set and change, which NATS delivers to each
agent subscribed to the set's subject: a tenant network's peer list (the underlay addresses of
the hypervisors that carry it, ``NetworkPeers`` on ``net.<id>.peers``) and a security group's
member addresses (``GroupMembers`` on ``sg.<id>.members``, for rules naming it as remote group).

A whole set in every message made filling a network or a group quadratic: its n-th member sent
n addresses to n hosts. A message carries what changed since the previous one (``added`` /
``removed``), and a whole set only when that is not smaller or when the set is new to this
controller. Every message carries the set's version after it (``epoch``: this publisher,
``seq``: its messages of the set so far), and a network spec carries the version of the sets in
it, so a follower knows which message comes next. One that finds a message missing (published
before its subscription reached the server, lost in a reconnect) asks for the whole set
(``GetSet``, answered from ``whole``). A set quiet for ``refresh_seconds`` is marked: a message
that changes nothing and repeats its version, for a follower that missed its last change. (Whole
sets sent again instead cost followers * size: at 150,000 servers the 50 projects' default
groups, refreshed together, were 300 million addresses through NATS and the simulated hosts.)

Pacing: every message of a set reaches every follower (a group's members: every host with a
port in a group whose rules name it; a network's peers: every host of the network), so while a
big set fills, one message per pass would cost followers * passes deliveries a second. A set
therefore changes in at most one message per ``pace`` * its size seconds (at most
``max_interval``); changes in between wait and go out together. That holds each set near
1 / ``pace`` deliveries a second whatever its size, and a small or quiet set is not delayed
(the interval counts from its previous message).

``budget``: besides, all sets together send at most about this many deliveries a second (a
message counts as many as its set has members, about its followers), the sets waiting longest
first. Many groups filling at once (a launch across projects) then share one bounded fan-out
instead of each taking its own.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from typing import Any, NamedTuple

import msgspec

from cloudland.bus.messages import SetVersion

REFRESH_SECONDS = 300.0
# Marks per call of ``changes`` at most (the rest next time).
REFRESH_BATCH = 256
PACE = 0.005  # seconds per member between two messages of a set (see above)
MAX_INTERVAL = 5.0


class SetChange(NamedTuple):
    key: str
    full: bool
    members: list[str]  # the whole set (``full``), else empty
    added: list[str]
    removed: list[str]
    version: SetVersion  # the set's after this message (a mark: no change, the same version)

    def fields(self) -> dict[str, Any]:
        """The fields of ``bus.messages.SetChangeMessage`` this change fills."""
        return {"full": self.full, "addresses": self.members, "added": self.added, "removed": self.removed,
                "epoch": self.version.epoch, "seq": self.version.seq}


class BroadcastSets:
    def __init__(self, refresh_seconds: float = REFRESH_SECONDS, refresh_batch: int = REFRESH_BATCH,
                 pace: float = PACE, max_interval: float = MAX_INTERVAL, budget: float | None = None) -> None:
        self.refresh_seconds = refresh_seconds
        self.refresh_batch = refresh_batch
        self.pace = pace
        self.max_interval = max_interval
        self.budget = budget
        self._tokens = budget or 0.0  # deliveries that may go now (a second's worth at most)
        self._tokens_at: float | None = None
        self._sent_at: dict[str, float] = {}  # the last message of each set
        self._published: dict[str, list[str]] = {}  # what the followers were last told
        self._outbox: dict[str, list[str]] = {}  # what they are to be told next
        self.epoch = secrets.token_hex(4)
        self._seq: dict[str, int] = {}  # messages of each set so far (kept when it empties)
        self._told_at: OrderedDict[str, float] = OrderedDict()  # the sets' last messages, oldest first
        self._encoded: dict[str, msgspec.Raw] = {}  # published sets as JSON, once per version

    def version(self, key: str) -> tuple[list[str], SetVersion] | None:
        """The set as published (what its followers were told) and its version; None if it never
        was. A network spec built from it is followed by the set's next message."""
        seq = self._seq.get(key)
        return None if seq is None else (self._published.get(key, []), SetVersion(self.epoch, seq))

    def encoded(self, key: str) -> msgspec.Raw:
        """The published set as a JSON array, encoded once per version: every host that gets a
        spec naming the group asks for it (10,000 addresses in a big project)."""
        raw = self._encoded.get(key)
        if raw is None:
            raw = self._encoded[key] = msgspec.Raw(msgspec.json.encode(self._published.get(key, [])))
        return raw

    def update(self, key: str, members: list[str]) -> None:
        """The set's members now (sorted); a message if they changed."""
        if self._outbox.get(key, self._published.get(key)) != members:
            self._outbox[key] = members

    @property
    def pending(self) -> bool:
        return bool(self._outbox)

    def changes_of(self, keys: set[str], now: float) -> list[SetChange]:
        """The waiting changes of these sets, now (not paced, nor counted in the budget)."""
        out = []
        for key in keys & self._outbox.keys():
            if change := self._change(key, self._outbox.pop(key), now):
                out.append(change)
        return out

    def changes(self, now: float) -> list[SetChange]:
        """What to publish now: the changes since the last call, then marks of the sets quiet for
        ``refresh_seconds``."""
        outbox, self._outbox = self._outbox, {}
        if self.budget is not None:
            if self._tokens_at is not None:
                self._tokens = min(self.budget, self._tokens + self.budget * (now - self._tokens_at))
            self._tokens_at = now
        out = []
        for key, members in outbox.items():
            if ((sent := self._sent_at.get(key)) is not None and now - sent < self._interval(key)) \
                    or (self.budget is not None and self._tokens <= 0):
                self._outbox[key] = members  # not yet
            elif change := self._change(key, members, now):
                out.append(change)
                if self.budget is not None:
                    self._tokens -= max(1, len(members))
        due = []
        for key, at in self._told_at.items():
            if now - at < self.refresh_seconds or len(due) >= self.refresh_batch:
                break
            due.append(key)
        for key in due:
            self._told(key, now)
            out.append(SetChange(key, False, [], [], [], SetVersion(self.epoch, self._seq[key])))
        return out

    def _told(self, key: str, now: float) -> SetVersion:
        self._told_at.pop(key, None)
        if key in self._published:  # an empty set is not marked: nobody follows it
            self._told_at[key] = now
        return SetVersion(self.epoch, self._seq[key])

    def _interval(self, key: str) -> float:
        return min(self.max_interval, self.pace * len(self._published.get(key, ())))

    def _change(self, key: str, members: list[str], now: float) -> SetChange | None:
        old = self._published.get(key)
        if old is None:
            return self._full(key, members, now)
        before, after = set(old), set(members)
        added, removed = sorted(after - before), sorted(before - after)
        if not added and not removed:
            return None
        if len(added) + len(removed) >= len(members):
            return self._full(key, members, now)
        self._published[key] = members
        self._encoded.pop(key, None)
        self._sent_at[key] = now
        self._seq[key] += 1
        return SetChange(key, False, [], added, removed, self._told(key, now))

    def _full(self, key: str, members: list[str], now: float) -> SetChange:
        self._encoded.pop(key, None)
        if members:
            self._published[key] = members
            self._sent_at[key] = now
        else:  # nobody is in it any more
            self._published.pop(key, None)
            self._sent_at.pop(key, None)
        self._seq[key] = self._seq.get(key, 0) + 1
        return SetChange(key, True, members, [], [], self._told(key, now))
