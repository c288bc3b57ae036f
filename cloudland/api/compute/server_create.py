"""POST /servers: validate the request like Nova, check quotas, write instances and ports."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Text, bindparam, func, insert, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.api.context import RequestContext
from cloudland.api.errors import ApiError, bad_request, conflict, forbidden
from cloudland.config import ComputeConfig
from cloudland.controller.columns import array_rows, on_postgresql
from cloudland.db.models import (
    DefaultSecurityGroup,
    Flavor,
    Host,
    Image,
    Instance,
    Keypair,
    Network,
    Port,
    Subnet,
    new_id,
)

# Nova's default quotas per project.
QUOTA_INSTANCES = 10
QUOTA_CORES = 20
QUOTA_RAM = 51200
MAX_USER_DATA = 65535


@dataclass
class NetRequest:
    network: Network
    port: Port | None = None
    fixed_ip: str | None = None
    # The network's subnets in IPAM order when read with the network (the common case: then the
    # port is written with Core statements); None: ipam.create_port reads them.
    subnets: list[Subnet] | None = None


@dataclass
class CreateRequest:
    name: str
    flavor: Flavor
    image: Image | None
    networks: list[NetRequest]
    min_count: int = 1
    max_count: int = 1
    key_name: str | None = None
    key_data: str | None = None
    user_data: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    security_groups: list[str] = field(default_factory=list)
    availability_zone: str | None = None
    requested_host: str | None = None  # admin only: "zone:host" forces the host
    config_drive: bool = False
    default_group_id: str | None = None  # the project's default security group, if it has one


def _ref_id(ref: Any) -> str:
    """flavorRef / imageRef may be an id or a URL ending in the id."""
    return str(ref).rstrip("/").rsplit("/", 1)[-1]


def _count(body: dict[str, Any], key: str) -> int:
    value = body.get(key, 1)
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise bad_request(f"Invalid input for field/attribute {key}. Value: {value}.")
    if count < 1 or isinstance(value, bool):
        raise bad_request(f"Invalid input for field/attribute {key}. Value: {value}.")
    return count


def _name(body: dict[str, Any]) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 255:
        raise bad_request(f"Invalid input for field/attribute name. Value: {name}.")
    return name


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"Invalid input for field/attribute metadata. Value: {value}.")
    for k, v in value.items():
        if not isinstance(v, str) or not k or len(k) > 255 or len(v) > 255:
            raise bad_request(f"Invalid input for field/attribute metadata. Value: {value}.")
    return dict(value)


def _user_data(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_USER_DATA:
        raise bad_request("User data needs to be valid base 64.")
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("User data needs to be valid base 64.")
    return value


def _config_drive(value: Any) -> bool:
    if value in (None, "", False):
        return False
    if value is True or str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise bad_request(f"Invalid input for field/attribute config_drive. Value: {value}.")


def _security_groups(value: Any) -> list[str]:
    if value is None:
        return ["default"]
    if not isinstance(value, list):
        raise bad_request("Invalid input for field/attribute security_groups.")
    names = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise bad_request("Invalid input for field/attribute security_groups.")
        if item["name"] not in names:
            names.append(item["name"])
    return names


# Table columns, not ORM attributes: the statements below then skip the ORM's compile and
# loading steps. Built once: constructing statements costs more per request than running them.
_F, _I, _G = Flavor.__table__.c, Image.__table__.c, DefaultSecurityGroup.__table__.c
_N, _S = Network.__table__.c, Subnet.__table__.c
_FLAVOR_COLUMNS = (_F.id, _F.name, _F.vcpus, _F.ram, _F.disk, _F.swap, _F.ephemeral, _F.is_public,
                   _F.disabled, _F.extra_specs)
_IMAGE_COLUMNS = (_I.id, _I.owner, _I.status, _I.visibility, _I.deleted)
_NETWORK_COLUMNS = (_N.id, _N.name, _N.project_id, _N.shared, _N.external, _N.port_security_enabled)
_SUBNET_COLUMNS = (_S.id, _S.network_id, _S.project_id, _S.ip_version, _S.cidr, _S.gateway_ip,
                   _S.allocation_pools, _S.ipv6_address_mode, _S.ipv6_ra_mode, _S.created_at)
# Everything a create reads, in one round trip: the flavor, the image, the project's default
# security group and (when one network is requested, the common case) that network with its
# subnets in ``ipam.network_subnets``' order: one row per subnet, at least one row.
_CREATE_LOOKUPS = (
    select(*_FLAVOR_COLUMNS, *_IMAGE_COLUMNS,
           select(_G.security_group_id).where(_G.project_id == bindparam("project_id")).scalar_subquery(),
           *_NETWORK_COLUMNS, *_SUBNET_COLUMNS)
    .select_from(select(literal(1).label("one")).subquery())
    .outerjoin(Flavor.__table__, _F.id == bindparam("flavor_id"))
    .outerjoin(Image.__table__, _I.id == bindparam("image_id"))
    .outerjoin(Network.__table__, _N.id == bindparam("network_id"))
    .outerjoin(Subnet.__table__, _S.network_id == _N.id)
    .order_by(_S.created_at, _S.id))
_NF, _NI = len(_FLAVOR_COLUMNS), len(_IMAGE_COLUMNS)
# The same for many requests at once (PostgreSQL): the keys as arrays, one row per key and
# subnet, each starting with the key's position (1-based).
_KEY_NAMES = ("flavor_id", "image_id", "project_id", "network_id")
_KEYS = array_rows("k", dict.fromkeys(_KEY_NAMES, Text), with_ordinality="n")
_CREATE_LOOKUPS_MANY = (
    select(_KEYS.c.n, *_FLAVOR_COLUMNS, *_IMAGE_COLUMNS,
           select(_G.security_group_id).where(_G.project_id == _KEYS.c.project_id).scalar_subquery(),
           *_NETWORK_COLUMNS, *_SUBNET_COLUMNS)
    .select_from(_KEYS
                 .outerjoin(Flavor.__table__, _F.id == _KEYS.c.flavor_id)
                 .outerjoin(Image.__table__, _I.id == _KEYS.c.image_id)
                 .outerjoin(Network.__table__, _N.id == _KEYS.c.network_id)
                 .outerjoin(Subnet.__table__, _S.network_id == _N.id))
    .order_by(_KEYS.c.n, _S.created_at, _S.id))
_NN = len(_NETWORK_COLUMNS)
Networks = dict[str, tuple[Network, list[Subnet]]]


def _network_rows(rows: Any, offset: int, found: Networks) -> None:
    """Detached, read-only Network and Subnet objects from rows whose network columns start at
    ``offset``; they go into ``found``."""
    for row in rows:
        if row[offset] is None:
            continue
        entry = found.get(row[offset])
        if entry is None:
            values = row[offset:offset + _NN]
            network = Network(**{c.key: v for c, v in zip(_NETWORK_COLUMNS, values, strict=True)})
            entry = found[row[offset]] = (network, [])
        if row[offset + _NN] is not None:
            values = row[offset + _NN:offset + _NN + len(_SUBNET_COLUMNS)]
            entry[1].append(Subnet(**{c.key: v for c, v in zip(_SUBNET_COLUMNS, values, strict=True)}))


LookupKey = tuple[str, str, str, str]  # flavor id, image id, project id, network id ("": none)


def lookup_key(ctx: RequestContext, payload: Any) -> LookupKey:
    """What ``_CREATE_LOOKUPS`` reads for this request (what does not parse reads nothing:
    ``_lookups`` reports it)."""
    body = payload.get("server") if isinstance(payload, dict) else None
    if not isinstance(body, dict):
        return ("", "", ctx.project_id or "", "")
    return _lookup_key(ctx, body)


def _lookup_key(ctx: RequestContext, body: dict[str, Any]) -> LookupKey:
    flavor_ref = body.get("flavorRef")
    wanted = _wanted_networks(body.get("networks"))
    return (_ref_id(flavor_ref) if flavor_ref not in (None, "") else "", _image_id(body)[0] or "",
            ctx.project_id or "", next(iter(wanted)) if len(wanted) == 1 else "")


def _image_id(body: dict[str, Any]) -> tuple[str | None, ApiError | None]:
    """The image to boot from (``imageRef`` or the boot mapping's), or the error to report
    once the flavor is checked."""
    image_ref, bdms = body.get("imageRef"), body.get("block_device_mapping_v2")
    image_id: str | None = None
    try:
        image_id = _ref_id(image_ref) if image_ref else _boot_image_from_bdm(bdms)
        if image_ref:
            _boot_image_from_bdm(bdms)  # still reject volumes
        if not image_id:
            raise bad_request("Missing imageRef attribute.")
    except ApiError as exc:
        return image_id, exc
    return image_id, None


async def _lookups(session: AsyncSession, ctx: RequestContext, body: dict[str, Any],
                   networks: Networks, rows: Sequence[Sequence[Any]] | None = None
                   ) -> tuple[Flavor, Image, str | None]:
    """The flavor, the image and the project's default security group id, in one statement
    (each checked, and failing, as Nova does: flavor first, then the image). When the request
    names one network, it and its subnets come with them (into ``networks``). ``rows``: that
    statement's rows, already read (``lookups_many``)."""
    flavor_ref = body.get("flavorRef")
    if flavor_ref in (None, ""):
        raise bad_request("Missing flavorRef attribute.")
    flavor_id = _ref_id(flavor_ref)
    image_id, image_error = _image_id(body)
    if rows is None:
        key = _lookup_key(ctx, body)
        rows = (await lookups_many(session, [key]))[key]
    _network_rows(rows, _NF + _NI + 1, networks)
    row = rows[0]
    f, i, group_id = row[:_NF], row[_NF:_NF + _NI], row[_NF + _NI]
    if f[0] is None or f[8] or (not f[7] and not ctx.is_admin):
        raise bad_request(f"Flavor {flavor_id} could not be found.")
    if image_error is not None:
        raise image_error
    visible = i[0] is not None and not i[4] and (
        ctx.is_admin or i[1] == ctx.project_id or i[3] in ("public", "community"))
    if not visible:
        raise bad_request(f"Image {image_id} could not be found.")
    if i[2] != "active":
        raise bad_request(f"Image {image_id} is not active.")
    flavor = Flavor(**{c.key: v for c, v in zip(_FLAVOR_COLUMNS, f, strict=True)})
    image = Image(**{c.key: v for c, v in zip(_IMAGE_COLUMNS, i, strict=True)})
    return flavor, image, group_id


async def lookups_many(session: AsyncSession, keys: Iterable[LookupKey]
                       ) -> dict[LookupKey, Sequence[Sequence[Any]]]:
    """``_CREATE_LOOKUPS``' rows for each key: on PostgreSQL one statement for all of them (the
    keys as arrays, ``unnest``), elsewhere one statement per key."""
    distinct = list(dict.fromkeys(keys))
    found: dict[LookupKey, list[Sequence[Any]]] = {key: [] for key in distinct}
    if on_postgresql(session) and len(distinct) > 1:
        columns = zip(*distinct, strict=True)
        rows = await session.execute(_CREATE_LOOKUPS_MANY, {
            f"k_{name}": list(values) for name, values in zip(_KEY_NAMES, columns, strict=True)})
        for row in rows:
            found[distinct[row[0] - 1]].append(row[1:])
        return found
    for key in distinct:
        flavor_id, image_id, project_id, network_id = key
        found[key] = (await session.execute(_CREATE_LOOKUPS, {
            "flavor_id": flavor_id, "image_id": image_id, "project_id": project_id,
            "network_id": network_id})).all()
    return found


def _wanted_networks(value: Any) -> set[str]:
    """The network ids a ``networks`` list names (ports' networks aside); nothing is checked here."""
    if not isinstance(value, list):
        return set()
    return {str(item["uuid"]) for item in value
            if isinstance(item, dict) and item.get("uuid") and not item.get("port")}


def _boot_image_from_bdm(bdms: Any) -> str | None:
    """The image of a block_device_mapping_v2 whose boot disk is a local copy of an image."""
    if bdms is None:
        return None
    if not isinstance(bdms, list):
        raise bad_request("Invalid input for field/attribute block_device_mapping_v2.")
    image_id = None
    for bdm in bdms:
        if not isinstance(bdm, dict):
            raise bad_request("Invalid input for field/attribute block_device_mapping_v2.")
        source = bdm.get("source_type")
        destination = bdm.get("destination_type", "local")
        boot_index = bdm.get("boot_index")
        if source == "image" and destination == "local" and str(boot_index) == "0":
            image_id = str(bdm.get("uuid") or "")
            continue
        raise bad_request("Block device mappings other than the boot image are not supported yet.")
    return image_id


async def _keypair(session: AsyncSession, ctx: RequestContext, key_name: Any) -> tuple[str, str] | None:
    """(name, public key) of the caller's key pair ``key_name``."""
    if key_name is None:
        return None
    keypair = (await session.execute(select(Keypair.name, Keypair.public_key).where(
        Keypair.user_id == ctx.user_id, Keypair.name == str(key_name)))).first()
    if keypair is None:
        raise bad_request("Invalid key_name provided.")
    return keypair[0], keypair[1]


def _visible_network_clause(ctx: RequestContext):  # type: ignore[no-untyped-def]
    return or_(Network.project_id == ctx.project_id, Network.shared.is_(True))


async def _networks(session: AsyncSession, ctx: RequestContext, value: Any, count: int,
                    known: Networks | None = None) -> list[NetRequest]:
    """``known``: networks already read (with their subnets); the others named are read here."""
    if value == "none":
        return []
    # Before 2.37 an empty list means what omitting it means: the project's one network.
    if value is None or value == "auto" or value == []:
        candidates = (await session.execute(
            select(Network).where(_visible_network_clause(ctx), Network.external.is_(False))
            .order_by(Network.created_at).limit(2))).scalars().all()
        if len(candidates) > 1:
            raise conflict("Multiple possible networks found, use a Network ID to be more specific.")
        if not candidates and value == "auto":
            raise bad_request("Unable to automatically allocate a network for project "
                              f"{ctx.project_id}")
        return [NetRequest(candidates[0])] if candidates else []
    if not isinstance(value, list):
        raise bad_request("Invalid input for field/attribute networks.")
    known = dict(known or {})
    missing = _wanted_networks(value) - set(known)
    if missing:
        known.update(await _networks_with_subnets(session, missing))
    requests = []
    for item in value:
        if not isinstance(item, dict):
            raise bad_request("Invalid input for field/attribute networks.")
        port_id, net_id, fixed_ip = item.get("port"), item.get("uuid"), item.get("fixed_ip")
        if port_id:
            if count > 1:
                raise bad_request("Unable to launch multiple instances with a single configured port ID. "
                                  "Please launch your instance one by one with different ports.")
            port = await session.get(Port, str(port_id))
            if port is None or not (ctx.is_admin or port.project_id == ctx.project_id):
                raise bad_request(f"Port id {port_id} could not be found.")
            if port.device_id:
                raise conflict(f"Port {port_id} is still in use.")
            network = await session.get(Network, port.network_id)
            assert network is not None
            requests.append(NetRequest(network, port=port))
            continue
        if not net_id:
            raise bad_request("Invalid input for field/attribute networks.")
        network, subnets = known.get(str(net_id), (None, None))
        if network is None or not (ctx.is_admin or network.shared or network.project_id == ctx.project_id):
            raise bad_request(f"Network {net_id} could not be found.")
        if fixed_ip is not None and count > 1:
            raise bad_request("max_count cannot be greater than 1 if an fixed_ip is specified.")
        requests.append(NetRequest(network, fixed_ip=str(fixed_ip) if fixed_ip else None, subnets=subnets))
    return requests


_NETWORKS_WITH_SUBNETS = (
    select(*_NETWORK_COLUMNS, *_SUBNET_COLUMNS)
    .select_from(Network.__table__.outerjoin(Subnet.__table__, _S.network_id == _N.id))
    .where(_N.id.in_(bindparam("ids", expanding=True)))
    .order_by(_N.id, _S.created_at, _S.id))


async def _networks_with_subnets(session: AsyncSession, ids: set[str]) -> Networks:
    """The networks (detached, read-only copies) and their subnets in ``ipam.network_subnets``'
    order, in one statement."""
    rows = await session.execute(_NETWORKS_WITH_SUBNETS, {"ids": sorted(ids)})
    found: Networks = {}
    _network_rows(rows, 0, found)
    return found


async def _availability_zone(session: AsyncSession, ctx: RequestContext,
                             value: Any) -> tuple[str | None, str | None]:
    """(zone, forced host) from Nova's ``zone``, ``zone:host`` or ``zone:host:node``."""
    if value in (None, ""):
        return None, None
    zone, _, rest = str(value).partition(":")
    host = rest.split(":", 1)[0] or None
    if host is not None:
        if not ctx.is_admin:
            raise forbidden("Policy doesn't allow os_compute_api:servers:create:forced_host to be performed.")
        found = await session.get(Host, host)
        if found is None:
            raise bad_request(f"Compute host {host} could not be found.")
        if zone and zone != "nova" and found.zone != zone:
            raise bad_request("The requested availability zone is not available")
    if not zone:
        return None, host
    if zone == "nova":
        return zone, host
    known = (await session.execute(select(Host.id).where(Host.zone == zone).limit(1))).first()
    if known is None:
        raise bad_request("The requested availability zone is not available")
    return zone, host


async def parse_create(session: AsyncSession, ctx: RequestContext, payload: Any,
                       lookup_rows: Sequence[Sequence[Any]] | None = None) -> CreateRequest:
    """``lookup_rows``: what ``lookups_many`` read for this request's ``lookup_key``."""
    if not isinstance(payload, dict) or not isinstance(payload.get("server"), dict):
        raise bad_request("Invalid input for request: 'server' is a required property")
    body: dict[str, Any] = payload["server"]
    min_count, max_count = _count(body, "min_count"), _count(body, "max_count")
    if "max_count" not in body:
        max_count = max(max_count, min_count)
    if min_count > max_count:
        raise bad_request("min_count must be <= max_count")
    keypair = await _keypair(session, ctx, body.get("key_name"))
    zone, requested_host = await _availability_zone(session, ctx, body.get("availability_zone"))
    name = _name(body)
    known: Networks = {}
    flavor, image, default_group_id = await _lookups(session, ctx, body, known, lookup_rows)
    return CreateRequest(
        name=name,
        flavor=flavor,
        image=image,
        networks=await _networks(session, ctx, body.get("networks"), max_count, known),
        min_count=min_count,
        max_count=max_count,
        key_name=keypair[0] if keypair else None,
        key_data=keypair[1] if keypair else None,
        user_data=_user_data(body.get("user_data")),
        metadata=_metadata(body.get("metadata")),
        security_groups=_security_groups(body.get("security_groups")),
        availability_zone=zone,
        requested_host=requested_host,
        config_drive=_config_drive(body.get("config_drive")),
        default_group_id=default_group_id,
    )


async def allowed_count(session: AsyncSession, project_id: str, req: CreateRequest,
                        quotas: ComputeConfig | None = None) -> int:
    """How many of the requested servers fit the project's quota (Nova: as many as possible).
    ``quotas``: the configured limits (``compute.quota_*``, negative: unlimited); default Nova's."""
    q_instances, q_cores, q_ram = ((quotas.quota_instances, quotas.quota_cores, quotas.quota_ram)
                                   if quotas else (QUOTA_INSTANCES, QUOTA_CORES, QUOTA_RAM))
    if q_instances < 0 and q_cores < 0 and q_ram < 0:
        return req.max_count
    count, cores, ram = (await session.execute(
        select(func.count(Instance.id),
               func.coalesce(func.sum(Instance.flavor["vcpus"].as_integer()), 0),
               func.coalesce(func.sum(Instance.flavor["ram"].as_integer()), 0))
        .where(Instance.project_id == project_id, Instance.deleted_at.is_(None)))).one()
    limits = [(name, per, used, limit) for name, per, used, limit in (
        ("instances", 1, count, q_instances), ("cores", req.flavor.vcpus, cores, q_cores),
        ("ram", req.flavor.ram, ram, q_ram)) if limit >= 0]
    fits = req.max_count
    for _, per, used, limit in limits:
        if per > 0:
            fits = min(fits, max(0, (limit - used) // per))
    if fits < req.min_count:
        overs = [(n, per, used, limit) for n, per, used, limit in limits
                 if per > 0 and used + per * req.min_count > limit]
        names = ", ".join(n for n, *_ in overs)
        requested = ", ".join(str(per * req.min_count) for _, per, _, _ in overs)
        used_s = ", ".join(str(used) for _, _, used, _ in overs)
        allowed = ", ".join(str(limit) for *_, limit in overs)
        raise ApiError(403, f"Quota exceeded for {names}: Requested {requested}, but already used "
                            f"{used_s} of {allowed} {names}")
    return fits


def flavor_copy(flavor: Flavor) -> dict[str, Any]:
    return {"vcpus": flavor.vcpus, "ram": flavor.ram, "disk": flavor.disk, "swap": flavor.swap,
            "ephemeral": flavor.ephemeral, "name": flavor.name, "extra_specs": dict(flavor.extra_specs or {})}


async def create_instances(session: AsyncSession, ctx: RequestContext, req: CreateRequest,
                           count: int) -> list[str]:
    """Instance rows and their ports (Core statements); the caller owns the transaction.
    Returns the new server ids."""
    from cloudland.api.network import ipam
    from cloudland.api.network.secgroup_rules import resolve_groups

    project_id = ctx.project_id
    assert project_id is not None
    if req.security_groups == ["default"] and req.default_group_id is not None:
        group_ids = [req.default_group_id]  # what resolve_groups answers, without its two queries
    else:
        try:
            group_ids = await resolve_groups(session, project_id, req.security_groups, by_name=True)
        except ApiError as exc:
            if exc.status != 404:
                raise
            raise bad_request(f"Security group {exc.message.split()[2]} not found.")
    dialect = session.get_bind().dialect.name
    ids = []
    for index in range(count):
        instance_id = new_id()
        await session.execute(INSERT_INSTANCE, instance_row(
            ctx, req, instance_id, f"{req.name}-{index + 1}" if count > 1 else req.name))
        for net in req.networks:
            if net.port is not None:
                claimed = await session.execute(
                    update(Port).where(Port.id == net.port.id, Port.device_id == "")
                    .values(device_id=instance_id, device_owner="compute:nova"))
                if claimed.rowcount != 1:  # type: ignore[attr-defined]
                    raise conflict(f"Port {net.port.id} is still in use.")
                continue
            security = net.network.port_security_enabled
            if net.subnets is not None and net.fixed_ip is None and dialect in _INSERT_OR_IGNORE:
                await _create_port(session, net.network, net.subnets, project_id, instance_id,
                                   group_ids if security else [], _INSERT_OR_IGNORE[dialect])
                continue
            fixed_ips = [{"ip_address": net.fixed_ip}] if net.fixed_ip else None
            attrs = {"security_groups": group_ids} if security else None
            await ipam.create_port(session, network=net.network, project_id=project_id,
                                   device_id=instance_id, device_owner="compute:nova", fixed_ips=fixed_ips,
                                   attrs=attrs)
        ids.append(instance_id)
    return ids


INSERT_INSTANCE = insert(Instance.__table__)


def instance_row(ctx: RequestContext, req: CreateRequest, instance_id: str, name: str) -> dict[str, Any]:
    """The values of a new server's row (``INSERT_INSTANCE``)."""
    return {
        "id": instance_id, "name": name, "project_id": ctx.project_id, "user_id": ctx.user_id,
        "image_id": req.image.id if req.image else None,
        "flavor_id": req.flavor.id, "flavor": flavor_copy(req.flavor),
        "key_name": req.key_name, "key_data": req.key_data, "user_data": req.user_data,
        "config_drive": req.config_drive, "metadata": req.metadata,
        "availability_zone": req.availability_zone, "requested_host": req.requested_host,
        "security_groups": req.security_groups,
        "preserved_port_ids": [n.port.id for n in req.networks if n.port is not None],
        "vm_state": "building", "task_state": "scheduling", "power_state": 0,
        "desired_power": "running"}


def port_row(network: Network, project_id: str, port_id: str, mac: str, device_id: str,
             group_ids: list[str]) -> dict[str, Any]:
    """The values of a server's new port on ``network`` (groups apply only with port security)."""
    return {"id": port_id, "network_id": network.id, "project_id": project_id, "name": "",
            "mac_address": mac, "device_id": device_id, "device_owner": "compute:nova",
            "binding_host_id": "", "port_security_enabled": network.port_security_enabled,
            "security_groups": group_ids if network.port_security_enabled else []}
# A port row unless its MAC is taken on the network (then nothing: the caller tries another).
_INSERT_OR_IGNORE = {"postgresql": postgresql.insert(Port.__table__).on_conflict_do_nothing(),
                     "sqlite": sqlite.insert(Port.__table__).on_conflict_do_nothing()}


async def _create_port(session: AsyncSession, network: Network, subnets: list[Subnet], project_id: str,
                       device_id: str, group_ids: list[str], insert_port: Any) -> None:
    """``ipam.create_port`` for a server's port with automatic addresses, in fewer statements:
    the MAC is checked by the insert itself (``ON CONFLICT DO NOTHING`` on the
    ``(network_id, mac_address)`` index, then another MAC) instead of a query first, the subnets
    come with the network, and the addresses from ``ipam.allocate`` as ``allocate_default`` picks them."""
    from cloudland.api.network import ipam

    port_id = new_id()
    for _ in range(ipam.MAX_ATTEMPTS):
        mac = ipam.random_mac()
        inserted = await session.execute(insert_port, port_row(network, project_id, port_id, mac,
                                                               device_id, group_ids))
        if inserted.rowcount == 1:  # type: ignore[attr-defined]
            break
    else:
        raise ipam.mac_in_use(network.id, mac)
    port = Port(id=port_id, network_id=network.id, mac_address=mac, device_id=device_id,
                device_owner="compute:nova")  # detached: what ipam.allocate reads
    # ipam.allocate_default, over the subnets we already have.
    for version in (4, 6):
        candidates = [s for s in subnets if s.ip_version == version and not ipam.is_auto_address(s)]
        for subnet in candidates:
            try:
                await ipam.allocate(session, port, subnet)
                break
            except ApiError as exc:
                if exc.kind != "IpAddressGenerationFailure":
                    raise
        else:
            if candidates:
                raise ipam.exhausted(network.id)
    for subnet in subnets:
        if ipam.is_auto_address(subnet):
            await ipam.allocate(session, port, subnet)
