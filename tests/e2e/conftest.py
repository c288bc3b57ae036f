"""A real all-in-one cloud (``cloudland up --detach``) for end-to-end tests, one per module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloudland.allinone.supervisor import read_pid
from tests.conftest import free_port

BIN = Path(sys.executable).parent


@dataclass
class RunningCloud:
    state_dir: Path
    api_url: str
    host_id: str

    @property
    def clouds_yaml(self) -> Path:
        return self.state_dir / "clouds.yaml"

    def env(self, cloud: str = "cloudland-demo") -> dict[str, str]:
        return {**os.environ, "OS_CLIENT_CONFIG_FILE": str(self.clouds_yaml), "OS_CLOUD": cloud}

    def openstack(self, *args: str, cloud: str = "cloudland-demo", check: bool = True,
                  timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(BIN / "openstack"), *args], env=self.env(cloud), text=True,
                              capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"openstack {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def openstack_json(self, *args: str, cloud: str = "cloudland-demo") -> dict | list:
        return json.loads(self.openstack(*args, "-f", "json", cloud=cloud).stdout)

    def cloudland(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "cloudland"), *args, "--state-dir", str(self.state_dir)],
                              text=True, capture_output=True, timeout=timeout)

    def agent_pid(self) -> int:
        return read_pid(self.state_dir / "run" / "agent.pid") or 0

    def instance_dir(self, server_id: str) -> Path:
        return self.state_dir / "agent" / self.host_id / "instances" / server_id


def wait_for(predicate, timeout: float = 120, interval: float = 0.5, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCloud]:
    state_dir = tmp_path_factory.mktemp("cloud") / "state"
    port, nats_port = free_port(), free_port()
    host_id = f"e2e-{uuid.uuid4().hex[:6]}"
    proc = subprocess.run(
        [str(BIN / "cloudland"), "up", "--detach", "--state-dir", str(state_dir), "--port", str(port),
         "--nats-port", str(nats_port), "--host-id", host_id, "--no-user-clouds-yaml", "--timeout", "240"],
        text=True, capture_output=True, timeout=600)
    running = RunningCloud(state_dir, f"http://127.0.0.1:{port}", host_id)
    if proc.returncode != 0:
        log = state_dir / "logs" / "cloudland.log"
        tail = log.read_text()[-4000:] if log.exists() else ""
        pytest.fail(f"cloudland up failed:\n{proc.stdout}\n{proc.stderr}\n{tail}")
    try:
        yield running
    finally:
        running.cloudland("down", "--timeout", "60")
