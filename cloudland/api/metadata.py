"""The metadata service (Nova's ``openstack`` and EC2 layouts), for the metadata proxies.

Mounted in the API app under ``/internal/metadata``. Guests never reach it directly: the
proxy in each network's DHCP namespace (``agent/drivers/network/metadata_proxy.py``) forwards
``GET /<path>`` to ``/internal/metadata/<path>`` with ``X-Cloudland-Network-Id`` (the network
it serves), ``X-Forwarded-For`` (the guest's source address) and ``X-Cloudland-Signature``
(HMAC of both with the installation's ``keys/metadata-proxy.key``). The instance is the one
whose port on *that* network has *that* fixed IP: nothing the guest sends chooses it, and
the same address on another tenant's network is another network id.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from sqlalchemy import select

from cloudland.api.errors import forbidden, not_found
from cloudland.bus.messages import InstanceSpec
from cloudland.config import Config
from cloudland.controller.specs import instance_ports, instance_spec
from cloudland.db.models import Instance, IpAllocation, Port
from cloudland.metadata import content
from cloudland.secrets import metadata_key, metadata_signature

router = APIRouter(prefix="/internal/metadata", include_in_schema=False)

NETWORK_HEADER = "X-Cloudland-Network-Id"
ADDRESS_HEADER = "X-Forwarded-For"
SIGNATURE_HEADER = "X-Cloudland-Signature"


async def setup(app: FastAPI, config: Config) -> None:
    app.state.metadata_key = metadata_key(config.keys_dir)


def _text(body: str | bytes, media: str = "text/plain") -> Response:
    return Response(content=body, media_type=media)


def _json(doc: Any) -> Response:
    return Response(content=json.dumps(doc), media_type="application/json")


def _caller(request: Request) -> tuple[str, str]:
    """(network id, address) from a correctly signed proxy request, else 403."""
    network_id = request.headers.get(NETWORK_HEADER, "")
    address = request.headers.get(ADDRESS_HEADER, "").strip()
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not network_id or not address or not signature:
        raise forbidden("Metadata requests must come through the metadata proxy.")
    expected = metadata_signature(request.app.state.metadata_key, network_id, address)
    if not hmac.compare_digest(expected, signature):
        raise forbidden("Invalid metadata proxy signature.")
    try:
        address = str(ipaddress.ip_address(address))
    except ValueError:
        raise forbidden("Invalid source address.")
    return network_id, address


async def _instance_spec(request: Request, network_id: str, address: str) -> InstanceSpec:
    async with request.app.state.sessionmaker() as db:
        inst = await db.scalar(
            select(Instance)
            .join(Port, Port.device_id == Instance.id)
            .join(IpAllocation, IpAllocation.port_id == Port.id)
            .where(IpAllocation.network_id == network_id, IpAllocation.ip_address == address,
                   Port.network_id == network_id, Instance.deleted.is_(False))
            .limit(1))
        if inst is None:
            raise not_found(f"No instance with address {address} on network {network_id}.")
        ports = (await instance_ports(db, [inst.id]))[inst.id]
        return instance_spec(inst, ports, None)


def _openstack(spec: InstanceSpec, path: str) -> Response:
    if path in ("", "/"):
        return _text("\n".join(content.OPENSTACK_VERSIONS))
    version, _, doc = path.strip("/").partition("/")
    if version not in content.OPENSTACK_VERSIONS:
        raise not_found("Unknown metadata version.")
    if doc == "":
        return _text("meta_data.json\nnetwork_data.json\nvendor_data.json\nvendor_data2.json"
                     + ("\nuser_data" if spec.user_data else ""))
    if doc == "meta_data.json":
        return _json(content.meta_data(spec))
    if doc == "network_data.json":
        return _json(content.network_data(spec))
    if doc in ("vendor_data.json", "vendor_data2.json"):
        return _json({})
    if doc == "user_data":
        data = content.user_data(spec)
        if data is None:
            raise not_found("No user data.")
        return _text(data, "application/octet-stream")
    raise not_found("Unknown metadata document.")


def _ec2(spec: InstanceSpec, path: str) -> Response:
    version, _, rest = path.strip("/").partition("/")
    if version == "":
        return _text("\n".join(content.EC2_VERSIONS))
    if version not in content.EC2_VERSIONS:
        raise not_found("Unknown metadata version.")
    if rest in ("", "/"):
        return _text("meta-data/" + ("\nuser-data" if spec.user_data else ""))
    if rest == "user-data":
        data = content.user_data(spec)
        if data is None:
            raise not_found("No user data.")
        return _text(data, "application/octet-stream")
    if rest == "meta-data" or rest.startswith("meta-data/"):
        value = content.ec2_meta(spec, rest.removeprefix("meta-data"))
        if value is not None:
            return _text(value)
    raise not_found("Unknown metadata item.")


@router.get("/{path:path}", response_model=None)
async def metadata(path: str, request: Request) -> Response:
    network_id, address = _caller(request)
    spec = await _instance_spec(request, network_id, address)
    path = "/" + path.lstrip("/")
    if path == "/":
        return _text("\n".join([*content.EC2_VERSIONS, "openstack"]))
    if path == "/openstack" or path.startswith("/openstack/"):
        return _openstack(spec, path.removeprefix("/openstack"))
    return _ec2(spec, path)
