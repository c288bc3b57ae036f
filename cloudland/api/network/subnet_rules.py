"""Subnet attribute rules: CIDR, gateway, allocation pools, DNS, host routes, IPv6 modes."""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

from cloudland.api.errors import ApiError
from cloudland.api.network.validation import as_ip, as_list, invalid

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPV6_MODES = ("slaac", "dhcpv6-stateful", "dhcpv6-stateless")
MAX_DNS = 5


def parse_cidr(cidr: Any, ip_version: int) -> IpNetwork:
    if not isinstance(cidr, str):
        raise invalid(f"Invalid input for cidr. Reason: '{cidr}' is not a valid IP subnet.")
    try:
        loose = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise invalid(f"Invalid input for cidr. Reason: '{cidr}' is not a valid IP subnet.")
    if ipaddress.ip_interface(cidr).ip != loose.network_address:
        raise invalid(f"Invalid input for cidr. Reason: '{cidr}' isn't a recommended CIDR, "
                      f"{loose} is recommended")
    if loose.version != ip_version:
        raise invalid("Invalid input for operation: cidr and ip_version must be the same IP version.",
                      "InvalidInput")
    if loose.prefixlen == 0 or (ip_version == 4 and loose.prefixlen > 30) or \
            (ip_version == 6 and loose.prefixlen > 126):
        raise invalid(f"Invalid input for operation: {loose} is not a usable subnet prefix.", "InvalidInput")
    return loose


def host_range(net: IpNetwork) -> tuple[int, int]:
    first = int(net.network_address) + 1
    last = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    return first, last


def check_gateway(net: IpNetwork, gateway: Any) -> str | None:
    if gateway is None:
        return None
    address = as_ip(gateway, "gateway_ip")
    first, last = host_range(net)
    if address.version != net.version or not first <= int(address) <= last:
        raise invalid(f"Invalid input for operation: Gateway IP {gateway} is not valid on subnet {net}.",
                      "InvalidInput")
    return str(address)


def _ip(value: int, version: int) -> str:
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


def default_pools(net: IpNetwork, gateway: str | None) -> list[dict[str, str]]:
    first, last = host_range(net)
    ranges = [(first, last)]
    if gateway is not None:
        gw = int(ipaddress.ip_address(gateway))
        ranges = [r for r in ((first, gw - 1), (gw + 1, last)) if r[0] <= r[1]]
    return [{"start": _ip(a, net.version), "end": _ip(b, net.version)} for a, b in ranges]


def check_pools(net: IpNetwork, pools: Any, gateway: str | None) -> list[dict[str, str]]:
    first, last = host_range(net)
    ranges: list[tuple[int, int]] = []
    for pool in as_list(pools, "allocation_pools"):
        if not isinstance(pool, dict) or set(pool) != {"start", "end"}:
            raise invalid("Invalid input for allocation_pools. Reason: each pool needs start and end.")
        start, end = as_ip(pool["start"], "allocation_pools"), as_ip(pool["end"], "allocation_pools")
        if start.version != net.version or end.version != net.version or int(start) > int(end):
            raise invalid(f"The allocation pool {pool['start']}-{pool['end']} is not valid.",
                          "InvalidAllocationPool")
        if int(start) < first or int(end) > last:
            raise invalid(f"The allocation pool {pool['start']}-{pool['end']} spans beyond the subnet "
                          f"cidr {net}.", "OutOfBoundsAllocationPool")
        ranges.append((int(start), int(end)))
    ordered = sorted(ranges)
    for (_, end_a), (start_b, _) in itertools.pairwise(ordered):
        if start_b <= end_a:
            raise invalid("Found overlapping allocation pools.", "OverlappingAllocationPools")
    if gateway is not None:
        gw = int(ipaddress.ip_address(gateway))
        for start, end in ordered:
            if start <= gw <= end:
                raise ApiError(409, f"Gateway ip {gateway} conflicts with allocation pool "
                               f"{_ip(start, net.version)}-{_ip(end, net.version)}.",
                               "GatewayConflictWithAllocationPools")
    return [{"start": _ip(a, net.version), "end": _ip(b, net.version)} for a, b in ordered]


def check_dns(values: Any) -> list[str]:
    result = [str(as_ip(v, "dns_nameservers")) for v in as_list(values, "dns_nameservers")]
    if len(set(result)) != len(result):
        raise invalid(f"Invalid input for dns_nameservers. Reason: Duplicate nameserver in {values}.")
    if len(result) > MAX_DNS:
        raise invalid(f"Number of DNS nameservers exceeds the limit {MAX_DNS}.", "DNSNameServersExhausted")
    return result


def check_host_routes(values: Any, version: int) -> list[dict[str, str]]:
    routes = []
    for route in as_list(values, "host_routes"):
        if not isinstance(route, dict) or set(route) != {"destination", "nexthop"}:
            raise invalid("Invalid input for host_routes. Reason: each route needs destination and nexthop.")
        try:
            destination = ipaddress.ip_network(route["destination"])
        except (TypeError, ValueError):
            raise invalid(f"Invalid input for host_routes. Reason: '{route['destination']}' is not a valid "
                          "CIDR.")
        nexthop = as_ip(route["nexthop"], "host_routes")
        if destination.version != version or nexthop.version != version:
            raise invalid("Invalid input for host_routes. Reason: IP version mismatch.")
        entry = {"destination": str(destination), "nexthop": str(nexthop)}
        if entry in routes:
            raise invalid(f"Invalid input for host_routes. Reason: Duplicate hostroute '{entry}'.")
        routes.append(entry)
    return routes


def check_ipv6_modes(net: IpNetwork, ra_mode: Any, address_mode: Any) -> None:
    for name, mode in (("ipv6_ra_mode", ra_mode), ("ipv6_address_mode", address_mode)):
        if mode is not None and mode not in IPV6_MODES:
            raise invalid(f"Invalid input for {name}. Reason: '{mode}' is not in {list(IPV6_MODES)}.")
    if net.version == 4 and (ra_mode or address_mode):
        raise invalid("Invalid input for operation: ipv6_ra_mode or ipv6_address_mode cannot be set when "
                      "ip_version is 4.", "InvalidInput")
    if ra_mode and address_mode and ra_mode != address_mode:
        raise invalid(f"Invalid input for operation: ipv6_ra_mode set to '{ra_mode}' with "
                      f"ipv6_address_mode set to '{address_mode}' is not valid. If both attributes are "
                      "set, they must be the same value.", "InvalidInput")
    auto = {"slaac", "dhcpv6-stateless"}
    if (ra_mode in auto or address_mode in auto) and net.prefixlen != 64:
        raise invalid(f"Invalid CIDR {net} for IPv6 address mode. OpenStack uses the EUI-64 address "
                      "format, which requires the prefix to be /64", "InvalidInput")
