"""IPAM on big pools: a per-process cursor and windows, not a read of every allocation."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest

from cloudland.api.network import ipam
from cloudland.db.models import Network, Subnet


async def make_subnet(app: Any, cidr: str, start: str, end: str, vni: int) -> Network:
    async with app.state.sessionmaker() as session:
        net = Network(name=f"big-{vni}", project_id="p1", segmentation_id=vni)
        session.add(net)
        await session.flush()
        gateway = str(ipaddress.ip_network(cidr).network_address + 1)
        session.add(Subnet(network_id=net.id, project_id="p1", cidr=cidr, gateway_ip=gateway,
                           allocation_pools=[{"start": start, "end": end}]))
        await session.commit()
        return net


async def create(app: Any, net: Network, device: str) -> str:
    async with app.state.sessionmaker() as session:
        port = await ipam.create_port(session, network=net, project_id="p1", device_id=device,
                                      device_owner="compute:nova")
        await session.commit()
        return (await ipam.port_fixed_ips(session, [port.id]))[port.id][0]["ip_address"]


@pytest.mark.both_databases
async def test_concurrent_allocations_in_a_big_pool(app: Any) -> None:
    net = await make_subnet(app, "10.40.0.0/16", "10.40.0.2", "10.40.255.254", 901)
    addresses = await asyncio.gather(*(create(app, net, f"vm{i}") for i in range(100)))
    assert len(set(addresses)) == 100
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("10.40.0.0/16") for a in addresses)
    assert "10.40.0.1" not in addresses  # the gateway


@pytest.mark.both_databases
async def test_big_pool_wraps_to_released_addresses(app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipam, "SMALL_POOL", 4)
    monkeypatch.setattr(ipam, "WINDOW", 4)
    net = await make_subnet(app, "10.41.0.0/24", "10.41.0.2", "10.41.0.11", 902)  # 10 addresses
    got = [await create(app, net, f"vm{i}") for i in range(10)]
    assert sorted(got, key=ipaddress.ip_address) == [f"10.41.0.{i}" for i in range(2, 12)]
    with pytest.raises(Exception) as exc:
        await create(app, net, "vm-extra")
    assert getattr(exc.value, "kind", "") == "IpAddressGenerationFailure"
    async with app.state.sessionmaker() as session:
        await ipam.delete_ports_of_device(session, "vm3")
        await session.commit()
    assert await create(app, net, "vm-again") == got[3]
