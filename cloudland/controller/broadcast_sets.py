"""Sets the controller publishes to whoever follows them: ``BroadcastSets``.

Two kinds of set go out this way, one message per set and change, which NATS delivers to each
agent subscribed to the set's subject: a tenant network's peer list (the underlay addresses of
the hypervisors that carry it, ``NetworkPeers`` on ``net.<id>.peers``) and a security group's
member addresses (``GroupMembers`` on ``sg.<id>.members``, for rules naming it as remote group).

A whole set in every message made filling a network or a group quadratic: its n-th member sent
n addresses to n hosts. A message carries what changed since the previous one (``added`` /
``removed``), and a whole set only when that is not smaller, when the set is new to this
controller, or when its last whole set is ``refresh_seconds`` old: a follower that missed a
change (a message published before its subscription reached the server, a reconnect) is mended
by that refresh at the latest, at a cost of one set per period.

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

from collections import OrderedDict
from typing import Any, NamedTuple

REFRESH_SECONDS = 300.0
# Whole sets sent again per call of ``changes`` at most (the rest next time).
REFRESH_BATCH = 64
PACE = 0.005  # seconds per member between two messages of a set (see above)
MAX_INTERVAL = 5.0


class SetChange(NamedTuple):
    key: str
    full: bool
    members: list[str]  # the whole set (``full``), else empty
    added: list[str]
    removed: list[str]

    def fields(self) -> dict[str, Any]:
        """The fields of ``bus.messages.SetChangeMessage`` this change fills."""
        return {"full": self.full, "addresses": self.members, "added": self.added, "removed": self.removed}


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
        self._full_at: OrderedDict[str, float] = OrderedDict()  # oldest whole set first

    def update(self, key: str, members: list[str]) -> None:
        """The set's members now (sorted); a message if they changed."""
        if self._outbox.get(key, self._published.get(key)) != members:
            self._outbox[key] = members

    @property
    def pending(self) -> bool:
        return bool(self._outbox)

    def changes(self, now: float) -> list[SetChange]:
        """What to publish now: the changes since the last call, then whole sets due again."""
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
        for key, at in self._full_at.items():
            if now - at < self.refresh_seconds or len(due) >= self.refresh_batch:
                break
            due.append(key)
        out.extend(self._full(key, self._published[key], now) for key in due)
        return out

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
        self._sent_at[key] = now
        return SetChange(key, False, [], added, removed)

    def _full(self, key: str, members: list[str], now: float) -> SetChange:
        self._full_at.pop(key, None)
        if members:
            self._published[key] = members
            self._full_at[key] = now
            self._sent_at[key] = now
        else:  # nobody is in it any more: nothing to mend later
            self._published.pop(key, None)
            self._sent_at.pop(key, None)
        return SetChange(key, True, members, [], [])
