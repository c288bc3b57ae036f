"""Fuzz every operation of the API's own OpenAPI document: no input may produce a 5xx.

Schemathesis generates requests (valid and invalid bodies, odd path and query values) for
every operation the API declares and sends them, with an admin token, to the API served over
real HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import free_port

# A sweep of every operation of a whole API server (~30 s): with the end-to-end tests, out of the
# fast set; CI runs it.
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    port = free_port()
    state_dir = tmp_path_factory.mktemp("fuzz") / "state"
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.serve_api", str(state_dir), str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        creds = json.loads(proc.stdout.readline())
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                httpx.get(base + "/healthz")
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": "admin", "domain": {"name": "Default"}, "password": creds["admin_password"]}}},
            "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}}}}
        token = httpx.post(base + "/identity/v3/auth/tokens", json=body).headers["X-Subject-Token"]
        yield base, token
    finally:
        proc.terminate()
        proc.wait(10)


def test_no_input_crashes_the_api(api_server: tuple[str, str]) -> None:
    base, token = api_server
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
                  derandomize=True, database=None)
        @given(case=operation.as_strategy())
        def send(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(base_url=base, headers={"X-Auth-Token": token})
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} {case.query or ''} body={case.body!r:.200} -> "
                f"{response.status_code}: {response.text[:300]}")

        try:
            send()
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])
    assert operations > 50, "the OpenAPI document lost its operations"
    assert not failures, "\n".join(failures)


# --- request bodies ---------------------------------------------------------------------------
# The routes parse their bodies themselves (OpenStack bodies are too loose for a schema), so the
# OpenAPI document has no body schemas: generate bodies here, from OpenStack's own vocabulary.

FIELDS = [
    "name", "id", "description", "enabled", "cidr", "ip_version", "gateway_ip", "allocation_pools",
    "start", "end", "dns_nameservers", "host_routes", "destination", "nexthop", "enable_dhcp",
    "ipv6_ra_mode", "ipv6_address_mode", "network_id", "subnet_id", "fixed_ips", "ip_address",
    "mac_address", "device_id", "device_owner", "admin_state_up", "shared", "router:external",
    "provider:network_type", "provider:segmentation_id", "provider:physical_network",
    "port_security_enabled", "allowed_address_pairs", "security_groups", "tags", "mtu",
    "binding:host_id", "external_gateway_info", "enable_snat", "external_fixed_ips", "routes",
    "floating_network_id", "floating_ip_address", "port_id", "fixed_ip_address",
    "flavorRef", "imageRef", "networks", "uuid", "port", "fixed_ip", "key_name",
    "user_data", "metadata", "min_count", "max_count", "availability_zone", "block_device_mapping_v2",
    "boot_index", "source_type", "destination_type", "config_drive", "public_key", "type", "ram",
    "vcpus", "disk", "swap", "OS-FLV-EXT-DATA:ephemeral", "os-flavor-access:is_public", "rxtx_factor",
    "disk_format", "container_format", "visibility", "protected", "min_disk", "min_ram", "op", "path",
    "value", "password", "domain_id", "default_project_id", "email", "original_password", "length",
    "identity", "methods", "scope", "project", "user", "domain", "token", "extra_specs", "is_domain",
]
WRAPPERS = [
    "network", "subnet", "port", "router", "floatingip", "server", "flavor", "keypair", "domain", "project",
    "user", "role",
    "auth", "extra_specs", "os-start", "os-stop", "reboot", "os-getConsoleOutput", "os-getVNCConsole",
]
TRICKY = [
    "", "0", "-1", "10.0.0.0/24", "10.0.0.1/24", "0.0.0.0/0", "fd00::/64", "::/0", "10.0.0.5", "::1",
    "fa:16:3e:00:00:01", "auto", "none", "qcow2", "raw", "bare", "public", "private", "SOFT", "HARD",
    "slaac", "dhcpv6-stateful", "admin", "default", "Default", "x" * 300, "\x00", "ü", "aGVsbG8=",
    "ssh-rsa AAAA", "/name", "replace", "add", "remove", 2**31, 2**63, -(2**63), 1e308, 4, 6,
]

json_leaf = (st.none() | st.booleans() | st.integers(min_value=-(2**66), max_value=2**66)
             | st.floats(allow_nan=False) | st.text(max_size=12) | st.sampled_from(TRICKY))
json_value = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), children, max_size=6),
    max_leaves=10)
wrapped = st.dictionaries(st.sampled_from(WRAPPERS), json_value, min_size=1, max_size=2)


STATUS_SEEN: defaultdict[str, Counter[int]] = defaultdict(Counter)


def _make_fixtures(base: str, token: str) -> dict[str, str]:
    """Real resources, so that generated requests reach body validation instead of 404."""
    h = {"X-Auth-Token": token}

    def post(path: str, body: dict) -> dict:
        r = httpx.post(base + path, json=body, headers=h)
        assert r.status_code < 300, r.text
        return r.json()

    net = post("/network/v2.0/networks", {"network": {"name": "fuzz-net"}})["network"]
    subnet = post("/network/v2.0/subnets", {"subnet": {"network_id": net["id"], "cidr": "10.9.0.0/24",
                                                       "ip_version": 4}})["subnet"]
    port = post("/network/v2.0/ports", {"port": {"network_id": net["id"]}})["port"]
    image = post("/image/v2/images", {"name": "fuzz", "disk_format": "raw", "container_format": "bare"})
    r = httpx.put(f"{base}/image/v2/images/{image['id']}/file", content=b"\0" * 512,
                  headers={**h, "Content-Type": "application/octet-stream"})
    assert r.status_code == 204, r.text
    server = post("/compute/v2.1/servers", {"server": {
        "name": "fuzz", "imageRef": image["id"], "flavorRef": "42",
        "networks": [{"uuid": net["id"]}]}})["server"]
    ids = {"network_id": net["id"], "resource_id": net["id"], "subnet_id": subnet["id"],
           "port_id": port["id"], "image_id": image["id"], "server_id": server["id"], "flavor_id": "42",
           "key": "hw:cpu_policy", "tag": "fuzz-tag", "collection": "projects", "name": "fuzz-key",
           "domain_id": "default",
           "group_id": post("/network/v2.0/security-groups", {"security_group": {"name": "fz"}})
           ["security_group"]["id"]}
    ext = post("/network/v2.0/networks", {"network": {"name": "fuzz-public", "router:external": True}})
    ext = ext["network"]
    post("/network/v2.0/subnets", {"subnet": {"network_id": ext["id"], "cidr": "172.31.0.0/24",
                                              "ip_version": 4}})
    ids["router_id"] = post("/network/v2.0/routers", {"router": {
        "name": "fuzz-router", "external_gateway_info": {"network_id": ext["id"]}}})["router"]["id"]
    ids["floatingip_id"] = post("/network/v2.0/floatingips", {"floatingip": {
        "floating_network_id": ext["id"]}})["floatingip"]["id"]
    for kind, key in (("projects", "project_id"), ("users", "user_id"), ("roles", "role_id")):
        r = httpx.get(f"{base}/identity/v3/{kind}", headers=h)
        ids[key] = r.json()[kind][0]["id"]
    ids["target_id"] = ids["project_id"]
    return ids


def test_no_request_body_crashes_the_api(api_server: tuple[str, str]) -> None:
    base, token = api_server
    ids = _make_fixtures(base, token)
    doc = httpx.get(base + "/openapi.json").json()
    operations = [(method.upper(), path) for path, item in doc["paths"].items() for method in item
                  if method in ("post", "put", "patch")]
    operations.append(("POST", "/identity/v3/auth/tokens"))
    failures: list[str] = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for method, template in operations:
            try:
                _body_fuzzer(client, token, method, template, template.format(**ids))()
            except* AssertionError as group:
                failures += [str(e).splitlines()[0] for e in group.exceptions]
    # Generated bodies must get past parsing into validation and sometimes succeed, or the test
    # proves little.
    codes = Counter[int]()
    for seen in STATUS_SEEN.values():
        codes.update(seen)
    print("status codes seen:", dict(sorted(codes.items())))
    assert codes[400] > 100 and sum(n for c, n in codes.items() if c < 300) > 20, codes
    assert not failures, "\n".join(failures)


def _body_fuzzer(client: httpx.Client, token: str, method: str, template: str, path: str):  # type: ignore[no-untyped-def]
    headers = {"X-Auth-Token": token}
    if template.endswith("/file"):
        headers["Content-Type"] = "application/octet-stream"
    elif method == "PATCH" and template.startswith("/image"):
        headers["Content-Type"] = "application/openstack-images-v2.1-json-patch"

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True, database=None)
    @given(body=st.one_of(wrapped, json_value, st.binary(max_size=64)))
    def send(body) -> None:  # type: ignore[no-untyped-def]
        if isinstance(body, bytes):
            r = client.request(method, path, content=body,
                               headers={"Content-Type": "application/json", **headers})
        else:
            r = client.request(method, path, json=body, headers=headers)
        STATUS_SEEN[f"{method} {template}"][r.status_code] += 1
        assert r.status_code < 500, (
            f"{method} {template} body={body!r:.300} -> {r.status_code}: {r.text[:300]}")

    return send
