"""Nova server bodies at microversion 2.1, and the status Nova derives from vm/task state."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select
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
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def naive_iso(value: datetime | None) -> str | None:
    """Nova renders launched_at/terminated_at naive with microseconds; gophercloud needs no zone."""
    return value.strftime("%Y-%m-%dT%H:%M:%S.%f") if value else None


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
    rows = await session.execute(
        select(Port.device_id, Port.mac_address, Network.id, Network.name, IpAllocation.ip_address)
        .join(Network, Network.id == Port.network_id)
        .outerjoin(IpAllocation, IpAllocation.port_id == Port.id)
        .where(Port.device_id.in_(ids))
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
    status = server_status(inst.vm_state, inst.task_state)
    image: dict[str, Any] | str = (
        {"id": inst.image_id, "links": _bookmark(base, "images", inst.image_id)} if inst.image_id else "")
    body: dict[str, Any] = {
        "id": inst.id,
        "name": inst.name,
        "status": status,
        "tenant_id": inst.project_id,
        "user_id": inst.user_id,
        "metadata": dict(inst.metadata_ or {}),
        "hostId": host_id_hash(inst.project_id, inst.host),
        "image": image,
        "flavor": {"id": inst.flavor_id, "links": _bookmark(base, "flavors", inst.flavor_id)},
        "created": rfc3339(inst.created_at),
        "updated": rfc3339(inst.updated_at),
        "addresses": addresses,
        "accessIPv4": "",
        "accessIPv6": "",
        "links": _links(base, "servers", inst.id),
        "OS-DCF:diskConfig": "MANUAL",
        "key_name": inst.key_name,
        "config_drive": "True" if inst.config_drive else "",
        "OS-EXT-AZ:availability_zone": inst.availability_zone or ("nova" if inst.host else ""),
        "OS-EXT-STS:vm_state": inst.vm_state,
        "OS-EXT-STS:task_state": inst.task_state,
        "OS-EXT-STS:power_state": inst.power_state,
        "OS-SRV-USG:launched_at": naive_iso(inst.launched_at),
        "OS-SRV-USG:terminated_at": naive_iso(inst.terminated_at),
        "os-extended-volumes:volumes_attached": [],
        "security_groups": [{"name": name} for name in (inst.security_groups or [])],
    }
    if status in _PROGRESS_STATUSES:
        body["progress"] = 100 if status == "ACTIVE" else 0
    if inst.vm_state in ("error", "deleted") and inst.fault:
        fault = {"code": inst.fault.get("code", 500), "message": inst.fault.get("message", ""),
                 "created": inst.fault.get("created") or rfc3339(inst.updated_at)}
        if admin and inst.fault.get("details"):
            fault["details"] = inst.fault["details"]
        body["fault"] = fault
    if admin:
        body["OS-EXT-SRV-ATTR:host"] = inst.host
        body["OS-EXT-SRV-ATTR:hypervisor_hostname"] = inst.host
        body["OS-EXT-SRV-ATTR:instance_name"] = f"instance-{inst.id}"
    return body
