"""``HostKeyed``: the reconciler's (host, item) maps, with each host's keys found without a walk."""

from __future__ import annotations

from cloudland.controller.reconciler import HostKeyed


def test_host_keyed_is_a_dict_that_knows_each_hosts_keys() -> None:
    sent: HostKeyed[int] = HostKeyed()
    for host in ("h1", "h2"):
        for net in ("n1", "n2", "n3"):
            sent[(host, net)] = 1
    sent[("h1", "n1")] = 2
    assert len(sent) == 6 and sent[("h1", "n1")] == 2 and ("h2", "n3") in sent
    assert sorted(sent.of_host("h1")) == ["n1", "n2", "n3"] and sent.of_host("h9") == []
    for net in sent.of_host("h1"):  # a copy: deleting while walking it is fine
        if net != "n2":
            del sent[("h1", net)]
    assert sent.of_host("h1") == ["n2"] and sent.pop(("h1", "n2")) == 1
    assert sent.of_host("h1") == [] and sent.pop(("h1", "n2"), None) is None
    assert sorted(sent) == [("h2", "n1"), ("h2", "n2"), ("h2", "n3")]
    assert dict(sent.items()) == {("h2", "n1"): 1, ("h2", "n2"): 1, ("h2", "n3"): 1}
