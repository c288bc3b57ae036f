"""Neutron floating IPs: create, associate through a router, disassociate, delete, isolation, quotas."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from cloudland.api.network import ipam
from cloudland.db.models import FloatingIp, IpAllocation, Port
from tests.api.test_network import h, make_network, make_port, make_subnet, neutron_error
from tests.api.test_routers import (
    add_interface,
    make_external,
    make_router,
    other_project_token,
    remove_interface,
)

N = "/network/v2.0"
FIP_KEYS = {
    "id",
    "floating_ip_address",
    "floating_network_id",
    "router_id",
    "port_id",
    "fixed_ip_address",
    "status",
    "project_id",
    "tenant_id",
    "description",
    "dns_domain",
    "dns_name",
    "port_details",
    "tags",
    "created_at",
    "updated_at",
    "revision_number",
    "qos_policy_id",
}


async def make_fip(client: httpx.AsyncClient, token: str, network_id: str, **attrs: Any) -> httpx.Response:
    return await client.post(
        f"{N}/floatingips",
        json={"floatingip": {"floating_network_id": network_id, **attrs}},
        headers=h(token),
    )


async def setup_topology(
    client: httpx.AsyncClient, admin_token: str, demo_token: str, cidr: str = "10.20.0.0/24"
) -> dict[str, Any]:
    """public ← router → private subnet, and a port on the private network."""
    public, public_sub = await make_external(client, admin_token)
    net = await make_network(client, demo_token)
    sub = await make_subnet(client, demo_token, net["id"], cidr)
    router = await make_router(client, demo_token, external_gateway_info={"network_id": public["id"]})
    assert (await add_interface(client, demo_token, router["id"], subnet_id=sub["id"])).status_code == 200
    r = await make_port(client, demo_token, net["id"], device_id="server-1", device_owner="compute:nova")
    assert r.status_code == 201, r.text
    return {
        "public": public,
        "public_sub": public_sub,
        "net": net,
        "sub": sub,
        "router": router,
        "port": r.json()["port"],
    }


async def test_create_associate_disassociate_delete(
    client: httpx.AsyncClient, app: Any, admin_token: str, demo_token: str
) -> None:
    t = await setup_topology(client, admin_token, demo_token)
    r = await make_fip(client, demo_token, t["public"]["id"], description="web")
    assert r.status_code == 201, r.text
    fip = r.json()["floatingip"]
    assert set(fip) == FIP_KEYS
    assert fip["status"] == "DOWN" and fip["port_id"] is None and fip["router_id"] is None
    assert fip["port_details"] is None and fip["floating_ip_address"].startswith("172.24.4.")
    assert fip["dns_name"] == "" and fip["description"] == "web"
    # As `openstack server add floating ip` does it: the server's ports, then PUT port_id + fixed IP.
    ports = (await client.get(f"{N}/ports", params={"device_id": "server-1"}, headers=h(demo_token))).json()
    (port,) = ports["ports"]
    fixed = port["fixed_ips"][0]["ip_address"]
    r = await client.put(
        f"{N}/floatingips/{fip['id']}",
        json={"floatingip": {"port_id": port["id"], "fixed_ip_address": fixed}},
        headers=h(demo_token),
    )
    assert r.status_code == 200, r.text
    got = r.json()["floatingip"]
    assert got["status"] == "ACTIVE" and got["port_id"] == port["id"] and got["fixed_ip_address"] == fixed
    assert got["router_id"] == t["router"]["id"]
    assert got["port_details"] == {
        "name": "",
        "network_id": t["net"]["id"],
        "mac_address": port["mac_address"],
        "admin_state_up": True,
        "status": port["status"],
        "device_id": "server-1",
        "device_owner": "compute:nova",
    }
    listed = await client.get(f"{N}/floatingips", params={"port_id": port["id"]}, headers=h(demo_token))
    assert [x["id"] for x in listed.json()["floatingips"]] == [fip["id"]]
    by_ip = await client.get(
        f"{N}/floatingips", params={"floating_ip_address": fip["floating_ip_address"]}, headers=h(demo_token)
    )
    assert [x["id"] for x in by_ip.json()["floatingips"]] == [fip["id"]]
    # The same fixed IP cannot get a second floating IP.
    other = (await make_fip(client, demo_token, t["public"]["id"])).json()["floatingip"]
    r = await client.put(
        f"{N}/floatingips/{other['id']}", json={"floatingip": {"port_id": port["id"]}}, headers=h(demo_token)
    )
    neutron_error(r, 409, "FloatingIPPortAlreadyAssociated")
    # The interface and the gateway it goes through are now needed.
    neutron_error(
        await remove_interface(client, demo_token, t["router"]["id"], subnet_id=t["sub"]["id"]),
        409,
        "RouterInterfaceInUseByFloatingIP",
    )
    r = await client.put(
        f"{N}/routers/{t['router']['id']}",
        json={"router": {"external_gateway_info": None}},
        headers=h(demo_token),
    )
    neutron_error(r, 409, "RouterExternalGatewayInUseByFloatingIp")
    # A fixed IP the port does not have.
    r = await client.put(
        f"{N}/floatingips/{fip['id']}",
        json={"floatingip": {"port_id": port["id"], "fixed_ip_address": "10.20.0.250"}},
        headers=h(demo_token),
    )
    neutron_error(r, 400)
    # `floating ip unset --port`.
    r = await client.put(
        f"{N}/floatingips/{fip['id']}", json={"floatingip": {"port_id": None}}, headers=h(demo_token)
    )
    assert r.status_code == 200
    got = r.json()["floatingip"]
    assert got["status"] == "DOWN" and got["port_id"] is None and got["router_id"] is None
    assert got["fixed_ip_address"] is None and got["port_details"] is None
    # Deleting releases the address and its port.
    for f in (fip, other):
        assert (await client.delete(f"{N}/floatingips/{f['id']}", headers=h(demo_token))).status_code == 204
    neutron_error(
        await client.get(f"{N}/floatingips/{fip['id']}", headers=h(demo_token)), 404, "FloatingIPNotFound"
    )
    async with app.state.sessionmaker() as session:
        assert (
            await session.scalar(
                select(func.count())
                .select_from(IpAllocation)
                .where(IpAllocation.ip_address == fip["floating_ip_address"])
            )
            == 0
        )
        assert (
            await session.scalar(
                select(func.count()).select_from(Port).where(Port.device_owner == "network:floatingip")
            )
            == 0
        )
    assert (
        await remove_interface(client, demo_token, t["router"]["id"], subnet_id=t["sub"]["id"])
    ).status_code == 200


async def test_associate_on_create_and_errors(
    client: httpx.AsyncClient, admin_token: str, demo_token: str
) -> None:
    t = await setup_topology(client, admin_token, demo_token)
    r = await make_fip(client, demo_token, t["public"]["id"], port_id=t["port"]["id"])
    assert r.status_code == 201, r.text
    assert r.json()["floatingip"]["status"] == "ACTIVE"
    # Not an external network; unknown network; floating_ip_address is admin's.
    err = neutron_error(await make_fip(client, demo_token, t["net"]["id"]), 400)
    assert (
        err["message"] == f"Bad floatingip request: Network {t['net']['id']} is not a valid external network."
    )
    neutron_error(await make_fip(client, demo_token, "missing"), 404, "NetworkNotFound")
    neutron_error(
        await make_fip(client, demo_token, t["public"]["id"], floating_ip_address="172.24.4.99"), 403
    )
    r = await make_fip(client, admin_token, t["public"]["id"], floating_ip_address="172.24.4.99")
    assert r.status_code == 201 and r.json()["floatingip"]["floating_ip_address"] == "172.24.4.99"
    neutron_error(
        await make_fip(client, admin_token, t["public"]["id"], floating_ip_address="172.24.4.99"), 409
    )
    neutron_error(await make_fip(client, demo_token, t["public"]["id"], fixed_ip_address="10.20.0.5"), 400)
    neutron_error(await client.post(f"{N}/floatingips", json={"floatingip": {}}, headers=h(demo_token)), 400)
    neutron_error(
        await client.post(f"{N}/floatingips", json={"floatingip": {"x": 1}}, headers=h(demo_token)), 400
    )
    neutron_error(await client.post(f"{N}/floatingips", content=b"{", headers=h(demo_token)), 400)
    neutron_error(
        await make_fip(client, demo_token, t["public"]["id"], port_id="missing"), 404, "PortNotFound"
    )
    # Association without a router path: Neutron's message.
    lonely = await make_network(client, demo_token)
    lonely_sub = await make_subnet(client, demo_token, lonely["id"], "10.21.0.0/24")
    lport = (await make_port(client, demo_token, lonely["id"])).json()["port"]
    r = await make_fip(client, demo_token, t["public"]["id"], port_id=lport["id"])
    err = neutron_error(r, 404, "ExternalGatewayForFloatingIPNotFound")
    assert err["message"] == (
        f"External network {t['public']['id']} is not reachable from subnet "
        f"{lonely_sub['id']}.  Therefore, cannot associate Port {lport['id']} with a "
        "Floating IP."
    )
    # The failed create left nothing behind.
    listed = await client.get(f"{N}/floatingips", headers=h(demo_token))
    assert len(listed.json()["floatingips"]) == 1


async def test_port_delete_disassociates(
    client: httpx.AsyncClient, app: Any, admin_token: str, demo_token: str
) -> None:
    t = await setup_topology(client, admin_token, demo_token)
    fip = (await make_fip(client, demo_token, t["public"]["id"], port_id=t["port"]["id"])).json()[
        "floatingip"
    ]
    assert (await client.delete(f"{N}/ports/{t['port']['id']}", headers=h(demo_token))).status_code == 204
    got = (await client.get(f"{N}/floatingips/{fip['id']}", headers=h(demo_token))).json()["floatingip"]
    assert got["port_id"] is None and got["status"] == "DOWN" and got["router_id"] is None
    # The floating IP port itself is not deletable through the port API.
    async with app.state.sessionmaker() as session:
        fport = await session.scalar(select(Port.id).where(Port.device_id == fip["id"]))
    neutron_error(await client.delete(f"{N}/ports/{fport}", headers=h(admin_token)), 409, "ServicePortInUse")
    # The server-deletion path: ipam.disassociate_floating_ips_of_device before delete_ports_of_device.
    port2 = (await make_port(client, demo_token, t["net"]["id"], device_id="server-2")).json()["port"]
    fip2 = (await make_fip(client, demo_token, t["public"]["id"], port_id=port2["id"])).json()["floatingip"]
    async with app.state.sessionmaker() as session:
        networks = await ipam.disassociate_floating_ips_of_device(session, "server-2")
        await ipam.delete_ports_of_device(session, "server-2")
        await session.commit()
        assert networks == {t["net"]["id"]}
        row = await session.get(FloatingIp, fip2["id"])
        assert row is not None and row.port_id is None and row.status == "DOWN"
    # Changing a port's fixed IP away from the associated one disassociates too.
    port3 = (await make_port(client, demo_token, t["net"]["id"])).json()["port"]
    fip3 = (await make_fip(client, demo_token, t["public"]["id"], port_id=port3["id"])).json()["floatingip"]
    r = await client.put(
        f"{N}/ports/{port3['id']}",
        json={"port": {"fixed_ips": [{"subnet_id": t["sub"]["id"], "ip_address": "10.20.0.200"}]}},
        headers=h(demo_token),
    )
    assert r.status_code == 200, r.text
    got = (await client.get(f"{N}/floatingips/{fip3['id']}", headers=h(demo_token))).json()["floatingip"]
    assert got["port_id"] is None


async def test_isolation(client: httpx.AsyncClient, admin_token: str, demo_token: str) -> None:
    t = await setup_topology(client, admin_token, demo_token)
    fip = (await make_fip(client, demo_token, t["public"]["id"])).json()["floatingip"]
    alt = await other_project_token(client, admin_token, "alt-fip")
    neutron_error(await client.get(f"{N}/floatingips/{fip['id']}", headers=h(alt)), 404, "FloatingIPNotFound")
    neutron_error(
        await client.put(
            f"{N}/floatingips/{fip['id']}", json={"floatingip": {"port_id": None}}, headers=h(alt)
        ),
        404,
    )
    neutron_error(await client.delete(f"{N}/floatingips/{fip['id']}", headers=h(alt)), 404)
    assert (await client.get(f"{N}/floatingips", headers=h(alt))).json()["floatingips"] == []
    # Another project cannot point its floating IP at demo's port.
    alt_fip = (await make_fip(client, alt, t["public"]["id"])).json()["floatingip"]
    r = await client.put(
        f"{N}/floatingips/{alt_fip['id']}", json={"floatingip": {"port_id": t["port"]["id"]}}, headers=h(alt)
    )
    neutron_error(r, 404, "PortNotFound")
    every = await client.get(f"{N}/floatingips", headers=h(admin_token))
    assert {fip["id"], alt_fip["id"]} <= {x["id"] for x in every.json()["floatingips"]}


@pytest.mark.both_databases
async def test_integrity_and_quota(client: httpx.AsyncClient, admin_token: str, demo_token: str) -> None:
    t = await setup_topology(client, admin_token, demo_token)
    fip = (await make_fip(client, demo_token, t["public"]["id"], port_id=t["port"]["id"])).json()[
        "floatingip"
    ]
    neutron_error(
        await client.delete(f"{N}/routers/{t['router']['id']}", headers=h(demo_token)), 409, "RouterInUse"
    )
    neutron_error(
        await client.delete(f"{N}/subnets/{t['public_sub']['id']}", headers=h(admin_token)),
        409,
        "SubnetInUse",
    )
    neutron_error(
        await client.delete(f"{N}/networks/{t['public']['id']}", headers=h(admin_token)), 409, "NetworkInUse"
    )
    neutron_error(
        await remove_interface(client, demo_token, t["router"]["id"], subnet_id=t["sub"]["id"]), 409
    )
    assert (await client.delete(f"{N}/floatingips/{fip['id']}", headers=h(demo_token))).status_code == 204
    for _ in range(50):
        assert (await make_fip(client, demo_token, t["public"]["id"])).status_code == 201
    neutron_error(await make_fip(client, demo_token, t["public"]["id"]), 409, "OverQuota")
