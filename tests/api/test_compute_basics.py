"""Nova versions, microversion negotiation, flavors and keypairs against the real app."""

from __future__ import annotations

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from cloudland.api.compute.flavors import bootstrap_flavors
from cloudland.api.compute.keypairs import fingerprint, generate_key_pair

V21 = "/compute/v2.1"


def auth(token: str, **extra: str) -> dict[str, str]:
    return {"X-Auth-Token": token, **extra}


@pytest.fixture
async def flavors(app) -> None:  # type: ignore[no-untyped-def]
    await bootstrap_flavors(app.state.sessionmaker)
    await bootstrap_flavors(app.state.sessionmaker)  # idempotent


# --- versions and microversions ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/compute", "/compute/"])
async def test_versions_list(client: httpx.AsyncClient, path: str) -> None:
    r = await client.get(path)
    assert r.status_code == 200
    (version,) = r.json()["versions"]
    assert version == {
        "id": "v2.1", "status": "CURRENT", "version": "2.1", "min_version": "2.1",
        "updated": "2013-07-23T11:33:21Z",
        "links": [{"rel": "self", "href": "http://cloudland.test/compute/v2.1/"}],
    }


@pytest.mark.parametrize("path", [V21, V21 + "/"])
async def test_version_show(client: httpx.AsyncClient, path: str) -> None:
    r = await client.get(path)
    assert r.status_code == 200
    version = r.json()["version"]
    assert version["id"] == "v2.1" and version["min_version"] == "2.1"
    assert version["media-types"][0]["type"] == "application/vnd.openstack.compute+json;version=2.1"
    assert version["links"][0]["href"] == "http://cloudland.test/compute/v2.1/"


@pytest.mark.parametrize("headers", [
    {}, {"OpenStack-API-Version": "compute 2.1"}, {"OpenStack-API-Version": "compute latest"},
    {"X-OpenStack-Nova-API-Version": "2.1"}, {"OpenStack-API-Version": "volume 3.5, compute 2.1"},
])
async def test_microversion_echo(client: httpx.AsyncClient, demo_token: str, flavors: None,
                                 headers: dict[str, str]) -> None:
    r = await client.get(V21 + "/flavors", headers=auth(demo_token, **headers))
    assert r.status_code == 200
    assert r.headers["OpenStack-API-Version"] == "compute 2.1"
    assert r.headers["X-OpenStack-Nova-API-Version"] == "2.1"
    assert "OpenStack-API-Version" in r.headers["Vary"]


@pytest.mark.parametrize("headers", [
    {"OpenStack-API-Version": "compute 2.5"}, {"X-OpenStack-Nova-API-Version": "2.0"},
    {"OpenStack-API-Version": "compute 3.1"},
])
async def test_microversion_out_of_range(client: httpx.AsyncClient, demo_token: str,
                                         headers: dict[str, str]) -> None:
    r = await client.get(V21 + "/flavors", headers=auth(demo_token, **headers))
    assert r.status_code == 406
    message = r.json()["computeFault"]["message"]
    assert message.endswith("is not supported by the API. Minimum is 2.1 and maximum is 2.1.")


async def test_microversion_garbage(client: httpx.AsyncClient, demo_token: str) -> None:
    r = await client.get(V21 + "/flavors", headers=auth(demo_token, **{"OpenStack-API-Version": "compute x"}))
    assert r.status_code == 400
    assert "badRequest" in r.json()


async def test_no_headers_outside_compute(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz", headers={"OpenStack-API-Version": "compute 9.9"})
    assert r.status_code == 200 and "OpenStack-API-Version" not in r.headers


# --- flavors ----------------------------------------------------------------------------------


async def test_flavor_list_and_detail(client: httpx.AsyncClient, demo_token: str, flavors: None) -> None:
    r = await client.get(V21 + "/flavors", headers=auth(demo_token))
    assert r.status_code == 200
    by_name = {f["name"]: f for f in r.json()["flavors"]}
    assert len(by_name) == 7 and set(by_name["m1.nano"]) == {"id", "name", "links"}
    assert by_name["m1.nano"]["links"] == [
        {"rel": "self", "href": "http://cloudland.test/compute/v2.1/flavors/42"},
        {"rel": "bookmark", "href": "http://cloudland.test/compute/flavors/42"},
    ]
    r = await client.get(V21 + "/flavors/detail", params={"is_public": "True"}, headers=auth(demo_token))
    nano = next(f for f in r.json()["flavors"] if f["id"] == "42")
    assert nano == {
        "id": "42", "name": "m1.nano", "ram": 128, "vcpus": 1, "disk": 1, "swap": "",
        "OS-FLV-EXT-DATA:ephemeral": 0, "os-flavor-access:is_public": True, "rxtx_factor": 1.0,
        "OS-FLV-DISABLED:disabled": False, "links": nano["links"],
    }


async def test_flavor_filters_and_pages(client: httpx.AsyncClient, demo_token: str, flavors: None) -> None:
    r = await client.get(V21 + "/flavors/detail", params={"minRam": 4096, "minDisk": 50},
                         headers=auth(demo_token))
    assert sorted(f["name"] for f in r.json()["flavors"]) == ["m1.large", "m1.xlarge"]
    seen: list[str] = []
    url: str | None = V21 + "/flavors?limit=3"
    while url:
        r = await client.get(url, headers=auth(demo_token))
        assert r.status_code == 200
        body = r.json()
        seen += [f["id"] for f in body["flavors"]]
        url = body.get("flavors_links", [{}])[0].get("href")
        assert url is None or url.startswith("http://cloudland.test/compute/v2.1/flavors?")
    assert seen == sorted(seen) and len(seen) == 7
    r = await client.get(V21 + "/flavors?marker=nope", headers=auth(demo_token))
    assert r.status_code == 400
    r = await client.get(V21 + "/flavors?minRam=lots", headers=auth(demo_token))
    assert r.status_code == 400


async def test_flavor_show_and_404(client: httpx.AsyncClient, demo_token: str, flavors: None) -> None:
    r = await client.get(V21 + "/flavors/1", headers=auth(demo_token))
    assert r.status_code == 200 and r.json()["flavor"]["name"] == "m1.tiny"
    r = await client.get(V21 + "/flavors/m1.tiny", headers=auth(demo_token))
    assert r.status_code == 404
    assert r.json()["itemNotFound"]["code"] == 404
    r = await client.get(V21 + "/flavors/1/os-extra_specs", headers=auth(demo_token))
    assert r.json() == {"extra_specs": {}}


async def test_flavor_needs_token(client: httpx.AsyncClient) -> None:
    assert (await client.get(V21 + "/flavors")).status_code == 401


async def test_flavor_create_delete(client: httpx.AsyncClient, admin_token: str, demo_token: str,
                                    flavors: None) -> None:
    body = {"flavor": {"name": "custom", "ram": 256, "vcpus": 2, "disk": 3, "id": "c1",
                       "os-flavor-access:is_public": False}}
    r = await client.post(V21 + "/flavors", json=body, headers=auth(demo_token))
    assert r.status_code == 403 and "forbidden" in r.json()
    r = await client.post(V21 + "/flavors", json=body, headers=auth(admin_token))
    assert r.status_code == 200, r.text
    created = r.json()["flavor"]
    assert created["id"] == "c1" and created["os-flavor-access:is_public"] is False
    assert (await client.post(V21 + "/flavors", json=body, headers=auth(admin_token))).status_code == 409
    same_name = {"flavor": {**body["flavor"], "id": "c2"}}
    assert (await client.post(V21 + "/flavors", json=same_name, headers=auth(admin_token))).status_code == 409
    # private: hidden from members, listed for admins with is_public=None (or false)
    assert (await client.get(V21 + "/flavors/c1", headers=auth(demo_token))).status_code == 404
    r = await client.get(V21 + "/flavors/detail?is_public=None", headers=auth(admin_token))
    assert "c1" in [f["id"] for f in r.json()["flavors"]]
    r = await client.get(V21 + "/flavors/detail", headers=auth(admin_token))
    assert "c1" not in [f["id"] for f in r.json()["flavors"]]
    r = await client.get(V21 + "/flavors/detail?is_public=false", headers=auth(admin_token))
    assert [f["id"] for f in r.json()["flavors"]] == ["c1"]
    specs = {"extra_specs": {"hw:cpu_policy": "shared"}}
    r = await client.post(V21 + "/flavors/c1/os-extra_specs", json=specs, headers=auth(admin_token))
    assert r.status_code == 200
    r = await client.get(V21 + "/flavors/c1/os-extra_specs", headers=auth(admin_token))
    assert r.json() == {"extra_specs": {"hw:cpu_policy": "shared"}}
    # generated id, bad input
    generated = {"flavor": {"name": "gen", "ram": 64, "vcpus": 1, "disk": 0}}
    r = await client.post(V21 + "/flavors", json=generated, headers=auth(admin_token))
    assert r.status_code == 200 and len(r.json()["flavor"]["id"]) == 36
    bad = {"flavor": {"name": "bad", "ram": -1, "vcpus": 1, "disk": 0}}
    r = await client.post(V21 + "/flavors", json=bad, headers=auth(admin_token))
    assert r.status_code == 400
    assert (await client.delete(V21 + "/flavors/c1", headers=auth(demo_token))).status_code == 403
    assert (await client.delete(V21 + "/flavors/c1", headers=auth(admin_token))).status_code == 202
    assert (await client.delete(V21 + "/flavors/c1", headers=auth(admin_token))).status_code == 404


# --- keypairs ---------------------------------------------------------------------------------


async def test_keypair_generate(client: httpx.AsyncClient, demo_token: str) -> None:
    r = await client.post(V21 + "/os-keypairs", json={"keypair": {"name": "gen"}}, headers=auth(demo_token))
    assert r.status_code == 200, r.text
    kp = r.json()["keypair"]
    assert set(kp) == {"name", "public_key", "fingerprint", "user_id", "private_key"}
    private = serialization.load_pem_private_key(kp["private_key"].encode(), password=None)
    derived = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH).decode()
    assert kp["public_key"].startswith(derived)
    assert kp["fingerprint"] == fingerprint(kp["public_key"])
    r = await client.get(V21 + "/os-keypairs/gen", headers=auth(demo_token))
    shown = r.json()["keypair"]
    assert shown["deleted"] is False and shown["deleted_at"] is None and shown["updated_at"] is None
    assert shown["user_id"] == kp["user_id"] and isinstance(shown["id"], int) and shown["created_at"]
    assert "type" not in shown and "private_key" not in shown


async def test_keypair_import_list_delete(client: httpx.AsyncClient, demo_token: str) -> None:
    _, public = generate_key_pair()
    r = await client.post(V21 + "/os-keypairs", json={"keypair": {"name": "mine", "public_key": public}},
                          headers=auth(demo_token))
    assert r.status_code == 200
    kp = r.json()["keypair"]
    assert "private_key" not in kp and kp["public_key"] == public
    assert len(kp["fingerprint"].split(":")) == 16
    r = await client.post(V21 + "/os-keypairs", json={"keypair": {"name": "mine", "public_key": public}},
                          headers=auth(demo_token))
    assert r.status_code == 409 and "conflictingRequest" in r.json()
    r = await client.get(V21 + "/os-keypairs", headers=auth(demo_token))
    assert r.json() == {"keypairs": [{"keypair": {"name": "mine", "public_key": public,
                                                  "fingerprint": kp["fingerprint"]}}]}
    assert (await client.delete(V21 + "/os-keypairs/mine", headers=auth(demo_token))).status_code == 202
    assert (await client.get(V21 + "/os-keypairs/mine", headers=auth(demo_token))).status_code == 404
    assert (await client.delete(V21 + "/os-keypairs/mine", headers=auth(demo_token))).status_code == 404


@pytest.mark.parametrize("keypair", [
    {"name": "x", "public_key": "ssh-rsa not-base64"},
    {"name": "x", "public_key": "hello"},
    {"name": "bad/name"},
    {"name": ""},
    {"name": "x", "type": "ssh"},
])
async def test_keypair_invalid(client: httpx.AsyncClient, demo_token: str, keypair: dict[str, str]) -> None:
    r = await client.post(V21 + "/os-keypairs", json={"keypair": keypair}, headers=auth(demo_token))
    assert r.status_code == 400 and "badRequest" in r.json()


async def test_keypair_isolation(client: httpx.AsyncClient, demo_token: str, admin_token: str, app) -> None:  # type: ignore[no-untyped-def]
    _, public = generate_key_pair()
    body = {"keypair": {"name": "shared-name", "public_key": public}}
    assert (await client.post(V21 + "/os-keypairs", json=body, headers=auth(demo_token))).status_code == 200
    # the same name is free for another user
    assert (await client.post(V21 + "/os-keypairs", json=body, headers=auth(admin_token))).status_code == 200
    r = await client.post(V21 + "/os-keypairs", json={"keypair": {"name": "demo-only", "public_key": public}},
                          headers=auth(demo_token))
    assert r.status_code == 200
    demo_id = r.json()["keypair"]["user_id"]
    r = await client.get(V21 + "/os-keypairs", headers=auth(admin_token))
    assert [k["keypair"]["name"] for k in r.json()["keypairs"]] == ["shared-name"]
    assert (await client.get(V21 + "/os-keypairs/demo-only", headers=auth(admin_token))).status_code == 404
    r = await client.get(V21 + f"/os-keypairs/demo-only?user_id={demo_id}", headers=auth(admin_token))
    assert r.status_code == 200
    admin_id = app.state.credentials.admin_user_id
    r = await client.get(V21 + f"/os-keypairs?user_id={admin_id}", headers=auth(demo_token))
    assert r.status_code == 403
    r = await client.delete(V21 + "/os-keypairs/demo-only", headers=auth(admin_token))
    assert r.status_code == 404
