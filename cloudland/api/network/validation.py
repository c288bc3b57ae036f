"""Request bodies: unwrap ``{"network": {...}}``, reject unknown attributes, convert values.

Messages and error types follow Neutron's (``HTTPBadRequest`` for malformed input).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from fastapi import Request

from cloudland.api.errors import ApiError

BAD = "HTTPBadRequest"


def invalid(message: str, kind: str = BAD) -> ApiError:
    return ApiError(400, message, kind)


async def read_body(request: Request, resource: str, allowed: set[str]) -> dict[str, Any]:
    """The resource's attributes from the body; unknown attributes are a 400 as in Neutron."""
    body = await request.json()
    if not isinstance(body, dict) or resource not in body:
        raise invalid(f"Unable to find '{resource}' in request body")
    attrs = body[resource]
    if not isinstance(attrs, dict):
        raise invalid(f"Invalid format for '{resource}' in request body")
    unknown = sorted(set(attrs) - allowed)
    if unknown:
        raise invalid("Unrecognized attribute(s) '" + ", ".join(unknown) + "'")
    return attrs


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise invalid(f"Invalid input for {name}. Reason: '{value}' cannot be converted to boolean.")


def as_str(value: Any, name: str, max_len: int = 255) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise invalid(f"Invalid input for {name}. Reason: '{value}' is not a valid string.")
    if len(value) > max_len:
        raise invalid(f"Invalid input for {name}. Reason: '{value}' exceeds maximum length of {max_len}.")
    return value


def as_int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise invalid(f"Invalid input for {name}. Reason: '{value}' is not an integer.")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise invalid(f"Invalid input for {name}. Reason: '{value}' is not an integer.")
    if not low <= number <= high:
        raise invalid(f"Invalid input for {name}. Reason: '{number}' is not in range {low} through {high}.")
    return number


def as_ip(value: Any, name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        if not isinstance(value, str):
            raise ValueError
        return ipaddress.ip_address(value)
    except ValueError:
        raise invalid(f"Invalid input for {name}. Reason: '{value}' is not a valid IP address.")


def as_list(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(f"Invalid input for {name}. Reason: '{value}' is not a list.")
    return value


def as_dict(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"Invalid input for {name}. Reason: '{value}' is not a dictionary.")
    return value


def as_id_list(value: Any, name: str) -> list[str]:
    items = as_list(value, name)
    for item in items:
        as_str(item, name, 36)
    if len(set(items)) != len(items):
        raise invalid(f"Invalid input for {name}. Reason: Duplicate items in the list: '{items}'.")
    return list(items)


def check_project(ctx_project_id: str | None, is_admin: bool, attrs: dict[str, Any]) -> str:
    """The owner of a new resource: the caller's project unless an admin names another."""
    requested = attrs.get("project_id") or attrs.get("tenant_id")
    if attrs.get("project_id") and attrs.get("tenant_id") and attrs["project_id"] != attrs["tenant_id"]:
        raise invalid("'project_id' and 'tenant_id' do not match")
    if requested:
        requested = as_str(requested, "project_id", 255)
        if requested != ctx_project_id and not is_admin:
            raise invalid("Specifying 'project_id' or 'tenant_id' other than the authenticated project "
                          "in request requires admin privileges")
        return requested
    if not ctx_project_id:
        raise invalid("A project is required to create this resource.")
    return ctx_project_id


def allowed_address_pairs(value: Any) -> list[dict[str, str]]:
    pairs = []
    for pair in as_list(value, "allowed_address_pairs"):
        if not isinstance(pair, dict) or "ip_address" not in pair or \
                set(pair) - {"ip_address", "mac_address"}:
            raise invalid("Allowed address pairs must be a list of {ip_address, mac_address} dictionaries.")
        ip = pair["ip_address"]
        try:
            ipaddress.ip_network(ip, strict=False)
        except (TypeError, ValueError):
            raise invalid(f"'{ip}' is not a valid IP address or CIDR.", "AllowedAddressPairsInvalid")
        entry = {"ip_address": ip}
        if pair.get("mac_address"):
            entry["mac_address"] = normalize_mac(pair["mac_address"])
        pairs.append(entry)
    return pairs


def normalize_mac(value: Any) -> str:
    text = value.lower().replace("-", ":") if isinstance(value, str) else ""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
        raise invalid(f"Invalid input for mac_address. Reason: '{value}' is not a valid MAC address.")
    if int(parts[0], 16) & 1 or text == "00:00:00:00:00:00":
        raise invalid(f"Invalid input for mac_address. Reason: '{value}' is not a valid unicast MAC address.")
    return text
