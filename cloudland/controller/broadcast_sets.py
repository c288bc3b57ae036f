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
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

REFRESH_SECONDS = 300.0
# Whole sets sent again per call of ``changes`` at most (the rest next time).
REFRESH_BATCH = 64


class SetChange(NamedTuple):
    key: str
    full: bool
    members: list[str]  # the whole set (``full``), else empty
    added: list[str]
    removed: list[str]


class BroadcastSets:
    def __init__(self, refresh_seconds: float = REFRESH_SECONDS, refresh_batch: int = REFRESH_BATCH) -> None:
        self.refresh_seconds = refresh_seconds
        self.refresh_batch = refresh_batch
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
        out = [c for key, members in outbox.items() if (c := self._change(key, members, now))]
        due = []
        for key, at in self._full_at.items():
            if now - at < self.refresh_seconds or len(due) >= self.refresh_batch:
                break
            due.append(key)
        out.extend(self._full(key, self._published[key], now) for key in due)
        return out

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
        return SetChange(key, False, [], added, removed)

    def _full(self, key: str, members: list[str], now: float) -> SetChange:
        self._full_at.pop(key, None)
        if members:
            self._published[key] = members
            self._full_at[key] = now
        else:  # nobody is in it any more: nothing to mend later
            self._published.pop(key, None)
        return SetChange(key, True, members, [], [])
