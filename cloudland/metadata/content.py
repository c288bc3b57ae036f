"""The metadata documents of one instance, built from its InstanceSpec.

One builder for both paths: the metadata service (API process, ``cloudland/api/metadata.py``)
builds the spec from the database with ``controller/specs.py``; the agent gets the same spec
in ``EnsureInstance`` and writes the config drive from it. Layouts follow Nova's
``openstack/latest`` and EC2 ``latest/meta-data``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Any

from cloudland.bus.messages import InstanceSpec

OPENSTACK_VERSIONS = ["2012-08-10", "2013-04-04", "2013-10-17", "2015-10-15", "2016-06-30",
                      "2016-10-06", "2017-02-22", "2018-08-27", "2020-10-14", "latest"]
EC2_VERSIONS = ["1.0", "2007-01-19", "2009-04-04", "latest"]
EC2_META_KEYS = ["ami-id", "hostname", "instance-id", "local-hostname", "local-ipv4",
                 "placement/", "public-keys/"]


def hostname(spec: InstanceSpec) -> str:
    """Nova's sanitised hostname: lower case, [a-z0-9-], at most 63 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-")[:63]
    return name or f"server-{spec.id}"


def user_data(spec: InstanceSpec) -> bytes | None:
    if not spec.user_data:
        return None
    try:
        return base64.b64decode(spec.user_data, validate=False)
    except (binascii.Error, ValueError):
        return None


def _public_keys(spec: InstanceSpec) -> tuple[dict[str, str], list[dict[str, str]]]:
    if not spec.key_data:
        return {}, []
    name = spec.key_name or "key"
    return {name: spec.key_data}, [{"name": name, "type": "ssh", "data": spec.key_data}]


def meta_data(spec: InstanceSpec) -> dict[str, Any]:
    public_keys, keys = _public_keys(spec)
    return {
        "uuid": spec.id,
        "name": spec.name,
        "hostname": hostname(spec),
        "project_id": spec.project_id,
        "availability_zone": spec.availability_zone,
        "launch_index": 0,
        "public_keys": public_keys,
        "keys": keys,
        "meta": dict(spec.metadata),
        "devices": [],
    }


def network_data(spec: InstanceSpec) -> dict[str, Any]:
    links, networks = [], []
    for i, port in enumerate(spec.ports):
        link_id = f"tap{port.port_id[:11]}"
        links.append({"id": link_id, "vif_id": port.port_id, "type": "ovs",
                      "ethernet_mac_address": port.mac_address, "mtu": port.mtu})
        for j, fip in enumerate(port.fixed_ips):
            net = ipaddress.ip_network(fip.cidr, strict=False)
            entry: dict[str, Any] = {
                "id": f"network{i}-{j}", "link": link_id, "network_id": port.network_id,
                "type": "ipv4_dhcp" if net.version == 4 else "ipv6_slaac",
                "ip_address": fip.ip_address, "netmask": str(net.netmask), "routes": []}
            if fip.gateway_ip:
                default = "0.0.0.0" if net.version == 4 else "::"
                entry["routes"].append({"network": default, "netmask": default, "gateway": fip.gateway_ip})
            networks.append(entry)
    return {"links": links, "networks": networks, "services": []}


def local_ipv4(spec: InstanceSpec) -> str:
    for port in spec.ports:
        for fip in port.fixed_ips:
            if ipaddress.ip_address(fip.ip_address).version == 4:
                return fip.ip_address
    return ""


def ec2_meta(spec: InstanceSpec, path: str) -> str | None:
    """The text of ``latest/meta-data/<path>`` (no leading slash), or None if absent."""
    path = path.strip("/")
    public_keys, _ = _public_keys(spec)
    values = {
        "": "\n".join(EC2_META_KEYS),
        "ami-id": spec.image.id if spec.image else "",
        "hostname": hostname(spec),
        "local-hostname": hostname(spec),
        "instance-id": spec.id,
        "local-ipv4": local_ipv4(spec),
        "placement": "availability-zone",
        "placement/availability-zone": spec.availability_zone,
        "public-keys": "\n".join(f"{i}={n}" for i, n in enumerate(public_keys)),
    }
    for i, key in enumerate(public_keys.values()):
        values[f"public-keys/{i}"] = "openssh-key"
        values[f"public-keys/{i}/openssh-key"] = key
    return values.get(path)
