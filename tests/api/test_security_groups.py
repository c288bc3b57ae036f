"""Neutron security groups and rules: shapes, the default group, validation, 409s, isolation."""

from __future__ import annotations

from typing import Any

import httpx

from tests.api.test_network import h, make_network, make_port, make_subnet

N = "/network/v2.0"


async def rule(client: httpx.AsyncClient, token: str, group_id: str, **attrs: Any) -> httpx.Response:
    body = {"security_group_rule": {"security_group_id": group_id, "direction": "ingress", **attrs}}
    return await client.post(f"{N}/security-group-rules", json=body, headers=h(token))


async def test_default_group_and_shapes(client: httpx.AsyncClient, demo_token: str, admin_token: str) -> None:
    r = await client.get(f"{N}/security-groups", params={"name": "default"}, headers=h(demo_token))
    assert r.status_code == 200
    (default,) = r.json()["security_groups"]
    assert default["name"] == "default" and default["stateful"] is True
    rules = default["security_group_rules"]
    assert sorted((x["direction"], x["ethertype"], x["remote_group_id"]) for x in rules) == [
        ("egress", "IPv4", None),
        ("egress", "IPv6", None),
        ("ingress", "IPv4", default["id"]),
        ("ingress", "IPv6", default["id"]),
    ]
    assert all(x["belongs_to_default_sg"] for x in rules)
    # Listing again does not create a second one; fields= works.
    r = await client.get(f"{N}/security-groups", params={"fields": ["id", "name"]}, headers=h(demo_token))
    assert r.json()["security_groups"] == [{"id": default["id"], "name": "default"}]
    r = await client.delete(f"{N}/security-groups/{default['id']}", headers=h(demo_token))
    assert r.status_code == 409 and "SecurityGroupCannotRemoveDefault" in r.text
    r = await client.post(
        f"{N}/security-groups", json={"security_group": {"name": "default"}}, headers=h(demo_token)
    )
    assert r.status_code == 409
    # Another project sees neither the group nor its rules.
    r = await client.get(f"{N}/security-groups", headers=h(admin_token))
    assert default["id"] in [g["id"] for g in r.json()["security_groups"]]  # admin sees all
    ext = await client.get(f"{N}/extensions/security-group", headers=h(demo_token))
    assert ext.status_code == 200


async def test_group_and_rule_crud(client: httpx.AsyncClient, demo_token: str) -> None:
    r = await client.post(
        f"{N}/security-groups",
        json={"security_group": {"name": "web", "description": "d"}},
        headers=h(demo_token),
    )
    assert r.status_code == 201, r.text
    group = r.json()["security_group"]
    assert [x["direction"] for x in group["security_group_rules"]] == ["egress", "egress"]
    r = await rule(
        client,
        demo_token,
        group["id"],
        protocol="tcp",
        port_range_min=22,
        port_range_max=22,
        remote_ip_prefix="10.0.0.0/8",
    )
    assert r.status_code == 201, r.text
    created = r.json()["security_group_rule"]
    assert created["protocol"] == "tcp" and created["port_range_min"] == 22
    assert created["remote_ip_prefix"] == "10.0.0.0/8" and created["ethertype"] == "IPv4"
    dup = await rule(
        client,
        demo_token,
        group["id"],
        protocol="6",
        port_range_min=22,
        port_range_max=22,
        remote_ip_prefix="10.0.0.0/8",
    )
    assert dup.status_code == 409 and "SecurityGroupRuleExists" in dup.text
    r = await client.get(
        f"{N}/security-group-rules", params={"security_group_id": group["id"]}, headers=h(demo_token)
    )
    assert len(r.json()["security_group_rules"]) == 3
    r = await client.put(
        f"{N}/security-groups/{group['id']}", json={"security_group": {"name": "web2"}}, headers=h(demo_token)
    )
    assert r.json()["security_group"]["name"] == "web2"
    assert (
        await client.delete(f"{N}/security-group-rules/{created['id']}", headers=h(demo_token))
    ).status_code == 204
    assert (
        await client.get(f"{N}/security-group-rules/{created['id']}", headers=h(demo_token))
    ).status_code == 404
    assert (
        await client.delete(f"{N}/security-groups/{group['id']}", headers=h(demo_token))
    ).status_code == 204


async def test_rule_validation(client: httpx.AsyncClient, demo_token: str) -> None:
    r = await client.post(
        f"{N}/security-groups", json={"security_group": {"name": "v"}}, headers=h(demo_token)
    )
    gid = r.json()["security_group"]["id"]
    cases = [
        ({"protocol": "tcp", "port_range_min": 80, "port_range_max": 22}, "SecurityGroupInvalidPortRange"),
        ({"protocol": "tcp", "port_range_min": 0, "port_range_max": 22}, "SecurityGroupInvalidPortRange"),
        ({"port_range_min": 22, "port_range_max": 22}, "SecurityGroupProtocolRequiredWithPorts"),
        ({"protocol": "icmp", "port_range_min": 300}, "SecurityGroupInvalidIcmpValue"),
        ({"protocol": "icmp", "port_range_max": 0}, "SecurityGroupMissingIcmpType"),
        ({"protocol": "bogus"}, "SecurityGroupRuleInvalidProtocol"),
        ({"direction": "sideways"}, "HTTPBadRequest"),
        ({"ethertype": "IPv6", "remote_ip_prefix": "10.0.0.0/8"}, "SecurityGroupRuleParameterConflict"),
        (
            {"remote_ip_prefix": "10.0.0.0/8", "remote_group_id": gid},
            "SecurityGroupRemoteGroupAndRemoteIpPrefix",
        ),
    ]
    for attrs, kind in cases:
        r = await rule(client, demo_token, gid, **attrs)
        assert r.status_code == 400 and kind in r.text, (attrs, r.text)
    r = await rule(client, demo_token, "nope")
    assert r.status_code == 404 and "SecurityGroupNotFound" in r.text
    r = await rule(client, demo_token, gid, protocol="icmp", port_range_min=8, port_range_max=0)
    assert r.status_code == 201


async def test_ports_get_default_group_and_in_use(
    client: httpx.AsyncClient, demo_token: str, admin_token: str
) -> None:
    net = await make_network(client, demo_token)
    await make_subnet(client, demo_token, net["id"], "10.9.0.0/24")
    r = await make_port(client, demo_token, net["id"])
    port = r.json()["port"]
    groups = (await client.get(f"{N}/security-groups", headers=h(demo_token))).json()["security_groups"]
    default = next(g for g in groups if g["name"] == "default")
    assert port["security_groups"] == [default["id"]]
    r = await client.post(
        f"{N}/security-groups", json={"security_group": {"name": "app"}}, headers=h(demo_token)
    )
    app_id = r.json()["security_group"]["id"]
    r = await client.put(
        f"{N}/ports/{port['id']}", json={"port": {"security_groups": [app_id]}}, headers=h(demo_token)
    )
    assert r.json()["port"]["security_groups"] == [app_id]
    r = await client.delete(f"{N}/security-groups/{app_id}", headers=h(demo_token))
    assert r.status_code == 409 and "SecurityGroupInUse" in r.text
    r = await client.put(
        f"{N}/ports/{port['id']}", json={"port": {"security_groups": ["missing"]}}, headers=h(demo_token)
    )
    assert r.status_code == 404
    r = await make_port(client, demo_token, net["id"], port_security_enabled=False)
    assert r.json()["port"]["security_groups"] == []
    # Another project's group is unknown here.
    other = (
        await client.post(
            f"{N}/security-groups", json={"security_group": {"name": "x"}}, headers=h(admin_token)
        )
    ).json()["security_group"]
    r = await make_port(client, demo_token, net["id"], security_groups=[other["id"]])
    assert r.status_code == 404
    assert (await client.get(f"{N}/security-groups/{other['id']}", headers=h(demo_token))).status_code == 404
