"""Neutron v2.0 API: networks, subnets, ports, IPAM, against the real app and SQLite."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from cloudland.api.errors import ApiError
from cloudland.api.network import ipam
from cloudland.api.network.bootstrap import bootstrap_demo_network
from cloudland.db.models import IpAllocation, Network, Port, Subnet

N = "/network/v2.0"


def h(token: str) -> dict[str, str]:
    return {"X-Auth-Token": token}


async def make_network(client: httpx.AsyncClient, token: str, **attrs: Any) -> dict[str, Any]:
    r = await client.post(f"{N}/networks", json={"network": {"name": "net", **attrs}}, headers=h(token))
    assert r.status_code == 201, r.text
    return r.json()["network"]


async def make_subnet(client: httpx.AsyncClient, token: str, network_id: str, cidr: str,
                      **attrs: Any) -> dict[str, Any]:
    body = {"subnet": {"network_id": network_id, "cidr": cidr, "ip_version": 4, **attrs}}
    r = await client.post(f"{N}/subnets", json=body, headers=h(token))
    assert r.status_code == 201, r.text
    return r.json()["subnet"]


async def make_port(client: httpx.AsyncClient, token: str, network_id: str, **attrs: Any) -> httpx.Response:
    body = {"port": {"network_id": network_id, **attrs}}
    return await client.post(f"{N}/ports", json=body, headers=h(token))


def neutron_error(r: httpx.Response, status: int, kind: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["NeutronError"]
    assert set(err) == {"type", "message", "detail"}
    if kind:
        assert err["type"] == kind, err
    return err


async def test_discovery(client: httpx.AsyncClient, demo_token: str) -> None:
    for path in ("/network", "/network/"):
        r = await client.get(path)
        assert r.status_code == 200
        version = r.json()["versions"][0]
        assert version["id"] == "v2.0" and version["status"] == "CURRENT"
        assert version["links"][0]["href"] == "http://cloudland.test/network/v2.0/"
    for path in (N, N + "/"):
        r = await client.get(path)
        assert {res["collection"] for res in r.json()["resources"]} == {
                "networks", "subnets", "ports", "security-groups", "security-group-rules"}
    r = await client.get(f"{N}/extensions", headers=h(demo_token))
    aliases = {e["alias"] for e in r.json()["extensions"]}
    assert {"provider", "external-net", "binding", "port-security"} <= aliases
    r = await client.get(f"{N}/extensions/provider", headers=h(demo_token))
    assert r.json()["extension"]["alias"] == "provider"
    neutron_error(await client.get(f"{N}/extensions/nope", headers=h(demo_token)), 404)


async def test_network_crud_shape_and_vni(client: httpx.AsyncClient, admin_token: str,
                                          demo_token: str) -> None:
    net = await make_network(client, demo_token, description="d")
    for key in ("subnets", "tags", "availability_zones", "availability_zone_hints"):
        assert net[key] == []
    assert net["mtu"] == 1450 and net["status"] == "ACTIVE" and net["shared"] is False
    assert net["router:external"] is False and net["port_security_enabled"] is True
    assert net["tenant_id"] == net["project_id"] and net["revision_number"] == 0
    assert net["created_at"].endswith("Z") and "provider:network_type" not in net
    other = await make_network(client, demo_token)
    a = (await client.get(f"{N}/networks/{net['id']}", headers=h(admin_token))).json()["network"]
    b = (await client.get(f"{N}/networks/{other['id']}", headers=h(admin_token))).json()["network"]
    assert a["provider:network_type"] == "vxlan" and a["provider:physical_network"] is None
    assert a["provider:segmentation_id"] >= 1
    assert a["provider:segmentation_id"] != b["provider:segmentation_id"]

    r = await client.put(f"{N}/networks/{net['id']}", json={"network": {"name": "renamed"}},
                         headers=h(demo_token))
    assert r.status_code == 200 and r.json()["network"]["name"] == "renamed"
    assert r.json()["network"]["revision_number"] == 1
    r = await client.delete(f"{N}/networks/{net['id']}", headers=h(demo_token))
    assert r.status_code == 204
    r = await client.get(f"{N}/networks/{net['id']}", headers=h(demo_token))
    neutron_error(r, 404, "NetworkNotFound")


async def test_vni_reuses_lowest_free(client: httpx.AsyncClient, admin_token: str) -> None:
    nets = [await make_network(client, admin_token) for _ in range(3)]
    vnis = [n["provider:segmentation_id"] for n in nets]
    assert len(set(vnis)) == 3
    await client.delete(f"{N}/networks/{nets[0]['id']}", headers=h(admin_token))
    again = await make_network(client, admin_token)
    assert again["provider:segmentation_id"] == min(vnis)


@pytest.mark.both_databases
async def test_concurrent_network_creates_get_distinct_vnis(client: httpx.AsyncClient,
                                                            admin_token: str) -> None:
    results = await asyncio.gather(*(make_network(client, admin_token) for _ in range(8)))
    assert len({n["provider:segmentation_id"] for n in results}) == 8


async def test_provider_attributes_admin_only(client: httpx.AsyncClient, admin_token: str,
                                              demo_token: str) -> None:
    for attrs in ({"provider:network_type": "vxlan"}, {"shared": True}, {"router:external": True}):
        r = await client.post(f"{N}/networks", json={"network": attrs}, headers=h(demo_token))
        neutron_error(r, 403)
    flat = await make_network(client, admin_token, **{"provider:network_type": "flat",
                                                      "provider:physical_network": "public",
                                                      "router:external": True})
    assert flat["mtu"] == 1500 and flat["provider:segmentation_id"] is None
    r = await client.post(f"{N}/networks", json={"network": {"provider:network_type": "flat",
                                                             "provider:physical_network": "public"}},
                          headers=h(admin_token))
    neutron_error(r, 409, "FlatNetworkInUse")
    vlan = await make_network(client, admin_token, **{"provider:network_type": "vlan",
                                                      "provider:physical_network": "public",
                                                      "provider:segmentation_id": 100})
    assert vlan["provider:segmentation_id"] == 100
    vx = await make_network(client, admin_token, **{"provider:segmentation_id": 4242})
    r = await client.post(f"{N}/networks", json={"network": {"provider:segmentation_id": 4242}},
                          headers=h(admin_token))
    neutron_error(r, 409, "TunnelIdInUse")
    # the member sees the external network, without provider fields
    seen = (await client.get(f"{N}/networks/{flat['id']}", headers=h(demo_token))).json()["network"]
    assert "provider:network_type" not in seen and seen["router:external"] is True
    neutron_error(await client.get(f"{N}/networks/{vx['id']}", headers=h(demo_token)), 404, "NetworkNotFound")


async def test_isolation_and_shared(client: httpx.AsyncClient, admin_token: str, demo_token: str) -> None:
    private = await make_network(client, admin_token, name="private")
    shared = await make_network(client, admin_token, name="shared", shared=True)
    neutron_error(await client.get(f"{N}/networks/{private['id']}", headers=h(demo_token)), 404)
    ids = {n["id"] for n in (await client.get(f"{N}/networks", headers=h(demo_token))).json()["networks"]}
    assert shared["id"] in ids and private["id"] not in ids
    neutron_error(await make_port(client, demo_token, private["id"]), 404, "NetworkNotFound")
    # a member may use a shared network but not change it
    await make_subnet(client, admin_token, shared["id"], "192.168.50.0/24")
    r = await make_port(client, demo_token, shared["id"])
    assert r.status_code == 201, r.text
    r = await client.put(f"{N}/networks/{shared['id']}", json={"network": {"name": "x"}},
                         headers=h(demo_token))
    neutron_error(r, 403)
    neutron_error(await client.delete(f"{N}/networks/{shared['id']}", headers=h(demo_token)), 403)
    r = await client.put(f"{N}/networks/{shared['id']}", json={"network": {"shared": False}},
                         headers=h(admin_token))
    neutron_error(r, 409, "InvalidSharedSetting")
    # admin sees all, filters by project
    r = await client.get(f"{N}/networks", params={"project_id": private["project_id"]},
                         headers=h(admin_token))
    assert {n["project_id"] for n in r.json()["networks"]} == {private["project_id"]}


async def test_name_lookup_malformed_json_and_unknown_attr(client: httpx.AsyncClient,
                                                           demo_token: str) -> None:
    neutron_error(await client.get(f"{N}/networks/demo-net", headers=h(demo_token)), 404, "NetworkNotFound")
    neutron_error(await client.get(f"{N}/subnets/nope", headers=h(demo_token)), 404, "SubnetNotFound")
    neutron_error(await client.get(f"{N}/ports/nope", headers=h(demo_token)), 404, "PortNotFound")
    r = await client.post(f"{N}/networks", content=b"{not json", headers=h(demo_token))
    neutron_error(r, 400)
    neutron_error(await client.post(f"{N}/networks", json={"net": {}}, headers=h(demo_token)), 400)
    r = await client.post(f"{N}/networks", json={"network": {"bogus": 1}}, headers=h(demo_token))
    neutron_error(r, 400)
    neutron_error(await client.get(f"{N}/networks"), 401)


async def test_subnet_shape_and_dhcp_port(client: httpx.AsyncClient, demo_token: str) -> None:
    net = await make_network(client, demo_token)
    sub = await make_subnet(client, demo_token, net["id"], "10.1.0.0/24", dns_nameservers=["8.8.8.8"])
    assert sub["gateway_ip"] == "10.1.0.1"
    assert sub["allocation_pools"] == [{"start": "10.1.0.2", "end": "10.1.0.254"}]
    for key in ("dns_nameservers", "host_routes", "tags", "service_types", "allocation_pools"):
        assert isinstance(sub[key], list)
    assert sub["subnetpool_id"] is None and sub["enable_dhcp"] is True and sub["ipv6_ra_mode"] is None
    r = await client.get(f"{N}/ports", params={"network_id": net["id"], "device_owner": "network:dhcp"},
                         headers=h(demo_token))
    [dhcp] = r.json()["ports"]
    assert dhcp["device_id"] == f"dhcp{net['id']}" and dhcp["project_id"] == net["project_id"]
    assert dhcp["fixed_ips"] == [{"subnet_id": sub["id"], "ip_address": "10.1.0.2"}]
    got = (await client.get(f"{N}/networks/{net['id']}", headers=h(demo_token))).json()["network"]
    assert got["subnets"] == [sub["id"]]
    # a second DHCP subnet extends the same port; a non-DHCP one does not
    sub2 = await make_subnet(client, demo_token, net["id"], "10.2.0.0/24")
    await make_subnet(client, demo_token, net["id"], "10.3.0.0/24", enable_dhcp=False)
    [dhcp] = (await client.get(f"{N}/ports", params={"device_owner": "network:dhcp", "network_id": net["id"]},
                               headers=h(demo_token))).json()["ports"]
    assert {ip["subnet_id"] for ip in dhcp["fixed_ips"]} == {sub["id"], sub2["id"]}
    # deleting a subnet shrinks the port; disabling DHCP on the last one removes it
    assert (await client.delete(f"{N}/subnets/{sub2['id']}", headers=h(demo_token))).status_code == 204
    r = await client.put(f"{N}/subnets/{sub['id']}", json={"subnet": {"enable_dhcp": False}},
                         headers=h(demo_token))
    assert r.status_code == 200 and r.json()["subnet"]["enable_dhcp"] is False
    r = await client.get(f"{N}/ports", params={"network_id": net["id"]}, headers=h(demo_token))
    assert r.json()["ports"] == []
    r = await client.put(f"{N}/subnets/{sub['id']}", json={"subnet": {"cidr": "10.9.0.0/24"}},
                         headers=h(demo_token))
    neutron_error(r, 400)


async def test_cidr_validation(client: httpx.AsyncClient, admin_token: str, demo_token: str) -> None:
    net = await make_network(client, demo_token)

    async def bad(status: int, **attrs: Any) -> dict[str, Any]:
        body = {"subnet": {"network_id": net["id"], "ip_version": 4, **attrs}}
        return neutron_error(await client.post(f"{N}/subnets", json=body, headers=h(demo_token)), status)

    err = await bad(400, cidr="10.0.0.5/24")
    assert "10.0.0.0/24 is recommended" in err["message"]
    await bad(400, cidr="not-a-cidr")
    await bad(400, cidr="10.0.0.0/31")
    await bad(400, cidr="fd00::/64")
    await bad(400, cidr="10.0.0.0/24", gateway_ip="10.0.1.1")
    await bad(400, cidr="10.0.0.0/24", gateway_ip="10.0.0.255")
    await bad(400, cidr="10.0.0.0/24", allocation_pools=[{"start": "10.0.0.10", "end": "10.0.1.5"}])
    await bad(400, cidr="10.0.0.0/24", allocation_pools=[{"start": "10.0.0.10", "end": "10.0.0.20"},
                                                         {"start": "10.0.0.15", "end": "10.0.0.30"}])
    await bad(409, cidr="10.0.0.0/24", allocation_pools=[{"start": "10.0.0.1", "end": "10.0.0.20"}])
    await bad(400, cidr="10.0.0.0/24", dns_nameservers=["8.8.8.8", "8.8.8.8"])
    await bad(400, cidr="10.0.0.0/24", dns_nameservers=["nope"])
    await bad(400, cidr="10.0.0.0/24", subnetpool_id="abc")
    await bad(400, cidr="10.0.0.0/24", ipv6_address_mode="slaac")
    await make_subnet(client, demo_token, net["id"], "10.0.0.0/24")
    await bad(400, cidr="10.0.0.128/25")
    # the same CIDR on another network (even another project's) is fine
    other = await make_network(client, admin_token)
    await make_subnet(client, admin_token, other["id"], "10.0.0.0/24")
    # gateway null, custom pool, host routes
    net3 = await make_network(client, demo_token)
    sub = await make_subnet(client, demo_token, net3["id"], "172.16.0.0/24", gateway_ip=None,
                            allocation_pools=[{"start": "172.16.0.100", "end": "172.16.0.110"}],
                            host_routes=[{"destination": "0.0.0.0/0", "nexthop": "172.16.0.254"}])
    assert sub["gateway_ip"] is None and sub["allocation_pools"][0]["start"] == "172.16.0.100"


async def test_ipv6_subnet_slaac(client: httpx.AsyncClient, demo_token: str) -> None:
    net = await make_network(client, demo_token)
    body = {"subnet": {"network_id": net["id"], "cidr": "fd00:1::/64", "ip_version": 6,
                       "ipv6_ra_mode": "slaac", "ipv6_address_mode": "slaac"}}
    r = await client.post(f"{N}/subnets", json=body, headers=h(demo_token))
    assert r.status_code == 201, r.text
    sub = r.json()["subnet"]
    assert sub["gateway_ip"] == "fd00:1::1"
    port = (await make_port(client, demo_token, net["id"], mac_address="fa:16:3e:00:00:01")).json()["port"]
    assert port["fixed_ips"] == [{"subnet_id": sub["id"], "ip_address": "fd00:1::f816:3eff:fe00:1"}]
    body["subnet"] |= {"cidr": "fd00:2::/64", "ipv6_ra_mode": "slaac", "ipv6_address_mode": "dhcpv6-stateful"}
    neutron_error(await client.post(f"{N}/subnets", json=body, headers=h(demo_token)), 400)


@pytest.mark.both_databases
async def test_port_crud_and_fixed_ips(client: httpx.AsyncClient, admin_token: str, demo_token: str) -> None:
    net = await make_network(client, demo_token)
    sub = await make_subnet(client, demo_token, net["id"], "10.5.0.0/24")
    r = await make_port(client, demo_token, net["id"], name="p1", device_id="vm1",
                        device_owner="compute:nova")
    assert r.status_code == 201, r.text
    port = r.json()["port"]
    assert port["mac_address"].startswith("fa:16:3e:")
    assert port["fixed_ips"] == [{"subnet_id": sub["id"], "ip_address": "10.5.0.3"}]
    for key in ("allowed_address_pairs", "tags", "extra_dhcp_opts"):
        assert port[key] == []
    assert len(port["security_groups"]) == 1  # the project's default group
    assert port["status"] == "DOWN" and port["binding:vnic_type"] == "normal"
    assert "binding:host_id" not in port
    admin_view = (await client.get(f"{N}/ports/{port['id']}", headers=h(admin_token))).json()["port"]
    assert admin_view["binding:vif_type"] == "unbound" and admin_view["binding:profile"] == {}

    fixed = {"fixed_ips": [{"subnet_id": sub["id"], "ip_address": "10.5.0.50"}]}
    r = await make_port(client, demo_token, net["id"], **fixed)
    assert r.json()["port"]["fixed_ips"][0]["ip_address"] == "10.5.0.50"
    neutron_error(await make_port(client, demo_token, net["id"], **fixed), 409, "IpAddressAlreadyAllocated")
    neutron_error(await make_port(client, demo_token, net["id"],
                                  fixed_ips=[{"subnet_id": sub["id"], "ip_address": "10.6.0.5"}]),
                  400, "InvalidIpForSubnet")
    neutron_error(await make_port(client, demo_token, net["id"], fixed_ips=[{"ip_address": "10.6.0.5"}]),
                  400, "InvalidIpForNetwork")
    neutron_error(await make_port(client, demo_token, net["id"], mac_address=port["mac_address"]),
                  409, "MacAddressInUse")
    other = await make_network(client, demo_token)
    other_sub = await make_subnet(client, demo_token, other["id"], "10.7.0.0/24")
    neutron_error(await make_port(client, demo_token, net["id"], fixed_ips=[{"subnet_id": other_sub["id"]}]),
                  400)
    neutron_error(await make_port(client, demo_token, net["id"], **{"binding:host_id": "h1"}), 403)

    # update: change the address, name; the old address is released
    r = await client.put(f"{N}/ports/{port['id']}", json={"port": {
        "name": "p2", "fixed_ips": [{"subnet_id": sub["id"], "ip_address": "10.5.0.77"}]}},
        headers=h(demo_token))
    assert r.status_code == 200, r.text
    assert r.json()["port"]["fixed_ips"][0]["ip_address"] == "10.5.0.77" and r.json()["port"]["name"] == "p2"
    r = await make_port(client, demo_token, net["id"], fixed_ips=[{"ip_address": "10.5.0.3"}])
    assert r.status_code == 201
    r = await client.put(f"{N}/ports/{port['id']}", json={"port": {"network_id": other["id"]}},
                         headers=h(demo_token))
    neutron_error(r, 400)

    # filters as openstacksdk sends them
    r = await client.get(f"{N}/ports", params=[("fixed_ips", "ip_address=10.5.0.77")], headers=h(demo_token))
    assert [p["id"] for p in r.json()["ports"]] == [port["id"]]
    r = await client.get(f"{N}/ports", params=[("fixed_ips", f"subnet_id={sub['id']}"), ("device_id", "vm1")],
                         headers=h(demo_token))
    assert [p["id"] for p in r.json()["ports"]] == [port["id"]]
    r = await client.get(f"{N}/ports", params={"mac_address": port["mac_address"]}, headers=h(demo_token))
    assert len(r.json()["ports"]) == 1
    # the admin's view of demo's port list does not leak into demo's
    assert (await client.delete(f"{N}/ports/{port['id']}", headers=h(demo_token))).status_code == 204
    neutron_error(await client.get(f"{N}/ports/{port['id']}", headers=h(demo_token)), 404, "PortNotFound")


@pytest.mark.both_databases
async def test_pool_exhaustion(client: httpx.AsyncClient, demo_token: str) -> None:
    net = await make_network(client, demo_token)
    await make_subnet(client, demo_token, net["id"], "10.8.0.0/29",
                      allocation_pools=[{"start": "10.8.0.2", "end": "10.8.0.4"}])
    # DHCP took .2; two more fit
    ips = [(await make_port(client, demo_token, net["id"])).json()["port"]["fixed_ips"][0]["ip_address"]
           for _ in range(2)]
    assert ips == ["10.8.0.3", "10.8.0.4"]
    neutron_error(await make_port(client, demo_token, net["id"]), 409, "IpAddressGenerationFailure")
    # an explicit address outside the pool but inside the subnet still works
    r = await make_port(client, demo_token, net["id"], fixed_ips=[{"ip_address": "10.8.0.6"}])
    assert r.status_code == 201, r.text
    neutron_error(await make_port(client, demo_token, net["id"], fixed_ips=[{"ip_address": "10.8.0.7"}]),
                  400, "InvalidIpForSubnet")
    neutron_error(await make_port(client, demo_token, net["id"], fixed_ips=[{"ip_address": "10.8.0.1"}]),
                  409, "IpAddressAlreadyAllocated")


async def test_delete_in_use(client: httpx.AsyncClient, app: Any, demo_token: str) -> None:
    net = await make_network(client, demo_token)
    sub = await make_subnet(client, demo_token, net["id"], "10.9.0.0/24")
    port = (await make_port(client, demo_token, net["id"])).json()["port"]
    r = await client.delete(f"{N}/networks/{net['id']}", headers=h(demo_token))
    neutron_error(r, 409, "NetworkInUse")
    neutron_error(await client.delete(f"{N}/subnets/{sub['id']}", headers=h(demo_token)), 409, "SubnetInUse")
    r = await client.get(f"{N}/ports", params={"network_id": net["id"]}, headers=h(demo_token))
    assert len(r.json()["ports"]) == 2  # nothing changed: the port and the DHCP port
    assert (await client.get(f"{N}/subnets/{sub['id']}", headers=h(demo_token))).status_code == 200
    assert (await client.delete(f"{N}/ports/{port['id']}", headers=h(demo_token))).status_code == 204
    assert (await client.delete(f"{N}/networks/{net['id']}", headers=h(demo_token))).status_code == 204
    async with app.state.sessionmaker() as session:
        for model in (Subnet, Port, IpAllocation):
            count = await session.scalar(select(func.count()).select_from(model)
                                         .where(model.network_id == net["id"]))
            assert count == 0


@pytest.mark.both_databases
async def test_pagination_sorting_fields(client: httpx.AsyncClient, demo_token: str) -> None:
    created = [await make_network(client, demo_token, name=f"page-{i}") for i in range(5)]
    seen: list[str] = []
    url: str | None = f"{N}/networks?limit=2&name=page-0&name=page-1&name=page-2&name=page-3&name=page-4"
    pages = 0
    while url:
        r = await client.get(url, headers=h(demo_token))
        body = r.json()
        seen += [n["id"] for n in body["networks"]]
        links = body.get("networks_links", [])
        url = next((link["href"] for link in links if link["rel"] == "next"), None)
        pages += 1
    assert sorted(seen) == sorted(n["id"] for n in created) and len(seen) == 5 and pages == 3
    r = await client.get(f"{N}/networks", params=[("sort_key", "name"), ("sort_dir", "desc"),
                                                  ("fields", "id"), ("fields", "name"), ("limit", "3")],
                         headers=h(demo_token))
    body = r.json()
    assert [n["name"] for n in body["networks"]] == ["page-4", "page-3", "page-2"]
    assert all(set(n) == {"id", "name"} for n in body["networks"])
    r = await client.get(body["networks_links"][0]["href"], headers=h(demo_token))
    assert [n["name"] for n in r.json()["networks"]] == ["page-1", "page-0"]
    r = await client.get(f"{N}/networks/{created[0]['id']}", params=[("fields", "name")],
                         headers=h(demo_token))
    assert r.json() == {"network": {"name": "page-0"}}
    neutron_error(await client.get(f"{N}/networks", params={"sort_key": "bogus"}, headers=h(demo_token)), 400)
    neutron_error(await client.get(f"{N}/networks", params={"limit": "x"}, headers=h(demo_token)), 400)


async def test_bootstrap_demo_network_idempotent(app: Any) -> None:
    first = await bootstrap_demo_network(app.state.sessionmaker, "p-demo")
    second = await bootstrap_demo_network(app.state.sessionmaker, "p-demo")
    assert first == second
    async with app.state.sessionmaker() as session:
        nets = list(await session.scalars(select(Network).where(Network.name == "demo-net")))
        assert len(nets) == 1
        [subnet] = list(await session.scalars(select(Subnet).where(Subnet.network_id == first)))
        assert subnet.cidr == "10.0.0.0/24" and subnet.gateway_ip == "10.0.0.1"
        assert subnet.dns_nameservers == [] and subnet.enable_dhcp
        ips = await session.scalars(select(IpAllocation.ip_address).where(IpAllocation.network_id == first))
        assert list(ips) == ["10.0.0.2"]


@pytest.mark.both_databases
async def test_ipam_concurrent_allocations(app: Any) -> None:
    maker = app.state.sessionmaker
    async with maker() as session:
        net = Network(name="busy", project_id="p1", segmentation_id=777)
        session.add(net)
        await session.flush()
        session.add(Subnet(network_id=net.id, project_id="p1", cidr="10.20.0.0/24", gateway_ip="10.20.0.1",
                           allocation_pools=[{"start": "10.20.0.2", "end": "10.20.0.254"}]))
        await session.commit()

    async def one(i: int) -> str:
        async with maker() as session:
            network = await session.get(Network, net.id)
            assert network is not None
            port = await ipam.create_port(session, network=network, project_id="p1", device_id=f"vm{i}",
                                          device_owner="compute:nova")
            await session.commit()
            return port.id

    port_ids = await asyncio.gather(*(one(i) for i in range(20)))
    async with maker() as session:
        ips = await ipam.port_fixed_ips(session, list(port_ids))
    addresses = [entries[0]["ip_address"] for entries in ips.values()]
    assert len(set(addresses)) == 20

    async with maker() as session:
        await ipam.delete_ports_of_device(session, "vm0")
        await session.commit()
        left = await session.scalar(select(func.count()).select_from(Port).where(Port.device_id == "vm0"))
        assert left == 0


@pytest.mark.both_databases
async def test_ipam_retries_after_stale_read(app: Any) -> None:
    """An address taken after we read the table (a concurrent writer) is skipped, not an error."""
    maker = app.state.sessionmaker
    async with maker() as session:
        net = Network(name="stale", project_id="p1", segmentation_id=778)
        session.add(net)
        await session.flush()
        subnet = Subnet(network_id=net.id, project_id="p1", cidr="10.21.0.0/29", gateway_ip="10.21.0.1",
                        allocation_pools=[{"start": "10.21.0.2", "end": "10.21.0.3"}])
        session.add(subnet)
        first = await ipam.create_port(session, network=net, project_id="p1", fixed_ips=[])
        assert await ipam._try_insert(session, first, subnet, "10.21.0.2")
        assert not await ipam._try_insert(session, first, subnet, "10.21.0.2")
        second = await ipam.create_port(session, network=net, project_id="p1")
        await session.commit()
        assert (await ipam.port_fixed_ips(session, [second.id]))[second.id][0]["ip_address"] == "10.21.0.3"
        with pytest.raises(ApiError) as exc:
            await ipam.create_port(session, network=net, project_id="p1")
        assert exc.value.kind == "IpAddressGenerationFailure"


def test_first_free_is_fast_for_big_pools() -> None:
    start = 10 << 24
    used = set(range(start + 1, start + 60000))
    assert ipam.first_free([(start + 1, start + 65534)], used) == start + 60000
    assert ipam.first_free([(1, 3)], {1, 2, 3}) is None


async def test_tags(client: httpx.AsyncClient, demo_token: str) -> None:
    net = await make_network(client, demo_token)
    other = await make_network(client, demo_token)
    base = f"{N}/networks/{net['id']}/tags"
    r = await client.put(base, json={"tags": ["red", "blue"]}, headers=h(demo_token))
    assert r.status_code == 200 and r.json() == {"tags": ["blue", "red"]}
    assert (await client.put(f"{base}/green", headers=h(demo_token))).status_code == 201
    assert (await client.get(f"{base}/green", headers=h(demo_token))).status_code == 204
    neutron_error(await client.get(f"{base}/nope", headers=h(demo_token)), 404, "TagNotFound")
    r = await client.get(f"{N}/networks", params={"tags": "red,green"}, headers=h(demo_token))
    assert [n["id"] for n in r.json()["networks"]] == [net["id"]]
    r = await client.get(f"{N}/networks", params={"not-tags-any": "red"}, headers=h(demo_token))
    assert other["id"] in [n["id"] for n in r.json()["networks"]]
    assert net["id"] not in [n["id"] for n in r.json()["networks"]]
    assert (await client.delete(f"{base}/red", headers=h(demo_token))).status_code == 204
    got = (await client.get(f"{N}/networks/{net['id']}", headers=h(demo_token))).json()["network"]
    assert got["tags"] == ["blue", "green"]
    assert (await client.delete(base, headers=h(demo_token))).status_code == 204
    assert (await client.get(base, headers=h(demo_token))).json() == {"tags": []}


@pytest.mark.both_databases
async def test_quota_exceeded_is_409(app: Any) -> None:
    from cloudland.api.network.quotas import check_quota

    async with app.state.sessionmaker() as session:
        await check_quota(session, "network", "p-quota")
        with pytest.raises(ApiError) as exc:
            await check_quota(session, "network", "p-quota", adding=101)
        assert exc.value.status == 409 and exc.value.kind == "OverQuota"
