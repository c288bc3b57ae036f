"""Typed, versioned messages between the control plane and agents.

Every command carries the whole desired spec, so a repeat is harmless and a lost one is
re-sent on the next reconcile pass. Encoded as JSON with msgspec; ``kind`` is the tag.
"""

from __future__ import annotations

from typing import Literal

import msgspec

PROTOCOL_VERSION = 1


class Message(msgspec.Struct, tag_field="kind", kw_only=True, omit_defaults=True):
    v: int = PROTOCOL_VERSION


# --- specs ------------------------------------------------------------------------------------


class FixedIp(msgspec.Struct, kw_only=True):
    ip_address: str
    subnet_id: str
    cidr: str
    ip_version: int = 4
    gateway_ip: str | None = None


class SecurityRuleSpec(msgspec.Struct, kw_only=True):
    """One security group rule of a port; ``remote_group_id`` names a set in ``NetworkSpec.remote_groups``."""

    direction: str  # ingress | egress
    ethertype: str = "IPv4"
    protocol: int | None = None  # IP protocol number; None = any
    port_range_min: int | None = None
    port_range_max: int | None = None
    remote_ip_prefix: str | None = None
    remote_group_id: str | None = None


class PortSpec(msgspec.Struct, kw_only=True):
    port_id: str
    network_id: str
    mac_address: str
    mtu: int = 1450
    fixed_ips: list[FixedIp] = []
    # Segmentation: "vxlan" with vni, "flat" / "vlan" on a physical network.
    network_type: str = "vxlan"
    segmentation_id: int | None = None
    # Security groups: filtered (anti-spoofing + rules, default drop) only when True.
    port_security: bool = False
    allowed_address_pairs: list[dict[str, str]] = []
    security_rules: list[SecurityRuleSpec] = []

    @property
    def tap_name(self) -> str:
        return "tap" + self.port_id[:11]


class ImageRef(msgspec.Struct, kw_only=True):
    id: str
    url: str  # signed URL on the image service; valid for a limited time
    hash_algo: str  # Glance's os_hash_algo (sha512 by default); the agent verifies it
    hash_value: str
    size: int
    disk_format: str = "qcow2"


class InstanceSpec(msgspec.Struct, kw_only=True):
    id: str
    name: str
    project_id: str
    vcpus: int
    memory_mb: int
    disk_gb: int
    image: ImageRef | None
    ports: list[PortSpec] = []
    power: Literal["running", "stopped"] = "running"
    # Bumped by each reboot request; the agent reboots when its own counter is behind.
    reboot_generation: int = 0
    reboot_hard: bool = False
    user_data: str | None = None  # base64, as the API received it
    key_data: str | None = None
    metadata: dict[str, str] = {}
    config_drive: bool = False
    # For the metadata service and the config drive (cloudland/metadata/content.py).
    key_name: str | None = None
    availability_zone: str = "nova"


class SubnetSpec(msgspec.Struct, kw_only=True):
    id: str
    cidr: str
    ip_version: int = 4
    gateway_ip: str | None = None
    enable_dhcp: bool = True
    dns_nameservers: list[str] = []
    host_routes: list[dict[str, str]] = []
    ipv6_ra_mode: str | None = None
    ipv6_address_mode: str | None = None


class RouterInterfaceSpec(msgspec.Struct, kw_only=True):
    """A router's port on one network: the same MAC and gateway address(es) on every host."""

    port_id: str
    network_id: str
    mac_address: str
    addresses: list[str] = []  # "ip/prefixlen", the subnets' gateway addresses
    mtu: int = 1450
    # IPv6 subnets with an ipv6_ra_mode: prefix (CIDR) → "slaac" | "dhcpv6-stateless" |
    # "dhcpv6-stateful". The router advertises itself as their default router.
    ra_prefixes: dict[str, str] = {}


class RouterGatewaySpec(msgspec.Struct, kw_only=True):
    """This host's own port of the router on the external network."""

    port_id: str
    network_id: str
    mac_address: str
    addresses: list[str] = []  # "ip/prefixlen"
    gateway_ips: list[str] = []  # the external subnets' gateways (default routes)
    mtu: int = 1500


class FloatingIpSpec(msgspec.Struct, kw_only=True):
    floating_ip: str
    fixed_ip: str


class NeighborSpec(msgspec.Struct, kw_only=True):
    ip: str
    mac: str


class RouterSpec(msgspec.Struct, kw_only=True):
    """A distributed router as one host realises it for one of its networks (the agent merges
    the RouterSpecs of all its networks by ``id``): this network's interface, the ports behind it
    (static neighbours: the router never resolves across the overlay), and the router-wide parts."""

    id: str
    interface: RouterInterfaceSpec
    neighbors: list[NeighborSpec] = []
    gateway: RouterGatewaySpec | None = None
    enable_snat: bool = True
    routes: list[dict[str, str]] = []  # [{destination, nexthop}]
    floating_ips: list[FloatingIpSpec] = []  # for this host's ports
    host_mac: str = ""  # source MAC of routed frames that leave this host over the overlay


class SetVersion(msgspec.Struct, frozen=True, array_like=True):
    """Where a published set (``SetChangeMessage``) stands: ``seq`` counts the messages of one
    set from one publisher, ``epoch`` names the publisher (a controller, per start)."""

    epoch: str
    seq: int

    def at_least(self, other: SetVersion) -> bool:
        """The same publisher's set, as far as ``other`` or further."""
        return self.epoch == other.epoch and self.seq >= other.seq


class NetworkSpec(msgspec.Struct, kw_only=True):
    """A network as one hypervisor must carry it: its subnets and this host's ports."""

    id: str
    network_type: str = "vxlan"
    segmentation_id: int | None = None
    physical_network: str | None = None  # flat / vlan: the uplink (agent.physical_networks)
    mtu: int = 1450
    subnets: list[SubnetSpec] = []
    # DHCP on this host serves static leases for exactly these ports, from the address(es)
    # of the network's DHCP port (device_owner "network:dhcp"; the same on every host).
    ports: list[PortSpec] = []
    dhcp_port: PortSpec | None = None
    # Underlay addresses of the other hypervisors that carry this network (VXLAN FDB).
    peers: list[str] = []
    # Security group id → member addresses, for the ports' rules with a remote_group_id.
    remote_groups: dict[str, list[str]] = {}
    # The published sets these are (NetworkPeers, GroupMembers), when they are: the next
    # message of a set follows on from its version here. A group with a version and no entry in
    # remote_groups is that published set: the agent has it or asks for it (GetSet).
    peers_version: SetVersion | None = None
    remote_group_versions: dict[str, SetVersion] = {}
    # Routers with an interface on this network that this host realises (it has ports here).
    routers: list[RouterSpec] = []


# --- commands to a host (subject host.<id>.cmd) -----------------------------------------------


class EnsureInstance(Message, tag="ensure_instance"):
    spec: InstanceSpec


class EnsureInstanceAbsent(Message, tag="ensure_instance_absent"):
    instance_id: str


class EnsureNetwork(Message, tag="ensure_network"):
    spec: NetworkSpec


class EnsureNetworkAbsent(Message, tag="ensure_network_absent"):
    network_id: str


class SetChangeMessage(Message, kw_only=True):
    """A set published by the controller to the hosts that follow it (``NetworkPeers``,
    ``GroupMembers``). ``full``: ``addresses`` is the whole set. Otherwise the change since the
    last message: ``added`` and ``removed`` (set operations, so a repeated one does no harm).
    ``epoch`` and ``seq``: the set's version after this message (``SetVersion``); a message that
    changes nothing and repeats the version (a mark, sent from time to time) lets a follower that
    missed the set's last change notice it. A follower that finds a message missing asks a
    controller for the whole set (``GetSet``)."""

    full: bool = True
    addresses: list[str] = []
    added: list[str] = []
    removed: list[str] = []
    epoch: str = ""
    seq: int = 0


class NetworkPeers(SetChangeMessage, tag="network_peers", kw_only=True):
    """Controller → every hypervisor of one network, on ``net.<network id>.peers``: the underlay
    addresses of the hypervisors that carry it (each agent leaves out its own). One message per
    membership change instead of an ``EnsureNetwork`` to every member; an agent subscribes while
    it carries the network, so NATS delivers it only down the branches that have members."""

    network_id: str


class GroupMembers(SetChangeMessage, tag="group_members", kw_only=True):
    """Controller → the hypervisors whose rules name a security group as remote group, on
    ``sg.<group id>.members``: the group's member addresses. An agent puts them in the
    ``remote_groups`` of its network specs."""

    group_id: str


HostCommand = EnsureInstance | EnsureInstanceAbsent | EnsureNetwork | EnsureNetworkAbsent


class GetSet(Message, tag="get_set"):
    """Agent → a controller, on ``controller.sets`` (request/reply): a published set as it
    stands, whole: a ``NetworkPeers`` or ``GroupMembers`` with its version; an empty reply when
    the controller has not published it."""

    set_kind: Literal["peers", "members"]
    key: str  # the network id (peers) or the security group id (members)


# --- requests to a host (subject host.<id>.rpc) and their replies -----------------------------


class GetConsoleOutput(Message, tag="get_console_output"):
    instance_id: str
    length: int | None = None  # last N lines; None = all


class ConsoleOutput(Message, tag="console_output"):
    output: str
    found: bool = True


class GetHostState(Message, tag="get_host_state"):
    pass


HostRequest = GetConsoleOutput | GetHostState


# --- reports from agents (subject report.<zone>) ----------------------------------------------

InstanceState = Literal["building", "running", "stopped", "paused", "error", "absent"]


class InstanceStatus(Message, tag="instance_status"):
    host_id: str
    instance_id: str
    state: InstanceState
    reboot_generation: int = 0
    error: str | None = None


class Resources(msgspec.Struct, kw_only=True):
    vcpus: int
    memory_mb: int
    disk_gb: int


class Heartbeat(Message, tag="heartbeat"):
    host_id: str
    zone: str
    address: str
    boot_id: str  # changes when the agent restarts
    resources: Resources
    # Digest of the agent's actual instance states; a mismatch makes the controller ask
    # for the full state (GetHostState).
    state_digest: str
    instance_count: int = 0
    driver: str = "qemu"
    # Wall-clock time (time.time()) when the agent sent it: the controller measures its lag.
    sent_at: float = 0.0


class HostState(Message, tag="host_state"):
    host_id: str
    boot_id: str = ""  # the agent's incarnation (as in Heartbeat)
    instances: list[InstanceStatus] = []
    networks: list[str] = []


Report = InstanceStatus | Heartbeat | HostState


class HeartbeatBatch(Message, tag="heartbeat_batch"):
    """Relay → controllers, on ``heartbeats.batch``: the heartbeats a relay took over one flush
    period. The relay never decodes them: it joins their JSON into this envelope
    (``cloudland/bus/heartbeat_relay.py``)."""

    heartbeats: list[Heartbeat] = []


class Wake(Message, tag="wake"):
    """API → controllers: desired state changed for these instances (an optimisation only)."""

    instance_ids: list[str] = []
    # Security groups changed for ports on these networks: every member host needs a new spec.
    network_ids: list[str] = []


AnyMessage = (HostCommand | HostRequest | ConsoleOutput | Report | Wake | NetworkPeers | GroupMembers
              | HeartbeatBatch | GetSet)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyMessage)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> AnyMessage:
    return _decoder.decode(data)


def state_digest(statuses: list[InstanceStatus]) -> str:
    """Order-independent digest of instance states (what the heartbeat carries)."""
    import hashlib

    h = hashlib.sha256()
    for s in sorted(statuses, key=lambda s: s.instance_id):
        h.update(f"{s.instance_id}:{s.state}:{s.reboot_generation};".encode())
    return h.hexdigest()[:16]
