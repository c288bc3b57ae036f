"""The controller's member index (``GroupMemberIndex``) answers as the direct queries of
``secgroups`` do, after every kind of change, once the change's event is in: a state built
through the API (servers, ports, groups, rules, a shared network, a router) and claims,
frees and deletes as the reconciler makes them."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
from controller_helpers import V21, seed  # type: ignore[import-not-found]
from sqlalchemy import select

from cloudland.bus.messages import Wake, decode
from cloudland.controller import secgroups
from cloudland.controller.group_members import MEND_AT_MOST, GroupMemberIndex, _Project
from cloudland.controller.hosts import HostInfo
from cloudland.controller.instance_status import finalize_delete
from cloudland.controller.scheduler import claim_many
from cloudland.db.models import Instance, Network, Port, SecurityGroup

pytestmark = pytest.mark.both_databases

N = "/network/v2.0"


class FakeBus:
    """Catches the API's wakes: the test hands their networks to the index, as the reconciler does."""

    is_connected = True

    def __init__(self) -> None:
        self.wakes: list[Wake] = []

    async def drain(self) -> None:
        pass

    async def publish(self, subject: str, data: bytes) -> None:
        message = decode(data)
        assert isinstance(message, Wake)
        self.wakes.append(message)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, app: Any, client: httpx.AsyncClient, admin: str, demo: str) -> None:
        self.app, self.client = app, client
        self.tokens = {"admin": admin, "demo": demo}
        self.bus = FakeBus()
        app.state.bus = self.bus
        self.clock = Clock()
        self.index = GroupMemberIndex(self.clock)

    async def call(self, method: str, path: str, who: str = "demo", body: Any = None) -> Any:
        r = await self.client.request(method, path, json=body, headers={"X-Auth-Token": self.tokens[who]})
        assert r.status_code < 300, r.text
        return r.json() if r.content else None

    async def post(self, path: str, key: str, body: dict[str, Any], who: str = "demo") -> Any:
        return (await self.call("POST", path, who, {key: body}))[key]

    def deliver_wakes(self) -> None:
        """What ``Reconciler.wake`` does with the API's wakes."""
        for wake in self.bus.wakes:
            self.index.networks_changed(wake.network_ids)
        self.bus.wakes.clear()

    async def compare(self) -> None:
        """Every answer of the index equals the direct query's, for each network alone and all."""
        self.deliver_wakes()
        async with self.app.state.sessionmaker() as s:
            nets = sorted(await s.scalars(select(Network.id)))
            groups = [*sorted(await s.scalars(select(SecurityGroup.id))), "no-such-group"]
            for subset in [[n] for n in nets] + [nets, nets[:2]]:
                assert (await self.index.networks_admitting_members_of(s, subset)
                        == await secgroups.networks_admitting_members_of(s, subset)), subset
            assert await self.index.remote_groups(s, groups) == await secgroups.members_of_groups(s, groups)
            for g in groups:
                assert await self.index.remote_groups(s, [g]) == await secgroups.members_of_groups(s, [g])

    async def claim(self, server_ids: list[str], host: str) -> None:
        """The reconciler's claim: ports bound, then their devices read again."""
        async with self.app.state.sessionmaker() as s, s.begin():
            assert set(await claim_many(s, [(i, HostInfo(id=host)) for i in server_ids])) == set(server_ids)
        self.index.devices_changed(server_ids)

    async def finalize(self, server_id: str) -> None:
        """The reconciler's finalize (the guest is gone), its freed ports to the index."""
        freed: list[tuple[str, str]] = []
        async with self.app.state.sessionmaker() as s, s.begin():
            inst = await s.get(Instance, server_id)
            assert inst is not None and inst.deleted_at is None
            inst.deleted = True
            await finalize_delete(s, inst, freed)
        assert freed
        self.index.ports_changed(freed)

    async def ports_of(self, server_id: str) -> list[dict[str, Any]]:
        return (await self.call("GET", f"{N}/ports?device_id={server_id}", "admin"))["ports"]


async def test_index_answers_as_the_queries(app: Any, client: httpx.AsyncClient, admin_token: str,
                                            demo_token: str) -> None:
    image_id, private = await seed(app)
    w = World(app, client, admin_token, demo_token)
    # Demo: a second network, a group "web" admitting its own members, a group "plain" without
    # remote rules; admin: a shared network demo's ports can use.
    second = await w.post(f"{N}/networks", "network", {"name": "second"})
    await w.post(f"{N}/subnets", "subnet",
                 {"network_id": second["id"], "cidr": "10.9.0.0/24", "ip_version": 4})
    web = await w.post(f"{N}/security-groups", "security_group", {"name": "web"})
    await w.post(f"{N}/security-group-rules", "security_group_rule",
                 {"security_group_id": web["id"], "direction": "ingress", "remote_group_id": web["id"]})
    plain = await w.post(f"{N}/security-groups", "security_group", {"name": "plain"})
    shared = await w.post(f"{N}/networks", "network", {"name": "shared", "shared": True}, "admin")
    await w.post(f"{N}/subnets", "subnet", {"network_id": shared["id"], "cidr": "10.8.0.0/24",
                                            "ip_version": 4}, "admin")
    await w.compare()

    async def server(net: str, groups: list[str] | None = None) -> str:
        body: dict[str, Any] = {"name": "vm", "imageRef": image_id, "flavorRef": "1",
                                "networks": [{"uuid": net}]}
        if groups is not None:
            body["security_groups"] = [{"name": g} for g in groups]
        return str((await w.call("POST", f"{V21}/servers", body={"server": body}))["server"]["id"])

    # Servers on three networks (the shared one too), claimed on two hosts. Until it is claimed,
    # a server's port is unknown to the index, which read the projects before it was made.
    a = await server(private)
    b = await server(second["id"], ["web"])
    await w.claim([a, b], "h1")
    await w.compare()
    c = await server(shared["id"], ["default", "web"])
    d = await server(private, ["plain"])
    await w.claim([c, d], "h2")
    await w.compare()
    e = await server(second["id"])
    f = await server(shared["id"], ["web"])
    await w.claim([e, f], "h1")
    await w.compare()

    # Ports through the port API: one unbound in "web", one of admin on demo's network.
    p1 = await w.post(f"{N}/ports", "port", {"network_id": second["id"], "security_groups": [web["id"]]})
    await w.compare()
    p2 = await w.post(f"{N}/ports", "port", {"network_id": shared["id"]}, "admin")
    await w.compare()
    # Groups, addresses and binding changed, then ports deleted.
    await w.call("PUT", f"{N}/ports/{p1['id']}", body={"port": {"security_groups": [plain["id"], web["id"]]}})
    await w.compare()
    await w.call("PUT", f"{N}/ports/{p1['id']}", body={"port": {"fixed_ips": [{"ip_address": "10.9.0.77"}]}})
    await w.compare()
    await w.call("PUT", f"{N}/ports/{p1['id']}", "admin", {"port": {"binding:host_id": "h3"}})
    await w.compare()
    port_b = (await w.ports_of(b))[0]
    await w.call("PUT", f"{N}/ports/{port_b['id']}", body={"port": {"security_groups": [plain["id"]]}})
    await w.compare()
    await w.call("PUT", f"{N}/ports/{port_b['id']}", body={"port": {"security_groups": []}})
    await w.compare()
    await w.call("DELETE", f"{N}/ports/{p2['id']}", "admin")
    await w.compare()
    await w.call("DELETE", f"{N}/ports/{(await w.ports_of(f))[0]['id']}")
    await w.compare()

    # Rules: "plain" gets a remote rule naming "web", then loses it; "web" is read live.
    rule = await w.post(f"{N}/security-group-rules", "security_group_rule", {
        "security_group_id": plain["id"], "direction": "ingress", "remote_group_id": web["id"]})
    await w.compare()
    await w.call("DELETE", f"{N}/security-group-rules/{rule['id']}")
    await w.compare()

    # A port becomes a router interface (its groups are cleared).
    p3 = await w.post(f"{N}/ports", "port", {"network_id": second["id"], "security_groups": [web["id"]]})
    await w.compare()
    router = await w.post(f"{N}/routers", "router", {"name": "r"})
    await w.call("PUT", f"{N}/routers/{router['id']}/add_router_interface", body={"port_id": p3["id"]})
    await w.compare()

    # Deletes: finalized by the controller; one by the API itself (never scheduled): the
    # reconciler reads that project again when converge sees the row.
    await w.finalize(a)
    await w.compare()
    await w.finalize(c)
    await w.compare()
    g = await server(private, ["web"])
    await w.claim([g], "h1")
    await w.compare()
    lone = await server(second["id"], ["web"])
    await w.claim([lone], "h2")
    await w.call("DELETE", f"{V21}/servers/{lone}")  # no host h2 is up: the API finalizes
    async with app.state.sessionmaker() as s:
        inst = await s.get(Instance, lone)
        assert inst is not None and inst.deleted_at is not None
        w.index.project_changed(inst.project_id)
    await w.compare()
    assert d and e

    # The safety net: a project read long ago is read again.
    loads = w.index.loads
    w.clock.now += 10_000
    await w.compare()
    assert w.index.loads > loads


async def test_events_read_only_what_changed(app: Any, client: httpx.AsyncClient, admin_token: str,
                                             demo_token: str) -> None:
    """Claims and frees read their ports, not the project again."""
    image_id, private = await seed(app)
    w = World(app, client, admin_token, demo_token)
    body = {"name": "vm", "imageRef": image_id, "flavorRef": "1", "networks": [{"uuid": private}]}
    first = str((await w.call("POST", f"{V21}/servers", body={"server": body}))["server"]["id"])
    await w.claim([first], "h1")
    await w.compare()
    assert w.index.loads == 1
    for _ in range(3):
        ids = [str((await w.call("POST", f"{V21}/servers", body={"server": body}))["server"]["id"])
               for _ in range(3)]
        await w.claim(ids, "h1")
        await w.compare()
        await w.finalize(ids[0])
        await w.compare()
    assert w.index.loads == 1
    async with app.state.sessionmaker() as s:
        addresses = await w.index.remote_groups(s, await s.scalars(select(SecurityGroup.id)))
        assert sum(len(v) for v in addresses.values()) == 7  # 1 + 3 * (3 - 1) in the default group


async def test_failed_transaction_is_read_again(app: Any, client: httpx.AsyncClient, admin_token: str,
                                                demo_token: str) -> None:
    """What the index read inside a transaction that then failed (its own deletes) is forgotten."""
    image_id, private = await seed(app)
    w = World(app, client, admin_token, demo_token)
    body = {"name": "vm", "imageRef": image_id, "flavorRef": "1", "networks": [{"uuid": private}]}
    server_id = str((await w.call("POST", f"{V21}/servers", body={"server": body}))["server"]["id"])
    await w.claim([server_id], "h1")
    await w.compare()
    w.index.record()
    async with app.state.sessionmaker() as s:
        await s.begin()
        inst = await s.get(Instance, server_id)
        assert inst is not None
        freed: list[tuple[str, str]] = []
        await finalize_delete(s, inst, freed)
        w.index.ports_changed(freed)
        groups = list(await s.scalars(select(SecurityGroup.id)))
        assert await w.index.remote_groups(s, groups) == {g: [] for g in groups}
        await s.rollback()
    w.index.discard_recorded()
    await w.compare()
    async with app.state.sessionmaker() as s:
        assert sum(len(v) for v in (await w.index.remote_groups(s, groups)).values()) == 1
        assert list(await s.scalars(select(Port.id).where(Port.device_id == server_id)))



async def test_only_remote_rules_fan_out(app: Any, client: httpx.AsyncClient, admin_token: str,
                                         demo_token: str) -> None:
    """A network's member hosts need new member sets only where a bound port's groups name a
    remote group (the ``default`` group does; a group without such rules does not)."""
    image_id, private = await seed(app)
    w = World(app, client, admin_token, demo_token)
    plain = await w.post(f"{N}/security-groups", "security_group", {"name": "plain"})
    body = {"name": "vm", "imageRef": image_id, "flavorRef": "1", "networks": [{"uuid": private}],
            "security_groups": [{"name": "plain"}]}
    server_id = str((await w.call("POST", f"{V21}/servers", body={"server": body}))["server"]["id"])
    await w.claim([server_id], "h1")
    async with app.state.sessionmaker() as s:
        assert await w.index.networks_admitting_members_of(s, [private]) == set()
    await w.post(f"{N}/security-group-rules", "security_group_rule", {
        "security_group_id": plain["id"], "direction": "ingress", "remote_group_id": plain["id"]})
    await w.compare()
    async with app.state.sessionmaker() as s:
        assert await w.index.networks_admitting_members_of(s, [private]) == {private}


async def test_no_remote_rules_reads_no_project(app: Any, client: httpx.AsyncClient, admin_token: str,
                                                demo_token: str) -> None:
    """While no rule names a remote group the index reads no project; the first such rule
    brings the answers back."""
    image_id, private = await seed(app)
    w = World(app, client, admin_token, demo_token)
    body = {"name": "vm", "imageRef": image_id, "flavorRef": "1", "networks": [{"uuid": private}]}
    server_id = str((await w.call("POST", f"{V21}/servers", body={"server": body}))["server"]["id"])
    rules = (await w.call("GET", f"{N}/security-group-rules", "admin"))["security_group_rules"]
    named = [r for r in rules if r["remote_group_id"]]
    assert named  # Neutron's default group admits its own members
    for rule in named:
        await w.call("DELETE", f"{N}/security-group-rules/{rule['id']}", "admin")
    await w.claim([server_id], "h1")
    w.deliver_wakes()
    async with app.state.sessionmaker() as s:
        assert await w.index.networks_admitting_members_of(s, [private]) == set()
    assert w.index.loads == 0
    group = named[0]["security_group_id"]
    await w.post(f"{N}/security-group-rules", "security_group_rule", {
        "security_group_id": group, "direction": "ingress", "remote_group_id": group}, "admin")
    await w.compare()
    async with app.state.sessionmaker() as s:
        assert await w.index.networks_admitting_members_of(s, [private]) == {private}
    assert w.index.loads > 0


def test_a_member_set_is_mended_as_ports_come_and_go() -> None:
    """``_Project.members_of`` mends its last sorted answer with the addresses that came or went
    (an address two ports share stays until both are gone); an answer given is never changed,
    and past ``MEND_AT_MOST`` changes the set is sorted anew."""
    rng = random.Random(5)
    project = _Project(expires=0.0, changed=set())
    ports: dict[str, tuple[str, ...]] = {}
    answers: list[tuple[list[str], list[str]]] = []
    for step in range(3000):
        if ports and rng.random() < 0.4:
            port_id = rng.choice(sorted(ports))
            del ports[port_id]
            project.remove(port_id)
        else:
            port_id = f"p{step}"
            ports[port_id] = (f"10.0.{rng.randrange(4)}.{rng.randrange(40 if step < 1500 else 250)}",)
            project.add(port_id, ("net", True, ("g",), ports[port_id]))
        # Answers every few steps (a few addresses to mend), then every hundred or so (many).
        if rng.random() < (0.2 if step < 1500 else 0.01) or step == 2999:
            answer = project.members_of("g")
            assert answer == sorted({a for addresses in ports.values() for a in addresses})
            answers.append((answer, list(answer)))
    assert all(answer == copy for answer, copy in answers)  # none changed after it was given
    for i in range(MEND_AT_MOST + 1):
        project.add(f"q{i}", ("net", True, ("g",), (f"10.1.{i // 250}.{i % 250}",)))
    assert "g" not in project.sorted and "g" not in project.touched
    assert project.members_of("g") == sorted(project.members["g"])
