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
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import free_port


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
