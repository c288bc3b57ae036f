"""The metadata service in-process: layouts, identification by (network, address), signatures."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import select

from cloudland.db.models import Instance, IpAllocation, Network, Port, Project, Subnet
from cloudland.secrets import metadata_signature

MD = "/internal/metadata"
KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBOGbOAb6jCFxh3gjpGnYNBbvUZW/1JZ7ky5bA3GPr8T test@cloudland")


@dataclass
class Server:
    id: str
    network_id: str
    address: str


async def _server(app, project: str, name: str, vni: int, **extra) -> Server:  # type: ignore[no-untyped-def]
    """A network 10.0.0.0/24 of its own and an instance with a port at 10.0.0.5 on it (rows
    only: the metadata service reads the database, nothing else)."""
    async with app.state.sessionmaker() as s, s.begin():
        net = Network(name=f"net-{name}", project_id=project, segmentation_id=vni)
        s.add(net)
        await s.flush()
        subnet = Subnet(network_id=net.id, project_id=project, cidr="10.0.0.0/24", gateway_ip="10.0.0.1",
                        allocation_pools=[{"start": "10.0.0.2", "end": "10.0.0.254"}])
        inst = Instance(name=name, project_id=project, user_id="u", flavor_id="1",
                        flavor={"vcpus": 1, "ram": 512, "disk": 1}, **extra)
        s.add_all([subnet, inst])
        await s.flush()
        port = Port(network_id=net.id, project_id=project, mac_address=f"fa:16:3e:00:00:{vni % 256:02x}",
                    device_id=inst.id, device_owner="compute:nova")
        s.add(port)
        await s.flush()
        s.add(IpAllocation(subnet_id=subnet.id, ip_address="10.0.0.5", port_id=port.id, network_id=net.id))
        return Server(inst.id, net.id, "10.0.0.5")


@pytest.fixture
async def world(app):  # type: ignore[no-untyped-def]
    async with app.state.sessionmaker() as s:
        projects = {p.name: p.id for p in await s.scalars(select(Project))}
    demo = await _server(app, projects["demo"], "My VM_1", 101, key_name="k", key_data=KEY,
                         metadata_={"role": "web"},
                         user_data=base64.b64encode(b"#!/bin/sh\necho hi\n").decode())
    other = await _server(app, projects["admin"], "other", 102)
    # Same address in both projects: the address alone does not tell them apart.
    assert demo.address == other.address
    return demo, other, projects


def signed(app, network_id: str, address: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"X-Cloudland-Network-Id": network_id, "X-Forwarded-For": address,
            "X-Cloudland-Signature": metadata_signature(app.state.metadata_key, network_id, address)}


async def test_openstack_layout(client: httpx.AsyncClient, app, world) -> None:  # type: ignore[no-untyped-def]
    demo, _, projects = world
    h = signed(app, demo.network_id, demo.address)
    r = await client.get(f"{MD}/openstack", headers=h)
    assert r.status_code == 200 and "latest" in r.text.split("\n")
    r = await client.get(f"{MD}/openstack/latest/meta_data.json", headers=h)
    assert r.status_code == 200
    md = r.json()
    assert md["uuid"] == demo.id and md["name"] == "My VM_1" and md["hostname"] == "my-vm-1"
    assert md["project_id"] == projects["demo"] and md["availability_zone"] == "nova"
    assert md["public_keys"] == {"k": KEY} and md["keys"] == [{"name": "k", "type": "ssh", "data": KEY}]
    assert md["launch_index"] == 0 and md["meta"] == {"role": "web"}
    r = await client.get(f"{MD}/openstack/latest/user_data", headers=h)
    assert r.status_code == 200 and r.content == b"#!/bin/sh\necho hi\n"
    nd = (await client.get(f"{MD}/openstack/latest/network_data.json", headers=h)).json()
    assert nd["networks"][0]["ip_address"] == demo.address and nd["links"][0]["mtu"]
    assert (await client.get(f"{MD}/openstack/latest/vendor_data.json", headers=h)).json() == {}
    assert (await client.get(f"{MD}/openstack/2099-01-01/meta_data.json", headers=h)).status_code == 404
    assert (await client.get(f"{MD}/openstack/latest/nope", headers=h)).status_code == 404


async def test_ec2_layout(client: httpx.AsyncClient, app, world) -> None:  # type: ignore[no-untyped-def]
    demo, other, _ = world
    h = signed(app, demo.network_id, demo.address)
    listing = (await client.get(f"{MD}/latest/meta-data/", headers=h)).text.split("\n")
    assert {"instance-id", "hostname", "local-ipv4", "public-keys/"} <= set(listing)
    assert (await client.get(f"{MD}/latest/meta-data/instance-id", headers=h)).text == demo.id
    assert (await client.get(f"{MD}/latest/meta-data/local-ipv4", headers=h)).text == demo.address
    assert (await client.get(f"{MD}/latest/meta-data/hostname", headers=h)).text == "my-vm-1"
    assert (await client.get(f"{MD}/latest/meta-data/public-keys/0/openssh-key", headers=h)).text == KEY
    assert (await client.get(f"{MD}/latest/user-data", headers=h)).content.startswith(b"#!/bin/sh")
    assert (await client.get(f"{MD}/latest/meta-data/nope", headers=h)).status_code == 404
    # No user data, no key: 404s.
    h2 = signed(app, other.network_id, other.address)
    assert (await client.get(f"{MD}/latest/user-data", headers=h2)).status_code == 404
    assert (await client.get(f"{MD}/openstack/latest/user_data", headers=h2)).status_code == 404
    r = await client.get(f"{MD}/latest/meta-data/public-keys/0/openssh-key", headers=h2)
    assert r.status_code == 404


async def test_identified_by_network_and_address_only(client: httpx.AsyncClient, app, world) -> None:  # type: ignore[no-untyped-def]
    demo, other, projects = world
    # Same address, the other tenant's network: the other tenant's instance, never demo's.
    md = (await client.get(f"{MD}/openstack/latest/meta_data.json",
                           headers=signed(app, other.network_id, other.address))).json()
    assert md["uuid"] == other.id and md["project_id"] == projects["admin"]
    assert "k" not in json.dumps(md["public_keys"])
    # An address with no instance on that network: 404.
    r = await client.get(f"{MD}/openstack/latest/meta_data.json",
                         headers=signed(app, demo.network_id, "10.0.0.250"))
    assert r.status_code == 404


async def test_signature_required(client: httpx.AsyncClient, app, world) -> None:  # type: ignore[no-untyped-def]
    demo, other, _ = world
    url = f"{MD}/openstack/latest/meta_data.json"
    assert (await client.get(url)).status_code == 403
    # Demo's guest (signed for demo's network) claiming the other network: refused.
    forged = signed(app, demo.network_id, demo.address) | {"X-Cloudland-Network-Id": other.network_id}
    assert (await client.get(url, headers=forged)).status_code == 403
    forged = signed(app, demo.network_id, demo.address) | {"X-Forwarded-For": "10.0.0.250"}
    assert (await client.get(url, headers=forged)).status_code == 403
    bad = signed(app, demo.network_id, demo.address) | {"X-Cloudland-Signature": "0" * 64}
    assert (await client.get(url, headers=bad)).status_code == 403
    # A token is no substitute for the signature.
    assert (await client.get(url, headers={"X-Cloudland-Network-Id": demo.network_id,
                                           "X-Forwarded-For": demo.address})).status_code == 403
