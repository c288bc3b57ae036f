"""Neutron representations of networks, subnets and ports."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from cloudland.db.models import Network, Port, Subnet

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
DHCP_OWNER = "network:dhcp"


def timestamp(value: datetime | None) -> str | None:
    return value.strftime(TIME_FORMAT) if value else None


def _standard(obj: Network | Subnet | Port) -> dict[str, Any]:
    return {
        "id": obj.id,
        "name": obj.name,
        "description": obj.description or "",
        "project_id": obj.project_id,
        "tenant_id": obj.project_id,
        "tags": list(obj.tags or []),
        "created_at": timestamp(obj.created_at),
        "updated_at": timestamp(obj.updated_at),
        "revision_number": obj.revision_number or 0,
    }


def network_view(net: Network, subnet_ids: list[str], *, admin: bool) -> dict[str, Any]:
    body = _standard(net) | {
        "admin_state_up": net.admin_state_up,
        "status": net.status,
        "shared": net.shared,
        "router:external": net.external,
        "subnets": list(subnet_ids),
        "mtu": net.mtu,
        "port_security_enabled": net.port_security_enabled,
        "availability_zones": [],
        "availability_zone_hints": list(net.availability_zone_hints or []),
    }
    if admin:
        body["provider:network_type"] = net.network_type
        body["provider:physical_network"] = net.physical_network
        body["provider:segmentation_id"] = net.segmentation_id
    return body


def subnet_view(subnet: Subnet) -> dict[str, Any]:
    return _standard(subnet) | {
        "network_id": subnet.network_id,
        "ip_version": subnet.ip_version,
        "cidr": subnet.cidr,
        "gateway_ip": subnet.gateway_ip,
        "enable_dhcp": subnet.enable_dhcp,
        "allocation_pools": [dict(p) for p in subnet.allocation_pools or []],
        "dns_nameservers": list(subnet.dns_nameservers or []),
        "host_routes": [dict(r) for r in subnet.host_routes or []],
        "ipv6_ra_mode": subnet.ipv6_ra_mode,
        "ipv6_address_mode": subnet.ipv6_address_mode,
        "subnetpool_id": None,
        "service_types": [],
        "segment_id": None,
    }


def port_view(port: Port, fixed_ips: list[dict[str, str]], *, admin: bool) -> dict[str, Any]:
    body = _standard(port) | {
        "network_id": port.network_id,
        "admin_state_up": port.admin_state_up,
        "status": port.status,
        "mac_address": port.mac_address,
        "fixed_ips": [dict(ip) for ip in fixed_ips],
        "device_id": port.device_id,
        "device_owner": port.device_owner,
        "port_security_enabled": port.port_security_enabled,
        "allowed_address_pairs": [dict(p) for p in port.allowed_address_pairs or []],
        "security_groups": list(port.security_groups or []),
        "extra_dhcp_opts": [],
        "binding:vnic_type": port.binding_vnic_type or "normal",
    }
    if admin:
        bound = bool(port.binding_host_id)
        body["binding:host_id"] = port.binding_host_id
        body["binding:profile"] = dict(port.binding_profile or {})
        body["binding:vif_type"] = "bridge" if bound else "unbound"
        body["binding:vif_details"] = {}
    return body
