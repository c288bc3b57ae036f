"""Glance v2 JSON shapes: images, version documents, schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from cloudland.db.models import Image

# Versions we answer to; v2.7 adds os_hash_algo/os_hash_value and os_hidden.
VERSIONS = ["2.7", "2.6", "2.5", "2.4", "2.3", "2.2", "2.1", "2.0"]


def glance_time(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def render_image(image: Image) -> dict[str, Any]:
    """One image as Glance shows it: custom properties at top level, core fields win."""
    props = dict(image.properties or {})
    os_hidden = bool(props.pop("os_hidden", False))
    return {
        **props,
        "id": image.id,
        "name": image.name,
        "status": image.status,
        "visibility": image.visibility,
        "protected": image.protected,
        "os_hidden": os_hidden,
        "owner": image.owner,
        "checksum": image.checksum,
        "os_hash_algo": image.os_hash_algo,
        "os_hash_value": image.os_hash_value,
        "size": image.size,
        "virtual_size": image.virtual_size,
        "disk_format": image.disk_format,
        "container_format": image.container_format,
        "min_disk": image.min_disk,
        "min_ram": image.min_ram,
        "tags": list(image.tags or []),
        "created_at": glance_time(image.created_at),
        "updated_at": glance_time(image.updated_at),
        "self": f"/v2/images/{image.id}",
        "file": f"/v2/images/{image.id}/file",
        "schema": "/v2/schemas/image",
    }


def versions_doc(image_root: str) -> dict[str, Any]:
    """The 300 Multiple Choices body of ``GET /image``; ``image_root`` is ``<base>/image``."""
    return {"versions": [
        {"id": f"v{v}", "status": "CURRENT" if i == 0 else "SUPPORTED",
         "links": [{"rel": "self", "href": f"{image_root}/v2/"}]}
        for i, v in enumerate(VERSIONS)
    ]}


def _prop(kind: str | list[str], description: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "description": description, **extra}


IMAGE_SCHEMA: dict[str, Any] = {
    "name": "image",
    "additionalProperties": {"type": "string"},
    "properties": {
        "id": _prop("string", "An identifier for the image", readOnly=False,
                    pattern="^([0-9a-fA-F]){8}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}-([0-9a-fA-F]){4}"
                            "-([0-9a-fA-F]){12}$"),
        "name": _prop(["null", "string"], "Descriptive name for the image", maxLength=255),
        "status": _prop("string", "Status of the image", readOnly=True,
                        enum=["queued", "saving", "active", "killed", "deleted", "uploading",
                              "importing", "pending_delete", "deactivated"]),
        "visibility": _prop("string", "Scope of image accessibility",
                            enum=["community", "public", "private", "shared"]),
        "protected": _prop("boolean", "If true, image will not be deletable."),
        "os_hidden": _prop("boolean", "If true, image will not appear in default image list response."),
        "checksum": _prop(["null", "string"], "md5 hash of image contents.", readOnly=True, maxLength=32),
        "os_hash_algo": _prop(["null", "string"], "Algorithm to calculate the os_hash_value",
                              readOnly=True, maxLength=64),
        "os_hash_value": _prop(["null", "string"], "Hexdigest of the image contents using the algorithm "
                               "specified by the os_hash_algo", readOnly=True, maxLength=128),
        "owner": _prop(["null", "string"], "Owner of the image", maxLength=255),
        "size": _prop(["null", "integer"], "Size of image file in bytes", readOnly=True),
        "virtual_size": _prop(["null", "integer"], "Virtual size of image in bytes", readOnly=True),
        "container_format": _prop(["null", "string"], "Format of the container",
                                  enum=[None, "ami", "ari", "aki", "bare", "ovf", "ova", "docker",
                                        "compressed"]),
        "disk_format": _prop(["null", "string"], "Format of the disk",
                             enum=[None, "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2",
                                   "vdi", "iso", "ploop"]),
        "created_at": _prop("string", "Date and time of image registration", readOnly=True),
        "updated_at": _prop("string", "Date and time of the last image modification", readOnly=True),
        "tags": {"type": "array", "description": "List of strings related to the image",
                 "items": {"type": "string", "maxLength": 255}},
        "direct_url": _prop("string", "URL to access the image file kept in external store",
                            readOnly=True),
        "min_ram": _prop("integer", "Amount of ram (in MB) required to boot image."),
        "min_disk": _prop("integer", "Amount of disk space (in GB) required to boot image."),
        "self": _prop("string", "An image self url", readOnly=True),
        "file": _prop("string", "An image file url", readOnly=True),
        "schema": _prop("string", "An image schema url", readOnly=True),
        "locations": {"type": "array", "description": "A set of URLs to access the image file kept "
                      "in external store", "items": {"type": "object"}},
    },
    "links": [
        {"rel": "self", "href": "{self}"},
        {"rel": "enclosure", "href": "{file}"},
        {"rel": "describedby", "href": "{schema}"},
    ],
}

IMAGES_SCHEMA: dict[str, Any] = {
    "name": "images",
    "properties": {
        "images": {"type": "array", "items": IMAGE_SCHEMA},
        "schema": {"type": "string"},
        "first": {"type": "string"},
        "next": {"type": "string"},
    },
    "links": [
        {"rel": "first", "href": "{first}"},
        {"rel": "next", "href": "{next}"},
        {"rel": "describedby", "href": "{schema}"},
    ],
}
