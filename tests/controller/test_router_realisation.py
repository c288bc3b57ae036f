"""Distributed routers in the specs the controller sends (simulated hypervisors, real API, NATS
and database): which hosts realise a router, their gateway ports, neighbours, floating IPs."""

from __future__ import annotations

from typing import Any

import httpx
from controller_helpers import V21, Cloud, wait_for  # type: ignore[import-not-found]
from sqlalchemy import select

from cloudland.bus.messages import RouterSpec
from cloudland.db.models import Port

N = "/network/v2.0"


async def _post(client: httpx.AsyncClient, token: str, path: str, key: str, body: dict[str, Any]) -> Any:
    r = await client.post(path, json={key: body}, headers={"X-Auth-Token": token})
    assert r.status_code in (201, 202), r.text
    return r.json()[key]


async def test_router_realised_on_the_hosts_of_its_networks(cloud: Cloud, client: httpx.AsyncClient,
                                                            admin_token: str) -> None:
    admin = {"X-Auth-Token": admin_token}
    agents = {"hv2": await cloud.start_host("hv2", "192.0.2.20"),
              "hv3": await cloud.start_host("hv3", "192.0.2.30")}

    await cloud.wait_hosts_up(agents)
    public = await _post(client, admin_token, f"{N}/networks", "network",
                         {"name": "public", "router:external": True, "provider:network_type": "flat",
                          "provider:physical_network": "public"})
    await _post(client, admin_token, f"{N}/subnets", "subnet",
                {"network_id": public["id"], "cidr": "203.0.113.0/24", "ip_version": 4, "enable_dhcp": False})
    nets, subnets = [], []
    for k in (1, 2):
        net = await _post(client, admin_token, f"{N}/networks", "network", {"name": f"n{k}"})
        sub = await _post(client, admin_token, f"{N}/subnets", "subnet",
                          {"network_id": net["id"], "cidr": f"10.60.{k}.0/24", "ip_version": 4})
        nets.append(net["id"])
        subnets.append(sub["id"])
    router = await _post(client, admin_token, f"{N}/routers", "router",
                         {"name": "r", "external_gateway_info": {"network_id": public["id"]}})
    for sub in subnets:
        r = await client.put(f"{N}/routers/{router['id']}/add_router_interface", json={"subnet_id": sub},
                             headers=admin)
        assert r.status_code == 200, r.text
    servers = {}
    for host, net in (("hv2", nets[0]), ("hv3", nets[1])):
        servers[host] = (await _post(client, admin_token, f"{V21}/servers", "server", {
            "name": host, "imageRef": cloud.image_id, "flavorRef": "1", "networks": [{"uuid": net}],
            "availability_zone": f"nova:{host}"}))["id"]

    def routers(host: str, net: str) -> list[RouterSpec]:
        spec = agents[host].network.networks.get(net)  # type: ignore[union-attr]
        return [] if spec is None else spec.routers

    # Each host realises the router with both interfaces (it carries the other network too),
    # with its own gateway address, and neighbours for the other host's guest.
    async def realised() -> bool:
        return all(len(routers(h, n)) == 1 and routers(h, n)[0].gateway is not None
                   for h in agents for n in nets)

    await wait_for(realised, describe=lambda: f"{[(h, n, routers(h, n)) for h in agents for n in nets]}")
    gw = {h: routers(h, nets[0])[0].gateway for h in agents}
    assert gw["hv2"] is not None and gw["hv3"] is not None
    assert gw["hv2"].addresses != gw["hv3"].addresses and gw["hv2"].gateway_ips == ["203.0.113.1"]
    assert routers("hv2", nets[0])[0].host_mac != routers("hv3", nets[0])[0].host_mac
    vm3 = (await client.get(f"{N}/ports?device_id={servers['hv3']}", headers=admin)).json()["ports"][0]
    assert vm3["fixed_ips"][0]["ip_address"] in {n.ip for n in routers("hv2", nets[1])[0].neighbors}
    # Both hosts carry the external network (their gateway ports) and peer on n1 and n2.
    async def carry_public() -> bool:
        return all(public["id"] in agents[h].network.networks for h in agents)  # type: ignore[union-attr]

    await wait_for(carry_public)
    assert agents["hv2"].network.networks[nets[1]].peers == ["192.0.2.30"]  # type: ignore[union-attr]
    r = await client.get(f"{N}/routers/{router['id']}", headers=admin)
    assert len(r.json()["router"]["external_gateway_info"]["external_fixed_ips"]) == 2

    # A floating IP lives on the host of its port only.
    fip = await _post(client, admin_token, f"{N}/floatingips", "floatingip",
                      {"floating_network_id": public["id"], "port_id": vm3["id"]})

    async def fip_on_hv3() -> bool:
        on = {h: [f.floating_ip for f in routers(h, nets[1])[0].floating_ips] for h in agents}
        return on == {"hv2": [], "hv3": [fip["floating_ip_address"]]}

    await wait_for(fip_on_hv3)

    # hv2's guest goes: hv2 stops realising the router, its gateway port is released.
    r = await client.delete(f"{V21}/servers/{servers['hv2']}", headers=admin)
    assert r.status_code == 204

    async def released() -> bool:
        async with cloud.app.state.sessionmaker() as s:
            bound = set(await s.scalars(select(Port.binding_host_id).where(
                Port.device_id == router["id"], Port.device_owner == "network:router_gateway")))
        return not agents["hv2"].network.networks and bound <= {"hv3", ""}  # type: ignore[union-attr]

    await wait_for(released, timeout=20, describe=lambda: str(agents["hv2"].network.networks))  # type: ignore[union-attr]
    assert len(routers("hv3", nets[1])) == 1


async def test_remote_group_members_reach_hosts_on_other_networks(cloud: Cloud, client: httpx.AsyncClient,
                                                                  admin_token: str) -> None:
    """The default group admits its members from any of the project's networks."""
    agents = {"hv2": await cloud.start_host("hv2", "192.0.2.20"),
              "hv3": await cloud.start_host("hv3", "192.0.2.30")}

    await cloud.wait_hosts_up(agents)
    nets = []
    for k in (1, 2):
        net = await _post(client, admin_token, f"{N}/networks", "network", {"name": f"g{k}"})
        await _post(client, admin_token, f"{N}/subnets", "subnet",
                    {"network_id": net["id"], "cidr": f"10.61.{k}.0/24", "ip_version": 4})
        nets.append(net["id"])
    ids = {}
    for host, net in (("hv2", nets[0]), ("hv3", nets[1])):
        ids[host] = (await _post(client, admin_token, f"{V21}/servers", "server", {
            "name": host, "imageRef": cloud.image_id, "flavorRef": "1", "networks": [{"uuid": net}],
            "availability_zone": f"nova:{host}"}))["id"]
    admin = {"X-Auth-Token": admin_token}
    ip3 = (await client.get(f"{N}/ports?device_id={ids['hv3']}", headers=admin)).json()["ports"][0]
    ip3 = ip3["fixed_ips"][0]["ip_address"]

    def members_on_hv2() -> set[str]:
        spec = agents["hv2"].network.networks.get(nets[0])  # type: ignore[union-attr]
        return set() if spec is None else {ip for ips in spec.remote_groups.values() for ip in ips}

    async def admitted() -> bool:
        return ip3 in members_on_hv2()

    # hv2 has only g1; the guest on g2 (hv3) is in the same default group, so hv2's rules admit it.
    await wait_for(admitted, describe=lambda: str(members_on_hv2()))
    assert (await client.delete(f"{V21}/servers/{ids['hv3']}", headers=admin)).status_code == 204

    async def gone() -> bool:
        return ip3 not in members_on_hv2()

    await wait_for(gone, describe=lambda: str(members_on_hv2()))
