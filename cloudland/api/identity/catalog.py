"""The service catalog: every Cloudland service under the one API base URL."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from cloudland.config import Config

# (type, name, path under the base URL)
SERVICES = (
    ("identity", "keystone", "/identity"),
    ("compute", "nova", "/compute/v2.1"),
    ("network", "neutron", "/network"),
    ("image", "glance", "/image"),
)
INTERFACES = ("public", "internal", "admin")
_NAMESPACE = uuid.UUID("6f1c5b0e-4c1a-4a43-9d6a-0c1a7d1e2f30")


def _stable_id(*parts: str) -> str:
    return uuid.uuid5(_NAMESPACE, "/".join(parts)).hex


def build_catalog(config: Config) -> list[dict[str, Any]]:
    base = config.api.base_url()
    region = config.identity.region
    catalog = []
    for service_type, name, path in SERVICES:
        endpoints = [{"id": _stable_id(service_type, interface, region), "interface": interface,
                      "region": region, "region_id": region, "url": base + path}
                     for interface in INTERFACES]
        catalog.append({"endpoints": endpoints, "id": _stable_id(service_type), "type": service_type,
                        "name": name})
    return catalog


class Catalog:
    """The catalog, built once, with its JSON encoding ready to splice into token bodies."""

    def __init__(self, config: Config) -> None:
        self.entries = build_catalog(config)
        self.raw = msgspec.Raw(msgspec.json.encode(self.entries))
