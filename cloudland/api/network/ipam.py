"""IP address management and port creation, used inside the caller's transaction.

Every function flushes and never commits, so the API routes and other services (servers,
routers) can create and delete ports atomically with their own rows. Uniqueness is enforced
by the database (``ip_allocations`` primary key, ``ports (network_id, mac_address)``):
a concurrent request that takes the address we picked makes our insert skip (``ON CONFLICT
DO NOTHING``; a savepoint on other databases), and we pick the next free address.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections import defaultdict
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.errors import ApiError
from cloudland.db.models import FloatingIp, IpAllocation, Network, Port, Subnet

ROUTER_OWNERS = ("network:router_interface", "network:router_interface_distributed",
                 "network:router_gateway", "network:ha_router_replicated_interface")
AUTO_ADDRESS_MODES = ("slaac", "dhcpv6-stateless")
MAX_ATTEMPTS = 32

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def is_auto_address(subnet: Subnet) -> bool:
    return subnet.ip_version == 6 and subnet.ipv6_address_mode in AUTO_ADDRESS_MODES


def pool_ranges(subnet: Subnet) -> list[tuple[int, int]]:
    return [(int(ipaddress.ip_address(p["start"])), int(ipaddress.ip_address(p["end"])))
            for p in subnet.allocation_pools or []]


def first_free(ranges: list[tuple[int, int]], used: set[int]) -> int | None:
    """Lowest address in the pools not in ``used``: O(len(used)), not O(pool size)."""
    ordered = sorted(used)
    for start, end in sorted(ranges):
        candidate = start
        for address in ordered:
            if address < candidate:
                continue
            if address > candidate:
                break
            candidate += 1
        if candidate <= end:
            return candidate
    return None


def eui64(cidr: str, mac: str) -> str:
    octets = bytearray(int(part, 16) for part in mac.split(":"))
    octets[0] ^= 0x02
    interface_id = int.from_bytes(bytes(octets[:3]) + b"\xff\xfe" + bytes(octets[3:]), "big")
    network = ipaddress.ip_network(cidr)
    return str(network.network_address + interface_id)


def check_ip_for_subnet(subnet: Subnet, ip: str, device_owner: str) -> str:
    """Canonical form of ``ip`` if a port may hold it on ``subnet``; else 400 InvalidIpForSubnet."""
    bad = ApiError(400, f"IP address {ip} is not a valid IP for the specified subnet.", "InvalidIpForSubnet")
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise bad
    network = ipaddress.ip_network(subnet.cidr)
    if address.version != network.version or address not in network:
        raise bad
    if address == network.network_address and device_owner not in ROUTER_OWNERS:
        raise bad
    if network.version == 4 and address == network.broadcast_address:
        raise bad
    if is_auto_address(subnet) and device_owner not in ROUTER_OWNERS:
        raise ApiError(400, f"IPv6 address {ip} cannot be directly assigned to a port on subnet "
                       f"{subnet.id} since the subnet is configured for automatic addresses",
                       "InvalidInput")
    if str(address) == subnet.gateway_ip and device_owner not in ROUTER_OWNERS:
        raise ip_in_use(str(address), subnet.id)
    return str(address)


def ip_in_use(ip: str, subnet_id: str) -> ApiError:
    return ApiError(409, f"IP address {ip} already allocated in subnet {subnet_id}",
                    "IpAddressAlreadyAllocated")


def exhausted(network_id: str) -> ApiError:
    return ApiError(409, f"No more IP addresses available on network {network_id}.",
                    "IpAddressGenerationFailure")


_allocations = IpAllocation.__table__
# Per dialect: INSERT ... ON CONFLICT (subnet_id, ip_address) DO NOTHING RETURNING subnet_id, ip_address.
_insert_or_skip: dict[str, Any] = {}


def _insert_statement(dialect: str) -> Any:
    stmt = _insert_or_skip.get(dialect)
    if stmt is None:
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = _insert_or_skip[dialect] = (
            insert(_allocations).on_conflict_do_nothing(index_elements=["subnet_id", "ip_address"])
            .returning(_allocations.c.subnet_id, _allocations.c.ip_address))
    return stmt


async def _try_insert(session: AsyncSession, port: Port, subnet: Subnet, ip: str) -> bool:
    """Insert one allocation; False if someone holds the address already (the unique key
    ``(subnet_id, ip_address)``). PostgreSQL and SQLite: one insert-or-skip statement, no
    savepoint (a savepoint is two more round trips); other databases: a savepoint."""
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        if session.new or session.dirty or session.deleted:
            await session.flush()  # the port row first (the allocation references it)
        inserted = await session.execute(_insert_statement(dialect), {
            "subnet_id": subnet.id, "ip_address": ip, "port_id": port.id,
            "network_id": subnet.network_id})
        return inserted.first() is not None
    try:
        async with session.begin_nested():
            session.add(IpAllocation(subnet_id=subnet.id, ip_address=ip, port_id=port.id,
                                     network_id=subnet.network_id))
    except IntegrityError:
        return False
    return True


async def allocate(session: AsyncSession, port: Port, subnet: Subnet, ip: str | None = None) -> str:
    """Give ``port`` an address on ``subnet``: ``ip`` if free, else the lowest free one in the pools."""
    if ip is not None:
        ip = check_ip_for_subnet(subnet, ip, port.device_owner)
        if not await _try_insert(session, port, subnet, ip):
            raise ip_in_use(ip, subnet.id)
        return ip
    if is_auto_address(subnet):
        ip = eui64(subnet.cidr, port.mac_address)
        if not await _try_insert(session, port, subnet, ip):
            raise ip_in_use(ip, subnet.id)
        return ip
    ranges = pool_ranges(subnet)
    version = ipaddress.ip_network(subnet.cidr).version
    if sum(end - start + 1 for start, end in ranges) > SMALL_POOL:
        return await _allocate_windowed(session, port, subnet, ranges, version)
    rows = await session.scalars(select(IpAllocation.ip_address).where(IpAllocation.subnet_id == subnet.id))
    used = {address_int(a) for a in rows}
    if subnet.gateway_ip:
        used.add(int(ipaddress.ip_address(subnet.gateway_ip)))
    for _ in range(MAX_ATTEMPTS):
        candidate = first_free(ranges, used)
        if candidate is None:
            break
        text = str(ipaddress.ip_address(candidate) if version == 4 else ipaddress.IPv6Address(candidate))
        if await _try_insert(session, port, subnet, text):
            return text
        used.add(candidate)  # taken by a concurrent request since we read the table
    raise exhausted(subnet.network_id)


# Pools up to this many addresses are searched whole (lowest free address first); bigger ones
# from a per-process cursor, a window at a time, so an allocation costs O(window), not O(used).
SMALL_POOL = 4096
WINDOW = 256
# subnet id -> where this process looks next; addresses it handed out and may not see committed yet.
_cursor: dict[str, int] = {}
_recent: dict[str, set[int]] = {}


def _window(ranges: list[tuple[int, int]], start: int, size: int) -> list[int]:
    """Up to ``size`` pool addresses from ``start`` on (in pool order, no wrap)."""
    out: list[int] = []
    for lo, hi in sorted(ranges):
        if hi < start:
            continue
        a = max(lo, start)
        while a <= hi and len(out) < size:
            out.append(a)
            a += 1
        if len(out) >= size:
            break
    return out


async def _allocate_windowed(session: AsyncSession, port: Port, subnet: Subnet,
                             ranges: list[tuple[int, int]], version: int) -> str:
    """A free address of a big pool: candidates are the next window after this process's cursor,
    minus the ones taken (one indexed query per window); one is picked at random, so concurrent
    requests (also from other API processes) rarely want the same row. Past the pool's end the
    cursor starts over from its beginning, which finds released addresses again."""
    def text(a: int) -> str:
        return str(ipaddress.IPv4Address(a) if version == 4 else ipaddress.IPv6Address(a))

    gateway = int(ipaddress.ip_address(subnet.gateway_ip)) if subnet.gateway_ip else None
    pool_start = min(lo for lo, _ in ranges)
    start = _cursor.get(subnet.id, pool_start)
    recent = _recent.setdefault(subnet.id, set())
    wrapped = False
    attempts = 0
    while attempts < MAX_ATTEMPTS:
        window = [a for a in _window(ranges, start, WINDOW) if a != gateway]
        if not window:
            if wrapped:
                break
            wrapped, start = True, pool_start
            recent.clear()
            continue
        by_text = {text(a): a for a in window}
        taken = set(await session.scalars(select(IpAllocation.ip_address).where(
            IpAllocation.subnet_id == subnet.id, IpAllocation.ip_address.in_(list(by_text)))))
        free = [a for t, a in by_text.items() if t not in taken and a not in recent]
        while free and attempts < MAX_ATTEMPTS:
            attempts += 1
            candidate = free.pop(secrets.randbelow(min(len(free), 32)))
            recent.add(candidate)
            if await _try_insert(session, port, subnet, text(candidate)):
                _cursor[subnet.id] = min(free) if free else window[-1] + 1
                if len(recent) > 4 * WINDOW:
                    recent.clear()
                return text(candidate)
        start = window[-1] + 1
        _cursor[subnet.id] = start
    raise exhausted(subnet.network_id)


def random_mac() -> str:
    return "fa:16:3e:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


async def mac_taken(session: AsyncSession, network_id: str, mac: str) -> bool:
    found = await session.scalar(select(Port.id).where(Port.network_id == network_id,
                                                       Port.mac_address == mac).limit(1))
    return found is not None


def mac_in_use(network_id: str, mac: str) -> ApiError:
    return ApiError(409, f"Unable to complete operation for network {network_id}. "
                    f"The mac address {mac} is in use.", "MacAddressInUse")


async def network_subnets(session: AsyncSession, network_id: str) -> list[Subnet]:
    rows = await session.scalars(select(Subnet).where(Subnet.network_id == network_id)
                                 .order_by(Subnet.created_at, Subnet.id))
    return list(rows)


async def resolve_fixed_ips(session: AsyncSession, network: Network,
                            fixed_ips: list[dict[str, Any]]) -> list[tuple[Subnet, str | None]]:
    """Requested fixed_ips → (subnet, ip or None); a subnet may be named or found by the ip."""
    subnets = await network_subnets(session, network.id)
    by_id = {s.id: s for s in subnets}
    wanted: list[tuple[Subnet, str | None]] = []
    for entry in fixed_ips:
        if not isinstance(entry, dict) or not entry or set(entry) - {"subnet_id", "ip_address"}:
            raise ApiError(400, "Invalid input for fixed_ips: each entry needs subnet_id and/or ip_address.",
                           "HTTPBadRequest")
        subnet_id, ip = entry.get("subnet_id"), entry.get("ip_address")
        if ip is not None and not isinstance(ip, str):
            raise ApiError(400, f"Invalid input for ip_address: '{ip}' is not a valid IP address.",
                           "HTTPBadRequest")
        if subnet_id:
            subnet = by_id.get(subnet_id)
            if subnet is None:
                if await session.get(Subnet, subnet_id) is None:
                    raise ApiError(404, f"Subnet {subnet_id} could not be found.", "SubnetNotFound")
                raise ApiError(400, f"Failed to create port on network {network.id}, because fixed_ips "
                               f"included invalid subnet {subnet_id}", "InvalidInput")
        else:
            subnet = _subnet_for_ip(subnets, ip, network.id)
        wanted.append((subnet, ip))
    return wanted


def _subnet_for_ip(subnets: list[Subnet], ip: str | None, network_id: str) -> Subnet:
    try:
        address = ipaddress.ip_address(ip or "")
    except ValueError:
        raise ApiError(400, f"Invalid input for ip_address: '{ip}' is not a valid IP address.",
                       "HTTPBadRequest")
    for subnet in subnets:
        if address in ipaddress.ip_network(subnet.cidr):
            return subnet
    raise ApiError(400, f"IP address {ip} is not a valid IP for any of the subnets on the specified "
                   f"network {network_id}.", "InvalidIpForNetwork")


async def allocate_default(session: AsyncSession, port: Port, network_id: str) -> None:
    """No fixed_ips requested: one IPv4 and one stateful IPv6 address, plus every SLAAC subnet."""
    subnets = await network_subnets(session, network_id)
    for version in (4, 6):
        candidates = [s for s in subnets if s.ip_version == version and not is_auto_address(s)]
        for subnet in candidates:
            try:
                await allocate(session, port, subnet)
                break
            except ApiError as exc:
                if exc.kind != "IpAddressGenerationFailure":
                    raise
        else:
            if candidates:
                raise exhausted(network_id)
    for subnet in subnets:
        if is_auto_address(subnet):
            await allocate(session, port, subnet)


async def create_port(session: AsyncSession, *, network: Network, project_id: str, device_id: str = "",
                      device_owner: str = "", fixed_ips: list[dict[str, Any]] | None = None,
                      mac_address: str | None = None, name: str = "", binding_host_id: str = "",
                      attrs: dict[str, Any] | None = None) -> Port:
    """Create a port with its addresses (``fixed_ips`` None: automatic; [] none). ``attrs`` sets
    further Port columns (description, admin_state_up, security_groups, ...)."""
    if mac_address is not None:
        if await mac_taken(session, network.id, mac_address):
            raise mac_in_use(network.id, mac_address)
    else:
        for _ in range(MAX_ATTEMPTS):
            mac_address = random_mac()
            if not await mac_taken(session, network.id, mac_address):
                break
    wanted = await resolve_fixed_ips(session, network, fixed_ips) if fixed_ips else []
    values: dict[str, Any] = {"port_security_enabled": network.port_security_enabled} | (attrs or {})
    port = Port(network_id=network.id, project_id=project_id, name=name, mac_address=mac_address,
                device_id=device_id, device_owner=device_owner, binding_host_id=binding_host_id, **values)
    session.add(port)
    try:
        await session.flush()
    except IntegrityError:
        raise mac_in_use(network.id, mac_address or "")
    if fixed_ips is None:
        await allocate_default(session, port, network.id)
    for subnet, ip in wanted:
        await allocate(session, port, subnet, ip)
    return port


async def replace_fixed_ips(session: AsyncSession, port: Port, network: Network,
                            fixed_ips: list[dict[str, Any]]) -> None:
    """Port update: keep addresses still requested, release the others, allocate the new ones."""
    wanted = await resolve_fixed_ips(session, network, fixed_ips)
    current = {(a.subnet_id, a.ip_address): a for a in
               await session.scalars(select(IpAllocation).where(IpAllocation.port_id == port.id))}
    keep: set[tuple[str, str]] = set()
    new: list[tuple[Subnet, str | None]] = []
    for subnet, ip in wanted:
        if ip is not None:
            try:
                key = (subnet.id, str(ipaddress.ip_address(ip)))
            except ValueError:
                key = (subnet.id, ip)
            if key in current and key not in keep:
                keep.add(key)
                continue
        elif any(k[0] == subnet.id and k not in keep for k in current) and not any(
                s.id == subnet.id for s, _ in new):
            key = next(k for k in current if k[0] == subnet.id and k not in keep)
            keep.add(key)
            continue
        new.append((subnet, ip))
    for key, allocation in current.items():
        if key not in keep:
            await session.delete(allocation)
    await session.flush()
    for subnet, ip in new:
        await allocate(session, port, subnet, ip)


async def delete_port(session: AsyncSession, port_id: str) -> None:
    """Delete a port and release its addresses; nothing happens if it does not exist."""
    await session.execute(delete(IpAllocation).where(IpAllocation.port_id == port_id))
    await session.execute(delete(Port).where(Port.id == port_id))
    await session.flush()


async def delete_ports_of_device(session: AsyncSession, device_id: str) -> None:
    ids = list(await session.scalars(select(Port.id).where(Port.device_id == device_id)))
    if ids:
        await session.execute(delete(IpAllocation).where(IpAllocation.port_id.in_(ids)))
        await session.execute(delete(Port).where(Port.id.in_(ids)))
        await session.flush()


async def port_fixed_ips(session: AsyncSession, port_ids: list[str]) -> dict[str, list[dict[str, str]]]:
    """Fixed IPs of many ports in one query: ``{port_id: [{subnet_id, ip_address}]}``."""
    result: dict[str, list[dict[str, str]]] = {pid: [] for pid in port_ids}
    if not port_ids:
        return result
    rows = await session.execute(
        select(IpAllocation.port_id, IpAllocation.subnet_id, IpAllocation.ip_address)
        .where(IpAllocation.port_id.in_(port_ids)).order_by(IpAllocation.port_id))
    for port_id, subnet_id, ip in rows:
        result[port_id].append({"subnet_id": subnet_id, "ip_address": ip})
    return result



async def _release_floating_ips(session: AsyncSession, fips: list[FloatingIp]) -> set[str]:
    """Disassociate ``fips``; the networks whose data plane changes (the internal ports' networks
    and the internal networks of the routers involved)."""
    if not fips:
        return set()
    port_ids = {f.port_id for f in fips if f.port_id}
    router_ids = {f.router_id for f in fips if f.router_id}
    networks = set(await session.scalars(select(Port.network_id).where(Port.id.in_(port_ids))))
    if router_ids:
        networks |= set(await session.scalars(select(Port.network_id).where(
            Port.device_id.in_(router_ids),
            Port.device_owner.in_(("network:router_interface", "network:router_interface_distributed")))))
    for fip in fips:
        fip.port_id = fip.fixed_ip_address = fip.router_id = None
        fip.status = "DOWN"
        fip.revision_number = (fip.revision_number or 0) + 1
    await session.flush()
    return networks


async def disassociate_floating_ips(session: AsyncSession, port_ids: list[str]) -> set[str]:
    """Floating IPs associated with these ports (about to be deleted) lose their association,
    as in Neutron. Returns the networks to pass to ``wake_controller`` after the commit."""
    if not port_ids:
        return set()
    fips = list(await session.scalars(select(FloatingIp).where(FloatingIp.port_id.in_(port_ids))))
    return await _release_floating_ips(session, fips)


async def disassociate_floating_ips_of_device(session: AsyncSession, device_id: str) -> set[str]:
    """``disassociate_floating_ips`` for every port of a device (a server being deleted): call it
    just before ``delete_ports_of_device``."""
    ids = list(await session.scalars(select(Port.id).where(Port.device_id == device_id)))
    return await disassociate_floating_ips(session, ids)


async def disassociate_stale_floating_ips(session: AsyncSession, port_id: str) -> set[str]:
    """After a port's fixed IPs changed: floating IPs whose fixed IP the port no longer holds are
    disassociated. Returns the networks to wake."""
    held = set(await session.scalars(select(IpAllocation.ip_address).where(IpAllocation.port_id == port_id)))
    fips = [f for f in await session.scalars(select(FloatingIp).where(FloatingIp.port_id == port_id))
            if f.fixed_ip_address not in held]
    return await _release_floating_ips(session, fips)



def address_int(text: str) -> int:
    """An address as stored (canonical text) as an integer; ``int(ip_address(text))``, ~20 times
    faster (pools are read whole, a few hundred addresses per create)."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except OSError:
        return int(ipaddress.ip_address(text))


async def allocate_many(session: AsyncSession,
                        wanted: list[tuple[str, str, Subnet]]) -> dict[tuple[str, str], str]:
    """Automatic addresses for many ports at once: ``(port id, MAC, subnet)`` → the address, by
    ``(port id, subnet id)``. The ports' rows exist. Small pools give their lowest free addresses
    (all small pools read in one query), big ones free addresses from this process's cursor (a
    window each), SLAAC subnets EUI-64; all rows go in one insert-or-skip, and addresses a
    concurrent request took meanwhile are picked again. PostgreSQL and SQLite only. Raises
    ``exhausted`` or ``ip_in_use`` as ``allocate`` does."""
    dialect = session.get_bind().dialect.name
    result: dict[tuple[str, str], str] = {}
    pending = list(wanted)
    taken_here: dict[str, set[int]] = defaultdict(set)  # per subnet: picked in this call
    for _ in range(MAX_ATTEMPTS):
        small = {s.id: s for _, _, s in pending
                 if not is_auto_address(s) and _pool_size(s) <= SMALL_POOL}
        used: dict[str, set[int]] = defaultdict(set)
        if small:
            rows = await session.execute(select(IpAllocation.subnet_id, IpAllocation.ip_address)
                                         .where(IpAllocation.subnet_id.in_(sorted(small))))
            for subnet_id, ip in rows:
                used[subnet_id].add(address_int(ip))
        need_big: dict[str, int] = defaultdict(int)
        big: dict[str, Subnet] = {}
        for _, _, s in pending:
            if not is_auto_address(s) and s.id not in small:
                need_big[s.id] += 1
                big[s.id] = s
        free_big = {sid: await _free_from_cursor(session, big[sid], n) for sid, n in need_big.items()}
        rows_in: list[dict[str, Any]] = []
        for port_id, mac, s in pending:
            if is_auto_address(s):
                ip = eui64(s.cidr, mac)
            elif s.id in small:
                u = used[s.id] | taken_here[s.id]
                if s.gateway_ip:
                    u.add(int(ipaddress.ip_address(s.gateway_ip)))
                candidate = first_free(pool_ranges(s), u)
                if candidate is None:
                    raise exhausted(s.network_id)
                taken_here[s.id].add(candidate)
                ip = _text(candidate, s)
            else:
                if not free_big[s.id]:
                    raise exhausted(s.network_id)
                ip = _text(free_big[s.id].pop(), s)
            rows_in.append({"subnet_id": s.id, "ip_address": ip, "port_id": port_id,
                            "network_id": s.network_id})
        got = {(r[0], r[1]) for r in await session.execute(_insert_statement(dialect), rows_in)}
        again = []
        for row, entry in zip(rows_in, pending, strict=True):
            if (row["subnet_id"], row["ip_address"]) in got:
                result[(entry[0], row["subnet_id"])] = row["ip_address"]
            elif is_auto_address(entry[2]):
                raise ip_in_use(row["ip_address"], row["subnet_id"])
            else:
                again.append(entry)
        if not again:
            return result
        pending = again
    raise exhausted(pending[0][2].network_id)


def _pool_size(subnet: Subnet) -> int:
    return sum(end - start + 1 for start, end in pool_ranges(subnet))


def _text(address: int, subnet: Subnet) -> str:
    return str(ipaddress.IPv4Address(address) if subnet.ip_version == 4 else ipaddress.IPv6Address(address))


async def _free_from_cursor(session: AsyncSession, subnet: Subnet, count: int) -> list[int]:
    """Up to ``count`` free addresses of a big pool from this process's cursor on (windows as in
    ``_allocate_windowed``, the cursor moves past them); fewer only when the pool is full."""
    ranges = pool_ranges(subnet)
    gateway = int(ipaddress.ip_address(subnet.gateway_ip)) if subnet.gateway_ip else None
    pool_start = min(lo for lo, _ in ranges)
    start = _cursor.get(subnet.id, pool_start)
    recent = _recent.setdefault(subnet.id, set())
    found: list[int] = []
    wrapped = False
    while len(found) < count:
        window = [a for a in _window(ranges, start, WINDOW) if a != gateway]
        if not window:
            if wrapped:
                break
            wrapped, start = True, pool_start
            recent.clear()
            continue
        by_text = {_text(a, subnet): a for a in window}
        taken = set(await session.scalars(select(IpAllocation.ip_address).where(
            IpAllocation.subnet_id == subnet.id, IpAllocation.ip_address.in_(list(by_text)))))
        free = [a for t, a in by_text.items() if t not in taken and a not in recent]
        # At random among the first free ones, as _allocate_windowed: other processes' cursors
        # may be here too.
        while free and len(found) < count:
            a = free.pop(secrets.randbelow(min(len(free), 32)))
            found.append(a)
            recent.add(a)
        start = min(free) if free else window[-1] + 1
    _cursor[subnet.id] = start
    if len(recent) > 4 * WINDOW:
        recent.clear()
    return found
