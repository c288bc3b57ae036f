"""Nova servers API in-process: shapes, codes and every validation error (no controller)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from cloudland.db.models import Flavor, Image, Instance, Keypair, Network, Port, Project, Subnet

V21 = "/compute/v2.1"

SERVER_KEYS_21 = {
    "id", "name", "status", "tenant_id", "user_id", "metadata", "hostId", "image", "flavor", "created",
    "updated", "addresses", "accessIPv4", "accessIPv6", "links", "OS-DCF:diskConfig", "key_name",
    "config_drive", "OS-EXT-AZ:availability_zone", "OS-EXT-STS:vm_state", "OS-EXT-STS:task_state",
    "OS-EXT-STS:power_state", "OS-SRV-USG:launched_at", "OS-SRV-USG:terminated_at",
    "os-extended-volumes:volumes_attached", "security_groups", "progress",
}
ADMIN_KEYS = {"OS-EXT-SRV-ATTR:host", "OS-EXT-SRV-ATTR:hypervisor_hostname", "OS-EXT-SRV-ATTR:instance_name"}


@dataclass
class Seed:
    demo_project: str
    admin_project: str
    image_id: str
    network_id: str
    subnet_id: str


def auth(token: str) -> dict[str, str]:
    return {"X-Auth-Token": token}


@pytest.fixture
async def seed(app) -> Seed:  # type: ignore[no-untyped-def]
    async with app.state.sessionmaker() as s, s.begin():
        projects = {p.name: p.id for p in await s.scalars(select(Project))}
        s.add_all([
            Flavor(id="1", name="m1.tiny", vcpus=1, ram=512, disk=1),
            Flavor(id="3", name="m1.medium", vcpus=2, ram=4096, disk=40),
            Flavor(id="huge", name="huge", vcpus=16, ram=65536, disk=10),
            Flavor(id="off", name="disabled", vcpus=1, ram=64, disk=1, disabled=True),
        ])
        image = Image(name="cirros", status="active", visibility="public", disk_format="qcow2",
                      container_format="bare", size=1024, os_hash_algo="sha512", os_hash_value="ab" * 64)
        queued = Image(id="00000000-0000-0000-0000-0000000000aa", name="q", status="queued",
                       visibility="public")
        net = Network(name="private", project_id=projects["demo"], segmentation_id=100)
        s.add_all([image, queued, net])
        await s.flush()
        subnet = Subnet(network_id=net.id, project_id=projects["demo"], cidr="10.0.0.0/24",
                        gateway_ip="10.0.0.1", allocation_pools=[{"start": "10.0.0.2", "end": "10.0.0.254"}])
        s.add(subnet)
        await s.flush()
        return Seed(projects["demo"], projects["admin"], image.id, net.id, subnet.id)


def server_body(seed: Seed, **extra: Any) -> dict[str, Any]:
    return {"server": {"name": "vm", "imageRef": seed.image_id, "flavorRef": "1", **extra}}


async def create(client: httpx.AsyncClient, token: str, seed: Seed, **extra: Any) -> httpx.Response:
    return await client.post(f"{V21}/servers", json=server_body(seed, **extra), headers=auth(token))


def error(r: httpx.Response, code: int, key: str) -> str:
    assert r.status_code == code, r.text
    body = r.json()
    assert list(body) == [key], body
    assert body[key]["code"] == code
    return body[key]["message"]


@pytest.mark.both_databases
async def test_create_shape_and_rows(client: httpx.AsyncClient, demo_token: str, seed: Seed, app) -> None:  # type: ignore[no-untyped-def]
    r = await create(client, demo_token, seed, security_groups=[{"name": "web"}])
    error(r, 400, "badRequest")  # unknown security group, as Nova
    r = await client.post("/network/v2.0/security-groups", json={"security_group": {"name": "web"}},
                          headers={"X-Auth-Token": demo_token})
    assert r.status_code == 201, r.text
    r = await create(client, demo_token, seed, metadata={"a": "b"}, security_groups=[{"name": "web"}],
                     user_data=base64.b64encode(b"#!/bin/sh\n").decode(), config_drive=True)
    assert r.status_code == 202, r.text
    server = r.json()["server"]
    assert set(server) == {"id", "links", "OS-DCF:diskConfig", "security_groups"}
    assert server["OS-DCF:diskConfig"] == "MANUAL"
    assert server["security_groups"] == [{"name": "web"}]
    assert server["links"][0] == {"rel": "self",
                                  "href": f"http://cloudland.test/compute/v2.1/servers/{server['id']}"}
    async with app.state.sessionmaker() as s:
        inst = await s.get(Instance, server["id"])
        assert inst is not None and inst.flavor["ram"] == 512 and inst.desired_power == "running"
        ports = list(await s.scalars(select(Port).where(Port.device_id == inst.id)))
        assert [p.device_owner for p in ports] == ["compute:nova"]
        assert ports[0].network_id == seed.network_id


async def test_show_body_at_21(client: httpx.AsyncClient, demo_token: str, admin_token: str,
                               seed: Seed) -> None:
    sid = (await create(client, demo_token, seed, key_name=None)).json()["server"]["id"]
    r = await client.get(f"{V21}/servers/{sid}", headers=auth(demo_token))
    assert r.status_code == 200
    server = r.json()["server"]
    assert set(server) == SERVER_KEYS_21
    assert server["status"] == "BUILD" and server["OS-EXT-STS:task_state"] == "scheduling"
    assert server["hostId"] == "" and server["progress"] == 0
    assert server["image"]["id"] == seed.image_id
    assert server["flavor"] == {"id": "1", "links": [
        {"rel": "bookmark", "href": "http://cloudland.test/compute/flavors/1"}]}
    assert server["created"].endswith("Z") and server["OS-SRV-USG:launched_at"] is None
    (address,) = server["addresses"]["private"]
    assert address["version"] == 4 and address["addr"].startswith("10.0.0.")
    assert address["OS-EXT-IPS:type"] == "fixed" and len(address["OS-EXT-IPS-MAC:mac_addr"]) == 17
    assert server["security_groups"] == [{"name": "default"}]
    r = await client.get(f"{V21}/servers/{sid}", headers=auth(admin_token))
    assert set(r.json()["server"]) == SERVER_KEYS_21 | ADMIN_KEYS
    r = await client.get(f"{V21}/servers/{sid}/ips", headers=auth(demo_token))
    assert r.json() == {"addresses": server["addresses"]}


@pytest.mark.both_databases
async def test_list_rename_delete(client: httpx.AsyncClient, demo_token: str, seed: Seed, app) -> None:  # type: ignore[no-untyped-def]
    sid = (await create(client, demo_token, seed)).json()["server"]["id"]
    r = await client.get(f"{V21}/servers", headers=auth(demo_token))
    assert r.status_code == 200
    (brief,) = r.json()["servers"]
    assert set(brief) == {"id", "name", "links"}
    r = await client.put(f"{V21}/servers/{sid}", json={"server": {"name": "renamed"}},
                         headers=auth(demo_token))
    assert r.status_code == 200 and r.json()["server"]["name"] == "renamed"
    r = await client.get(f"{V21}/servers/detail", headers=auth(demo_token))
    assert [s["name"] for s in r.json()["servers"]] == ["renamed"]
    r = await client.delete(f"{V21}/servers/{sid}", headers=auth(demo_token))
    assert r.status_code == 204
    r = await client.get(f"{V21}/servers/{sid}", headers=auth(demo_token))
    error(r, 404, "itemNotFound")
    assert (await client.get(f"{V21}/servers", headers=auth(demo_token))).json() == {"servers": []}
    async with app.state.sessionmaker() as s:
        # Never scheduled: deleted locally at once (Nova's local delete), its port released.
        inst = await s.get(Instance, sid)
        assert inst is not None and inst.deleted and inst.deleted_at is not None
        assert inst.vm_state == "deleted" and inst.task_state is None
        assert (await s.scalar(select(func.count()).select_from(Port).where(Port.device_id == sid))) == 0


@pytest.mark.both_databases
async def test_filters_and_paging(client: httpx.AsyncClient, demo_token: str, seed: Seed) -> None:
    r = await create(client, demo_token, seed, name="web", min_count=3, max_count=3)
    assert r.status_code == 202
    await create(client, demo_token, seed, name="db")
    r = await client.get(f"{V21}/servers?name=^web", headers=auth(demo_token))
    assert sorted(s["name"] for s in r.json()["servers"]) == ["web-1", "web-2", "web-3"]
    r = await client.get(f"{V21}/servers/detail?status=BUILD", headers=auth(demo_token))
    assert len(r.json()["servers"]) == 4
    r = await client.get(f"{V21}/servers/detail?status=ACTIVE", headers=auth(demo_token))
    assert r.json()["servers"] == []
    seen: list[str] = []
    url = f"{V21}/servers?limit=3"
    while url:
        body = (await client.get(url, headers=auth(demo_token))).json()
        seen += [s["id"] for s in body["servers"]]
        links = body.get("servers_links", [])
        url = links[0]["href"].replace("http://cloudland.test", "") if links else ""
    assert len(seen) == len(set(seen)) == 4
    error(await client.get(f"{V21}/servers?marker=nope", headers=auth(demo_token)), 400, "badRequest")
    error(await client.get(f"{V21}/servers?limit=x", headers=auth(demo_token)), 400, "badRequest")
    error(await client.get(f"{V21}/servers?all_tenants=1", headers=auth(demo_token)), 403, "forbidden")


@pytest.mark.both_databases
async def test_isolation(client: httpx.AsyncClient, demo_token: str, admin_token: str, seed: Seed) -> None:
    r = await create(client, admin_token, seed, networks="none")
    assert r.status_code == 202, r.text
    sid = r.json()["server"]["id"]
    for method, path, body in [
        ("GET", f"/servers/{sid}", None), ("PUT", f"/servers/{sid}", {"server": {"name": "x"}}),
        ("DELETE", f"/servers/{sid}", None), ("GET", f"/servers/{sid}/ips", None),
        ("POST", f"/servers/{sid}/action", {"os-stop": None}),
    ]:
        r = await client.request(method, V21 + path, json=body, headers=auth(demo_token))
        error(r, 404, "itemNotFound")
    assert (await client.get(f"{V21}/servers", headers=auth(demo_token))).json() == {"servers": []}
    r = await client.get(f"{V21}/servers?all_tenants=1", headers=auth(admin_token))
    assert [s["id"] for s in r.json()["servers"]] == [sid]


@pytest.mark.parametrize(("extra", "code", "key", "message"), [
    ({"flavorRef": "nope"}, 400, "badRequest", "Flavor nope could not be found."),
    ({"flavorRef": "http://x/compute/flavors/nope"}, 400, "badRequest", "Flavor nope could not be found."),
    ({"flavorRef": "off"}, 400, "badRequest", "Flavor off could not be found."),
    ({"imageRef": "nope"}, 400, "badRequest", "Image nope could not be found."),
    ({"imageRef": "00000000-0000-0000-0000-0000000000aa"}, 400, "badRequest", "is not active"),
    ({"key_name": "missing"}, 400, "badRequest", "Invalid key_name provided."),
    ({"user_data": "not base64!"}, 400, "badRequest", "User data needs to be valid base 64."),
    ({"metadata": {"k": 1}}, 400, "badRequest", "metadata"),
    ({"metadata": {"k": "v" * 256}}, 400, "badRequest", "metadata"),
    ({"name": ""}, 400, "badRequest", "name"),
    ({"min_count": 0}, 400, "badRequest", "min_count"),
    ({"min_count": 3, "max_count": 2}, 400, "badRequest", "min_count"),
    ({"networks": [{"uuid": "nope"}]}, 400, "badRequest", "Network nope could not be found."),
    ({"networks": [{"port": "nope"}]}, 400, "badRequest", "Port id nope could not be found."),
    ({"networks": "auto", "availability_zone": "mars"}, 400, "badRequest", "availability zone"),
    ({"block_device_mapping_v2": [{"source_type": "volume", "uuid": "v", "boot_index": 0,
                                   "destination_type": "volume"}]}, 400, "badRequest", "not supported"),
    ({"flavorRef": "huge"}, 403, "forbidden", "Quota exceeded for ram: Requested 65536"),
])
async def test_create_errors(client: httpx.AsyncClient, demo_token: str, seed: Seed, extra: dict[str, Any],
                             code: int, key: str, message: str) -> None:
    r = await create(client, demo_token, seed, **extra)
    assert message in error(r, code, key)


async def test_create_without_name_or_body(client: httpx.AsyncClient, demo_token: str, seed: Seed) -> None:
    r = await client.post(f"{V21}/servers", json={"server": {"imageRef": seed.image_id, "flavorRef": "1"}},
                          headers=auth(demo_token))
    error(r, 400, "badRequest")
    r = await client.post(f"{V21}/servers", json={"nothing": 1}, headers=auth(demo_token))
    error(r, 400, "badRequest")


async def test_boot_from_bdm_image_and_keypair(client: httpx.AsyncClient, demo_token: str, seed: Seed,
                                               app) -> None:  # type: ignore[no-untyped-def]
    r = await client.get("/identity/v3/auth/tokens",
                         headers={**auth(demo_token), "X-Subject-Token": demo_token})
    user_id = r.json()["token"]["user"]["id"]
    async with app.state.sessionmaker() as s, s.begin():
        s.add(Keypair(name="k", user_id=user_id, fingerprint="f", public_key="ssh-ed25519 AAAA k"))
    bdm = [{"source_type": "image", "uuid": seed.image_id, "boot_index": "0", "destination_type": "local",
            "delete_on_termination": True}]
    r = await client.post(f"{V21}/servers", headers=auth(demo_token), json={"server": {
        "name": "b", "imageRef": "", "flavorRef": "1", "key_name": "k", "block_device_mapping_v2": bdm}})
    assert r.status_code == 202, r.text
    show = (await client.get(f"{V21}/servers/{r.json()['server']['id']}", headers=auth(demo_token))).json()
    assert show["server"]["key_name"] == "k" and show["server"]["image"]["id"] == seed.image_id


@pytest.mark.both_databases
async def test_networks_selection(client: httpx.AsyncClient, demo_token: str, seed: Seed, app) -> None:  # type: ignore[no-untyped-def]
    r = await create(client, demo_token, seed, networks="none")
    sid = r.json()["server"]["id"]
    show = (await client.get(f"{V21}/servers/{sid}", headers=auth(demo_token))).json()["server"]
    assert show["addresses"] == {}
    r = await create(client, demo_token, seed, networks=[{"uuid": seed.network_id, "fixed_ip": "10.0.0.50"}])
    assert r.status_code == 202, r.text
    show = (await client.get(f"{V21}/servers/{r.json()['server']['id']}", headers=auth(demo_token))).json()
    assert show["server"]["addresses"]["private"][0]["addr"] == "10.0.0.50"
    r = await create(client, demo_token, seed, networks=[{"uuid": seed.network_id, "fixed_ip": "10.0.0.50"}])
    error(r, 409, "conflictingRequest")
    # A free port can be given; once a server uses it, it is in use.
    async with app.state.sessionmaker() as s, s.begin():
        port = Port(network_id=seed.network_id, project_id=seed.demo_project, mac_address="fa:16:3e:00:00:01")
        s.add(port)
        await s.flush()
        port_id = port.id
    r = await create(client, demo_token, seed, networks=[{"port": port_id}])
    assert r.status_code == 202
    error(await create(client, demo_token, seed, networks=[{"port": port_id}]), 409, "conflictingRequest")
    async with app.state.sessionmaker() as s:
        inst = await s.get(Instance, r.json()["server"]["id"])
        assert inst is not None and inst.preserved_port_ids == [port_id]
    # A second visible network makes the choice ambiguous.
    async with app.state.sessionmaker() as s, s.begin():
        s.add(Network(name="shared", project_id=seed.admin_project, shared=True, segmentation_id=101))
    message = error(await create(client, demo_token, seed), 409, "conflictingRequest")
    assert message == "Multiple possible networks found, use a Network ID to be more specific."


@pytest.mark.both_databases
async def test_quota_instances(client: httpx.AsyncClient, demo_token: str, seed: Seed) -> None:
    r = await create(client, demo_token, seed, networks="none", min_count=10, max_count=10)
    assert r.status_code == 202, r.text
    message = error(await create(client, demo_token, seed, networks="none"), 403, "forbidden")
    assert message == "Quota exceeded for instances: Requested 1, but already used 10 of 10 instances"
    # max_count beyond the quota creates what fits (Nova), min_count beyond it fails.
    sid = (await client.get(f"{V21}/servers?limit=1", headers=auth(demo_token))).json()["servers"][0]["id"]
    assert (await client.delete(f"{V21}/servers/{sid}", headers=auth(demo_token))).status_code == 204
    r = await create(client, demo_token, seed, networks="none", min_count=1, max_count=5)
    assert r.status_code == 202
    assert len((await client.get(f"{V21}/servers", headers=auth(demo_token))).json()["servers"]) == 10


@pytest.mark.both_databases
async def test_actions_state_checks(client: httpx.AsyncClient, demo_token: str, seed: Seed, app) -> None:  # type: ignore[no-untyped-def]
    sid = (await create(client, demo_token, seed)).json()["server"]["id"]
    url = f"{V21}/servers/{sid}/action"
    h = auth(demo_token)
    message = error(await client.post(url, json={"os-start": None}, headers=h), 409, "conflictingRequest")
    assert message == f"Cannot 'start' instance {sid} while it is in vm_state building"
    error(await client.post(url, json={"os-stop": None}, headers=h), 409, "conflictingRequest")
    error(await client.post(url, json={"reboot": {"type": "SOFT"}}, headers=h), 409, "conflictingRequest")
    error(await client.post(url, json={"os-getConsoleOutput": {}}, headers=h), 409, "conflictingRequest")
    error(await client.post(url, json={"reboot": {"type": "WARM"}}, headers=h), 400, "badRequest")
    error(await client.post(url, json={"frobnicate": None}, headers=h), 400, "badRequest")
    error(await client.post(url, json={"os-getVNCConsole": {"type": "novnc"}}, headers=h), 400, "badRequest")
    async with app.state.sessionmaker() as s, s.begin():
        inst = await s.get(Instance, sid)
        assert inst is not None
        inst.vm_state, inst.task_state, inst.host = "active", None, "h1"
    assert (await client.post(url, json={"os-stop": None}, headers=h)).status_code == 202
    show = (await client.get(f"{V21}/servers/{sid}", headers=h)).json()["server"]
    assert show["OS-EXT-STS:task_state"] == "powering-off" and show["status"] == "ACTIVE"
    async with app.state.sessionmaker() as s, s.begin():
        inst = await s.get(Instance, sid)
        assert inst is not None and inst.desired_power == "stopped"
        inst.vm_state, inst.task_state = "active", None
    assert (await client.post(url, json={"reboot": {"type": "HARD"}}, headers=h)).status_code == 202
    show = (await client.get(f"{V21}/servers/{sid}", headers=h)).json()["server"]
    assert show["status"] == "HARD_REBOOT" and show["hostId"] != ""
    # No bus in this app: the console cannot be reached.
    r = await client.post(url, json={"os-getConsoleOutput": {"length": 5}}, headers=h)
    error(r, 503, "serviceUnavailable")


@pytest.mark.both_databases
async def test_changes_since(client: httpx.AsyncClient, demo_token: str, seed: Seed, app) -> None:  # type: ignore[no-untyped-def]
    """Nova's ``changes-since``: servers updated at or after the time, deleted ones included."""
    from datetime import timedelta

    old = (await create(client, demo_token, seed, name="old")).json()["server"]["id"]
    async with app.state.sessionmaker() as s, s.begin():
        inst = await s.get(Instance, old)
        assert inst is not None
        marker_time = inst.updated_at + timedelta(seconds=1)
        inst.updated_at = inst.updated_at - timedelta(hours=1)
    new = (await create(client, demo_token, seed, name="new")).json()["server"]["id"]
    gone = (await create(client, demo_token, seed, name="gone")).json()["server"]["id"]
    assert (await client.delete(f"{V21}/servers/{gone}", headers=auth(demo_token))).status_code == 204
    since = (marker_time - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    r = await client.get(f"{V21}/servers/detail", params={"changes-since": since}, headers=auth(demo_token))
    servers = {srv["id"]: srv["status"] for srv in r.json()["servers"]}
    assert servers == {new: "BUILD", gone: "DELETED"}
    r = await client.get(f"{V21}/servers?changes-since=yesterday", headers=auth(demo_token))
    error(r, 400, "badRequest")
