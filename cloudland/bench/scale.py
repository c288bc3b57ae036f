"""``cloudland bench scale``: the whole control plane against many simulated hypervisors.

Builds a NATS tree (core ← zone leaf ← rack leaves), starts heartbeat relays for the rack leaves
(unless ``relays`` is off) and simulated hypervisor processes on the racks, the controller and
API worker processes, launches ``vms`` servers through the HTTP API from many concurrent clients
(admin, spread over projects with their own networks), and measures. The figures and their JSON
names are documented in docs/scale.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import tomli_w

from cloudland.bench.http import Connection
from cloudland.bus import subjects
from cloudland.bus.topology import NatsTree
from cloudland.controller.stats import percentiles

V21 = "/compute/v2.1"
LOCAL_POSTGRES = "local-postgres"
CONTROL_PLANE_ROLES = ("api", "controller", "postgres")


@dataclass
class ScaleOptions:
    hypervisors: int = 1000
    vms: int = 20000
    rate: float = 0.0  # creates per second; 0 = as fast as the clients go
    db: str = ""  # "" SQLite in the work dir; "local-postgres" starts one; else a URL
    json_path: Path | None = None
    work_dir: Path | None = None
    api_workers: int = 2
    clients: int = 64
    projects: int = 0  # 0: one per 10 networks, 4 to 50
    vms_per_network: int = 50  # tenant networks span about this many hypervisors
    prefill: int = 0  # server rows written straight to the database first (list latency at size)
    # Neutron's default group: ingress from the group's own members (remote group). False: from
    # the tenant address space (10.0.0.0/8) instead, no member sets (see docs/scale.md).
    remote_group_rules: bool = True
    hosts_per_rack: int = 1000
    hosts_per_process: int = 0  # 0: about hypervisors / 4
    kill_group: int = 100
    relays: bool = True  # heartbeat relays on the rack leaves (else the controller's takes them all)
    leaves_per_relay_process: int = 5
    max_pending_builds: int = 10000  # compute.max_pending_builds (admission control; 0: off)
    heartbeat_seconds: float = 2.0
    host_down_seconds: float = 10.0
    timeout: float = 1800.0
    keep: bool = False
    log: Any = print


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    cpu_start: float = 0.0

    def cpu(self) -> float:
        return proc_cpu(self.popen.pid)

    def peak_rss_mb(self) -> float:
        return proc_peak_rss_mb(self.popen.pid)


def proc_cpu(pid: int, reaped_children: bool = False) -> float:
    """User + system CPU seconds of a live process; with ``reaped_children``, also those of its
    children that exited and were waited for (PostgreSQL's backends come and go: the pools
    recycle connections after 5 minutes and close their overflow; a long run's figure missed
    most of its CPU without them)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def self_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proc_peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Launch:
    sent: dict[str, float] = field(default_factory=dict)  # server id -> wall time the POST was sent
    active: dict[str, float] = field(default_factory=dict)  # server id -> launched_at (wall)
    errors: set[str] = field(default_factory=set)
    rejected: int = 0
    rejections: dict[int, int] = field(default_factory=dict)
    throttled: int = 0  # 429s (admission control): sent again after Retry-After, not rejected
    first_sent: float = 0.0
    last_sent: float = 0.0


class ScaleBench:
    def __init__(self, opts: ScaleOptions) -> None:
        self.o = opts
        self.work = opts.work_dir or Path(tempfile.mkdtemp(prefix="cloudland-scale-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.procs: list[Proc] = []
        self.sims: list[Proc] = []
        self.relays: list[Proc] = []
        self.tree: NatsTree | None = None
        self.pg: Any = None
        self.port = 0
        self.figures: dict[str, Any] = {}
        self.projects: list[str] = []
        self.networks: list[tuple[int, str]] = []  # (index into projects, network id)
        self.image_id = ""
        self.nc: Any = None
        self.kill_hosts: list[str] = []

    # --- setup ----------------------------------------------------------------------------

    def database_url(self) -> str:
        if self.o.db == LOCAL_POSTGRES:
            from cloudland.db.local_postgres import LocalPostgres

            self.pg = LocalPostgres(self.work / "postgres")
            self.pg.start()
            return self.pg.create_database("cloudland")
        if self.o.db.startswith("postgresql://"):
            return "postgresql+asyncpg://" + self.o.db.removeprefix("postgresql://")
        return self.o.db or f"sqlite+aiosqlite:///{self.work / 'state' / 'cloudland.db'}"

    def write_config(self, db_url: str, nats_url: str) -> Path:
        (self.work / "state").mkdir(exist_ok=True)
        data = {"state_dir": str(self.work / "state"),
                "api": {"listen_port": self.port, "public_url": f"http://127.0.0.1:{self.port}"},
                "database": {"url": db_url},
                "nats": {"url": nats_url, "bundled": False},
                "compute": {"quota_instances": -1, "quota_cores": -1, "quota_ram": -1,
                            "max_pending_builds": self.o.max_pending_builds},
                "agent": {"heartbeat_seconds": self.o.heartbeat_seconds},
                "controller": {"host_down_seconds": self.o.host_down_seconds}}
        path = self.work / "cloudland.toml"
        path.write_text(tomli_w.dumps(data))
        return path

    async def seed(self, config_path: Path) -> str:
        """Migrate, bootstrap identity, and add the flavor, image, projects and their networks."""
        from sqlalchemy import delete, select

        from cloudland.api.identity.bootstrap import bootstrap_identity
        from cloudland.api.network.secgroup_rules import ensure_default_group
        from cloudland.config import load_config
        from cloudland.db.engine import make_engine, make_sessionmaker
        from cloudland.db.migrate import upgrade_async
        from cloudland.db.models import (
            Flavor,
            Image,
            Network,
            Port,
            Project,
            Role,
            RoleAssignment,
            SecurityGroupRule,
            Subnet,
        )

        config = load_config(config_path)
        await upgrade_async(config.database_url)
        engine = make_engine(config.database_url)
        sm = make_sessionmaker(engine)
        creds = await bootstrap_identity(sm, config)
        n_networks = max(4, math.ceil(self.o.vms / self.o.vms_per_network))
        n_projects = self.o.projects or min(50, max(4, n_networks // 10))
        small = math.ceil(self.o.vms / n_networks) <= 200
        async with sm() as s, s.begin():
            admin_role = (await s.scalars(select(Role.id).where(Role.name == "admin"))).one()
            s.add(Flavor(id="bench", name="bench.tiny", vcpus=1, ram=256, disk=1))
            image = Image(name="bench", status="active", visibility="public", disk_format="qcow2",
                          container_format="bare", size=1024, os_hash_algo="sha512", os_hash_value="ab" * 64)
            s.add(image)
            for i in range(n_projects):
                project = Project(name=f"bench-{i}", domain_id="default")
                s.add(project)
                await s.flush()
                s.add(RoleAssignment(user_id=creds.admin_user_id, target_type="project", target_id=project.id,
                                     role_id=admin_role))
                self.projects.append(project.id)
            for project_id in self.projects:  # as the first create would (then it is batched too)
                group_id = await ensure_default_group(s, project_id)
                if not self.o.remote_group_rules:
                    await s.execute(delete(SecurityGroupRule).where(
                        SecurityGroupRule.security_group_id == group_id,
                        SecurityGroupRule.remote_group_id.is_not(None)))
                    s.add(SecurityGroupRule(security_group_id=group_id, project_id=project_id,
                                            direction="ingress", ethertype="IPv4",
                                            remote_ip_prefix="10.0.0.0/8", description=""))
            for i in range(n_networks):
                project_id = self.projects[i % n_projects]
                net = Network(name=f"bench-net-{i}", project_id=project_id, segmentation_id=50000 + i)
                s.add(net)
                await s.flush()
                if small:  # 10.x.y.0/24
                    b = f"10.{i // 250 % 250}.{i % 250}"
                    cidr, gateway, first, last = f"{b}.0/24", f"{b}.1", f"{b}.3", f"{b}.254"
                else:  # 10.x.0.0/16
                    b = f"10.{i % 250}"
                    cidr, gateway, first, last = f"{b}.0.0/16", f"{b}.0.1", f"{b}.0.3", f"{b}.255.254"
                s.add(Subnet(network_id=net.id, project_id=project_id, cidr=cidr, gateway_ip=gateway,
                             allocation_pools=[{"start": first, "end": last}]))
                s.add(Port(network_id=net.id, project_id=project_id, device_id=f"dhcp-{net.id}",
                           mac_address=f"fa:16:3e:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
                           device_owner="network:dhcp"))
                self.networks.append((i % n_projects, net.id))
                if i % 1000 == 999:
                    await s.flush()
            await s.flush()
            self.image_id = image.id
        await engine.dispose()
        return creds.admin_password

    async def analyze(self, config_path: Path) -> None:
        """PostgreSQL: statistics for the tables just written, as autovacuum would have gathered on
        any cloud that has run for a minute. Without them the planner guesses the selectivity
        of ``device_id = ANY(:ids)`` and scans ``ports`` whole, which grows with the launch."""
        from sqlalchemy import text

        from cloudland.config import load_config
        from cloudland.db.engine import make_engine

        url = load_config(config_path).database_url
        if not url.startswith("postgresql"):
            return
        engine = make_engine(url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text("ANALYZE"))
        finally:
            await engine.dispose()

    async def prefill(self, config_path: Path, count: int) -> None:
        """``count`` server rows (ERROR, never scheduled: the controller leaves them alone),
        written in bulk, so list latency can be measured at size without launching them all."""
        import uuid

        from sqlalchemy import insert

        from cloudland.config import load_config
        from cloudland.db.engine import make_engine
        from cloudland.db.models import Instance, utcnow

        engine = make_engine(load_config(config_path).database_url)
        start = utcnow() - timedelta(days=1)
        flavor = {"vcpus": 1, "ram": 256, "disk": 1, "swap": 0, "ephemeral": 0, "name": "bench.tiny",
                  "extra_specs": {}}
        fault = {"code": 500, "message": "prefilled by the benchmark", "created": "2026-01-01T00:00:00Z"}
        t0 = time.monotonic()
        async with engine.begin() as conn:
            for first in range(0, count, 5000):
                rows = [{"id": str(uuid.uuid4()), "name": f"pre-{i}", "user_id": "bench",
                         "project_id": self.projects[i % len(self.projects)], "image_id": self.image_id,
                         "flavor_id": "bench", "flavor": flavor, "vm_state": "error", "task_state": None,
                         "power_state": 0, "fault": fault, "created_at": start + timedelta(milliseconds=i),
                         "updated_at": start}
                        for i in range(first, min(count, first + 5000))]
                await conn.execute(insert(Instance.__table__), rows)
        await engine.dispose()
        self.o.log(f"prefilled {count} server rows in {time.monotonic() - t0:.0f}s")

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        # CLOUDLAND_BENCH_PROFILE=controller,api-0: run those under cProfile (<logs>/<name>.prof).
        profiled = os.environ.get("CLOUDLAND_BENCH_PROFILE", "").split(",")
        if name in profiled and argv[1] == "-m":
            argv = [argv[0], "-m", "cProfile", "-o", str(self.logs / f"{name}.prof"), *argv[1:]]
        out = open(self.logs / f"{name}.log", "ab")
        popen = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})}, start_new_session=True)
        out.close()
        proc = Proc(name, popen)
        self.procs.append(proc)
        return proc

    def start_relays(self, tree: NatsTree, racks: int) -> None:
        """``cloudland relay`` processes, each serving a few rack leaves."""
        urls = [tree.leaf(f"nova/rack{r}").url for r in range(racks)]
        per = max(1, self.o.leaves_per_relay_process)
        for k in range(0, len(urls), per):
            argv = [sys.executable, "-m", "cloudland", "relay",
                    *[arg for url in urls[k:k + per] for arg in ("--nats", url)]]
            self.relays.append(self.spawn(f"relays-{k // per}", argv))

    def start_simhosts(self, tree: NatsTree, racks: int) -> None:
        """One process for the kill group, then chunks of each rack."""
        h = self.o.hypervisors
        per_proc = self.o.hosts_per_process or max(100, math.ceil(h / 4))
        kill = min(self.o.kill_group, max(1, h // 5))
        chunks: list[tuple[int, int, int]] = []  # (first, count, rack)
        for r in range(racks):
            first, end = r * self.o.hosts_per_rack, min(h, (r + 1) * self.o.hosts_per_rack)
            if r == 0:
                chunks.append((0, kill, 0))
                first = kill
            while first < end:
                count = min(per_proc, end - first)
                chunks.append((first, count, r))
                first += count
        self.kill_hosts = [f"hv-{i:05d}" for i in range(kill)]
        for k, (first, count, rack) in enumerate(chunks):
            url = tree.leaf(f"nova/rack{rack}").url
            argv = [sys.executable, "-m", "cloudland.bench.simhosts", "--nats", url, "--prefix", "hv",
                    "--first", str(first), "--count", str(count),
                    "--heartbeat", str(self.o.heartbeat_seconds),
                    "--connections", str(max(1, min(4, count // 250)))]
            self.sims.append(self.spawn(f"simhosts-{k}", argv))

    async def wait_ready(self, admin_password: str) -> None:
        deadline = time.monotonic() + max(120.0, self.o.hypervisors / 50)
        for proc in [*self.relays, *self.sims]:
            while True:
                text = (self.logs / f"{proc.name}.log").read_text(errors="replace")
                if "ready" in text:
                    break
                if proc.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} did not start; see {self.logs / (proc.name + '.log')}")
                await asyncio.sleep(0.2)
        conn = Connection("127.0.0.1", self.port)
        while True:
            with contextlib.suppress(OSError, ValueError, asyncio.IncompleteReadError):
                status, _, _ = await conn.request("GET", "/healthz")
                if status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not come up")
            await asyncio.sleep(0.2)
        conn.close()
        while True:
            stats = await self.controller_stats()
            h = self.o.hypervisors
            if stats.get("hosts_up", 0) >= h and stats.get("synced", 0) >= h:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {stats.get('hosts_up')} of {self.o.hypervisors} hosts came up")
            await asyncio.sleep(0.5)

    async def controller_stats(self, reset: bool = False) -> dict[str, Any]:
        assert self.nc is not None
        try:
            reply = await self.nc.request(subjects.CONTROLLER_STATS, b"reset" if reset else b"", timeout=10)
            return dict(json.loads(reply.data))
        except Exception:
            return {}

    async def token(self, password: str, project_id: str | None, rescope: str = "") -> str:
        """Admin's token for a project (rescoping ``rescope`` skips the password hash)."""
        scope = ({"project": {"id": project_id}} if project_id
                 else {"project": {"name": "admin", "domain": {"name": "Default"}}})
        user = {"name": "admin", "domain": {"name": "Default"}, "password": password}
        identity: dict[str, Any] = ({"methods": ["token"], "token": {"id": rescope}} if rescope
                                    else {"methods": ["password"], "password": {"user": user}})
        body = {"auth": {"identity": identity, "scope": scope}}
        conn = Connection("127.0.0.1", self.port)
        status, headers, reply = await conn.request("POST", "/identity/v3/auth/tokens", body)
        conn.close()
        if status != 201:
            raise RuntimeError(f"token: {status} {reply}")
        return headers["x-subject-token"]

    # --- the launch -----------------------------------------------------------------------

    async def launch(self, tokens: list[str], admin_token: str) -> Launch:
        o = self.o
        result = Launch()
        next_index = 0
        start = time.time()
        result.first_sent = start

        async def client() -> None:
            nonlocal next_index
            conn = Connection("127.0.0.1", self.port)
            while next_index < o.vms:
                i = next_index
                next_index += 1
                if o.rate > 0:
                    delay = start + i / o.rate - time.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                project, network_id = self.networks[i % len(self.networks)]
                body = {"server": {"name": f"vm-{i}", "imageRef": self.image_id, "flavorRef": "bench",
                                   "networks": [{"uuid": network_id}]}}
                while True:
                    sent = time.time()
                    try:
                        status, headers, reply = await conn.request("POST", f"{V21}/servers", body,
                                                                    {"X-Auth-Token": tokens[project]})
                    except (OSError, asyncio.IncompleteReadError):
                        status, reply = 0, None
                        conn.close()
                    if status != 429:
                        break
                    # Admission control (compute.max_pending_builds): as a client with backoff.
                    result.throttled += 1
                    await asyncio.sleep(float(headers.get("retry-after", "1")))
                if status == 202 and reply:
                    result.sent[reply["server"]["id"]] = sent
                else:
                    result.rejected += 1
                    result.rejections[status] = result.rejections.get(status, 0) + 1
                result.last_sent = time.time()
            conn.close()

        progress = asyncio.create_task(self.log_progress(result))
        await asyncio.gather(*(client() for _ in range(o.clients)))
        progress.cancel()
        deadline = time.monotonic() + o.timeout
        while time.monotonic() < deadline:
            if not await self.still_building(admin_token):
                break
            await asyncio.sleep(0.5)
        await self.collect(admin_token, result)
        return result

    async def log_progress(self, result: Launch) -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(30)
            elapsed = time.monotonic() - started
            self.o.log(f"{len(result.sent)} creates accepted in {elapsed:.0f}s "
                       f"({len(result.sent) / elapsed:.0f}/s), {result.rejected} rejected, "
                       f"{result.throttled} throttled (429)")

    async def still_building(self, token: str) -> bool:
        """Whether any server is still building: one brief row (``status=BUILD&limit=1``). The
        newest servers are the last to finish, so the index walk stops at once until none is
        left. (Watching with ``changes-since`` detail pages cost the API more CPU than the
        creates it watched.)"""
        conn = Connection("127.0.0.1", self.port)
        try:
            status, _, body = await conn.request(
                "GET", f"{V21}/servers", None, {"X-Auth-Token": token},
                {"all_tenants": "1", "status": "BUILD", "limit": "1"})
        finally:
            conn.close()
        return status != 200 or bool(body.get("servers"))

    async def collect(self, token: str, result: Launch) -> None:
        """Every launched server's ``OS-SRV-USG:launched_at`` (its ACTIVE time) and the ones in
        ERROR, paging once through all servers (keyset pages of 1,000)."""
        conn = Connection("127.0.0.1", self.port)
        marker = None
        while True:
            params = {"all_tenants": "1", "limit": "1000"}
            if marker:
                params["marker"] = marker
            status, _, body = await conn.request("GET", f"{V21}/servers/detail", None,
                                                 {"X-Auth-Token": token}, params)
            if status != 200:
                raise RuntimeError(f"list: {status} {body}")
            servers = body.get("servers", [])
            for srv in servers:
                sid = srv["id"]
                if sid not in result.sent:
                    continue  # prefilled rows
                if srv["status"] == "ACTIVE":
                    launched = srv.get("OS-SRV-USG:launched_at")
                    result.active[sid] = (datetime.fromisoformat(launched).replace(tzinfo=UTC).timestamp()
                                          if launched else time.time())
                elif srv["status"] == "ERROR":
                    result.errors.add(sid)
            if len(servers) < 1000:
                break
            marker = servers[-1]["id"]
        conn.close()

    async def list_latency(self, token: str) -> dict[str, Any]:
        """Page through every server (1,000 per page, all tenants) and time each page."""
        conn = Connection("127.0.0.1", self.port)
        times: list[float] = []
        total = 0
        for _ in range(2):
            marker = None
            pages = 0
            while pages < 200:  # keyset pages cost the same at any depth
                pages += 1
                params = {"all_tenants": "1", "limit": "1000"}
                if marker:
                    params["marker"] = marker
                t0 = time.perf_counter()
                status, _, body = await conn.request("GET", f"{V21}/servers/detail", None,
                                                     {"X-Auth-Token": token}, params)
                times.append(time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"list: {status} {body}")
                servers = body["servers"]
                total += len(servers)
                if len(servers) < 1000:
                    break
                marker = servers[-1]["id"]
        conn.close()
        p = percentiles(times)
        return {"list_page_median_s": p["p50"], "list_page_p99_s": p["p99"], "list_pages": len(times),
                "list_servers_seen": total // 2}

    async def down_detection(self) -> float | None:
        """SIGKILL the kill group's process; seconds until the hosts table says they are all down."""
        from sqlalchemy import func, select

        from cloudland.config import load_config
        from cloudland.db.engine import make_engine
        from cloudland.db.models import Host

        victim = self.sims[0]
        config = load_config(self.work / "cloudland.toml")
        engine = make_engine(config.database_url)
        try:
            victim.popen.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            while time.monotonic() - killed < 120:
                async with engine.connect() as conn:
                    down = await conn.scalar(select(func.count()).select_from(Host).where(
                        Host.id.in_(self.kill_hosts), Host.status == "down"))
                if down == len(self.kill_hosts):
                    return time.monotonic() - killed
                await asyncio.sleep(0.2)
            return None
        finally:
            await engine.dispose()

    def cpu_by_role(self) -> dict[str, dict[int, float]]:
        """CPU seconds so far of every process, by role (for where the machine's CPU went)."""
        roles: dict[str, dict[int, float]] = {"api": {}, "controller": {}, "simhosts": {}, "relays": {},
                                              "nats": {}, "postgres": {}}
        for proc in self.procs:
            role = proc.name.split("-")[0]
            roles.setdefault(role, {})[proc.popen.pid] = proc.cpu()
        if self.tree is not None:
            roles["nats"] = {p.pid: proc_cpu(p.pid) for p in self.tree.processes.values()}
        if self.pg is not None:
            pid_file = self.pg.data_dir / "postmaster.pid"
            with contextlib.suppress(OSError, ValueError):
                master = int(pid_file.read_text().split()[0])
                roles["postgres"] = {pid: proc_cpu(pid) for pid in _children(master)}
                roles["postgres"][master] = proc_cpu(master, reaped_children=True)
        roles["bench_client"] = {0: self_cpu()}
        return roles

    @staticmethod
    def cpu_delta(before: dict[str, dict[int, float]],
                  after: dict[str, dict[int, float]]) -> dict[str, float]:
        return {role: round(sum(cpu - before.get(role, {}).get(pid, 0.0) for pid, cpu in pids.items()), 2)
                for role, pids in after.items()}

    # --- the run --------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        o = self.o
        t_setup = time.monotonic()
        db_url = self.database_url()
        racks = max(2, math.ceil(o.hypervisors / o.hosts_per_rack))
        self.tree = NatsTree(self.work / "nats", [f"nova/rack{r}" for r in range(racks)])
        self.tree.start()
        from cloudland.bus.topology import _free_ports

        self.port = _free_ports(1)[0]
        config_path = self.write_config(db_url, self.tree.core.url)
        o.log(f"work dir {self.work}; database {db_url.split('@')[-1]}; NATS core {self.tree.core.url}, "
              f"{racks} racks")
        password = await self.seed(config_path)
        if o.prefill:
            await self.prefill(config_path, o.prefill)
        await self.analyze(config_path)
        self.nc = await nats.connect(self.tree.core.url)
        controller = self.spawn("controller", [sys.executable, "-m", "cloudland", "controller",
                                               "--config", str(config_path)])
        apis = [self.spawn(f"api-{k}", [sys.executable, "-m", "cloudland.bench.apiworker", str(config_path),
                                        str(self.port)]) for k in range(o.api_workers)]
        if o.relays:
            self.start_relays(self.tree, racks)
        self.start_simhosts(self.tree, racks)
        await self.wait_ready(password)
        setup_seconds = time.monotonic() - t_setup
        o.log(f"{o.hypervisors} hypervisors up and synced after {setup_seconds:.1f}s; "
              f"launching {o.vms} servers with {o.clients} clients over {len(self.projects)} projects, "
              f"{len(self.networks)} networks")
        admin_token = await self.token(password, None)
        tokens = [await self.token(password, pid, admin_token) for pid in self.projects]

        passes0 = (await self.controller_stats(reset=True)).get("passes", 0)
        cpu0 = {p.name: p.cpu() for p in (controller, *apis)}
        roles0 = self.cpu_by_role()
        t0 = time.monotonic()
        launch = await self.launch(tokens, admin_token)
        launch_wall = time.monotonic() - t0
        cpu1 = {p.name: p.cpu() for p in (controller, *apis)}
        roles = self.cpu_delta(roles0, self.cpu_by_role())
        stats = await self.controller_stats()

        latencies = [launch.active[sid] - sent for sid, sent in launch.sent.items() if sid in launch.active]
        succeeded = len(launch.active)
        span = (max(launch.active.values()) - launch.first_sent) if launch.active else 0.0
        lat = percentiles(latencies)
        api_cpu = sum(cpu1[p.name] - cpu0[p.name] for p in apis)
        ctl_cpu = cpu1["controller"] - cpu0["controller"]
        f: dict[str, Any] = {
            "hypervisors": o.hypervisors, "vms": o.vms, "database": "postgresql" if "postgresql" in db_url
            else "sqlite", "api_workers": o.api_workers, "clients": o.clients, "projects": len(self.projects),
            "networks": len(self.networks),
            "rate_limit": o.rate, "remote_group_rules": o.remote_group_rules,
            "succeeded": succeeded, "failed": o.vms - succeeded, "errors": len(launch.errors),
            "rejected": launch.rejected, "rejections": {str(k): v for k, v in launch.rejections.items()},
            "throttled": launch.throttled, "max_pending_builds": o.max_pending_builds,
            "success_rate": succeeded / o.vms if o.vms else 1.0,
            "vms_per_second": succeeded / span if span > 0 else 0.0,
            "create_requests_per_second": len(launch.sent) / max(1e-9, launch.last_sent - launch.first_sent),
            "create_to_active_p50_s": lat["p50"], "create_to_active_p99_s": lat["p99"],
            "create_to_active_max_s": lat["max"],
            "launch_seconds": launch_wall, "setup_seconds": setup_seconds,
            "controller_cpu_seconds": ctl_cpu, "controller_cpu_percent": 100 * ctl_cpu / launch_wall,
            "api_cpu_seconds": api_cpu, "api_cpu_percent": 100 * api_cpu / launch_wall,
            # Per accepted create, the watcher's listings included: steadier than the rates on a
            # shared machine.
            "api_cpu_ms_per_create": 1000 * api_cpu / max(1, len(launch.sent)),
            "heartbeat_lag_p50_s": stats.get("heartbeat_lag", {}).get("p50", 0.0),
            "heartbeat_lag_p99_s": stats.get("heartbeat_lag", {}).get("p99", 0.0),
            "heartbeat_lag_max_s": stats.get("heartbeat_lag", {}).get("max", 0.0),
            "controller_pass_p50_s": stats.get("pass_seconds", {}).get("p50", 0.0),
            "controller_pass_max_s": stats.get("pass_seconds", {}).get("max", 0.0),
            "controller_passes": stats.get("passes", 0) - passes0,
            # Wall seconds of the launch's passes by phase (applying reports, collecting work,
            # scheduling, converging: building and sending specs).
            "controller_phase_seconds": stats.get("pass_phase_seconds", {}),
            "cpu_seconds_by_role": roles,
            # API, controller and database per accepted create: what the control plane costs
            # apart from the simulation, which shares this machine's cores with it.
            "control_plane_cpu_ms_per_create": 1000 * sum(roles.get(r, 0.0) for r in CONTROL_PLANE_ROLES)
            / max(1, len(launch.sent)),
            "relays": len(self.relays),
            # Heartbeats the controller's own relay forwarded (all of them without leaf relays).
            "heartbeats_relayed_by_controller": stats.get("relayed_in_process", 0),
            "heartbeat_batches": stats.get("heartbeat_batches", 0),
            # Peer lists and member sets asked for whole by agents that found a message missing.
            "sets_requested": stats.get("sets_requested", 0),
        }
        o.log(f"launched: {succeeded}/{o.vms} ACTIVE, {f['vms_per_second']:.0f} VMs/s; listing...")
        f.update(await self.list_latency(admin_token))
        o.log("killing the kill group...")
        f["down_group"] = len(self.kill_hosts)
        f["down_detection_s"] = await self.down_detection()
        f["controller_peak_rss_mb"] = controller.peak_rss_mb()
        f["api_peak_rss_mb"] = sum(p.peak_rss_mb() for p in apis)
        f["api_peak_rss_mb_per_worker"] = max((p.peak_rss_mb() for p in apis), default=0.0)
        self.figures = f
        return f

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.terminate()
        for proc in self.procs:
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        if self.tree is not None:
            self.tree.stop()
        if self.pg is not None:
            self.pg.stop() if self.o.keep else self.pg.remove()


def report(f: dict[str, Any]) -> str:
    def s(v: Any, unit: str = "s") -> str:
        return "n/a" if v is None else f"{v * 1000:.0f} ms" if unit == "ms" else f"{v:.2f} {unit}"

    return "\n".join([
        f"hypervisors {f['hypervisors']}, VMs {f['vms']}, database {f['database']}, "
        f"API workers {f['api_workers']}, clients {f['clients']}, projects {f['projects']}, "
        f"networks {f['networks']}"
        + ("" if f.get("remote_group_rules", True) else ", default group without remote-group rules"),
        f"success rate        {100 * f['success_rate']:.3f}% ({f['succeeded']} ACTIVE, {f['errors']} ERROR, "
        f"{f['rejected']} rejected {f['rejections'] or ''}; {f.get('throttled', 0)} creates throttled "
        f"by admission control and sent again)",
        f"sustained           {f['vms_per_second']:.1f} VMs/s (create requests "
        f"{f['create_requests_per_second']:.1f}/s)",
        f"create -> ACTIVE    p50 {s(f['create_to_active_p50_s'], 'ms')}, "
        f"p99 {s(f['create_to_active_p99_s'], 'ms')}, max {s(f['create_to_active_max_s'], 'ms')}",
        f"list page (1,000)   median {s(f['list_page_median_s'], 'ms')}, p99 {s(f['list_page_p99_s'], 'ms')} "
        f"over {f['list_pages']} pages ({f['list_servers_seen']} servers)",
        f"controller          CPU {f['controller_cpu_percent']:.0f}% of a core during the launch, "
        f"peak RSS {f['controller_peak_rss_mb']:.0f} MiB; pass p50 {s(f['controller_pass_p50_s'], 'ms')}, "
        f"max {s(f['controller_pass_max_s'], 'ms')}; {f.get('controller_passes', 0)} passes, wall s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in f.get("controller_phase_seconds", {}).items()),
        f"API ({f['api_workers']} workers)     CPU {f['api_cpu_percent']:.0f}% of a core "
        f"({f.get('api_cpu_ms_per_create', 0):.1f} ms per create), "
        f"peak RSS {f['api_peak_rss_mb']:.0f} MiB total",
        f"heartbeat lag       p50 {s(f['heartbeat_lag_p50_s'], 'ms')}, "
        f"p99 {s(f['heartbeat_lag_p99_s'], 'ms')}, max {s(f['heartbeat_lag_max_s'], 'ms')}",
        f"down detection      {s(f['down_detection_s'])} for {f['down_group']} killed hypervisors",
        f"CPU during launch   {f['launch_seconds']:.0f} s wall; CPU seconds by role: "
        + ", ".join(f"{k} {v:.0f}" for k, v in f["cpu_seconds_by_role"].items()),
        f"control plane       {f.get('control_plane_cpu_ms_per_create', 0):.2f} ms CPU per create "
        f"({', '.join(CONTROL_PLANE_ROLES)})",
    ])


async def run_scale(opts: ScaleOptions) -> dict[str, Any]:
    bench = ScaleBench(opts)
    try:
        figures = await bench.run()
    finally:
        await bench.close()
    if opts.json_path:
        opts.json_path.write_text(json.dumps(figures, indent=2) + "\n")
    return figures
