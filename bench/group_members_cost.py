"""Remote-group member questions: the direct queries (``controller/secgroups.py``) against the
controller's in-memory index (``controller/group_members.py``), on a throwaway PostgreSQL.

Seeds ``--projects`` projects of ``--ports`` ports each (50 per network, all in the project's
``default`` group, which admits its own members, bound to random hosts), then times each
question per call (wall and CPU milliseconds, warm), the index's refresh of 500 claimed
servers' ports (what a scheduling pass costs it) and its first read of every project.

    .venv/bin/python bench/group_members_cost.py --projects 20 --ports 2500
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.controller import secgroups
from cloudland.controller.group_members import GroupMemberIndex
from cloudland.db.engine import make_engine, make_sessionmaker
from cloudland.db.local_postgres import LocalPostgres
from cloudland.db.migrate import upgrade_async
from cloudland.db.models import IpAllocation, Network, Port, SecurityGroup, SecurityGroupRule, Subnet


async def seed(session: AsyncSession, projects: int, ports: int) -> tuple[list[str], list[str], list[str]]:
    """(group ids, one network per project and a second of the first, all device ids)."""
    groups, nets, devices = [], [], []
    for p in range(projects):
        project, group = f"project{p}", str(uuid.uuid4())
        groups.append(group)
        await session.execute(insert(SecurityGroup.__table__),
                              [{"id": group, "project_id": project, "name": "default"}])
        await session.execute(insert(SecurityGroupRule.__table__), [
            {"id": str(uuid.uuid4()), "security_group_id": group, "project_id": project,
             "direction": "ingress", "ethertype": ethertype, "remote_group_id": group}
            for ethertype in ("IPv4", "IPv6")])
        for k in range(ports // 50):
            net, subnet = str(uuid.uuid4()), str(uuid.uuid4())
            if k == 0 or (p == 0 and k == 1):
                nets.append(net)
            await session.execute(insert(Network.__table__), [
                {"id": net, "project_id": project, "name": "n", "segmentation_id": p * 1000 + k}])
            await session.execute(insert(Subnet.__table__), [
                {"id": subnet, "network_id": net, "project_id": project, "cidr": f"10.{k % 256}.0.0/24",
                 "gateway_ip": f"10.{k % 256}.0.1"}])
            rows, addresses = [], []
            for i in range(50):
                port, device = str(uuid.uuid4()), str(uuid.uuid4())
                devices.append(device)
                rows.append({"id": port, "network_id": net, "project_id": project,
                             "mac_address": f"fa:16:3e:{p % 256:02x}:{k % 256:02x}:{i:02x}",
                             "device_id": device, "device_owner": "compute:nova",
                             "binding_host_id": f"hv{random.randrange(2000)}", "security_groups": [group]})
                addresses.append({"subnet_id": subnet, "ip_address": f"10.{k % 256}.0.{i + 2}",
                                  "port_id": port, "network_id": net})
            await session.execute(insert(Port.__table__), rows)
            await session.execute(insert(IpAllocation.__table__), addresses)
    return groups, nets, devices


async def main(args: argparse.Namespace, url: str) -> None:
    await upgrade_async(url)
    engine = make_engine(url)
    sessionmaker = make_sessionmaker(engine)
    async with sessionmaker() as s, s.begin():
        groups, nets, devices = await seed(s, args.projects, args.ports)
    async with sessionmaker() as s, s.begin():
        await s.execute(text("ANALYZE"))
    index = GroupMemberIndex(time.monotonic)

    async def timed(name: str, call: Callable[[AsyncSession], Awaitable[Any]], n: int = 20) -> None:
        async with sessionmaker() as s:
            await call(s)  # warm: statements prepared, projects read
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                await call(s)
            print(f"{name:42s} {(time.perf_counter() - wall) / n * 1e3:8.2f} ms wall "
                  f"{(time.process_time() - cpu) / n * 1e3:8.2f} ms CPU")

    direct = secgroups
    await timed("direct: members of every group", lambda s: direct.members_of_groups(s, groups))
    await timed("direct: networks admitting members", lambda s: direct.networks_admitting_members_of(s, nets))
    await timed("index: members of every group", lambda s: index.remote_groups(s, groups))
    await timed("index: networks admitting members", lambda s: index.networks_admitting_members_of(s, nets))
    claimed = random.sample(devices, 500)

    async def refresh(s: AsyncSession) -> None:
        index.devices_changed(claimed)
        await index.remote_groups(s, groups[:1])

    await timed("index: refresh 500 claimed servers' ports", refresh)
    fresh = GroupMemberIndex(time.monotonic)
    wall = time.perf_counter()
    async with sessionmaker() as s:
        await fresh.remote_groups(s, groups)
    print(f"index: first read of {args.projects} projects: {(time.perf_counter() - wall) * 1e3:.0f} ms")
    await engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--projects", type=int, default=20)
    parser.add_argument("--ports", type=int, default=2500, help="ports per project")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        pg = LocalPostgres(Path(work))
        pg.start()
        try:
            asyncio.run(main(arguments, pg.create_database("bench")))
        finally:
            pg.stop()
