"""The all-in-one cloud driven by openstacksdk, as Ansible's openstack.cloud modules use it."""

from __future__ import annotations

import openstack
import pytest
from openstack.config.loader import OpenStackConfig

from cloudland.guest import BOOT_MARKER
from tests.e2e.conftest import RunningCloud, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def test_openstacksdk_server_lifecycle(cloud: RunningCloud) -> None:
    region = OpenStackConfig(config_files=[str(cloud.clouds_yaml)]).get_one(cloud="cloudland-demo")
    conn = openstack.connection.Connection(config=region)
    try:
        image = conn.image.find_image("cloudland-guest")
        flavor = conn.compute.find_flavor("m1.nano")
        network = conn.network.find_network("demo-net")
        assert image and flavor and network
        server = conn.compute.create_server(name="sdk-vm", image_id=image.id, flavor_id=flavor.id,
                                            networks=[{"uuid": network.id}])
        server = conn.compute.wait_for_server(server, status="ACTIVE", wait=180)
        assert server.addresses["demo-net"][0]["addr"].startswith("10.0.0.")
        ports = list(conn.network.ports(device_id=server.id))
        assert len(ports) == 1 and ports[0].device_owner == "compute:nova"
        wait_for(lambda: BOOT_MARKER in (conn.compute.get_server_console_output(server)["output"] or ""),
                 what="boot marker via the SDK")
        conn.compute.delete_server(server)
        conn.compute.wait_for_delete(server, wait=120)
        assert not list(conn.network.ports(device_id=server.id))
    finally:
        conn.close()
