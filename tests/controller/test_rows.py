"""Claims and status reports against the real (migrated) database."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from cloudland.bus.messages import InstanceStatus
from cloudland.controller.hosts import HostInfo
from cloudland.controller.instance_status import apply_statuses
from cloudland.controller.scheduler import claim
from cloudland.db.models import Instance

pytestmark = pytest.mark.both_databases


async def make_instance(app: Any, **values: Any) -> str:
    async with app.state.sessionmaker() as s, s.begin():
        inst = Instance(name="vm", project_id="p", user_id="u", flavor_id="1",
                        flavor={"vcpus": 1, "ram": 512, "disk": 1}, **values)
        s.add(inst)
        await s.flush()
        return inst.id


async def test_claim_is_conditional(app: Any) -> None:
    iid = await make_instance(app)
    async with app.state.sessionmaker() as s1, app.state.sessionmaker() as s2:
        async with s1.begin():
            assert await claim(s1, iid, HostInfo(id="h1"))
        async with s2.begin():
            assert not await claim(s2, iid, HostInfo(id="h2"))
    async with app.state.sessionmaker() as s:
        inst = await s.get(Instance, iid)
        assert inst is not None and inst.host == "h1" and inst.availability_zone == "nova"


async def postgresql_plan(session: Any, statement: Any) -> str:
    """PostgreSQL's plan for ``statement`` with its parameters written in, sequential scans off
    (the test tables are small enough to be read whole otherwise)."""
    from sqlalchemy import text

    await session.execute(text("SET enable_seqscan = off"))
    sql = str(statement.compile(session.get_bind(), compile_kwargs={"literal_binds": True}))
    return "\n".join(str(row) for row in await session.execute(text("EXPLAIN " + sql)))


def reconciler_alone(app: Any, config: Any) -> Any:
    """A reconciler on the test database with no hosts and nowhere to send commands."""
    from cloudland.controller.hosts import HostIndex
    from cloudland.controller.reconciler import Reconciler

    async def send(host: str, command: object, data: bytes) -> None:
        pass

    return Reconciler(config, app.state.sessionmaker, HostIndex(down_after=10), send)


def status(iid: str, state: str, generation: int = 0, host: str = "h1") -> InstanceStatus:
    return InstanceStatus(host_id=host, instance_id=iid, state=state, reboot_generation=generation)  # type: ignore[arg-type]


async def test_reports_only_end_a_task_when_desired_state_is_reached(app: Any) -> None:
    iid = await make_instance(app, host="h1", vm_state="active", task_state="powering-off",
                              desired_power="stopped", power_state=1)
    async with app.state.sessionmaker() as s, s.begin():
        await apply_statuses(s, [status(iid, "running")])  # stale: the stop has not happened yet
    async with app.state.sessionmaker() as s, s.begin():
        inst = await s.get(Instance, iid)
        assert inst is not None and inst.task_state == "powering-off"
        outcome = await apply_statuses(s, [status(iid, "stopped")])
        assert inst.vm_state == "stopped" and inst.task_state is None and inst.power_state == 4
        assert outcome.strays == [] and outcome.missing == []
        inst.task_state, inst.reboot_generation, inst.desired_power = "rebooting_hard", 1, "running"
        await apply_statuses(s, [status(iid, "running", generation=0)])
        assert inst.task_state == "rebooting_hard" and inst.vm_state == "active"
        await apply_statuses(s, [status(iid, "running", generation=1)])
        assert inst.task_state is None and inst.launched_at is not None


async def test_reports_from_the_wrong_host_and_errors(app: Any) -> None:
    iid = await make_instance(app, host="h1", task_state="spawning")
    async with app.state.sessionmaker() as s, s.begin():
        outcome = await apply_statuses(s, [status(iid, "running", host="h2"), status("gone", "stopped")])
        assert sorted(outcome.strays) == sorted([("h2", iid), ("h1", "gone")])
        outcome = await apply_statuses(s, [status(iid, "absent")])
        assert outcome.missing == [iid]
        bad = InstanceStatus(host_id="h1", instance_id=iid, state="error", error="disk full")
        await apply_statuses(s, [bad])
        inst = await s.get(Instance, iid)
        assert inst is not None and inst.vm_state == "error" and inst.fault is not None
        assert inst.fault["message"] == "disk full" and inst.fault["code"] == 500


async def test_guest_that_shut_itself_down_stays_down(app: Any) -> None:
    iid = await make_instance(app, host="h1", vm_state="active", power_state=1)
    async with app.state.sessionmaker() as s, s.begin():
        inst = await s.get(Instance, iid)
        assert inst is not None
        inst.task_state = None  # (None at insert means "the column default")
        await s.flush()
        await apply_statuses(s, [status(iid, "stopped")])
        assert inst is not None and inst.desired_power == "stopped" and inst.vm_state == "stopped"


async def test_finalize_keeps_user_ports(app: Any) -> None:
    from cloudland.controller.instance_status import finalize_delete
    from cloudland.db.models import Network, Port

    async with app.state.sessionmaker() as s, s.begin():
        net = Network(name="n", project_id="p", segmentation_id=7)
        s.add(net)
        await s.flush()
        mine = Port(network_id=net.id, project_id="p", mac_address="fa:16:3e:00:00:01")
        made = Port(network_id=net.id, project_id="p", mac_address="fa:16:3e:00:00:02")
        s.add_all([mine, made])
        await s.flush()
        ids = (mine.id, made.id, net.id)
    iid = await make_instance(app, host="h1", preserved_port_ids=[ids[0]])
    async with app.state.sessionmaker() as s, s.begin():
        for port_id in ids[:2]:
            port = await s.get(Port, port_id)
            assert port is not None
            port.device_id, port.device_owner, port.binding_host_id = iid, "compute:nova", "h1"
    async with app.state.sessionmaker() as s, s.begin():
        inst = await s.get(Instance, iid)
        assert inst is not None
        assert await finalize_delete(s, inst) == {ids[2]}
    async with app.state.sessionmaker() as s:
        kept = await s.get(Port, ids[0])
        assert kept is not None and kept.device_id == "" and kept.binding_host_id == ""
        assert await s.get(Port, ids[1]) is None
        inst = await s.get(Instance, iid)
        assert inst is not None and inst.deleted and inst.vm_state == "deleted" and inst.terminated_at


async def test_claims_and_reports_in_one_statement(app: Any) -> None:
    """``claim_many`` and ``apply_statuses`` for many rows at once (on PostgreSQL one statement
    each, the rows as arrays): only unclaimed live instances are claimed, their ports bound and
    their networks returned; each reported row gets its own values."""
    from cloudland.controller.scheduler import claim_many
    from cloudland.db.models import Network, Port

    free = [await make_instance(app, availability_zone=None) for _ in range(3)]
    taken = await make_instance(app, host="h9")
    deleted = await make_instance(app, deleted=True)
    async with app.state.sessionmaker() as s, s.begin():
        s.add_all([Network(id=f"net-{n}", name=f"net-{n}", project_id="p", segmentation_id=200 + n)
                   for n in range(2)])
        await s.flush()
        for n, iid in enumerate([*free, taken]):
            s.add(Port(network_id=f"net-{n % 2}", project_id="p", mac_address=f"fa:16:3e:00:00:0{n}",
                       device_id=iid, device_owner="compute:nova"))
    hosts = [HostInfo(id="h1", zone="az1"), HostInfo(id="h2"), HostInfo(id="h1", zone="az1")]
    async with app.state.sessionmaker() as s, s.begin():
        claimed = await claim_many(s, [*zip(free, hosts, strict=True), (taken, HostInfo(id="h2")),
                                       (deleted, HostInfo(id="h2"))])
    assert claimed == {free[0]: {"net-0"}, free[1]: {"net-1"}, free[2]: {"net-0"}}
    async with app.state.sessionmaker() as s:
        rows = {i.id: i for i in (await s.scalars(select(Instance))).all()}
        bound = {p.device_id: p.binding_host_id for p in (await s.scalars(select(Port))).all()}
    assert [(rows[i].host, rows[i].availability_zone, rows[i].task_state) for i in free] == [
        ("h1", "az1", "spawning"), ("h2", "nova", "spawning"), ("h1", "az1", "spawning")]
    assert rows[taken].host == "h9" and rows[deleted].host is None
    assert bound == {free[0]: "h1", free[1]: "h2", free[2]: "h1", taken: ""}
    reports = [status(free[0], "running"), status(free[1], "running", host="h2"), status(free[2], "stopped")]
    async with app.state.sessionmaker() as s, s.begin():
        await apply_statuses(s, reports)
    async with app.state.sessionmaker() as s:
        rows = {i.id: i for i in (await s.scalars(select(Instance))).all()}
    assert [(rows[i].vm_state, rows[i].power_state, rows[i].task_state) for i in free] == [
        ("active", 1, None), ("active", 1, None), ("stopped", 4, "spawning")]  # not desired: still spawning
    assert rows[free[0]].launched_at is not None and rows[free[1]].launched_at is not None


async def test_the_queue_reads_use_the_unplaced_index(app: Any) -> None:
    """PostgreSQL reads the scheduler's queue and admission control's count from the partial
    index ``ix_instances_unplaced`` (which holds only servers waiting to be placed), not from
    every host-less row. SQLite, without statistics, goes by ``ix_instances_host``."""

    from cloudland.api.compute.admission import _waiting_statement
    from cloudland.controller.reconciler import _PENDING

    for _ in range(3):
        await make_instance(app)
    placed = await make_instance(app, host="h1")
    async with app.state.sessionmaker() as s:
        if s.get_bind().dialect.name == "postgresql":
            for statement in (_PENDING.params(limit=500), _waiting_statement(10_000)):
                plan = await postgresql_plan(s, statement)
                assert "ix_instances_unplaced" in plan, plan
        queue = [row[0] for row in await s.execute(_PENDING, {"limit": 500})]
        assert len(queue) == 3 and placed not in queue
        assert (await s.execute(_waiting_statement(2))).scalar_one() == 2
        assert (await s.execute(_waiting_statement(10))).scalar_one() == 3


async def test_disabled_hosts_are_read_from_their_index(app: Any) -> None:
    """The pass's read of disabled hosts is answered by ``ix_hosts_disabled`` on PostgreSQL (a
    scan of every host otherwise), and names exactly the disabled ones on both databases."""
    from cloudland.controller.reconciler import _DISABLED_HOSTS
    from cloudland.db.models import Host

    async with app.state.sessionmaker() as s, s.begin():
        s.add_all([Host(id="on-1"), Host(id="off-1", enabled=False), Host(id="on-2", enabled=True),
                   Host(id="off-2", enabled=False)])
    async with app.state.sessionmaker() as s:
        if s.get_bind().dialect.name == "postgresql":
            plan = await postgresql_plan(s, _DISABLED_HOSTS)
            assert "ix_hosts_disabled" in plan, plan
        assert set(await s.scalars(_DISABLED_HOSTS)) == {"off-1", "off-2"}


async def test_a_pass_builds_a_bounded_number_of_network_specs(app: Any, config: Any) -> None:
    """Network specs due for more (host, network) pairs than a pass builds (every host came
    back at once): a pass takes ``net_spec_batch`` of them, the rest wait, and the reconciler
    has work until all are done."""
    reconciler = reconciler_alone(app, config)
    reconciler.net_spec_batch = 2
    reconciler.dirty_nets = {(f"h{i}", "n1") for i in range(5)}
    left = []
    while reconciler.dirty_nets:
        assert reconciler.has_work
        await reconciler.converge()
        left.append(len(reconciler.dirty_nets))
    assert left == [3, 1, 0] and not reconciler.has_work


async def test_a_full_batch_asks_for_the_next_pass(app: Any, config: Any) -> None:
    """More servers waiting than a pass places: the reconciler has work, so the next pass
    follows at once instead of at the next timed one (reports no longer start passes)."""
    for _ in range(3):
        await make_instance(app)
    reconciler = reconciler_alone(app, config)
    reconciler.schedule_batch, reconciler.schedule_after = 2, 0.0
    await reconciler.schedule()  # no host is up: both get "no valid host"
    assert reconciler.has_work
    await reconciler.schedule()
    reconciler.dirty.clear()
    assert not reconciler.has_work


async def test_reports_not_written_are_kept(app: Any, config: Any) -> None:
    """A status write that fails (here: the table is gone for a moment) keeps its reports for
    the next attempt instead of dropping them (the row would stay BUILD while the guest runs)."""
    from sqlalchemy import text

    iid = await make_instance(app, host="h1")
    reconciler = reconciler_alone(app, config)
    reconciler.on_status(status(iid, "running"))

    async def rename(old: str, new: str) -> None:
        async with app.state.sessionmaker() as s, s.begin():
            await s.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))

    await rename("instances", "instances_away")
    try:
        with pytest.raises(Exception):  # noqa: B017 (whatever the driver raises for a missing table)
            await reconciler.write_statuses()
    finally:
        await rename("instances_away", "instances")
    assert [r.instance_id for r in reconciler.pending_reports] == [iid]
    await reconciler.write_statuses()
    async with app.state.sessionmaker() as s:
        inst = await s.get(Instance, iid)
        assert inst is not None and inst.vm_state == "active" and not reconciler.pending_reports


async def test_router_lookups_read_only_router_ports(app: Any) -> None:
    """Which networks a router joins, asked for the changed networks on every pass: answered from
    the partial index ``ix_ports_router_interfaces`` on PostgreSQL (router ports only), not by
    reading every port of those networks."""

    from cloudland.controller import router_specs
    from cloudland.db.models import Network, Port

    async with app.state.sessionmaker() as s, s.begin():
        nets = [Network(name=f"n{i}", project_id="p", segmentation_id=900 + i) for i in range(3)]
        s.add_all(nets)
        await s.flush()
        a, b, c = (n.id for n in nets)
        for i, (net, owner, device) in enumerate([
                (a, "network:router_interface_distributed", "r1"), (b, "network:router_interface", "r1"),
                (c, "compute:nova", "vm"), (c, "network:dhcp", "dhcp"), (a, "compute:nova", "vm2")]):
            s.add(Port(network_id=net, project_id="p", mac_address=f"fa:16:3e:00:00:{i:02x}",
                       device_owner=owner, device_id=device))
    async with app.state.sessionmaker() as s:
        assert await router_specs.linked_networks(s, [a, c]) == {a: {b}, b: {a}}
        assert await router_specs.linked_networks(s, [c]) == {}
        assert await router_specs.networks_with_routers(s, [a, b, c]) == {a, b}
        if s.get_bind().dialect.name == "postgresql":
            for statement in (router_specs._linked_stmt(s), router_specs._with_routers_stmt(s)):
                plan = await postgresql_plan(s, statement.params(nets=[a]))
                assert "ix_ports_router_interfaces" in plan, plan
