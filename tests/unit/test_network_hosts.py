"""NetworkHostCache: what the controller keeps of which hosts carry each network."""

from __future__ import annotations

from cloudland.controller.network_hosts import NetworkHostCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_claim_adds_its_host_only_to_networks_it_holds() -> None:
    cache = NetworkHostCache(clock=Clock())
    cache.store({"net-a": {"hv1"}}, cache.generation())
    cache.gained("hv2", ["net-a", "net-b"])
    assert cache.known(["net-a", "net-b"]) == {"net-a": {"hv1", "hv2"}}  # net-b: read it whole


def test_a_dropped_network_is_read_again() -> None:
    cache = NetworkHostCache(clock=Clock())
    cache.store({"net-a": {"hv1"}, "net-b": {"hv2"}}, cache.generation())
    cache.drop(["net-a"])
    assert cache.known(["net-a", "net-b"]) == {"net-b": {"hv2"}}
    cache.drop_host("hv2")
    assert cache.known(["net-b"]) == {}


def test_a_read_that_began_before_a_drop_is_not_kept() -> None:
    cache = NetworkHostCache(clock=Clock())
    since = cache.generation()
    cache.drop(["net-a"])  # e.g. the status writer finalized a delete while the read ran
    cache.store({"net-a": {"hv1"}, "net-b": {"hv2"}}, since)
    assert cache.known(["net-a", "net-b"]) == {"net-b": {"hv2"}}
    cache.store({"net-a": {"hv3"}}, cache.generation())  # a read after the drop is
    assert cache.known(["net-a"]) == {"net-a": {"hv3"}}


def test_entries_are_read_again_after_max_age() -> None:
    clock = Clock()
    cache = NetworkHostCache(max_age=60, clock=clock)
    cache.store({"net-a": {"hv1"}}, cache.generation())
    clock.now = 59
    assert cache.known(["net-a"]) == {"net-a": {"hv1"}}
    clock.now = 61
    assert cache.known(["net-a"]) == {}
    assert len(cache) == 0


def test_stored_sets_are_the_cache_s_own() -> None:
    cache = NetworkHostCache(clock=Clock())
    read = {"net-a": {"hv1"}}
    cache.store(read, cache.generation())
    read["net-a"].add("hv9")
    assert cache.known(["net-a"]) == {"net-a": {"hv1"}}
