"""Glance's image attribute rules, shared by create and PATCH."""

from __future__ import annotations

import uuid
from typing import Any

from cloudland.api.context import RequestContext
from cloudland.api.errors import ApiError, bad_request, conflict, forbidden

DISK_FORMATS = {"ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop"}
CONTAINER_FORMATS = {"ami", "ari", "aki", "bare", "ovf", "ova", "docker", "compressed"}
VISIBILITIES = {"public", "private", "shared", "community"}
READ_ONLY = {"id", "checksum", "created_at", "updated_at", "status", "size", "virtual_size", "file",
             "self", "schema", "direct_url", "os_hash_algo", "os_hash_value", "stores", "locations"}
RESERVED = {"deleted", "deleted_at", "location"}
# Attributes stored in their own columns; everything else is a custom property.
CORE = {"name", "visibility", "protected", "min_disk", "min_ram", "disk_format", "container_format",
        "tags", "owner", "os_hidden"}
MAX_PROPERTIES = 128
PATCH_TYPES = {"application/openstack-images-v2.1-json-patch", "application/openstack-images-v2.0-json-patch"}


def _check_writable(key: str, *, create: bool) -> None:
    if key in READ_ONLY and not (create and key == "id"):
        raise forbidden(f"Attribute '{key}' is read-only.")
    if key in RESERVED:
        raise forbidden(f"Attribute '{key}' is reserved.")


def _validate(key: str, value: Any, ctx: RequestContext, status: str) -> Any:
    """The value to store for a core attribute, or 400/403."""
    if key == "name":
        if value is not None and (not isinstance(value, str) or len(value) > 255):
            raise bad_request("Invalid value for name: a string of at most 255 characters or null.")
    elif key == "visibility":
        if value not in VISIBILITIES:
            raise bad_request(f"Invalid visibility value: {value}")
        if value == "public" and not ctx.is_admin:
            raise forbidden("You are not authorized to complete publicize_image action.")
    elif key in ("protected", "os_hidden"):
        if not isinstance(value, bool):
            raise bad_request(f"Invalid value for {key}: {value!r} is not a boolean.")
    elif key in ("min_disk", "min_ram"):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
            raise bad_request(f"Invalid value for {key}: {value!r} is not a non-negative integer.")
    elif key in ("disk_format", "container_format"):
        allowed = DISK_FORMATS if key == "disk_format" else CONTAINER_FORMATS
        if value is not None and value not in allowed:
            raise bad_request(f"Invalid value '{value}' for {key}: one of {', '.join(sorted(allowed))}.")
        if status != "queued":
            raise forbidden(f"Attribute {key} can be only replaced for a queued image.")
    elif key == "tags":
        if not isinstance(value, list) or not all(isinstance(t, str) and 0 < len(t) <= 255 for t in value):
            raise bad_request("Invalid value for tags: a list of strings of 1 to 255 characters.")
        value = list(dict.fromkeys(value))
    elif key == "owner":
        if value is not None and (not isinstance(value, str) or len(value) > 255):
            raise bad_request("Invalid value for owner.")
        if not ctx.is_admin and value != ctx.project_id:
            raise forbidden("Owner can't be updated by non admin.")
    return value


def _property(key: str, value: Any) -> str:
    if not key or len(key) > 255:
        raise bad_request(f"Invalid property name {key!r}.")
    if not isinstance(value, str):
        raise bad_request(f"Invalid value for property {key}: {value!r} is not a string.")
    if len(value) > 65535:
        raise bad_request(f"Value for property {key} is too long.")
    return value


def parse_create(body: Any, ctx: RequestContext) -> tuple[dict[str, Any], dict[str, str]]:
    """(core attributes incl. optional ``id``, custom properties) from a create body."""
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object.")
    core: dict[str, Any] = {}
    props: dict[str, str] = {}
    for key, value in body.items():
        _check_writable(key, create=True)
        if key == "id":
            try:
                core["id"] = str(uuid.UUID(str(value)))
            except ValueError:
                raise bad_request(f"Invalid image id {value!r}: it must be a UUID.") from None
        elif key in CORE:
            core[key] = _validate(key, value, ctx, "queued")
        else:
            props[key] = _property(key, value)
    if len(props) > MAX_PROPERTIES:
        raise ApiError(413, f"Maximum number of image properties ({MAX_PROPERTIES}) exceeded.")
    return core, props


def _pointer(path: Any) -> str:
    if not isinstance(path, str) or not path.startswith("/") or path.count("/") != 1 or path == "/":
        raise bad_request(f"Invalid JSON pointer for this resource: '{path}'")
    return path[1:].replace("~1", "/").replace("~0", "~")


def apply_patch(ops: Any, core: dict[str, Any], props: dict[str, str], ctx: RequestContext) -> None:
    """Apply JSON-patch ``ops`` in place to ``core`` (current core values) and ``props``."""
    if not isinstance(ops, list):
        raise bad_request("Request body must be a JSON array of operation objects.")
    status = core.get("status", "queued")
    for op in ops:
        if not isinstance(op, dict) or op.get("op") not in ("add", "replace", "remove"):
            raise bad_request("Operations must be JSON objects with op add, replace or remove.")
        kind = op["op"]
        key = _pointer(op.get("path"))
        if kind != "remove" and "value" not in op:
            raise bad_request(f"Operation '{kind}' requires a member named 'value'.")
        _check_writable(key, create=False)
        if key in CORE:
            if kind == "remove":
                raise forbidden(f"Attribute '{key}' cannot be removed.")
            core[key] = _validate(key, op["value"], ctx, status)
        elif kind == "remove":
            if key not in props:
                raise conflict(f"Property {key} does not exist.")
            del props[key]
        else:
            if kind == "replace" and key not in props:
                raise conflict(f"Property {key} does not exist.")
            props[key] = _property(key, op["value"])
    if len(props) > MAX_PROPERTIES:
        raise ApiError(413, f"Maximum number of image properties ({MAX_PROPERTIES}) exceeded.")
