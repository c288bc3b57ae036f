"""Which hosts carry each network, in the controller's memory: ``NetworkHostCache``.

A pass asks for the member hosts of every network whose membership changed (for its peer list)
and of every network it builds specs for. Read from the database, that is every bound port of
those networks, on every pass: during a launch the networks fill up, and the reads grew with
them (without remote-group rules, the largest statement of PostgreSQL's at 2,000 hypervisors).
The cache keeps each network's hosts as last read, and the controller keeps them true:

- a server claimed on a host (the scheduler binds its ports there) adds the host to its
  networks once the claim is committed: the one change the controller makes all the time;
- anything else that may change who carries a network (a port finalized, a wake from the API
  for a network's ports, a router's gateway bound or released, a server deleted by the API
  while its host was down) drops the network's entry, and the next pass reads it again;
- an entry is read again at least every ``max_age`` seconds whatever happens, as the sweep
  does for instances: a change nobody told the controller about does not last.

A read that started before an entry was dropped is not kept (``generation``): the status
writer finalizes deletes beside the passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

DEFAULT_MAX_AGE = 60.0


class NetworkHostCache:
    def __init__(self, max_age: float = DEFAULT_MAX_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self.clock = clock
        self._hosts: dict[str, tuple[set[str], float]] = {}  # network → (hosts, read at)
        self._generation = 0
        self._dropped_at: dict[str, int] = {}  # network → generation it was last dropped in

    def known(self, networks: Iterable[str]) -> dict[str, set[str]]:
        """The cached hosts of those of ``networks`` that are cached and fresh (not copies:
        callers only read them)."""
        now = self.clock()
        found: dict[str, set[str]] = {}
        for net in networks:
            entry = self._hosts.get(net)
            if entry is None:
                continue
            if now - entry[1] > self.max_age:
                del self._hosts[net]
                continue
            found[net] = entry[0]
        return found

    def generation(self) -> int:
        """Taken before a database read; ``store`` keeps what the read found only if none of its
        networks was dropped since."""
        return self._generation

    def store(self, read: dict[str, set[str]], since: int) -> None:
        now = self.clock()
        for net, hosts in read.items():
            if self._dropped_at.get(net, -1) <= since:
                self._hosts[net] = (set(hosts), now)

    def gained(self, host: str, networks: Iterable[str]) -> None:
        """``host`` has a port bound on each of ``networks`` now (committed)."""
        for net in networks:
            entry = self._hosts.get(net)
            if entry is not None:
                entry[0].add(host)

    def drop(self, networks: Iterable[str]) -> None:
        """Who carries these networks may have changed: read them again."""
        self._generation += 1
        for net in networks:
            self._hosts.pop(net, None)
            self._dropped_at[net] = self._generation

    def drop_all(self) -> None:
        self.drop(list(self._hosts))

    def drop_host(self, host: str) -> None:
        """Ports of ``host`` went without the controller (on unknown networks)."""
        self.drop([net for net, (hosts, _) in self._hosts.items() if host in hosts])

    def __len__(self) -> int:
        return len(self._hosts)
