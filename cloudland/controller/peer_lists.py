"""The peer lists of tenant networks as the controller publishes them: ``PeerLists``.

Every hypervisor that carries a network needs the underlay addresses of the others (its VXLAN
flood list). They go out as one ``NetworkPeers`` per network on ``net.<id>.peers``, which NATS
delivers to each member. A whole list in every message made filling a network quadratic: its
n-th member sent n addresses to n hosts. A message now carries what changed since the previous
one (``added``/``removed``), and a whole list only when that is not smaller, when the network
is new to this controller, or when a network's last whole list is ``refresh_seconds`` old: a
member that missed a change (a message published before its subscription reached the server,
a reconnect) is mended by that refresh at the latest, at a cost of one list per network and
period.
"""

from __future__ import annotations

from collections import OrderedDict

from cloudland.bus.messages import NetworkPeers

REFRESH_SECONDS = 300.0
# Whole lists sent again per call of ``messages`` at most (the rest next time).
REFRESH_BATCH = 64


class PeerLists:
    def __init__(self, refresh_seconds: float = REFRESH_SECONDS, refresh_batch: int = REFRESH_BATCH) -> None:
        self.refresh_seconds = refresh_seconds
        self.refresh_batch = refresh_batch
        self._published: dict[str, list[str]] = {}  # what the members were last told
        self._outbox: dict[str, list[str]] = {}  # what they are to be told next
        self._full_at: OrderedDict[str, float] = OrderedDict()  # oldest whole list first

    def update(self, network_id: str, addresses: list[str]) -> None:
        """The network's members now (sorted underlay addresses); a message if they changed."""
        if self._outbox.get(network_id, self._published.get(network_id)) != addresses:
            self._outbox[network_id] = addresses

    @property
    def pending(self) -> bool:
        return bool(self._outbox)

    def messages(self, now: float) -> list[NetworkPeers]:
        """What to publish now: the changes since the last call, then whole lists due again."""
        outbox, self._outbox = self._outbox, {}
        out = [m for net, addresses in outbox.items() if (m := self._message(net, addresses, now))]
        due = []
        for net, at in self._full_at.items():
            if now - at < self.refresh_seconds or len(due) >= self.refresh_batch:
                break
            due.append(net)
        out.extend(self._full(net, self._published[net], now) for net in due)
        return out

    def _message(self, net: str, addresses: list[str], now: float) -> NetworkPeers | None:
        old = self._published.get(net)
        if old is None:
            return self._full(net, addresses, now)
        before, after = set(old), set(addresses)
        added, removed = sorted(after - before), sorted(before - after)
        if not added and not removed:
            return None
        if len(added) + len(removed) >= len(addresses):
            return self._full(net, addresses, now)
        self._published[net] = addresses
        return NetworkPeers(network_id=net, full=False, added=added, removed=removed)

    def _full(self, net: str, addresses: list[str], now: float) -> NetworkPeers:
        self._full_at.pop(net, None)
        if addresses:
            self._published[net] = addresses
            self._full_at[net] = now
        else:  # nobody carries it any more: nothing to mend later
            self._published.pop(net, None)
        return NetworkPeers(network_id=net, addresses=addresses)
