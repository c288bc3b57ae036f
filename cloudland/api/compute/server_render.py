"""Nova server bodies at microversion 2.1, and the status Nova derives from vm/task state."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import String, any_, bindparam, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from cloudland.db.models import Instance, IpAllocation, Network, Port

# vm_state -> {task_state: status}; "default" when the task state is not listed (Nova's map).
_STATE_MAP: dict[str, dict[str | None, str]] = {
    "active": {"default": "ACTIVE", "rebooting": "REBOOT", "reboot_pending": "REBOOT",
               "reboot_started": "REBOOT", "rebooting_hard": "HARD_REBOOT",
               "reboot_pending_hard": "HARD_REBOOT", "reboot_started_hard": "HARD_REBOOT",
               "rebuilding": "REBUILD", "migrating": "MIGRATING"},
    "building": {"default": "BUILD"},
    "stopped": {"default": "SHUTOFF", "rebuilding": "REBUILD"},
    "paused": {"default": "PAUSED"},
    "suspended": {"default": "SUSPENDED"},
    "rescued": {"default": "RESCUE"},
    "error": {"default": "ERROR", "rebuilding": "REBUILD"},
    "deleted": {"default": "DELETED"},
    "soft-delete": {"default": "SOFT_DELETED"},
    "shelved": {"default": "SHELVED"},
    "shelved_offloaded": {"default": "SHELVED_OFFLOADED"},
}

_PROGRESS_STATUSES = {"ACTIVE", "BUILD", "REBUILD", "RESIZE", "VERIFY_RESIZE", "MIGRATING"}


def server_status(vm_state: str, task_state: str | None) -> str:
    states = _STATE_MAP.get(vm_state)
    if states is None:
        return "UNKNOWN"
    return states.get(task_state, states["default"])


def rfc3339(value: datetime | None) -> str | None:
    # isoformat: the same text as strftime("%Y-%m-%dT%H:%M:%SZ") for naive times, in a third of the time.
    return value.isoformat(timespec="seconds") + "Z" if value else None


def naive_iso(value: datetime | None) -> str | None:
    """Nova renders launched_at/terminated_at naive with microseconds; gophercloud needs no zone."""
    return value.isoformat(timespec="microseconds") if value else None


def host_id_hash(project_id: str, host: str | None) -> str:
    if not host:
        return ""
    return hashlib.sha224((project_id + host).encode()).hexdigest()


def _links(base: str, collection: str, item_id: str) -> list[dict[str, str]]:
    return [{"rel": "self", "href": f"{base}/compute/v2.1/{collection}/{item_id}"},
            {"rel": "bookmark", "href": f"{base}/compute/{collection}/{item_id}"}]


def _bookmark(base: str, collection: str, item_id: str) -> list[dict[str, str]]:
    return [{"rel": "bookmark", "href": f"{base}/compute/{collection}/{item_id}"}]


Addresses = dict[str, list[dict[str, Any]]]


async def load_addresses(session: AsyncSession, instance_ids: Iterable[str]) -> dict[str, Addresses]:
    """Addresses of many servers in one query: {server id: {network name: [address]}}."""
    ids = list(instance_ids)
    result: dict[str, Addresses] = defaultdict(dict)
    if not ids:
        return result
    if len(ids) > 1 and session.get_bind().dialect.name == "postgresql":
        # One array parameter: rendering an IN list of 1,000 binds costs more than the query.
        match = Port.device_id == any_(bindparam("ids", ids, type_=postgresql.ARRAY(String)))
    else:
        match = Port.device_id.in_(ids)
    rows = await session.execute(
        select(Port.device_id, Port.mac_address, Network.id, Network.name, IpAllocation.ip_address)
        .join(Network, Network.id == Port.network_id)
        .outerjoin(IpAllocation, IpAllocation.port_id == Port.id)
        .where(match)
        .order_by(Port.device_id, Port.created_at, Port.id, IpAllocation.ip_address))
    for device_id, mac, net_id, net_name, ip in rows:
        addresses = result[device_id].setdefault(net_name or net_id, [])
        if ip is not None:
            addresses.append({"version": 6 if ":" in ip else 4, "addr": ip,
                              "OS-EXT-IPS:type": "fixed", "OS-EXT-IPS-MAC:mac_addr": mac})
    return result


def render_brief(inst: Instance, base: str) -> dict[str, Any]:
    return {"id": inst.id, "name": inst.name, "links": _links(base, "servers", inst.id)}


def render_server(inst: Instance, addresses: Addresses, base: str, *, admin: bool) -> dict[str, Any]:
    return render_values(
        (inst.id, inst.name, inst.project_id, inst.user_id, inst.host, inst.image_id, inst.flavor_id,
         inst.created_at, inst.updated_at, inst.key_name, inst.config_drive, inst.availability_zone,
         inst.vm_state, inst.task_state, inst.power_state, inst.launched_at, inst.terminated_at),
        dict(inst.metadata_ or {}), [{"name": name} for name in (inst.security_groups or [])],
        inst.fault, addresses, base, admin=admin)


# The plain columns render_values reads, in its order (the list selects them with Core).
VALUE_COLUMNS = (Instance.id, Instance.name, Instance.project_id, Instance.user_id, Instance.host,
                 Instance.image_id, Instance.flavor_id, Instance.created_at, Instance.updated_at,
                 Instance.key_name, Instance.config_drive, Instance.availability_zone, Instance.vm_state,
                 Instance.task_state, Instance.power_state, Instance.launched_at, Instance.terminated_at)

_host_ids: dict[tuple[str, str], str] = {}


def _host_id(project_id: str, host: str | None) -> str:
    if not host:
        return ""
    key = (project_id, host)
    found = _host_ids.get(key)
    if found is None:
        if len(_host_ids) > 100_000:
            _host_ids.clear()
        found = _host_ids[key] = host_id_hash(project_id, host)
    return found


def render_values(values: Sequence[Any], metadata: dict[str, Any], security_groups: list[dict[str, str]],
                  fault: dict[str, Any] | None, addresses: Addresses, base: str, *,
                  admin: bool) -> dict[str, Any]:
    """A server body from the ``VALUE_COLUMNS`` values (an ORM instance's, or a Core row that may
    have more columns after them), its metadata, its security groups already in Nova's
    ``[{"name": ...}]`` shape and its fault."""
    (server_id, name, project_id, user_id, host, image_id, flavor_id, created_at, updated_at, key_name,
     config_drive, availability_zone, vm_state, task_state, power_state, launched_at, terminated_at,
     *_) = values
    status = server_status(vm_state, task_state)
    image: dict[str, Any] | str = (
        {"id": image_id, "links": [{"rel": "bookmark", "href": f"{base}/compute/images/{image_id}"}]}
        if image_id else "")
    body: dict[str, Any] = {
        "id": server_id,
        "name": name,
        "status": status,
        "tenant_id": project_id,
        "user_id": user_id,
        "metadata": metadata,
        "hostId": _host_id(project_id, host),
        "image": image,
        "flavor": {"id": flavor_id, "links": [{"rel": "bookmark",
                                               "href": f"{base}/compute/flavors/{flavor_id}"}]},
        "created": rfc3339(created_at),
        "updated": rfc3339(updated_at),
        "addresses": addresses,
        "accessIPv4": "",
        "accessIPv6": "",
        "links": [{"rel": "self", "href": f"{base}/compute/v2.1/servers/{server_id}"},
                  {"rel": "bookmark", "href": f"{base}/compute/servers/{server_id}"}],
        "OS-DCF:diskConfig": "MANUAL",
        "key_name": key_name,
        "config_drive": "True" if config_drive else "",
        "OS-EXT-AZ:availability_zone": availability_zone or ("nova" if host else ""),
        "OS-EXT-STS:vm_state": vm_state,
        "OS-EXT-STS:task_state": task_state,
        "OS-EXT-STS:power_state": power_state,
        "OS-SRV-USG:launched_at": naive_iso(launched_at),
        "OS-SRV-USG:terminated_at": naive_iso(terminated_at),
        "os-extended-volumes:volumes_attached": [],
        "security_groups": security_groups,
    }
    if status in _PROGRESS_STATUSES:
        body["progress"] = 100 if status == "ACTIVE" else 0
    if vm_state in ("error", "deleted") and fault:
        rendered = {"code": fault.get("code", 500), "message": fault.get("message", ""),
                    "created": fault.get("created") or rfc3339(updated_at)}
        if admin and fault.get("details"):
            rendered["details"] = fault["details"]
        body["fault"] = rendered
    if admin:
        body["OS-EXT-SRV-ATTR:host"] = host
        body["OS-EXT-SRV-ATTR:hypervisor_hostname"] = host
        body["OS-EXT-SRV-ATTR:instance_name"] = f"instance-{server_id}"
    return body
