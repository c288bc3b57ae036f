"""Metadata service, config drive, keypairs and user data with a real guest and the `openstack` CLI."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import RunningCloud, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def _get(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_keypair_user_data_config_drive_and_metadata(cloud: RunningCloud, tmp_path: Path) -> None:
    marker = f"ud-{uuid.uuid4().hex[:10]}"
    script = tmp_path / "script.sh"
    # The guest's own forged headers do not choose the instance: the proxy replaces them.
    script.write_text(
        "#!/bin/sh\n"
        f"echo {marker}\n"
        "id=$(timeout 3 wget -q -O - --header 'X-Cloudland-Network-Id: forged' "
        "--header 'X-Forwarded-For: 10.0.0.250' http://169.254.169.254/latest/meta-data/instance-id)\n"
        "echo \"forged-request-got $id\"\n")
    cloud.openstack("keypair", "create", "md-key")  # generated; prints the private key
    public = cloud.openstack("keypair", "show", "--public-key", "md-key").stdout.strip()
    assert public.startswith("ssh-")
    server = cloud.openstack_json("server", "create", "--flavor", "m1.nano", "--image", "cloudland-guest",
                                  "--network", "demo-net", "--key-name", "md-key", "--user-data", str(script),
                                  "--config-drive", "true", "--wait", "vm-md")
    sid = server["id"]  # type: ignore[index]
    try:
        def console() -> str:
            return cloud.openstack("console", "log", "show", "vm-md", check=False).stdout

        out = wait_for(lambda: (o := console()) and "user-data end" in o and o, timeout=90,
                       what="the user-data script on the console")
        assert f"cloudland-guest: config-drive ok {sid}" in out
        assert f"cloudland-guest: metadata ok {sid}" in out
        assert f"cloudland-guest: public-key {public}" in out
        body = out.split("cloudland-guest: user-data begin", 1)[1].split("cloudland-guest: user-data end", 1)
        assert marker in body[0] and f"forged-request-got {sid}" in body[0]
        assert "user-data end rc=0" in out

        # Straight to the service with forged headers (no valid signature): refused.
        addresses = json.dumps(cloud.openstack_json("server", "show", "vm-md")["addresses"])  # type: ignore[index]
        ip = re.search(r"10\.0\.0\.\d+", addresses)
        assert ip
        net = cloud.openstack_json("network", "show", "demo-net")["id"]  # type: ignore[index]
        url = f"{cloud.api_url}/internal/metadata/openstack/latest/meta_data.json"
        forged = {"X-Cloudland-Network-Id": net, "X-Forwarded-For": ip.group(0)}
        assert _get(url, forged) == 403
        assert _get(url, forged | {"X-Cloudland-Signature": "0" * 64}) == 403
    finally:
        cloud.openstack("server", "delete", "--wait", "vm-md", check=False)
        cloud.openstack("keypair", "delete", "md-key", check=False)
