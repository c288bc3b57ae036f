"""Sets the controller publishes (peer lists, group members): changes, whole sets, and the
periodic refresh."""

from __future__ import annotations

from cloudland.controller.broadcast_sets import BroadcastSets, SetChange


def full(net: str, addresses: list[str]) -> SetChange:
    return SetChange(net, True, addresses, [], [])


def change(net: str, added: list[str], removed: list[str]) -> SetChange:
    return SetChange(net, False, [], added, removed)


def test_a_network_filling_sends_its_changes() -> None:
    lists = BroadcastSets(refresh_seconds=100, pace=0)
    lists.update("n", ["10.0.0.1"])
    assert lists.changes(0) == [full("n", ["10.0.0.1"])]  # new to this controller: the whole list
    lists.update("n", ["10.0.0.1", "10.0.0.2"])
    assert lists.changes(1) == [change("n", ["10.0.0.2"], [])]
    lists.update("n", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    assert lists.changes(2) == [change("n", ["10.0.0.3"], [])]
    # Several changes before a send: one message from what the members were last told.
    lists.update("n", ["10.0.0.1", "10.0.0.3", "10.0.0.4"])
    lists.update("n", ["10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5"])
    assert lists.pending
    assert lists.changes(3) == [change("n", ["10.0.0.4", "10.0.0.5"], ["10.0.0.2"])]
    # A change as large as the list it makes: the whole list.
    lists.update("n", ["10.0.0.9"])
    assert lists.changes(4) == [full("n", ["10.0.0.9"])]
    lists.update("n", ["10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5"])
    lists.changes(4)
    # Back and forth between sends, or the same list again: nothing to say.
    lists.update("n", ["10.0.0.1"])
    lists.update("n", ["10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5"])
    assert lists.changes(4) == []
    lists.update("n", ["10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5"])
    assert not lists.pending
    # The last member leaves: an empty whole list, and the network is forgotten.
    lists.update("n", [])
    assert lists.changes(5) == [full("n", [])]
    assert lists.changes(500) == []


def test_whole_lists_are_sent_again_when_old() -> None:
    """A member that missed a change is mended by the next whole list: each network's comes
    ``refresh_seconds`` after its previous one, the oldest first, a batch at a time."""
    lists = BroadcastSets(refresh_seconds=100, refresh_batch=2, pace=0)
    for i, net in enumerate(("a", "b", "c")):
        lists.update(net, [f"10.0.0.{i}", "10.0.1.1", "10.0.1.2"])
        lists.changes(i)
    lists.update("b", ["10.0.0.1", "10.0.1.1", "10.0.1.2", "10.0.1.3"])
    assert lists.changes(50) == [change("b", ["10.0.1.3"], [])]  # a change is not a refresh
    assert lists.changes(99) == []
    assert lists.changes(101) == [full("a", ["10.0.0.0", "10.0.1.1", "10.0.1.2"]),
                                   full("b", ["10.0.0.1", "10.0.1.1", "10.0.1.2", "10.0.1.3"])]
    assert lists.changes(102) == [full("c", ["10.0.0.2", "10.0.1.1", "10.0.1.2"])]
    assert lists.changes(150) == []
    assert [m.key for m in lists.changes(202)] == ["a", "b"]


def test_changes_of_one_set_wait_for_its_interval() -> None:
    """A set's changes go out at most once per ``pace`` * its size seconds, together; other sets
    are not held back by it."""
    sets = BroadcastSets(refresh_seconds=1000, pace=0.5)
    sets.update("g", ["10.0.0.1", "10.0.0.2"])
    assert sets.changes(0.0) == [full("g", ["10.0.0.1", "10.0.0.2"])]
    sets.update("g", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    sets.update("h", ["10.0.1.1"])
    assert sets.changes(0.5) == [full("h", ["10.0.1.1"])]
    assert sets.pending
    sets.update("g", ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"])
    assert sets.changes(0.9) == []
    assert sets.changes(1.0) == [change("g", ["10.0.0.3", "10.0.0.4"], [])]
    assert not sets.pending
    sets.update("g", ["10.0.0.1"])  # 4 members were published: 2 s
    assert sets.changes(2.9) == [] and sets.changes(3.0) == [full("g", ["10.0.0.1"])]
    # At most max_interval, however big the set.
    sets = BroadcastSets(refresh_seconds=1000, pace=10.0, max_interval=3.0)
    sets.update("g", ["10.0.0.1", "10.0.0.2"])
    sets.changes(0.0)
    sets.update("g", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    assert sets.changes(2.0) == [] and sets.changes(3.0) == [change("g", ["10.0.0.3"], [])]


def test_all_sets_share_a_budget() -> None:
    """With ``budget``, messages go out while the deliveries of the last second (a message counts
    its set's size) stay within it; the sets waiting longest go first."""
    sets = BroadcastSets(refresh_seconds=1000, pace=0, budget=10)
    for key in ("a", "b", "c"):
        sets.update(key, [f"10.0.{key}.{i}" for i in range(6)])
    assert [c.key for c in sets.changes(0.0)] == ["a", "b"]  # 10 tokens: a (6), b (6, into debt)
    sets.update("d", ["10.0.9.9"])
    assert sets.changes(0.1) == []  # -2 + 1 tokens
    assert [c.key for c in sets.changes(0.5)] == ["c"]  # +4: 3 tokens, c first (waiting longest)
    assert [c.key for c in sets.changes(1.0)] == ["d"]
    assert not sets.pending
