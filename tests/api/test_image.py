"""Glance v2 and the agents' signed image download, against the real app, SQLite and files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from cloudland.api.image import ImageStore, bootstrap_image
from cloudland.api.internal import image_download_url
from cloudland.config import Config

IMAGES = "/image/v2/images"
PATCH = "application/openstack-images-v2.1-json-patch"


def auth(token: str, **extra: str) -> dict[str, str]:
    return {"X-Auth-Token": token, **extra}


async def create(client: httpx.AsyncClient, token: str, **body: Any) -> dict[str, Any]:
    body.setdefault("disk_format", "raw")
    body.setdefault("container_format", "bare")
    r = await client.post(IMAGES, json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    return r.json()


async def upload(client: httpx.AsyncClient, token: str, image_id: str, data: bytes | Any) -> httpx.Response:
    return await client.put(f"{IMAGES}/{image_id}/file", content=data,
                            headers=auth(token, **{"Content-Type": "application/octet-stream"}))


async def patch(client: httpx.AsyncClient, token: str, image_id: str,
                ops: list[dict[str, Any]]) -> httpx.Response:
    headers = auth(token, **{"Content-Type": PATCH})
    return await client.patch(f"{IMAGES}/{image_id}", json=ops, headers=headers)


# --- discovery --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/image", "/image/", "/image/v2", "/image/v2/"])
async def test_versions(client: httpx.AsyncClient, path: str) -> None:
    r = await client.get(path)
    assert r.status_code == 300
    versions = r.json()["versions"]
    assert versions[0]["status"] == "CURRENT"
    assert {v["status"] for v in versions[1:]} == {"SUPPORTED"}
    assert all(v["links"] == [{"rel": "self", "href": "http://cloudland.test/image/v2/"}] for v in versions)


async def test_schemas(client: httpx.AsyncClient, demo_token: str) -> None:
    r = await client.get("/image/v2/schemas/image", headers=auth(demo_token))
    assert r.status_code == 200 and r.json()["name"] == "image"
    r = await client.get("/image/v2/schemas/images", headers=auth(demo_token))
    assert r.status_code == 200 and r.json()["name"] == "images"


# --- create, upload, download -----------------------------------------------------------------


async def test_round_trip(client: httpx.AsyncClient, demo_token: str, config: Config) -> None:
    image = await create(client, demo_token, name="cirros", tags=["a", "b"],
                         **{"owner_specified.openstack.md5": "", "hw_disk_bus": "virtio"})
    assert image["status"] == "queued" and image["visibility"] == "shared"
    assert image["hw_disk_bus"] == "virtio" and image["tags"] == ["a", "b"]
    assert image["self"] == f"/v2/images/{image['id']}"
    assert image["file"] == f"/v2/images/{image['id']}/file"
    assert image["schema"] == "/v2/schemas/image"
    assert image["created_at"].endswith("Z") and image["size"] is None and image["checksum"] is None
    r = await client.get(f"{IMAGES}/{image['id']}/file", headers=auth(demo_token))
    assert r.status_code == 204

    data = os.urandom(3 * (1 << 20) + 512)  # qemu-img counts raw sizes in sectors
    r = await upload(client, demo_token, image["id"], data)
    assert r.status_code == 204, r.text
    r = await client.get(f"{IMAGES}/{image['id']}", headers=auth(demo_token))
    shown = r.json()
    assert shown["status"] == "active" and shown["size"] == len(data)
    assert shown["checksum"] == hashlib.md5(data).hexdigest()
    assert shown["os_hash_algo"] == "sha512" and shown["os_hash_value"] == hashlib.sha512(data).hexdigest()
    assert shown["virtual_size"] == len(data)  # raw
    assert (config.images_dir / image["id"]).read_bytes() == data
    assert not [p for p in config.images_dir.iterdir() if p.name.endswith(".part")]

    r = await client.get(f"{IMAGES}/{image['id']}/file", headers=auth(demo_token))
    assert r.status_code == 200 and r.content == data
    assert r.headers["Content-MD5"] == shown["checksum"]
    assert r.headers["Content-Length"] == str(len(data))

    r = await upload(client, demo_token, image["id"], b"again")
    assert r.status_code == 409


async def test_chunked_qcow2_upload(client: httpx.AsyncClient, demo_token: str, tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    proc = await asyncio.create_subprocess_exec("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M")
    assert await proc.wait() == 0
    content = disk.read_bytes()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(content), 4096):
            yield content[i:i + 4096]

    image = await create(client, demo_token, name="q", disk_format="qcow2")
    assert (await upload(client, demo_token, image["id"], chunks())).status_code == 204
    shown = (await client.get(f"{IMAGES}/{image['id']}", headers=auth(demo_token))).json()
    assert shown["virtual_size"] == 64 * (1 << 20) and shown["size"] == len(content)
    assert shown["checksum"] == hashlib.md5(content).hexdigest()


async def test_create_errors(client: httpx.AsyncClient, demo_token: str) -> None:
    json_type = {"Content-Type": "application/json"}
    r = await client.post(IMAGES, content=b"{nope", headers=auth(demo_token, **json_type))
    assert r.status_code == 400 and r.headers["content-type"].startswith("text/plain")
    r = await client.post(IMAGES, json={"name": "x", "visibility": "public"}, headers=auth(demo_token))
    assert r.status_code == 403
    r = await client.post(IMAGES, json={"name": "x", "checksum": "abc"}, headers=auth(demo_token))
    assert r.status_code == 403 and "read-only" in r.text
    r = await client.post(IMAGES, json={"name": "x", "disk_format": "floppy"}, headers=auth(demo_token))
    assert r.status_code == 400
    r = await client.post(IMAGES, json={"name": "x", "custom": 5}, headers=auth(demo_token))
    assert r.status_code == 400
    image_id = "8a4a3b4e-9f5a-4f57-9d0c-2f8f8f0f0f0f"
    image = await create(client, demo_token, id=image_id, name="with-id")
    assert image["id"] == image_id
    r = await client.post(IMAGES, json={"id": image_id}, headers=auth(demo_token))
    assert r.status_code == 409


async def test_unknown_image_is_plain_404(client: httpx.AsyncClient, demo_token: str) -> None:
    r = await client.get(f"{IMAGES}/does-not-exist", headers=auth(demo_token))
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text.startswith("404 Not Found")
    assert (await client.get(IMAGES)).status_code == 401


# --- visibility -------------------------------------------------------------------------------


async def test_visibility(client: httpx.AsyncClient, demo_token: str, admin_token: str) -> None:
    private = await create(client, admin_token, name="admin-private", visibility="private")
    shared = await create(client, admin_token, name="admin-shared")
    public = await create(client, admin_token, name="admin-public", visibility="public")
    community = await create(client, admin_token, name="admin-community", visibility="community")
    mine = await create(client, demo_token, name="demo-own")

    for hidden in (private, shared):
        r = await client.get(f"{IMAGES}/{hidden['id']}", headers=auth(demo_token))
        assert r.status_code == 404
        assert (await client.delete(f"{IMAGES}/{hidden['id']}", headers=auth(demo_token))).status_code == 404
    for seen in (public, community):
        assert (await client.get(f"{IMAGES}/{seen['id']}", headers=auth(demo_token))).status_code == 200
    # visible but not the member's to change
    assert (await client.delete(f"{IMAGES}/{public['id']}", headers=auth(demo_token))).status_code == 403
    r = await patch(client, demo_token, public["id"], [{"op": "replace", "path": "/name", "value": "x"}])
    assert r.status_code == 403

    r = await client.get(IMAGES, headers=auth(demo_token))
    assert {i["name"] for i in r.json()["images"]} == {"admin-public", "demo-own"}
    r = await client.get(IMAGES, params={"visibility": "community"}, headers=auth(demo_token))
    assert [i["name"] for i in r.json()["images"]] == ["admin-community"]
    r = await client.get(IMAGES, params={"visibility": "private"}, headers=auth(demo_token))
    assert r.json()["images"] == []
    r = await client.get(IMAGES, headers=auth(admin_token))
    assert {i["id"] for i in r.json()["images"]} >= {private["id"], shared["id"], mine["id"]}


# --- list filters and pagination -------------------------------------------------------------


async def test_list_filters_and_pages(client: httpx.AsyncClient, demo_token: str) -> None:
    ids = []
    for i in range(7):
        image = await create(client, demo_token, name=f"img-{i}", tags=["even"] if i % 2 == 0 else ["odd"],
                             disk_format="qcow2" if i < 3 else "raw")
        ids.append(image["id"])
    await upload(client, demo_token, ids[0], b"x" * 10)

    async def names(**params: Any) -> list[str]:
        r = await client.get(IMAGES, params=params, headers=auth(demo_token))
        assert r.status_code == 200, r.text
        return [i["name"] for i in r.json()["images"]]

    assert await names(name="img-3") == ["img-3"]
    assert await names(status="active") == ["img-0"]
    assert sorted(await names(tag="even")) == ["img-0", "img-2", "img-4", "img-6"]
    assert await names(tag="eve") == []
    assert sorted(await names(disk_format="qcow2")) == ["img-0", "img-1", "img-2"]
    assert await names(sort_key="name", sort_dir="asc") == [f"img-{i}" for i in range(7)]
    assert await names(sort="name:desc") == [f"img-{i}" for i in reversed(range(7))]

    # walk the pages the way openstacksdk does: follow ``next`` until it disappears
    seen: list[str] = []
    url: str | None = f"{IMAGES}?limit=3&sort_key=name&sort_dir=asc"
    pages = 0
    while url:
        r = await client.get(url, headers=auth(demo_token))
        body = r.json()
        assert body["first"] == "/v2/images" and body["schema"] == "/v2/schemas/images"
        seen += [i["name"] for i in body["images"]]
        nxt = body.get("next")
        url = f"/image{nxt}" if nxt else None
        pages += 1
    assert seen == [f"img-{i}" for i in range(7)] and pages == 3
    # default order: newest first
    assert (await names())[0] == "img-6"

    for bad in ({"limit": "x"}, {"sort_key": "nope"}, {"sort_dir": "up"}, {"marker": "missing"},
                {"visibility": "everyone"}):
        r = await client.get(IMAGES, params=bad, headers=auth(demo_token))
        assert r.status_code == 400, bad


# --- patch, tags, delete ----------------------------------------------------------------------


async def test_patch(client: httpx.AsyncClient, demo_token: str) -> None:
    image = await create(client, demo_token, name="before", foo="bar")
    ops = [
        {"op": "replace", "path": "/name", "value": "after"},
        {"op": "add", "path": "/min_ram", "value": 64},
        {"op": "add", "path": "/new_prop", "value": "1"},
        {"op": "remove", "path": "/foo"},
        {"op": "replace", "path": "/tags", "value": ["t1", "t1", "t2"]},
        {"op": "replace", "path": "/visibility", "value": "private"},
        {"op": "add", "path": "/protected", "value": True},
    ]
    r = await patch(client, demo_token, image["id"], ops)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "after" and body["min_ram"] == 64 and body["new_prop"] == "1"
    assert "foo" not in body and body["tags"] == ["t1", "t2"] and body["visibility"] == "private"
    assert body["protected"] is True

    image_id = image["id"]
    assert (await patch(client, demo_token, image_id, [{"op": "replace", "path": "/status",
                                                        "value": "active"}])).status_code == 403
    r = await patch(client, demo_token, image_id, [{"op": "remove", "path": "/missing"}])
    assert r.status_code == 409
    assert (await patch(client, demo_token, image_id, [{"op": "replace", "path": "/visibility",
                                                        "value": "public"}])).status_code == 403
    assert (await patch(client, demo_token, image_id, [{"op": "move", "path": "/name"}])).status_code == 400
    r = await client.patch(f"{IMAGES}/{image_id}", json=[], headers=auth(demo_token))
    assert r.status_code == 415

    # protected images cannot be deleted until unprotected
    assert (await client.delete(f"{IMAGES}/{image_id}", headers=auth(demo_token))).status_code == 403
    await patch(client, demo_token, image_id, [{"op": "replace", "path": "/protected", "value": False}])
    assert (await client.delete(f"{IMAGES}/{image_id}", headers=auth(demo_token))).status_code == 204
    assert (await client.get(f"{IMAGES}/{image_id}", headers=auth(demo_token))).status_code == 404


async def test_tags_and_delete_removes_data(client: httpx.AsyncClient, demo_token: str,
                                            config: Config) -> None:
    image = await create(client, demo_token, name="tagged")
    url = f"{IMAGES}/{image['id']}"
    assert (await client.put(f"{url}/tags/blue", headers=auth(demo_token))).status_code == 204
    assert (await client.put(f"{url}/tags/blue", headers=auth(demo_token))).status_code == 204
    assert (await client.get(url, headers=auth(demo_token))).json()["tags"] == ["blue"]
    assert (await client.delete(f"{url}/tags/blue", headers=auth(demo_token))).status_code == 204
    assert (await client.delete(f"{url}/tags/blue", headers=auth(demo_token))).status_code == 404
    await upload(client, demo_token, image["id"], b"data")
    assert (config.images_dir / image["id"]).exists()
    assert (await client.delete(url, headers=auth(demo_token))).status_code == 204
    assert not (config.images_dir / image["id"]).exists()


# --- bootstrap and the agents' download -------------------------------------------------------


async def test_bootstrap_image(app, client: httpx.AsyncClient, demo_token: str, config: Config,  # type: ignore[no-untyped-def]
                               tmp_path: Path) -> None:
    source = tmp_path / "guest.img"
    data = os.urandom(100_000)
    source.write_bytes(data)
    maker = app.state.sessionmaker
    image_id = await bootstrap_image(maker, config, "guest", source, disk_format="raw")
    assert await bootstrap_image(maker, config, "guest", source, disk_format="raw") == image_id
    shown = (await client.get(f"{IMAGES}/{image_id}", headers=auth(demo_token))).json()
    assert shown["visibility"] == "public" and shown["status"] == "active"
    assert shown["owner"] == app.state.credentials.admin_project_id
    assert shown["checksum"] == hashlib.md5(data).hexdigest() and shown["size"] == len(data)
    assert ImageStore(config.images_dir).path(image_id).read_bytes() == data


async def test_internal_download(app, client: httpx.AsyncClient, demo_token: str,  # type: ignore[no-untyped-def]
                                 config: Config) -> None:
    data = os.urandom(50_000)
    image = await create(client, demo_token, name="for-agent")
    url = image_download_url(config, image["id"])
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == "http://cloudland.test"
    path = f"{parts.path}?{parts.query}"
    assert (await client.get(path)).status_code == 404  # no data yet
    await upload(client, demo_token, image["id"], data)

    r = await client.get(path)
    assert r.status_code == 200 and r.content == data
    assert r.headers["Content-MD5"] == hashlib.md5(data).hexdigest()

    tampered = path[:-1] + ("0" if path[-1] != "0" else "1")
    assert (await client.get(tampered)).status_code == 403
    other = await create(client, demo_token, name="other")
    assert (await client.get(path.replace(image["id"], other["id"]))).status_code == 403
    assert (await client.get(parts.path)).status_code == 403

    expired_url = image_download_url(config, image["id"], ttl=-10)
    expired = urlsplit(expired_url)
    assert int(dict(p.split("=") for p in expired.query.split("&"))["expires"]) < time.time()
    assert (await client.get(f"{expired.path}?{expired.query}")).status_code == 403

    missing = urlsplit(image_download_url(config, "0b1e0d53-0000-4000-8000-000000000000"))
    assert (await client.get(f"{missing.path}?{missing.query}")).status_code == 404
