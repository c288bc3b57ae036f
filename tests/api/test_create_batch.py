"""Group commit of server creates (cloudland/api/compute/create_batch.py): concurrent creates
share transactions, and what they produce is what one-at-a-time creates would."""

from __future__ import annotations

import asyncio
import ipaddress

import httpx
import pytest
from sqlalchemy import select

from cloudland.db.models import Flavor, Image, Instance, IpAllocation, Network, Port, Project, Subnet
from tests.api.test_servers import V21, Seed, auth, create, error


@pytest.fixture
async def seed(app) -> Seed:  # type: ignore[no-untyped-def]
    async with app.state.sessionmaker() as s, s.begin():
        projects = {p.name: p.id for p in await s.scalars(select(Project))}
        s.add(Flavor(id="1", name="m1.tiny", vcpus=1, ram=512, disk=1))
        image = Image(name="cirros", status="active", visibility="public", disk_format="qcow2",
                      container_format="bare", size=1024, os_hash_algo="sha512", os_hash_value="ab" * 64)
        net = Network(name="private", project_id=projects["demo"], segmentation_id=100)
        s.add_all([image, net])
        await s.flush()
        subnet = Subnet(network_id=net.id, project_id=projects["demo"], cidr="10.0.0.0/24",
                        gateway_ip="10.0.0.1", allocation_pools=[{"start": "10.0.0.2", "end": "10.0.0.254"}])
        s.add(subnet)
        await s.flush()
        return Seed(projects["demo"], projects["admin"], image.id, net.id, subnet.id)


async def _default_group(client: httpx.AsyncClient, token: str) -> None:
    """Listing security groups creates the project's default group (Neutron), which the batch
    path needs: without it, creates go one by one."""
    r = await client.get("/network/v2.0/security-groups", headers=auth(token))
    assert r.status_code == 200, r.text


async def _many(client: httpx.AsyncClient, token: str, seed: Seed, count: int,
                network_id: str | None = None) -> list[httpx.Response]:
    nets = [{"uuid": network_id or seed.network_id}]
    return list(await asyncio.gather(*(create(client, token, seed, name=f"vm-{i}", networks=nets)
                                       for i in range(count))))


@pytest.mark.both_databases
async def test_concurrent_creates_share_transactions(client: httpx.AsyncClient, demo_token: str,
                                                     seed: Seed, app, config) -> None:  # type: ignore[no-untyped-def]
    config.compute.quota_instances = config.compute.quota_cores = config.compute.quota_ram = -1
    await _default_group(client, demo_token)
    batcher = app.state.create_batcher
    replies = await _many(client, demo_token, seed, 40)
    assert [r.status_code for r in replies] == [202] * 40, [r.text for r in replies if r.status_code != 202]
    assert batcher.batched == 40 and batcher.fallbacks == 0
    assert batcher.batches < 40  # some shared a transaction
    ids = {r.json()["server"]["id"] for r in replies}
    async with app.state.sessionmaker() as s:
        ports = list(await s.scalars(select(Port).where(Port.device_id.in_(ids))))
        port_ids = [p.id for p in ports]
        ips = list(await s.scalars(select(IpAllocation).where(IpAllocation.port_id.in_(port_ids))))
    assert {p.device_id for p in ports} == ids and len(ports) == 40
    assert len({p.mac_address for p in ports}) == 40
    assert all(p.security_groups and p.device_owner == "compute:nova" for p in ports)
    # One address each, distinct, in the pool (lowest first: the pool is small), never the gateway.
    addresses = sorted(int(ipaddress.ip_address(a.ip_address)) for a in ips)
    assert len(ips) == 40 and len(set(addresses)) == 40
    assert "10.0.0.1" not in {a.ip_address for a in ips}
    assert addresses == list(range(int(ipaddress.ip_address("10.0.0.2")),
                                   int(ipaddress.ip_address("10.0.0.2")) + 40))
    listed = (await client.get(f"{V21}/servers/detail", headers=auth(demo_token))).json()["servers"]
    assert {s["id"] for s in listed} == ids
    assert all(s["addresses"]["private"][0]["addr"].startswith("10.0.0.") for s in listed)


@pytest.mark.both_databases
async def test_quota_in_a_batch(client: httpx.AsyncClient, demo_token: str, seed: Seed, app) -> None:  # type: ignore[no-untyped-def]
    """Nova's default quota (10 instances): 14 concurrent creates give 10 servers and 4 403s."""
    await _default_group(client, demo_token)
    replies = await _many(client, demo_token, seed, 14)
    codes = sorted(r.status_code for r in replies)
    assert codes == [202] * 10 + [403] * 4
    for r in replies:
        if r.status_code == 403:
            assert error(r, 403, "forbidden").startswith("Quota exceeded for instances: Requested 1, but "
                                                         "already used 10 of 10 instances")


@pytest.mark.both_databases
async def test_pool_running_out_in_a_batch(client: httpx.AsyncClient, demo_token: str, seed: Seed,
                                           app, config) -> None:  # type: ignore[no-untyped-def]
    """A /29 has 5 addresses for ports: 8 concurrent creates give 5 servers and Nova's 409s
    for the others, and every server has an address."""
    config.compute.quota_instances = config.compute.quota_cores = config.compute.quota_ram = -1
    await _default_group(client, demo_token)
    async with app.state.sessionmaker() as s, s.begin():
        net = Network(name="tiny", project_id=seed.demo_project, segmentation_id=101)
        s.add(net)
        await s.flush()
        s.add(Subnet(network_id=net.id, project_id=seed.demo_project, cidr="10.9.0.0/29",
                     gateway_ip="10.9.0.1", allocation_pools=[{"start": "10.9.0.2", "end": "10.9.0.6"}]))
        net_id = net.id
    replies = await _many(client, demo_token, seed, 8, net_id)
    created = [r.json()["server"]["id"] for r in replies if r.status_code == 202]
    failed = [r for r in replies if r.status_code != 202]
    assert len(created) == 5, [r.text for r in failed]
    for r in failed:
        assert r.status_code == 409, r.text
    async with app.state.sessionmaker() as s:
        held = set(await s.scalars(select(IpAllocation.ip_address).join(Port, Port.id == IpAllocation.port_id)
                                   .where(Port.device_id.in_(created))))
    assert held == {f"10.9.0.{n}" for n in range(2, 7)}


async def test_batching_off(client: httpx.AsyncClient, demo_token: str, seed: Seed, app) -> None:  # type: ignore[no-untyped-def]
    """``compute.batch_creates = false``: no batcher, creates still work (one transaction each)."""
    from cloudland.api.app import create_app

    app.state.config.compute.batch_creates = False
    other = create_app(app.state.config, connect_bus=False)
    async with other.router.lifespan_context(other):
        assert getattr(other.state, "create_batcher", None) is None
        transport = httpx.ASGITransport(app=other)
        async with httpx.AsyncClient(transport=transport, base_url="http://cloudland.test") as c2:
            r = await create(c2, demo_token, seed, networks=[{"uuid": seed.network_id}])
            assert r.status_code == 202, r.text


@pytest.mark.both_databases
async def test_errors_in_a_batch(client: httpx.AsyncClient, demo_token: str, seed: Seed, app,
                                 config) -> None:  # type: ignore[no-untyped-def]
    """The batch reads what all its requests need at once; each request still gets its own
    outcome, the one it would get alone, and the good ones are written."""
    config.compute.quota_instances = config.compute.quota_cores = config.compute.quota_ram = -1
    await _default_group(client, demo_token)
    async with app.state.sessionmaker() as s, s.begin():
        other = Network(name="theirs", project_id=seed.admin_project, segmentation_id=102)
        s.add(other)
        await s.flush()
        other_id = other.id
    nets = [{"uuid": seed.network_id}]
    requests = {
        "good-1": {"networks": nets},
        "good-2": {"networks": nets, "imageRef": f"http://x/images/{seed.image_id}", "flavorRef": "http://x/flavors/1"},
        "no-flavor": {"networks": nets, "flavorRef": "nope"},
        "no-image": {"networks": nets, "imageRef": "nope"},
        "no-network": {"networks": [{"uuid": "nope"}]},
        "not-mine": {"networks": [{"uuid": other_id}]},
        "bad-name": {"networks": nets, "name": ""},
        "unknown-group": {"networks": nets, "security_groups": [{"name": "web"}]},
        "named-default": {"networks": nets, "security_groups": [{"name": "default"}]},
        "bad-user-data": {"networks": nets, "user_data": "not base64!"},
    }
    replies = dict(zip(requests, await asyncio.gather(*(
        create(client, demo_token, seed, **({"name": name} | extra)) for name, extra in requests.items())),
        strict=True))
    for name in ("good-1", "good-2", "named-default"):
        assert replies[name].status_code == 202, replies[name].text
    assert error(replies["no-flavor"], 400, "badRequest") == "Flavor nope could not be found."
    assert error(replies["no-image"], 400, "badRequest") == "Image nope could not be found."
    assert error(replies["no-network"], 400, "badRequest") == "Network nope could not be found."
    assert error(replies["not-mine"], 400, "badRequest") == f"Network {other_id} could not be found."
    assert error(replies["bad-name"], 400, "badRequest").startswith("Invalid input for field/attribute name")
    assert error(replies["unknown-group"], 400, "badRequest") == "Security group web not found."
    assert error(replies["bad-user-data"], 400, "badRequest") == "User data needs to be valid base 64."
    created = {replies[n].json()["server"]["id"] for n in ("good-1", "good-2", "named-default")}
    async with app.state.sessionmaker() as s:
        names = set(await s.scalars(select(Instance.name).where(Instance.deleted_at.is_(None))))
    assert names == {"good-1", "good-2", "named-default"} and len(created) == 3


@pytest.mark.both_databases
async def test_admission_control(client: httpx.AsyncClient, demo_token: str, seed: Seed, app,
                                 config) -> None:  # type: ignore[no-untyped-def]
    """``compute.max_pending_builds``: while that many servers wait to be placed, creates get
    Nova's 429 ``overLimit`` with Retry-After and write nothing; once the controller places
    them (here: a host written on the rows), creates are taken again."""
    from sqlalchemy import update

    from cloudland.api.compute.admission import BuildBacklog

    config.compute.quota_instances = config.compute.quota_cores = config.compute.quota_ram = -1
    await _default_group(client, demo_token)
    app.state.build_backlog = backlog = BuildBacklog(app.state.sessionmaker, 5, interval=0.0)
    replies = await _many(client, demo_token, seed, 5)
    assert [r.status_code for r in replies] == [202] * 5
    refused = await create(client, demo_token, seed, networks=[{"uuid": seed.network_id}])
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "5 servers are waiting to be scheduled" in error(refused, 429, "overLimit")
    many = await create(client, demo_token, seed, networks=[{"uuid": seed.network_id}], max_count=3)
    assert many.status_code == 429
    async with app.state.sessionmaker() as s:
        assert len((await s.scalars(select(Instance.id))).all()) == 5  # nothing written for them
    async with app.state.sessionmaker() as s, s.begin():
        await s.execute(update(Instance).values(host="hv-1", vm_state="active"))
    again = await create(client, demo_token, seed, networks=[{"uuid": seed.network_id}])
    assert again.status_code == 202, again.text
    assert backlog.refused == 2
