"""Several (simulated) hypervisors: forced hosts, peers fan-out, port status."""

from __future__ import annotations

import httpx
from controller_helpers import V21, Cloud, wait_for  # type: ignore[import-not-found]
from sqlalchemy import select

from cloudland.bus import subjects
from cloudland.bus.messages import GetSet, NetworkPeers, SetVersion, decode, encode
from cloudland.db.models import Host


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
    # The hosts come to hold the list at its published version: from the message after their
    # spec or, when they subscribed after it went out, from the next mark of the set (made
    # frequent here), on which they ask a controller for the set whole.
    assert cloud.controller.reconciler is not None
    cloud.controller.reconciler.peer_sets.refresh_seconds = 0.5
    published = cloud.controller.reconciler.peer_sets.version(cloud.network_id)
    assert published is not None and published[0] == ["192.0.2.20", "192.0.2.30"]

    def versions() -> list[SetVersion | None]:
        return [agents[h].network.networks[cloud.network_id].peers_version for h in ("hv2", "hv3")]  # type: ignore[union-attr]

    async def at_published() -> bool:
        return versions() == [published[1], published[1]]

    await wait_for(at_published, describe=lambda: f"{versions()} {published}")
    nc = cloud.agent.nc
    assert nc is not None
    reply = await nc.request(subjects.CONTROLLER_SETS, encode(GetSet(set_kind="peers", key=cloud.network_id)))
    assert decode(reply.data) == NetworkPeers(network_id=cloud.network_id, addresses=published[0],
                                              epoch=published[1].epoch, seq=published[1].seq)
    unknown = GetSet(set_kind="members", key="no-such-group")
    reply = await nc.request(subjects.CONTROLLER_SETS, encode(unknown))
    assert reply.data == b""
    # Neutron: the port of a running guest is ACTIVE.
    r = await client.get(f"/network/v2.0/ports?device_id={ids['hv2']}", headers=admin)
    assert [p["status"] for p in r.json()["ports"]] == ["ACTIVE"]

    # hv3's guest goes: hv2 loses the peer, hv3 the network.
    r = await client.delete(f"{V21}/servers/{ids['hv3']}", headers=admin)
    assert r.status_code == 204

    async def left() -> bool:
        return peers("hv2") == [] and peers("hv3") is None

    await wait_for(left, describe=lambda: f"{peers('hv2')} {peers('hv3')}")


async def test_a_server_deleted_while_its_host_was_down_leaves_the_network(
        cloud: Cloud, client: httpx.AsyncClient, admin_token: str) -> None:
    """The API deletes such a server itself (its ports go without the controller): when the host
    comes back it is nobody's peer on that network, however the network changes afterwards."""
    hv2 = await cloud.start_host("hv2", "192.0.2.20")
    hv3 = await cloud.start_host("hv3", "192.0.2.30")
    await cloud.wait_hosts_up({"hv1", "hv2", "hv3"})
    admin = {"X-Auth-Token": admin_token}
    ids = {}
    for host in ("hv2", "hv3"):
        r = await _create(client, admin_token, cloud, f"nova:{host}")
        assert r.status_code == 202, r.text
        ids[host] = r.json()["server"]["id"]

    async def wait_active(sid: str) -> None:
        async def active() -> bool:
            r = await client.get(f"{V21}/servers/{sid}", headers=admin)
            return r.status_code == 200 and r.json()["server"]["status"] == "ACTIVE"

        await wait_for(active)

    for sid in ids.values():
        await wait_active(sid)

    def peers(agent: object) -> list[str] | None:
        spec = agent.network.networks.get(cloud.network_id)  # type: ignore[attr-defined]
        return None if spec is None else spec.peers

    async def meshed() -> bool:
        return peers(hv2) == ["192.0.2.30"]

    await wait_for(meshed, describe=lambda: f"{peers(hv2)}")

    await hv3.stop()

    async def hv3_down() -> bool:
        async with cloud.app.state.sessionmaker() as s:
            return await s.scalar(select(Host.status).where(Host.id == "hv3")) == "down"

    await wait_for(hv3_down)
    assert (await client.delete(f"{V21}/servers/{ids['hv3']}", headers=admin)).status_code == 204
    hv3 = await cloud.start_host("hv3", "192.0.2.30")
    await cloud.wait_hosts_up({"hv3"})
    # The network changes (a new server on hv2): its members are worked out again.
    r = await _create(client, admin_token, cloud, "nova:hv2")
    assert r.status_code == 202, r.text
    await wait_active(r.json()["server"]["id"])
    await cloud.wait_passes(3)
    assert peers(hv2) == []
    assert peers(hv3) is None
