"""Sets the controller publishes (peer lists, group members): changes, whole sets, versions,
and marks of quiet sets."""

from __future__ import annotations

from cloudland.bus.messages import SetVersion
from cloudland.controller.broadcast_sets import BroadcastSets, SetChange

Plain = tuple[str, bool, list[str], list[str], list[str]]


def full(net: str, addresses: list[str]) -> Plain:
    return (net, True, addresses, [], [])


def change(net: str, added: list[str], removed: list[str]) -> Plain:
    return (net, False, [], added, removed)


def plain(changes: list[SetChange]) -> list[Plain]:
    """The changes without their versions."""
    return [(c.key, c.full, c.members, c.added, c.removed) for c in changes]


def test_a_network_filling_sends_its_changes() -> None:
    lists = BroadcastSets(refresh_seconds=100, pace=0)
    lists.update("n", ["10.0.0.1"])
    assert plain(lists.changes(0)) == [full("n", ["10.0.0.1"])]  # new to this controller: the whole list
    lists.update("n", ["10.0.0.1", "10.0.0.2"])
    assert plain(lists.changes(1)) == [change("n", ["10.0.0.2"], [])]
    lists.update("n", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    assert plain(lists.changes(2)) == [change("n", ["10.0.0.3"], [])]
    # Several changes before a send: one message from what the members were last told.
    lists.update("n", ["10.0.0.1", "10.0.0.3", "10.0.0.4"])
    lists.update("n", ["10.0.0.1", "10.0.0.3", "10.0.0.4", "10.0.0.5"])
    assert lists.pending
    assert plain(lists.changes(3)) == [change("n", ["10.0.0.4", "10.0.0.5"], ["10.0.0.2"])]
    # A change as large as the list it makes: the whole list.
    lists.update("n", ["10.0.0.9"])
    assert plain(lists.changes(4)) == [full("n", ["10.0.0.9"])]
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
    assert plain(lists.changes(5)) == [full("n", [])]
    assert lists.changes(500) == []


def test_every_message_carries_the_version_it_makes() -> None:
    """``seq`` counts a set's messages (whole or change, also across an empty spell), ``epoch``
    names this publisher; ``version`` is the set as published and its version."""
    sets = BroadcastSets(refresh_seconds=100, pace=0)
    assert sets.epoch != BroadcastSets().epoch
    assert sets.version("n") is None
    sets.update("n", ["10.0.0.1"])
    sets.update("m", ["10.0.9.9"])
    assert [(c.key, c.version) for c in sets.changes(0)] == [("n", SetVersion(sets.epoch, 1)),
                                                              ("m", SetVersion(sets.epoch, 1))]
    sets.update("n", ["10.0.0.1", "10.0.0.2"])
    (message,) = sets.changes(1)
    assert message.fields() == {"full": False, "addresses": [], "added": ["10.0.0.2"], "removed": [],
                                "epoch": sets.epoch, "seq": 2}
    sets.update("n", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])  # not published yet
    assert sets.version("n") == (["10.0.0.1", "10.0.0.2"], SetVersion(sets.epoch, 2))
    encoded = sets.encoded("n")
    assert bytes(encoded) == b'["10.0.0.1","10.0.0.2"]' and sets.encoded("n") is encoded
    sets.update("n", [])
    assert [(c.full, c.version.seq) for c in sets.changes(2)] == [(True, 3)]
    assert sets.version("n") == ([], SetVersion(sets.epoch, 3))
    assert bytes(sets.encoded("n")) == b"[]"
    sets.update("n", ["10.0.0.7"])
    assert [(c.full, c.version.seq) for c in sets.changes(3)] == [(True, 4)]


def test_quiet_sets_are_marked_with_their_version() -> None:
    """A set with no message for ``refresh_seconds`` is marked (no change, its version again),
    the quietest first, a batch at a time; a whole set is never sent again for that, and an
    empty set is not marked."""
    lists = BroadcastSets(refresh_seconds=100, refresh_batch=2, pace=0)
    for i, net in enumerate(("a", "b", "c", "d")):
        lists.update(net, [f"10.0.0.{i}", "10.0.1.1", "10.0.1.2"])
        lists.changes(i)
    lists.update("d", [])
    lists.changes(3)
    lists.update("b", ["10.0.0.1", "10.0.1.1", "10.0.1.2", "10.0.1.3"])
    assert plain(lists.changes(50)) == [change("b", ["10.0.1.3"], [])]
    assert lists.changes(99) == []
    marks = lists.changes(103)
    assert plain(marks) == [change("a", [], []), change("c", [], [])]  # b changed at 50
    assert [m.version for m in marks] == [SetVersion(lists.epoch, 1), SetVersion(lists.epoch, 1)]
    assert lists.changes(104) == []
    assert [(m.key, m.version.seq) for m in lists.changes(151)] == [("b", 2)]
    assert lists.changes(202) == []
    assert [m.key for m in lists.changes(204)] == ["a", "c"]
    assert lists.version("a") == (["10.0.0.0", "10.0.1.1", "10.0.1.2"], SetVersion(lists.epoch, 1))


def test_changes_of_one_set_wait_for_its_interval() -> None:
    """A set's changes go out at most once per ``pace`` * its size seconds, together; other sets
    are not held back by it."""
    sets = BroadcastSets(refresh_seconds=1000, pace=0.5)
    sets.update("g", ["10.0.0.1", "10.0.0.2"])
    assert plain(sets.changes(0.0)) == [full("g", ["10.0.0.1", "10.0.0.2"])]
    sets.update("g", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    sets.update("h", ["10.0.1.1"])
    assert plain(sets.changes(0.5)) == [full("h", ["10.0.1.1"])]
    assert sets.pending
    sets.update("g", ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"])
    assert sets.changes(0.9) == []
    assert plain(sets.changes(1.0)) == [change("g", ["10.0.0.3", "10.0.0.4"], [])]
    assert not sets.pending
    sets.update("g", ["10.0.0.1"])  # 4 members were published: 2 s
    assert sets.changes(2.9) == [] and plain(sets.changes(3.0)) == [full("g", ["10.0.0.1"])]
    # At most max_interval, however big the set.
    sets = BroadcastSets(refresh_seconds=1000, pace=10.0, max_interval=3.0)
    sets.update("g", ["10.0.0.1", "10.0.0.2"])
    sets.changes(0.0)
    sets.update("g", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    assert sets.changes(2.0) == [] and plain(sets.changes(3.0)) == [change("g", ["10.0.0.3"], [])]


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


def test_the_waiting_changes_of_named_sets_go_at_once() -> None:
    """``changes_of``: a set's waiting change now, whatever its interval (a host is about to get a
    spec with the set as published: the change that adds it must go before)."""
    sets = BroadcastSets(refresh_seconds=1000, pace=10.0)
    sets.update("n", ["10.0.0.1", "10.0.0.2"])
    sets.changes(0.0)
    sets.update("n", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    assert sets.changes(1.0) == [] and sets.pending
    assert sets.changes_of({"m"}, 1.0) == []
    (message,) = sets.changes_of({"n", "m"}, 1.0)
    assert (message.added, message.version.seq) == (["10.0.0.3"], 2) and not sets.pending
    assert sets.version("n") == (["10.0.0.1", "10.0.0.2", "10.0.0.3"], SetVersion(sets.epoch, 2))
