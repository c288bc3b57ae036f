"""Desired state: every table Cloudland keeps.

Times are naive UTC (``utcnow()``); the API layer renders them in each service's format.
Changing a model means changing the Alembic migrations (``docs/development.md``).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_id() -> str:
    return str(uuid.uuid4())


def hex_id() -> str:
    """Keystone-style ids: 32 hex characters."""
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Timestamps:
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


# --- identity ---------------------------------------------------------------------------------


class Domain(Base, Timestamps):
    __tablename__ = "domains"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=hex_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)


class Project(Base, Timestamps):
    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("domain_id", "name"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=hex_id)
    name: Mapped[str] = mapped_column(String(255))
    domain_id: Mapped[str] = mapped_column(ForeignKey("domains.id"))
    description: Mapped[str] = mapped_column(Text, default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)


class User(Base, Timestamps):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("domain_id", "name"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=hex_id)
    name: Mapped[str] = mapped_column(String(255))
    domain_id: Mapped[str] = mapped_column(ForeignKey("domains.id"))
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    default_project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    description: Mapped[str] = mapped_column(Text, default="")
    email: Mapped[str | None] = mapped_column(String(255), nullable=True)
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Role(Base, Timestamps):
    __tablename__ = "roles"
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=hex_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")


class RoleAssignment(Base):
    """A role for a user on a project (target_type "project") or a domain ("domain")."""

    __tablename__ = "role_assignments"
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    target_type: Mapped[str] = mapped_column(String(16), primary_key=True)
    target_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    role_id: Mapped[str] = mapped_column(ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True)


class RevokedToken(Base):
    """Revoked tokens by audit id; rows expire with the token they revoke."""

    __tablename__ = "revoked_tokens"
    audit_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


# --- compute ----------------------------------------------------------------------------------


class Flavor(Base, Timestamps):
    __tablename__ = "flavors"
    id: Mapped[str] = mapped_column(String(255), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    vcpus: Mapped[int] = mapped_column(Integer)
    ram: Mapped[int] = mapped_column(Integer)  # MiB
    disk: Mapped[int] = mapped_column(Integer)  # GiB
    swap: Mapped[int] = mapped_column(Integer, default=0)  # MiB
    ephemeral: Mapped[int] = mapped_column(Integer, default=0)  # GiB
    is_public: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    rxtx_factor: Mapped[float] = mapped_column(default=1.0)
    description: Mapped[str | None] = mapped_column(Text, nullable=True)
    extra_specs: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Keypair(Base, Timestamps):
    __tablename__ = "keypairs"
    __table_args__ = (UniqueConstraint("user_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(255))
    user_id: Mapped[str] = mapped_column(String(64), index=True)
    fingerprint: Mapped[str] = mapped_column(String(255))
    public_key: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16), default="ssh")


# Hosts an admin disabled (``ix_hosts_disabled``, a handful at most): the controller asks on every
# pass, and without the index that read every row of a table of 20,000 hosts (2-3 ms).
HOST_DISABLED = "enabled = false"


class Host(Base):
    """A hypervisor, as last reported by its agent."""

    __tablename__ = "hosts"
    __table_args__ = (
        Index("ix_hosts_disabled", "id",
              postgresql_where=text(HOST_DISABLED), sqlite_where=text(HOST_DISABLED)),
    )
    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    zone: Mapped[str] = mapped_column(String(255), default="nova")
    address: Mapped[str] = mapped_column(String(255), default="")
    vcpus: Mapped[int] = mapped_column(Integer, default=0)
    memory_mb: Mapped[int] = mapped_column(Integer, default=0)
    disk_gb: Mapped[int] = mapped_column(Integer, default=0)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    status: Mapped[str] = mapped_column(String(16), default="up")  # up | down
    first_seen: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_heartbeat: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)


# Live servers with no host yet (``ix_instances_unplaced``): queries that want the index state
# this predicate with literals (a bound parameter does not prove it).
UNPLACED = "host IS NULL AND deleted_at IS NULL AND vm_state = 'building'"


class Instance(Base, Timestamps):
    """A server. ``vm_state``/``task_state``/``power_state`` follow Nova's meanings.

    Desired state is ``desired_power`` ("running" | "stopped"), ``reboot_generation`` and
    ``deleted``; the controller converges the host's actual state to it. ``host`` plus the
    flavor's resources is the scheduler's claim on that host.
    """

    __tablename__ = "instances"
    __table_args__ = (
        Index("ix_instances_project_created", "project_id", "deleted_at", "created_at", "id"),
        Index("ix_instances_host", "host", "deleted"),
        # All-tenant listing (admin) in created order, and Nova's changes-since filter.
        Index("ix_instances_created", "created_at", "id"),
        Index("ix_instances_updated", "updated_at"),
        # Servers waiting to be placed, oldest first: the scheduler's queue and admission
        # control's count read only these rows, however many servers the table holds.
        Index("ix_instances_unplaced", "created_at", "id",
              postgresql_where=text(UNPLACED), sqlite_where=text(UNPLACED)),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255))
    project_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(64))
    image_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    flavor_id: Mapped[str] = mapped_column(String(255))
    # Copy of the flavor at create time: {vcpus, ram, disk, swap, ephemeral, name, extra_specs}
    flavor: Mapped[dict[str, Any]] = mapped_column(default=dict)
    key_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    key_data: Mapped[str | None] = mapped_column(Text, nullable=True)
    user_data: Mapped[str | None] = mapped_column(Text, nullable=True)
    config_drive: Mapped[bool] = mapped_column(Boolean, default=False)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    availability_zone: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # An admin's forced host (``--availability-zone zone:host``); the scheduler places it there.
    requested_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    vm_state: Mapped[str] = mapped_column(String(32), default="building")
    task_state: Mapped[str | None] = mapped_column(String(32), nullable=True, default="scheduling")
    power_state: Mapped[int] = mapped_column(Integer, default=0)
    fault: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    desired_power: Mapped[str] = mapped_column(String(16), default="running")
    reboot_generation: Mapped[int] = mapped_column(Integer, default=0)
    launched_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    terminated_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # Security group names requested at create time (enforced by the network issue's work).
    security_groups: Mapped[list[Any]] = mapped_column(default=list)
    # Ports the user passed at create time: detached, not deleted, when the server goes (Nova).
    preserved_port_ids: Mapped[list[Any]] = mapped_column(default=list)


# --- image ------------------------------------------------------------------------------------


class Image(Base, Timestamps):
    __tablename__ = "images"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(32), default="queued")
    visibility: Mapped[str] = mapped_column(String(16), default="shared")
    protected: Mapped[bool] = mapped_column(Boolean, default=False)
    disk_format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    container_format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Bytes: BigInteger, images pass 2 GiB (PostgreSQL INTEGER is 32-bit).
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    virtual_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    checksum: Mapped[str | None] = mapped_column(String(32), nullable=True)  # md5
    os_hash_algo: Mapped[str | None] = mapped_column(String(32), nullable=True)
    os_hash_value: Mapped[str | None] = mapped_column(String(128), nullable=True)
    min_disk: Mapped[int] = mapped_column(Integer, default=0)
    min_ram: Mapped[int] = mapped_column(Integer, default=0)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    properties: Mapped[dict[str, Any]] = mapped_column(default=dict)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)


# --- network ----------------------------------------------------------------------------------


class Network(Base, Timestamps):
    __tablename__ = "networks"
    __table_args__ = (UniqueConstraint("network_type", "segmentation_id"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), default="")
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    admin_state_up: Mapped[bool] = mapped_column(Boolean, default=True)
    status: Mapped[str] = mapped_column(String(16), default="ACTIVE")
    shared: Mapped[bool] = mapped_column(Boolean, default=False)
    external: Mapped[bool] = mapped_column(Boolean, default=False)
    mtu: Mapped[int] = mapped_column(Integer, default=1450)
    network_type: Mapped[str] = mapped_column(String(16), default="vxlan")
    segmentation_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    physical_network: Mapped[str | None] = mapped_column(String(64), nullable=True)
    port_security_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    availability_zone_hints: Mapped[list[Any]] = mapped_column(default=list)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    revision_number: Mapped[int] = mapped_column(Integer, default=0)


class Subnet(Base, Timestamps):
    __tablename__ = "subnets"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    network_id: Mapped[str] = mapped_column(ForeignKey("networks.id"), index=True)
    project_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    ip_version: Mapped[int] = mapped_column(Integer, default=4)
    cidr: Mapped[str] = mapped_column(String(64))
    gateway_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    enable_dhcp: Mapped[bool] = mapped_column(Boolean, default=True)
    allocation_pools: Mapped[list[Any]] = mapped_column(default=list)  # [{start, end}]
    dns_nameservers: Mapped[list[Any]] = mapped_column(default=list)
    host_routes: Mapped[list[Any]] = mapped_column(default=list)  # [{destination, nexthop}]
    ipv6_ra_mode: Mapped[str | None] = mapped_column(String(32), nullable=True)
    ipv6_address_mode: Mapped[str | None] = mapped_column(String(32), nullable=True)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    revision_number: Mapped[int] = mapped_column(Integer, default=0)


# Router interface ports (``ix_ports_router_interfaces``): a few among all ports, looked up by
# network on every pass. Queries that want the index state this predicate (literals, as above).
ROUTER_INTERFACE_OWNERS = ("network:router_interface_distributed", "network:router_interface")
ROUTER_INTERFACE = "device_owner IN ({})".format(", ".join(f"'{o}'" for o in ROUTER_INTERFACE_OWNERS))


class Port(Base, Timestamps):
    __tablename__ = "ports"
    __table_args__ = (
        UniqueConstraint("network_id", "mac_address"),
        Index("ix_ports_router_interfaces", "network_id", "device_id",
              postgresql_where=text(ROUTER_INTERFACE), sqlite_where=text(ROUTER_INTERFACE)),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    network_id: Mapped[str] = mapped_column(ForeignKey("networks.id"), index=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    mac_address: Mapped[str] = mapped_column(String(32))
    admin_state_up: Mapped[bool] = mapped_column(Boolean, default=True)
    status: Mapped[str] = mapped_column(String(16), default="DOWN")
    device_id: Mapped[str] = mapped_column(String(255), default="", index=True)
    device_owner: Mapped[str] = mapped_column(String(255), default="")
    binding_host_id: Mapped[str] = mapped_column(String(255), default="")
    port_security_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    allowed_address_pairs: Mapped[list[Any]] = mapped_column(default=list)
    security_groups: Mapped[list[Any]] = mapped_column(default=list)  # security group ids
    binding_profile: Mapped[dict[str, Any]] = mapped_column(default=dict)
    binding_vnic_type: Mapped[str] = mapped_column(String(32), default="normal")
    tags: Mapped[list[Any]] = mapped_column(default=list)
    revision_number: Mapped[int] = mapped_column(Integer, default=0)


class IpAllocation(Base):
    """One fixed IP of a port; the unique key makes double allocation impossible."""

    __tablename__ = "ip_allocations"
    subnet_id: Mapped[str] = mapped_column(ForeignKey("subnets.id"), primary_key=True)
    ip_address: Mapped[str] = mapped_column(String(64), primary_key=True)
    port_id: Mapped[str] = mapped_column(ForeignKey("ports.id", ondelete="CASCADE"), index=True)
    network_id: Mapped[str] = mapped_column(String(36), index=True)


class SecurityGroup(Base, Timestamps):
    __tablename__ = "security_groups"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    stateful: Mapped[bool] = mapped_column(Boolean, default=True)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    revision_number: Mapped[int] = mapped_column(Integer, default=0)


class DefaultSecurityGroup(Base):
    """The project's ``default`` group; the primary key makes a second one impossible."""

    __tablename__ = "default_security_groups"
    project_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    security_group_id: Mapped[str] = mapped_column(ForeignKey("security_groups.id", ondelete="CASCADE"))


class SecurityGroupRule(Base, Timestamps):
    __tablename__ = "security_group_rules"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    security_group_id: Mapped[str] = mapped_column(ForeignKey("security_groups.id", ondelete="CASCADE"),
                                                   index=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    direction: Mapped[str] = mapped_column(String(8))  # ingress | egress
    ethertype: Mapped[str] = mapped_column(String(8), default="IPv4")
    protocol: Mapped[str | None] = mapped_column(String(40), nullable=True)
    port_range_min: Mapped[int | None] = mapped_column(Integer, nullable=True)
    port_range_max: Mapped[int | None] = mapped_column(Integer, nullable=True)
    remote_ip_prefix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    remote_group_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    revision_number: Mapped[int] = mapped_column(Integer, default=0)


class Router(Base, Timestamps):
    """A distributed router. Its interfaces are ports (``device_owner``
    ``network:router_interface_distributed``, ``device_id`` = router id, the subnet's gateway
    IP); its gateway ports too (``network:router_gateway``): one per hypervisor that hosts the
    router (``binding_host_id``), each with its own address on the external network."""

    __tablename__ = "routers"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    admin_state_up: Mapped[bool] = mapped_column(Boolean, default=True)
    status: Mapped[str] = mapped_column(String(16), default="ACTIVE")
    external_network_id: Mapped[str | None] = mapped_column(ForeignKey("networks.id"), nullable=True,
                                                            index=True)
    enable_snat: Mapped[bool] = mapped_column(Boolean, default=True)
    routes: Mapped[list[Any]] = mapped_column(default=list)  # [{destination, nexthop}]
    tags: Mapped[list[Any]] = mapped_column(default=list)
    revision_number: Mapped[int] = mapped_column(Integer, default=0)


class FloatingIp(Base, Timestamps):
    """An address of an external network (held by a ``network:floatingip`` port) and, when
    associated, the internal port and fixed IP it is translated to, through ``router_id``."""

    __tablename__ = "floating_ips"
    # One floating IP per fixed IP (NULLs, i.e. unassociated, repeat freely).
    __table_args__ = (UniqueConstraint("port_id", "fixed_ip_address"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    floating_network_id: Mapped[str] = mapped_column(ForeignKey("networks.id"), index=True)
    floating_ip_address: Mapped[str] = mapped_column(String(64))
    floating_port_id: Mapped[str] = mapped_column(String(36), index=True)
    port_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    fixed_ip_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    router_id: Mapped[str | None] = mapped_column(String(36), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(16), default="DOWN")
    description: Mapped[str] = mapped_column(Text, default="")
    tags: Mapped[list[Any]] = mapped_column(default=list)
    revision_number: Mapped[int] = mapped_column(Integer, default=0)
