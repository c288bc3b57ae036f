"""Remote-group member sets as agents hold them: one list per distinct set, shared.

An agent keeps each remote group's member addresses (a sorted list) in the spec of every
network that names the group, and changes it by ``GroupMembers`` messages. A real host runs
one agent and holds a few sets. A simulated-hypervisor process runs a thousand agents that
mostly hold the same sets: decoded per agent, each would be a thousand private copies of every
address (at 100,000 servers the simulation's processes ran out of memory that way). Agents of
one process share one ``MemberSets``: a set equal to one seen lately is that list, and a change
one agent computed from a shared list is the answer for every agent holding that list.

A network spec names a published set by its version only; the agent fills it from a spec it
holds, else from the newest set here (``held``), else by asking a controller, once per process
at a time (``fetch``).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from cloudland.bus.messages import SetVersion


class MemberSets:
    def __init__(self, versions: int = 4, groups: int = 4096, changes: int = 1024) -> None:
        """Keep the last ``versions`` sets of at most ``groups`` groups, and the answers to the
        last ``changes`` changes. Forgetting one costs sharing, never correctness."""
        self._versions_kept = versions
        self._groups_kept = groups
        self._changes_kept = changes
        self._versions: OrderedDict[str, list[list[str]]] = OrderedDict()
        # (id of the list changed, the message) -> (that list, the result or None: no change)
        self._changes: OrderedDict[tuple[int, bytes], tuple[list[str], list[str] | None]] = OrderedDict()
        self._newest: OrderedDict[str, tuple[SetVersion, list[str]]] = OrderedDict()
        self._fetching: dict[str, asyncio.Future[Any]] = {}

    def hold(self, group: str, version: SetVersion, members: list[str]) -> None:
        """An agent applied ``members`` as the group's set at ``version``."""
        newest = self._newest.get(group)
        if newest is None or not newest[0].at_least(version):
            self._newest[group] = (version, members)
            self._newest.move_to_end(group)
            if len(self._newest) > self._groups_kept:
                self._newest.popitem(last=False)

    def held(self, group: str, version: SetVersion) -> tuple[SetVersion, list[str]] | None:
        """The newest set held of the group if it is at ``version`` or later."""
        newest = self._newest.get(group)
        if newest is not None and newest[0].at_least(version):
            return newest
        return None

    async def fetch(self, group: str, request: Callable[[], Awaitable[Any]]) -> Any:
        """``request()``'s answer, shared by the agents that want the group meanwhile."""
        future = self._fetching.get(group)
        if future is None:
            future = self._fetching[group] = asyncio.ensure_future(request())
            future.add_done_callback(lambda _: self._fetching.pop(group, None))
        return await asyncio.shield(future)

    def adopt(self, group: str, members: list[str]) -> list[str]:
        """The list to keep for ``members`` (a sorted set): an equal one seen lately, else
        ``members``, from now on the group's newest."""
        versions = self._versions.get(group)
        if versions is None:
            versions = self._versions[group] = []
            if len(self._versions) > self._groups_kept:
                self._versions.popitem(last=False)
        else:
            self._versions.move_to_end(group)
        for i, known in enumerate(versions):
            if known is members or known == members:
                if i:
                    versions.insert(0, versions.pop(i))
                return known
        versions.insert(0, members)
        del versions[self._versions_kept:]
        return members

    def change(self, current: list[str], message: bytes,
               compute: Callable[[list[str]], list[str] | None]) -> list[str] | None:
        """``compute(current)`` (the set after ``message``, or None if it changes nothing),
        computed once per message for all agents holding this very list."""
        key = (id(current), message)
        known = self._changes.get(key)
        if known is not None and known[0] is current:
            return known[1]
        result = compute(current)
        self._changes[key] = (current, result)
        if len(self._changes) > self._changes_kept:
            self._changes.popitem(last=False)
        return result
