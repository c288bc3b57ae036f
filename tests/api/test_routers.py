"""Neutron routers: shapes, gateways, interfaces, extra routes, integrity 409s, isolation, quotas."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from cloudland.db.models import IpAllocation, Port
from tests.api.test_network import h, make_network, make_port, make_subnet, neutron_error
from tests.conftest import get_token

N = "/network/v2.0"


async def make_external(
    client: httpx.AsyncClient, admin_token: str, cidr: str = "172.24.4.0/24"
) -> tuple[dict[str, Any], dict[str, Any]]:
    net = await make_network(client, admin_token, name="public", **{"router:external": True})
    sub = await make_subnet(client, admin_token, net["id"], cidr, enable_dhcp=False)
    return net, sub


async def make_router(client: httpx.AsyncClient, token: str, **attrs: Any) -> dict[str, Any]:
    r = await client.post(f"{N}/routers", json={"router": {"name": "r1", **attrs}}, headers=h(token))
    assert r.status_code == 201, r.text
    return r.json()["router"]


async def add_interface(client: httpx.AsyncClient, token: str, router_id: str, **body: Any) -> httpx.Response:
    return await client.put(f"{N}/routers/{router_id}/add_router_interface", json=body, headers=h(token))


async def remove_interface(
    client: httpx.AsyncClient, token: str, router_id: str, **body: Any
) -> httpx.Response:
    return await client.put(f"{N}/routers/{router_id}/remove_router_interface", json=body, headers=h(token))


async def other_project_token(client: httpx.AsyncClient, admin_token: str, name: str = "alt") -> str:
    """A member token of a fresh project (another tenant than demo)."""
    ah = h(admin_token)
    r = await client.post(
        "/identity/v3/projects", json={"project": {"name": name, "domain_id": "default"}}, headers=ah
    )
    assert r.status_code == 201, r.text
    project = r.json()["project"]["id"]
    r = await client.post(
        "/identity/v3/users",
        json={
            "user": {
                "name": name,
                "domain_id": "default",
                "password": "secret-pw",
                "default_project_id": project,
            }
        },
        headers=ah,
    )
    assert r.status_code == 201, r.text
    user = r.json()["user"]["id"]
    roles = (await client.get("/identity/v3/roles", params={"name": "member"}, headers=ah)).json()["roles"]
    r = await client.put(f"/identity/v3/projects/{project}/users/{user}/roles/{roles[0]['id']}", headers=ah)
    assert r.status_code == 204, r.text
    return await get_token(client, name, "secret-pw", name)


ROUTER_KEYS = {
    "id",
    "name",
    "description",
    "project_id",
    "tenant_id",
    "admin_state_up",
    "status",
    "external_gateway_info",
    "routes",
    "distributed",
    "ha",
    "availability_zone_hints",
    "availability_zones",
    "flavor_id",
    "tags",
    "created_at",
    "updated_at",
    "revision_number",
}


async def test_router_crud_and_shape(client: httpx.AsyncClient, demo_token: str) -> None:
    r = await make_router(client, demo_token, description="d")
    assert set(r) == ROUTER_KEYS
    assert r["external_gateway_info"] is None and r["routes"] == [] and r["status"] == "ACTIVE"
    assert r["distributed"] is True and r["ha"] is False and r["availability_zones"] == ["nova"]
    assert r["tenant_id"] == r["project_id"] and r["revision_number"] == 0 and r["admin_state_up"] is True
    other = await make_router(client, demo_token, name="r2")
    got = await client.get(f"{N}/routers/{r['id']}", params={"fields": ["id", "name"]}, headers=h(demo_token))
    assert got.json() == {"router": {"id": r["id"], "name": "r1"}}
    # Lookups by name as the clients do them: GET /routers/<name> is 404, then ?name=.
    neutron_error(await client.get(f"{N}/routers/r1", headers=h(demo_token)), 404, "RouterNotFound")
    listed = await client.get(f"{N}/routers", params={"name": "r2"}, headers=h(demo_token))
    assert [x["id"] for x in listed.json()["routers"]] == [other["id"]]
    page = await client.get(f"{N}/routers", params={"limit": 1, "sort_key": "name"}, headers=h(demo_token))
    assert [x["name"] for x in page.json()["routers"]] == ["r1"] and "routers_links" in page.json()
    upd = await client.put(
        f"{N}/routers/{r['id']}",
        json={"router": {"name": "new", "admin_state_up": False}},
        headers=h(demo_token),
    )
    assert upd.status_code == 200 and upd.json()["router"]["name"] == "new"
    assert upd.json()["router"]["revision_number"] == 1
    neutron_error(
        await client.put(f"{N}/routers/{r['id']}", json={"router": {"id": "x"}}, headers=h(demo_token)), 400
    )
    neutron_error(
        await client.put(f"{N}/routers/{r['id']}", json={"router": {"ha": True}}, headers=h(demo_token)), 403
    )
    neutron_error(await client.post(f"{N}/routers", content=b"{", headers=h(demo_token)), 400)
    neutron_error(
        await client.post(f"{N}/routers", json={"router": {"bogus": 1}}, headers=h(demo_token)), 400
    )
    assert (await client.delete(f"{N}/routers/{r['id']}", headers=h(demo_token))).status_code == 204
    neutron_error(await client.get(f"{N}/routers/{r['id']}", headers=h(demo_token)), 404, "RouterNotFound")
    ext = await client.get(f"{N}/extensions", headers=h(demo_token))
    assert {"router", "extraroute", "ext-gw-mode", "dvr"} <= {e["alias"] for e in ext.json()["extensions"]}


async def test_gateway(client: httpx.AsyncClient, app: Any, admin_token: str, demo_token: str) -> None:
    public, public_sub = await make_external(client, admin_token)
    private = await make_network(client, demo_token)
    r = await client.post(
        f"{N}/routers",
        json={"router": {"name": "gw", "external_gateway_info": {"network_id": private["id"]}}},
        headers=h(demo_token),
    )
    err = neutron_error(r, 400)
    assert err["message"] == f"Bad router request: Network {private['id']} is not an external network."
    router = await make_router(client, demo_token, external_gateway_info={"network_id": public["id"]})
    gw = router["external_gateway_info"]
    assert gw["network_id"] == public["id"] and gw["enable_snat"] is True
    (fixed,) = gw["external_fixed_ips"]
    assert fixed["subnet_id"] == public_sub["id"] and fixed["ip_address"].startswith("172.24.4.")
    async with app.state.sessionmaker() as session:
        ports = list(await session.scalars(select(Port).where(Port.device_id == router["id"])))
        assert [(p.device_owner, p.binding_host_id, p.project_id) for p in ports] == [
            ("network:router_gateway", "", "")
        ]
    # The gateway port is not the user's: not listed, not deletable.
    mine = await client.get(f"{N}/ports", params={"device_id": router["id"]}, headers=h(demo_token))
    assert mine.json()["ports"] == []
    neutron_error(
        await client.delete(f"{N}/ports/{ports[0].id}", headers=h(admin_token)), 409, "ServicePortInUse"
    )
    # A specific address is admin's; members get 403.
    r = await client.post(
        f"{N}/routers",
        json={
            "router": {
                "external_gateway_info": {
                    "network_id": public["id"],
                    "external_fixed_ips": [{"ip_address": "172.24.4.100"}],
                }
            }
        },
        headers=h(demo_token),
    )
    neutron_error(r, 403)
    admin_router = await make_router(
        client,
        admin_token,
        external_gateway_info={
            "network_id": public["id"],
            "enable_snat": False,
            "external_fixed_ips": [{"ip_address": "172.24.4.100"}],
        },
    )
    assert admin_router["external_gateway_info"]["external_fixed_ips"] == [
        {"subnet_id": public_sub["id"], "ip_address": "172.24.4.100"}
    ]
    assert admin_router["external_gateway_info"]["enable_snat"] is False
    # The external network cannot stop being external while it has gateway ports, nor be deleted.
    neutron_error(
        await client.put(
            f"{N}/networks/{public['id']}",
            json={"network": {"router:external": False}},
            headers=h(admin_token),
        ),
        409,
        "ExternalNetworkInUse",
    )
    neutron_error(
        await client.delete(f"{N}/networks/{public['id']}", headers=h(admin_token)), 409, "NetworkInUse"
    )
    # Clearing it ({} or null) releases the port and its address.
    for clear in ({}, None):
        upd = await client.put(
            f"{N}/routers/{router['id']}",
            json={"router": {"external_gateway_info": clear}},
            headers=h(demo_token),
        )
        assert upd.status_code == 200, upd.text
        assert upd.json()["router"]["external_gateway_info"] is None
    async with app.state.sessionmaker() as session:
        assert (
            await session.scalar(select(func.count()).select_from(Port).where(Port.device_id == router["id"]))
            == 0
        )
        assert (
            await session.scalar(
                select(func.count())
                .select_from(IpAllocation)
                .where(IpAllocation.ip_address == fixed["ip_address"])
            )
            == 0
        )
    # Set again through update, then delete the router: its gateway port goes with it.
    upd = await client.put(
        f"{N}/routers/{router['id']}",
        json={"router": {"external_gateway_info": {"network_id": public["id"]}}},
        headers=h(demo_token),
    )
    assert upd.json()["router"]["external_gateway_info"]["network_id"] == public["id"]
    for rid in (router["id"], admin_router["id"]):
        assert (await client.delete(f"{N}/routers/{rid}", headers=h(admin_token))).status_code == 204
    assert (await client.delete(f"{N}/subnets/{public_sub['id']}", headers=h(admin_token))).status_code == 204
    # Malformed gateway info.
    for bad in ({"network_id": 5}, {"enable_snat": True}, "x", {"network_id": public["id"], "nope": 1}):
        r = await client.post(
            f"{N}/routers", json={"router": {"external_gateway_info": bad}}, headers=h(demo_token)
        )
        neutron_error(r, 400)
    r = await client.post(
        f"{N}/routers",
        json={"router": {"external_gateway_info": {"network_id": "missing"}}},
        headers=h(demo_token),
    )
    neutron_error(r, 404, "NetworkNotFound")


async def test_gateway_on_network_without_subnet_creates_nothing(
    client: httpx.AsyncClient, app: Any, admin_token: str, demo_token: str
) -> None:
    net = await make_network(client, admin_token, **{"router:external": True})
    r = await client.post(
        f"{N}/routers",
        json={"router": {"name": "half", "external_gateway_info": {"network_id": net["id"]}}},
        headers=h(demo_token),
    )
    neutron_error(r, 400)
    listed = await client.get(f"{N}/routers", params={"name": "half"}, headers=h(demo_token))
    assert listed.json()["routers"] == []  # one transaction: no router without its gateway


async def test_interfaces(client: httpx.AsyncClient, app: Any, demo_token: str) -> None:
    router = await make_router(client, demo_token)
    net = await make_network(client, demo_token)
    sub = await make_subnet(client, demo_token, net["id"], "10.1.0.0/24")
    r = await add_interface(client, demo_token, router["id"], subnet_id=sub["id"])
    assert r.status_code == 200, r.text
    info = r.json()
    assert set(info) == {"id", "subnet_id", "subnet_ids", "port_id", "network_id", "project_id", "tenant_id"}
    assert (
        info["id"] == router["id"] and info["subnet_ids"] == [sub["id"]] and info["network_id"] == net["id"]
    )
    port = (await client.get(f"{N}/ports/{info['port_id']}", headers=h(demo_token))).json()["port"]
    assert (
        port["device_owner"] == "network:router_interface_distributed" and port["device_id"] == router["id"]
    )
    assert port["fixed_ips"] == [{"subnet_id": sub["id"], "ip_address": "10.1.0.1"}]
    # Already attached; an overlapping CIDR on another network; a subnet without gateway.
    err = neutron_error(await add_interface(client, demo_token, router["id"], subnet_id=sub["id"]), 400)
    assert err["message"] == f"Bad router request: Router already has a port on subnet {sub['id']}."
    net2 = await make_network(client, demo_token)
    overlap = await make_subnet(client, demo_token, net2["id"], "10.1.0.0/16")
    err = neutron_error(await add_interface(client, demo_token, router["id"], subnet_id=overlap["id"]), 400)
    assert err["message"] == (
        f"Bad router request: Cidr 10.1.0.0/16 of subnet {overlap['id']} overlaps with "
        f"cidr 10.1.0.0/24 of subnet {sub['id']}."
    )
    net3 = await make_network(client, demo_token)
    nogw = await make_subnet(client, demo_token, net3["id"], "10.3.0.0/24", gateway_ip=None)
    err = neutron_error(await add_interface(client, demo_token, router["id"], subnet_id=nogw["id"]), 400)
    assert err["message"] == "Bad router request: Subnet for router interface must have a gateway IP."
    neutron_error(await add_interface(client, demo_token, router["id"]), 400)
    neutron_error(
        await add_interface(client, demo_token, router["id"], subnet_id=sub["id"], port_id="x"), 400
    )
    neutron_error(
        await add_interface(client, demo_token, router["id"], subnet_id="nope"), 404, "SubnetNotFound"
    )
    r = await client.put(
        f"{N}/routers/{router['id']}/add_router_interface", content=b"[1]", headers=h(demo_token)
    )
    neutron_error(r, 400)
    # By port: the port's one address becomes the interface.
    p = (await make_port(client, demo_token, net3["id"], fixed_ips=[{"subnet_id": nogw["id"]}])).json()[
        "port"
    ]
    r = await add_interface(client, demo_token, router["id"], port_id=p["id"])
    assert r.status_code == 200, r.text
    assert r.json()["port_id"] == p["id"] and r.json()["subnet_id"] == nogw["id"]
    neutron_error(await add_interface(client, demo_token, router["id"], port_id=p["id"]), 409, "PortInUse")
    # The router and the interface port cannot be deleted directly; neither can the subnet/network.
    neutron_error(
        await client.delete(f"{N}/routers/{router['id']}", headers=h(demo_token)), 409, "RouterInUse"
    )
    neutron_error(await client.delete(f"{N}/ports/{info['port_id']}", headers=h(demo_token)), 409)
    neutron_error(await client.delete(f"{N}/subnets/{sub['id']}", headers=h(demo_token)), 409, "SubnetInUse")
    neutron_error(
        await client.delete(f"{N}/networks/{net['id']}", headers=h(demo_token)), 409, "NetworkInUse"
    )
    # Removal: by subnet, by port; absent ones are 404.
    r = await remove_interface(client, demo_token, router["id"], subnet_id=sub["id"])
    assert r.status_code == 200 and r.json()["port_id"] == info["port_id"]
    err = neutron_error(
        await remove_interface(client, demo_token, router["id"], subnet_id=sub["id"]),
        404,
        "RouterInterfaceNotFoundForSubnet",
    )
    assert err["message"] == f"Router {router['id']} has no interface on subnet {sub['id']}"
    neutron_error(
        await remove_interface(client, demo_token, router["id"], port_id=info["port_id"]),
        404,
        "RouterInterfaceNotFound",
    )
    r = await remove_interface(client, demo_token, router["id"], port_id=p["id"])
    assert r.status_code == 200 and r.json()["subnet_ids"] == [nogw["id"]]
    assert (await client.get(f"{N}/ports/{p['id']}", headers=h(demo_token))).status_code == 404
    assert (await client.delete(f"{N}/subnets/{sub['id']}", headers=h(demo_token))).status_code == 204
    assert (await client.delete(f"{N}/routers/{router['id']}", headers=h(demo_token))).status_code == 204


async def test_external_subnet_is_not_an_interface(client: httpx.AsyncClient, admin_token: str) -> None:
    _, public_sub = await make_external(client, admin_token)
    router = await make_router(client, admin_token)
    neutron_error(await add_interface(client, admin_token, router["id"], subnet_id=public_sub["id"]), 400)


async def test_extra_routes(client: httpx.AsyncClient, demo_token: str) -> None:
    router = await make_router(client, demo_token)
    net = await make_network(client, demo_token)
    sub = await make_subnet(client, demo_token, net["id"], "10.4.0.0/24")
    url = f"{N}/routers/{router['id']}"
    route = {"destination": "192.168.10.0/24", "nexthop": "10.4.0.20"}
    err = neutron_error(
        await client.put(url, json={"router": {"routes": [route]}}, headers=h(demo_token)),
        400,
        "InvalidRoutes",
    )
    assert "the nexthop is not connected with router" in err["message"]
    assert (await add_interface(client, demo_token, router["id"], subnet_id=sub["id"])).status_code == 200
    r = await client.put(url, json={"router": {"routes": [route]}}, headers=h(demo_token))
    assert r.status_code == 200, r.text
    assert r.json()["router"]["routes"] == [route]
    for bad in (
        [{"destination": "nope", "nexthop": "10.4.0.20"}],
        [{"destination": "10.9.0.0/24"}],
        [{"destination": "10.9.0.0/24", "nexthop": "x"}],
        "x",
        [1],
    ):
        neutron_error(await client.put(url, json={"router": {"routes": bad}}, headers=h(demo_token)), 400)
    err = neutron_error(
        await client.put(
            url,
            json={"router": {"routes": [{"destination": "10.8.0.0/24", "nexthop": "10.4.0.1"}]}},
            headers=h(demo_token),
        ),
        400,
        "InvalidRoutes",
    )
    assert "used by router" in err["message"]
    # The interface a route needs cannot go.
    neutron_error(
        await remove_interface(client, demo_token, router["id"], subnet_id=sub["id"]),
        409,
        "RouterInterfaceInUseByRoute",
    )
    # extraroute-atomic, as `openstack router add/remove route` sends it.
    extra = {"destination": "192.168.20.0/24", "nexthop": "10.4.0.21"}
    r = await client.put(
        f"{url}/add_extraroutes", json={"router": {"routes": [extra]}}, headers=h(demo_token)
    )
    assert r.status_code == 200 and r.json()["router"]["routes"] == [route, extra]
    r = await client.put(
        f"{url}/remove_extraroutes", json={"router": {"routes": [route, extra]}}, headers=h(demo_token)
    )
    assert r.status_code == 200 and r.json()["router"]["routes"] == []
    assert (await remove_interface(client, demo_token, router["id"], subnet_id=sub["id"])).status_code == 200


async def test_isolation(client: httpx.AsyncClient, admin_token: str, demo_token: str) -> None:
    router = await make_router(client, demo_token)
    alt = await other_project_token(client, admin_token)
    neutron_error(await client.get(f"{N}/routers/{router['id']}", headers=h(alt)), 404, "RouterNotFound")
    neutron_error(
        await client.put(f"{N}/routers/{router['id']}", json={"router": {"name": "x"}}, headers=h(alt)), 404
    )
    neutron_error(await client.delete(f"{N}/routers/{router['id']}", headers=h(alt)), 404)
    neutron_error(await add_interface(client, alt, router["id"], subnet_id="x"), 404, "RouterNotFound")
    assert (await client.get(f"{N}/routers", headers=h(alt))).json()["routers"] == []
    # The other project cannot attach demo's subnet to its own router.
    net = await make_network(client, demo_token)
    sub = await make_subnet(client, demo_token, net["id"], "10.5.0.0/24")
    alt_router = await make_router(client, alt)
    neutron_error(
        await add_interface(client, alt, alt_router["id"], subnet_id=sub["id"]), 404, "SubnetNotFound"
    )
    # Admin sees all, and filters by project.
    every = await client.get(f"{N}/routers", headers=h(admin_token))
    assert {router["id"], alt_router["id"]} <= {x["id"] for x in every.json()["routers"]}
    only = await client.get(
        f"{N}/routers", params={"project_id": router["project_id"]}, headers=h(admin_token)
    )
    assert {x["id"] for x in only.json()["routers"]} == {router["id"]}


@pytest.mark.both_databases
async def test_integrity_and_quota(client: httpx.AsyncClient, app: Any, demo_token: str) -> None:
    router = await make_router(client, demo_token)
    net = await make_network(client, demo_token)
    sub = await make_subnet(client, demo_token, net["id"], "10.6.0.0/24")
    assert (await add_interface(client, demo_token, router["id"], subnet_id=sub["id"])).status_code == 200
    neutron_error(await client.delete(f"{N}/subnets/{sub['id']}", headers=h(demo_token)), 409, "SubnetInUse")
    neutron_error(
        await client.delete(f"{N}/networks/{net['id']}", headers=h(demo_token)), 409, "NetworkInUse"
    )
    neutron_error(
        await client.delete(f"{N}/routers/{router['id']}", headers=h(demo_token)), 409, "RouterInUse"
    )
    assert (await remove_interface(client, demo_token, router["id"], subnet_id=sub["id"])).status_code == 200
    assert (await client.delete(f"{N}/networks/{net['id']}", headers=h(demo_token))).status_code == 204
    for i in range(9):
        await make_router(client, demo_token, name=f"q{i}")
    neutron_error(
        await client.post(f"{N}/routers", json={"router": {"name": "over"}}, headers=h(demo_token)),
        409,
        "OverQuota",
    )


async def test_router_tags_and_another_projects_router(client: httpx.AsyncClient, demo_token: str,
                                                       admin_token: str) -> None:
    router = await make_router(client, demo_token)
    base = f"{N}/routers/{router['id']}/tags"
    r = await client.put(base, json={"tags": ["edge", "blue"]}, headers=h(demo_token))
    assert r.status_code == 200 and r.json() == {"tags": ["blue", "edge"]}
    assert (await client.put(f"{base}/green", headers=h(demo_token))).status_code == 201
    got = (await client.get(f"{N}/routers/{router['id']}", headers=h(demo_token))).json()["router"]
    assert got["tags"] == ["blue", "edge", "green"]
    # Another tenant cannot see (or tag) it.
    alt = await other_project_token(client, admin_token, "tagalt")
    neutron_error(await client.put(f"{base}/x", headers=h(alt)), 404, "RouterNotFound")
