"""Several (simulated) hypervisors: forced hosts, peers fan-out, port status."""

from __future__ import annotations

import httpx
from controller_helpers import V21, Cloud, wait_for  # type: ignore[import-not-found]


async def _create(client: httpx.AsyncClient, token: str, cloud: Cloud, az: str) -> httpx.Response:
    body = {"server": {"name": "vm", "imageRef": cloud.image_id, "flavorRef": "1",
                       "networks": [{"uuid": cloud.network_id}], "availability_zone": az}}
    return await client.post(f"{V21}/servers", json=body, headers={"X-Auth-Token": token})


async def test_forced_hosts_peers_and_port_status(cloud: Cloud, client: httpx.AsyncClient,
                                                  admin_token: str) -> None:
    hv2 = await cloud.start_host("hv2", "192.0.2.20")
    hv3 = await cloud.start_host("hv3", "192.0.2.30")
    agents = {"hv1": cloud.agent, "hv2": hv2, "hv3": hv3}

    await cloud.wait_hosts_up(agents)
    # Only admins force a host; an unknown host is a 400.
    assert (await _create(client, cloud.token, cloud, "nova:hv2")).status_code == 403
    assert (await _create(client, admin_token, cloud, "nova:nope")).status_code == 400
    ids = {}
    for host in ("hv2", "hv3"):
        r = await _create(client, admin_token, cloud, f"nova:{host}")
        assert r.status_code == 202, r.text
        ids[host] = r.json()["server"]["id"]
    admin = {"X-Auth-Token": admin_token}

    async def active() -> bool:
        servers = [(await client.get(f"{V21}/servers/{sid}", headers=admin)).json()["server"]
                   for sid in ids.values()]
        return [(s["status"], s["OS-EXT-SRV-ATTR:host"]) for s in servers] == [("ACTIVE", h) for h in ids]

    await wait_for(active)

    def peers(host: str) -> list[str] | None:
        spec = agents[host].network.networks.get(cloud.network_id)  # type: ignore[union-attr]
        return None if spec is None else spec.peers

    async def meshed() -> bool:
        return peers("hv2") == ["192.0.2.30"] and peers("hv3") == ["192.0.2.20"] and peers("hv1") is None

    await wait_for(meshed, describe=lambda: f"{peers('hv1')} {peers('hv2')} {peers('hv3')}")
    # Neutron: the port of a running guest is ACTIVE.
    r = await client.get(f"/network/v2.0/ports?device_id={ids['hv2']}", headers=admin)
    assert [p["status"] for p in r.json()["ports"]] == ["ACTIVE"]

    # hv3's guest goes: hv2 loses the peer, hv3 the network.
    r = await client.delete(f"{V21}/servers/{ids['hv3']}", headers=admin)
    assert r.status_code == 204

    async def left() -> bool:
        return peers("hv2") == [] and peers("hv3") is None

    await wait_for(left, describe=lambda: f"{peers('hv2')} {peers('hv3')}")
