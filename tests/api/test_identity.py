"""Keystone v3 under /identity, against the real app and a real SQLite database."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloudland.api.identity.bootstrap import bootstrap_identity
from cloudland.api.identity.keys import load_fernet, rotate_fernet_keys
from cloudland.config import Config
from tests.conftest import free_port, get_token

TOKENS = "/identity/v3/auth/tokens"


def password_auth(user: dict[str, Any], password: str, scope: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "auth": {"identity": {"methods": ["password"], "password": {"user": {**user, "password": password}}}}
    }
    if scope is not None:
        body["auth"]["scope"] = scope
    return body


def h(token: str, **extra: str) -> dict[str, str]:
    return {"X-Auth-Token": token, **extra}


DEFAULT = {"name": "Default"}


# --- bootstrap, token issue ----------------------------------------------------------------------


async def test_bootstrap_is_idempotent_and_stores_passwords(app, config: Config) -> None:  # type: ignore[no-untyped-def]
    creds = app.state.credentials
    again = await bootstrap_identity(app.state.sessionmaker, config)
    assert again == creds
    for name in ("admin-password", "demo-password"):
        path = config.keys_dir / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (config.keys_dir / "admin-password").read_text().strip() == creds.admin_password
    assert stat.S_IMODE((config.keys_dir / "fernet").stat().st_mode) == 0o700
    for key in (config.keys_dir / "fernet").iterdir():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


@pytest.mark.both_databases
async def test_issue_by_name_body_shape(client: httpx.AsyncClient, app) -> None:  # type: ignore[no-untyped-def]
    creds = app.state.credentials
    body = password_auth(
        {"name": "demo", "domain": DEFAULT},
        creds.demo_password,
        {"project": {"name": "demo", "domain": DEFAULT}},
    )
    r = await client.post(TOKENS, json=body)
    assert r.status_code == 201, r.text
    assert r.headers["X-Subject-Token"]
    t = r.json()["token"]
    assert t["methods"] == ["password"]
    assert t["user"] == {
        "id": creds.demo_user_id,
        "name": "demo",
        "password_expires_at": None,
        "domain": {"id": "default", "name": "Default"},
    }
    assert t["project"] == {
        "id": creds.demo_project_id,
        "name": "demo",
        "domain": {"id": "default", "name": "Default"},
    }
    assert t["is_domain"] is False
    assert [r["name"] for r in t["roles"]] == ["member"]
    assert len(t["audit_ids"]) == 1
    for key in ("expires_at", "issued_at"):
        assert t[key].endswith("Z") and len(t[key]) == len("2025-01-01T00:00:00.000000Z")
    types = {entry["type"]: entry for entry in t["catalog"]}
    assert set(types) >= {"identity", "compute", "network", "image"}
    compute = types["compute"]
    assert compute["name"] == "nova" and compute["id"]
    assert {e["interface"] for e in compute["endpoints"]} == {"public", "internal", "admin"}
    for e in compute["endpoints"]:
        assert set(e) == {"id", "interface", "region", "region_id", "url"}
        assert e["url"] == "http://cloudland.test/compute/v2.1" and e["region"] == "RegionOne"
    assert types["identity"]["endpoints"][0]["url"] == "http://cloudland.test/identity"


async def test_issue_by_ids_and_domain_id(client: httpx.AsyncClient, app) -> None:  # type: ignore[no-untyped-def]
    creds = app.state.credentials
    r = await client.post(
        TOKENS,
        json=password_auth(
            {"id": creds.admin_user_id}, creds.admin_password, {"project": {"id": creds.admin_project_id}}
        ),
    )
    assert r.status_code == 201 and r.json()["token"]["project"]["id"] == creds.admin_project_id
    r = await client.post(
        TOKENS,
        json=password_auth(
            {"name": "admin", "domain": {"id": "default"}},
            creds.admin_password,
            {"project": {"name": "admin", "domain": {"id": "default"}}},
        ),
    )
    assert r.status_code == 201
    assert [x["name"] for x in r.json()["token"]["roles"]] == ["admin"]


async def test_unscoped_and_nocatalog(client: httpx.AsyncClient, app) -> None:  # type: ignore[no-untyped-def]
    creds = app.state.credentials
    r = await client.post(
        TOKENS, json=password_auth({"name": "demo", "domain": DEFAULT}, creds.demo_password)
    )
    assert r.status_code == 201
    t = r.json()["token"]
    assert "project" not in t and "roles" not in t and "catalog" not in t
    r = await client.post(
        TOKENS + "?nocatalog",
        json=password_auth(
            {"name": "demo", "domain": DEFAULT},
            creds.demo_password,
            {"project": {"id": creds.demo_project_id}},
        ),
    )
    assert r.status_code == 201 and "catalog" not in r.json()["token"]


async def test_rescope_with_token_method(client: httpx.AsyncClient, app) -> None:  # type: ignore[no-untyped-def]
    creds = app.state.credentials
    r = await client.post(
        TOKENS, json=password_auth({"name": "demo", "domain": DEFAULT}, creds.demo_password)
    )
    unscoped = r.headers["X-Subject-Token"]
    first = r.json()["token"]
    body = {
        "auth": {
            "identity": {"methods": ["token"], "token": {"id": unscoped}},
            "scope": {"project": {"name": "demo", "domain": DEFAULT}},
        }
    }
    r = await client.post(TOKENS, json=body)
    assert r.status_code == 201, r.text
    t = r.json()["token"]
    assert t["project"]["id"] == creds.demo_project_id
    assert t["methods"] == ["token", "password"]
    assert t["audit_ids"][1] == first["audit_ids"][0]
    assert t["expires_at"] == first["expires_at"]
    # A scope the user has no role on is refused.
    body["auth"]["scope"] = {"project": {"id": creds.admin_project_id}}
    assert (await client.post(TOKENS, json=body)).status_code == 401


async def test_domain_scope(client: httpx.AsyncClient, app, admin_token: str) -> None:  # type: ignore[no-untyped-def]
    creds = app.state.credentials
    body = password_auth(
        {"name": "admin", "domain": DEFAULT}, creds.admin_password, {"domain": {"id": "default"}}
    )
    assert (await client.post(TOKENS, json=body)).status_code == 401  # no role on the domain yet
    roles = (await client.get("/identity/v3/roles?name=admin", headers=h(admin_token))).json()["roles"]
    r = await client.put(
        f"/identity/v3/domains/default/users/{creds.admin_user_id}/roles/{roles[0]['id']}",
        headers=h(admin_token),
    )
    assert r.status_code == 204
    for scope in ({"domain": {"id": "default"}}, {"domain": {"name": "Default"}}):
        body["auth"]["scope"] = scope
        r = await client.post(TOKENS, json=body)
        assert r.status_code == 201, r.text
        t = r.json()["token"]
        assert t["domain"] == {"id": "default", "name": "Default"} and "project" not in t
        assert t["roles"][0]["name"] == "admin"
    r = await client.get("/identity/v3/auth/domains", headers=h(r.headers["X-Subject-Token"]))
    assert [d["id"] for d in r.json()["domains"]] == ["default"]


@pytest.mark.parametrize(
    "user,password_key,scope",
    [
        ({"name": "demo", "domain": DEFAULT}, "wrong", None),
        ({"name": "nobody", "domain": DEFAULT}, "demo", None),
        ({"name": "demo", "domain": {"name": "NoSuchDomain"}}, "demo", None),
        ({"id": "0" * 32}, "demo", None),
        ({"name": "demo", "domain": DEFAULT}, "demo", {"project": {"name": "nosuch", "domain": DEFAULT}}),
        ({"name": "demo", "domain": DEFAULT}, "demo", {"project": {"id": "nosuch"}}),
    ],
)
async def test_bad_credentials_401(client: httpx.AsyncClient, app, user, password_key, scope) -> None:  # type: ignore[no-untyped-def]
    creds = app.state.credentials
    password = creds.demo_password if password_key == "demo" else "not-the-password"
    r = await client.post(TOKENS, json=password_auth(user, password, scope))
    assert r.status_code == 401
    assert r.json() == {
        "error": {
            "code": 401,
            "title": "Unauthorized",
            "message": "The request you have made requires authentication.",
        }
    }


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"auth": {}}',
        b'{"auth": {"identity": {"methods": "x"}}}',
        b'{"auth": {"identity": {"methods": ["password"], "password": {"user": {}}}}}',
    ],
)
async def test_malformed_400(client: httpx.AsyncClient, content: bytes) -> None:
    r = await client.post(TOKENS, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == 400 and err["title"] == "Bad Request" and err["message"]


# --- validate, revoke, expiry ---------------------------------------------------------------------


@pytest.mark.both_databases
async def test_validate_head_revoke(
    client: httpx.AsyncClient, app, admin_token: str, demo_token: str
) -> None:  # type: ignore[no-untyped-def]
    r = await client.get(TOKENS, headers=h(demo_token, **{"X-Subject-Token": demo_token}))
    assert r.status_code == 200 and r.headers["X-Subject-Token"] == demo_token
    assert r.json()["token"]["user"]["name"] == "demo"
    assert (
        await client.head(TOKENS, headers=h(admin_token, **{"X-Subject-Token": demo_token}))
    ).status_code == 200
    # Someone else's token: only admin may look.
    r = await client.head(TOKENS, headers=h(demo_token, **{"X-Subject-Token": admin_token}))
    assert r.status_code == 403
    r = await client.get(TOKENS, headers=h(admin_token, **{"X-Subject-Token": "garbage"}))
    assert r.status_code == 404
    assert (await client.get(TOKENS, headers={"X-Subject-Token": demo_token})).status_code == 401

    r = await client.delete(TOKENS, headers=h(admin_token, **{"X-Subject-Token": demo_token}))
    assert r.status_code == 204
    r = await client.get("/identity/v3/auth/projects", headers=h(demo_token))
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    assert (await client.get("/compute/v2.1/flavors", headers=h(demo_token))).status_code == 401
    r = await client.head(TOKENS, headers=h(admin_token, **{"X-Subject-Token": demo_token}))
    assert r.status_code == 404
    # A fresh provider (another process) sees the revocation in the database.
    from cloudland.api.identity.tokens import RevocationList

    fresh = RevocationList(app.state.sessionmaker, 5.0)
    assert await fresh.contains(app.state.tokens.decode(demo_token).audit_ids[0])
    assert not await fresh.contains(app.state.tokens.decode(admin_token).audit_ids[0])


async def test_expired_token_401(client: httpx.AsyncClient, app) -> None:  # type: ignore[no-untyped-def]
    creds = app.state.credentials
    app.state.tokens.ttl_seconds = 1
    token = await get_token(client, "demo", creds.demo_password, "demo")
    assert (await client.get("/identity/v3/auth/projects", headers=h(token))).status_code == 200
    await asyncio.sleep(1.05)
    assert (await client.get("/identity/v3/auth/projects", headers=h(token))).status_code == 401


async def test_garbage_token_401(client: httpx.AsyncClient) -> None:
    for token in ("garbage", "gAAAAAB" + "x" * 100, ""):
        r = await client.get("/identity/v3/auth/projects", headers={"X-Auth-Token": token})
        assert r.status_code == 401


async def test_disabled_user_401(client: httpx.AsyncClient, app, admin_token: str, demo_token: str) -> None:  # type: ignore[no-untyped-def]
    creds = app.state.credentials
    r = await client.patch(
        f"/identity/v3/users/{creds.demo_user_id}", headers=h(admin_token), json={"user": {"enabled": False}}
    )
    assert r.status_code == 200 and r.json()["user"]["enabled"] is False
    assert (await client.get("/identity/v3/auth/projects", headers=h(demo_token))).status_code == 401
    r = await client.post(
        TOKENS, json=password_auth({"name": "demo", "domain": DEFAULT}, creds.demo_password)
    )
    assert r.status_code == 401
    await client.patch(
        f"/identity/v3/users/{creds.demo_user_id}", headers=h(admin_token), json={"user": {"enabled": True}}
    )
    assert (await client.get("/identity/v3/auth/projects", headers=h(demo_token))).status_code == 200


async def test_role_removal_and_project_disable_invalidate(
    client: httpx.AsyncClient,
    app,
    admin_token: str,  # type: ignore[no-untyped-def]
    demo_token: str,
) -> None:
    creds = app.state.credentials
    member = (await client.get("/identity/v3/roles?name=member", headers=h(admin_token))).json()["roles"][0]
    grant = f"/identity/v3/projects/{creds.demo_project_id}/users/{creds.demo_user_id}/roles/{member['id']}"
    assert (await client.delete(grant, headers=h(admin_token))).status_code == 204
    assert (await client.get("/identity/v3/auth/catalog", headers=h(demo_token))).status_code == 401
    assert (await client.put(grant, headers=h(admin_token))).status_code == 204
    assert (await client.get("/identity/v3/auth/catalog", headers=h(demo_token))).status_code == 200
    r = await client.patch(
        f"/identity/v3/projects/{creds.demo_project_id}",
        headers=h(admin_token),
        json={"project": {"enabled": False}},
    )
    assert r.status_code == 200
    assert (await client.get("/identity/v3/auth/catalog", headers=h(demo_token))).status_code == 401


@pytest.mark.both_databases
async def test_password_change_revokes_old_tokens(client: httpx.AsyncClient, app, demo_token: str) -> None:  # type: ignore[no-untyped-def]
    creds = app.state.credentials
    url = f"/identity/v3/users/{creds.demo_user_id}/password"
    r = await client.post(
        url, headers=h(demo_token), json={"user": {"password": "new-pass-1", "original_password": "wrong"}}
    )
    assert r.status_code == 401
    r = await client.post(
        url,
        headers=h(demo_token),
        json={"user": {"password": "new-pass-1", "original_password": creds.demo_password}},
    )
    assert r.status_code == 204
    assert (await client.get("/identity/v3/auth/projects", headers=h(demo_token))).status_code == 401
    r = await client.post(
        TOKENS, json=password_auth({"name": "demo", "domain": DEFAULT}, creds.demo_password)
    )
    assert r.status_code == 401
    token = await get_token(client, "demo", "new-pass-1", "demo")
    assert (await client.get("/identity/v3/auth/projects", headers=h(token))).status_code == 200


# --- discovery, catalog, auth lists -----------------------------------------------------------------


async def test_discovery(client: httpx.AsyncClient) -> None:
    for path in ("/identity", "/identity/"):
        r = await client.get(path)
        assert r.status_code in (200, 300)
        (v,) = r.json()["versions"]["values"]
        assert v["id"] == "v3.14" and v["status"] == "stable" and v["updated"]
        assert v["links"] == [{"rel": "self", "href": "http://cloudland.test/identity/v3/"}]
        assert v["media-types"][0]["type"] == "application/vnd.openstack.identity-v3+json"
    for path in ("/identity/v3", "/identity/v3/"):
        r = await client.get(path)
        assert r.status_code == 200 and r.json()["version"]["id"] == "v3.14"


async def test_auth_catalog_and_projects(client: httpx.AsyncClient, app, demo_token: str) -> None:  # type: ignore[no-untyped-def]
    r = await client.get("/identity/v3/auth/catalog", headers=h(demo_token))
    assert r.status_code == 200
    assert {c["type"] for c in r.json()["catalog"]} >= {"identity", "compute", "network", "image"}
    assert r.json()["links"]["self"].endswith("/identity/v3/auth/catalog")
    r = await client.get("/identity/v3/auth/projects", headers=h(demo_token))
    (p,) = r.json()["projects"]
    assert p["id"] == app.state.credentials.demo_project_id and p["links"]["self"]
    assert r.json()["links"] == {
        "self": "http://cloudland.test/identity/v3/auth/projects",
        "next": None,
        "previous": None,
    }


# --- admin APIs ---------------------------------------------------------------------------------------


@pytest.mark.both_databases
async def test_admin_crud_and_role_assignment(client: httpx.AsyncClient, app, admin_token: str) -> None:  # type: ignore[no-untyped-def]
    a = h(admin_token)
    r = await client.post("/identity/v3/domains", headers=a, json={"domain": {"name": "acme"}})
    assert r.status_code == 201
    domain = r.json()["domain"]
    assert domain["enabled"] is True and domain["links"]["self"].endswith(domain["id"])
    assert (
        await client.post("/identity/v3/domains", headers=a, json={"domain": {"name": "acme"}})
    ).status_code == 409
    r = await client.get("/identity/v3/domains?name=acme", headers=a)
    assert [d["id"] for d in r.json()["domains"]] == [domain["id"]]
    assert r.json()["links"]["next"] is None

    r = await client.post(
        "/identity/v3/projects",
        headers=a,
        json={"project": {"name": "p1", "domain_id": domain["id"], "description": "d"}},
    )
    assert r.status_code == 201
    project = r.json()["project"]
    assert project["domain_id"] == domain["id"] and project["parent_id"] == domain["id"]
    assert project["is_domain"] is False
    r = await client.post(
        "/identity/v3/projects", headers=a, json={"project": {"name": "p1", "domain_id": domain["id"]}}
    )
    assert r.status_code == 409
    r = await client.get(f"/identity/v3/projects?name=p1&domain_id={domain['id']}", headers=a)
    assert [p["id"] for p in r.json()["projects"]] == [project["id"]]
    r = await client.patch(
        f"/identity/v3/projects/{project['id']}", headers=a, json={"project": {"description": "changed"}}
    )
    assert r.json()["project"]["description"] == "changed"

    r = await client.post(
        "/identity/v3/users",
        headers=a,
        json={
            "user": {
                "name": "alice",
                "domain_id": domain["id"],
                "password": "alice-pw",
                "default_project_id": project["id"],
                "email": "alice@example.com",
            }
        },
    )
    assert r.status_code == 201, r.text
    user = r.json()["user"]
    assert "password" not in user and user["email"] == "alice@example.com"
    assert (
        await client.post(
            "/identity/v3/users", headers=a, json={"user": {"name": "alice", "domain_id": domain["id"]}}
        )
    ).status_code == 409
    r = await client.get(f"/identity/v3/users?name=alice&domain_id={domain['id']}", headers=a)
    assert [u["id"] for u in r.json()["users"]] == [user["id"]]

    r = await client.post("/identity/v3/roles", headers=a, json={"role": {"name": "operator"}})
    assert r.status_code == 201
    role = r.json()["role"]
    assert (
        await client.post("/identity/v3/roles", headers=a, json={"role": {"name": "operator"}})
    ).status_code == 409
    assert (await client.get("/identity/v3/roles?name=operator", headers=a)).json()["roles"][0]["id"] == role[
        "id"
    ]
    assert (await client.get(f"/identity/v3/roles/{role['id']}", headers=a)).status_code == 200

    grant = f"/identity/v3/projects/{project['id']}/users/{user['id']}/roles/{role['id']}"
    assert (await client.head(grant, headers=a)).status_code == 404
    assert (await client.put(grant, headers=a)).status_code == 204
    assert (await client.put(grant, headers=a)).status_code == 204
    assert (await client.head(grant, headers=a)).status_code == 204
    r = await client.get(f"/identity/v3/projects/{project['id']}/users/{user['id']}/roles", headers=a)
    assert [x["name"] for x in r.json()["roles"]] == ["operator"]
    r = await client.get(f"/identity/v3/role_assignments?user.id={user['id']}&include_names", headers=a)
    (ra,) = r.json()["role_assignments"]
    assert ra["role"] == {"id": role["id"], "name": "operator"}
    assert ra["user"]["name"] == "alice" and ra["user"]["domain"]["name"] == "acme"
    assert ra["scope"]["project"]["id"] == project["id"] and ra["scope"]["project"]["name"] == "p1"
    r = await client.get(
        f"/identity/v3/role_assignments?scope.project.id={project['id']}&role.id={role['id']}", headers=a
    )
    assert len(r.json()["role_assignments"]) == 1
    r = await client.get(f"/identity/v3/users/{user['id']}/projects", headers=a)
    assert [p["id"] for p in r.json()["projects"]] == [project["id"]]

    # The new user logs in with the unscoped request: scoped to its default project, as Keystone.
    r = await client.post(
        TOKENS, json=password_auth({"name": "alice", "domain": {"name": "acme"}}, "alice-pw")
    )
    assert r.status_code == 201 and r.json()["token"]["project"]["id"] == project["id"]
    alice = r.headers["X-Subject-Token"]
    assert (await client.get(f"/identity/v3/users/{user['id']}", headers=h(alice))).status_code == 200
    assert (await client.get(f"/identity/v3/projects/{project['id']}", headers=h(alice))).status_code == 200
    r = await client.get(f"/identity/v3/users/{app.state.credentials.admin_user_id}", headers=h(alice))
    assert r.status_code == 403

    assert (await client.delete(grant, headers=a)).status_code == 204
    assert (await client.delete(grant, headers=a)).status_code == 404
    assert (await client.get("/identity/v3/auth/catalog", headers=h(alice))).status_code == 401
    assert (await client.delete(f"/identity/v3/roles/{role['id']}", headers=a)).status_code == 204
    assert (await client.delete(f"/identity/v3/users/{user['id']}", headers=a)).status_code == 204
    assert (await client.get(f"/identity/v3/users/{user['id']}", headers=a)).status_code == 404
    assert (await client.delete(f"/identity/v3/projects/{project['id']}", headers=a)).status_code == 204
    # Domains are deleted only once disabled.
    r = await client.delete(f"/identity/v3/domains/{domain['id']}", headers=a)
    assert r.status_code == 403
    r = await client.patch(
        f"/identity/v3/domains/{domain['id']}", headers=a, json={"domain": {"enabled": False}}
    )
    assert r.status_code == 200
    assert (await client.delete(f"/identity/v3/domains/{domain['id']}", headers=a)).status_code == 204
    assert (await client.get(f"/identity/v3/domains/{domain['id']}", headers=a)).status_code == 404


async def test_member_gets_403_on_admin_apis(client: httpx.AsyncClient, app, demo_token: str) -> None:  # type: ignore[no-untyped-def]
    d = h(demo_token)
    creds = app.state.credentials
    for method, path, body in [
        ("GET", "/identity/v3/projects", None),
        ("GET", "/identity/v3/users", None),
        ("GET", "/identity/v3/domains", None),
        ("GET", "/identity/v3/roles", None),
        ("GET", "/identity/v3/role_assignments", None),
        ("POST", "/identity/v3/projects", {"project": {"name": "x"}}),
        ("POST", "/identity/v3/users", {"user": {"name": "x"}}),
        ("POST", "/identity/v3/domains", {"domain": {"name": "x"}}),
        ("DELETE", f"/identity/v3/projects/{creds.admin_project_id}", None),
        ("PATCH", f"/identity/v3/users/{creds.demo_user_id}", {"user": {"enabled": True}}),
        ("GET", f"/identity/v3/projects/{creds.admin_project_id}", None),
        ("GET", f"/identity/v3/users/{creds.admin_user_id}", None),
    ]:
        r = await client.request(method, path, headers=d, json=body)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["error"]["code"] == 403
    # A user may read itself and its own project.
    assert (await client.get(f"/identity/v3/users/{creds.demo_user_id}", headers=d)).status_code == 200
    assert (await client.get(f"/identity/v3/projects/{creds.demo_project_id}", headers=d)).status_code == 200


async def test_name_lookups_404(client: httpx.AsyncClient, admin_token: str) -> None:
    for collection in ("projects", "users", "domains", "roles"):
        r = await client.get(f"/identity/v3/{collection}/no-such-name", headers=h(admin_token))
        assert r.status_code == 404, collection
        assert r.json()["error"]["code"] == 404
    r = await client.get("/identity/v3/projects/admin", headers=h(admin_token))
    assert r.status_code == 404
    r = await client.get("/identity/v3/projects?name=admin", headers=h(admin_token))
    assert [p["name"] for p in r.json()["projects"]] == ["admin"]


async def test_admin_malformed_json_400(client: httpx.AsyncClient, admin_token: str) -> None:
    r = await client.post(
        "/identity/v3/projects",
        content=b"{oops",
        headers=h(admin_token, **{"Content-Type": "application/json"}),
    )
    assert r.status_code == 400 and r.json()["error"]["title"] == "Bad Request"
    r = await client.post("/identity/v3/projects", headers=h(admin_token), json={"project": {"name": 5}})
    assert r.status_code == 400


# --- keys ----------------------------------------------------------------------------------------------


async def test_key_rotation_keeps_old_tokens_valid(
    client: httpx.AsyncClient,
    app,
    config: Config,  # type: ignore[no-untyped-def]
    demo_token: str,
) -> None:
    creds = app.state.credentials
    rotate_fernet_keys(config.keys_dir)
    app.state.tokens.reload_keys()
    assert (await client.get("/identity/v3/auth/projects", headers=h(demo_token))).status_code == 200
    new = await get_token(client, "demo", creds.demo_password, "demo")
    assert (await client.get("/identity/v3/auth/projects", headers=h(new))).status_code == 200
    for _ in range(3):
        rotate_fernet_keys(config.keys_dir, max_active=3)
    assert len(list((config.keys_dir / "fernet").iterdir())) == 3
    app.state.tokens.reload_keys()
    assert (await client.get("/identity/v3/auth/projects", headers=h(demo_token))).status_code == 401


def test_load_fernet_creates_repository(tmp_path: Path) -> None:
    f = load_fernet(tmp_path / "keys")
    assert f.decrypt(f.encrypt(b"x")) == b"x"
    assert (tmp_path / "keys" / "fernet" / "1").exists()


# --- the real openstack CLI ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_openstack_cli(tmp_path: Path) -> None:
    """Start the API with uvicorn and drive it with the unmodified ``openstack`` CLI."""
    port = free_port()
    state = tmp_path / "state"
    script = f"""
import asyncio, uvicorn
from cloudland.config import Config
from cloudland.db.migrate import upgrade
from cloudland.api.app import create_app
from cloudland.api.identity.bootstrap import bootstrap_identity
from cloudland.db.engine import make_engine, make_sessionmaker
cfg = Config(state_dir={str(state)!r})
cfg.state_dir.mkdir(parents=True, exist_ok=True)
cfg.api.listen_port = {port}
upgrade(cfg.database_url)
async def boot():
    engine = make_engine(cfg.database_url)
    await bootstrap_identity(make_sessionmaker(engine), cfg)
    await engine.dispose()
asyncio.run(boot())
uvicorn.run(create_app(cfg, connect_bus=False), host="127.0.0.1", port={port}, log_level="warning")
"""
    server = subprocess.Popen([sys.executable, "-c", script])
    try:
        import time

        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "API did not start"
            time.sleep(0.2)
        password = (state / "keys" / "admin-password").read_text().strip()
        env = {
            **os.environ,
            "OS_AUTH_URL": f"http://127.0.0.1:{port}/identity",
            "OS_USERNAME": "admin",
            "OS_PASSWORD": password,
            "OS_PROJECT_NAME": "admin",
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default",
            "OS_IDENTITY_API_VERSION": "3",
        }
        env = {k: v for k, v in env.items() if k == "PATH" or not k.startswith("OS_") or v}
        cli = str(Path(sys.executable).parent / "openstack")

        def run(*args: str, fmt: bool = True) -> str:
            argv = [cli, *args, *(["-f", "json"] if fmt else [])]
            out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            return out.stdout

        import json

        token = json.loads(run("token", "issue"))
        assert token["id"] and token["project_id"] and token["user_id"]
        names = {p["Name"] for p in json.loads(run("project", "list"))}
        assert {"admin", "demo"} <= names
        created = json.loads(run("project", "create", "cli-project"))
        assert created["name"] == "cli-project"
        json.loads(run("user", "create", "--password", "pw", "--project", "cli-project", "cli-user"))
        run("role", "add", "--project", "cli-project", "--user", "cli-user", "member", fmt=False)
        assignments = json.loads(run("role", "assignment", "list", "--project", "cli-project", "--names"))
        assert assignments[0]["Role"] == "member"
        assert json.loads(run("project", "show", "cli-project"))["name"] == "cli-project"
    finally:
        server.terminate()
        server.wait(timeout=10)


async def test_identity_cache_loads_once_for_concurrent_misses(app) -> None:  # type: ignore[no-untyped-def]
    """Requests that miss the same entry together share one read (at expiry every concurrent
    request used to read the row), and a write meanwhile is not hidden by a shared read."""
    from sqlalchemy import select

    from cloudland.db.models import Project

    store = app.state.tokens.store
    async with app.state.sessionmaker() as s:
        project_id = (await s.scalars(select(Project.id).where(Project.name == "demo"))).one()
    store.invalidate()
    loads = store.loads
    found = await asyncio.gather(*(store.project(project_id) for _ in range(20)))
    assert {p.name for p in found} == {"demo"} and store.loads == loads + 1
    store.invalidate()
    assert (await store.project(project_id)).name == "demo" and store.loads == loads + 2


async def test_revocation_list_reloads_once_for_concurrent_requests(app) -> None:  # type: ignore[no-untyped-def]
    revocations = app.state.tokens.revocations
    revocations._next_refresh = 0.0
    refreshes = revocations.refreshes
    assert await asyncio.gather(*(revocations.contains("nope") for _ in range(20))) == [False] * 20
    assert revocations.refreshes == refreshes + 1
