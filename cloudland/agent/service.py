"""The hypervisor agent: turns idempotent commands into driver calls and reports actual state.

See docs/agent.md. In short: commands on ``host.<id>.cmd`` are queued per instance (or
network) and run in order, different keys concurrently; a newer command for a key replaces
one still waiting (every command carries the whole desired spec, so only the last one
matters). Requests on ``host.<id>.rpc`` are answered directly. Every heartbeat tick the
agent compares the driver's power states with what it last reported and reports changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cloudland.agent.drivers.compute.base import ComputeDriver
from cloudland.agent.drivers.network.base import NetworkDriver
from cloudland.agent.factory import underlay_address
from cloudland.agent.image_cache import ImageCache
from cloudland.agent.instance_state import InstanceRecord, InstanceStateStore
from cloudland.agent.member_sets import MemberSets
from cloudland.bus import subjects
from cloudland.bus.connection import connect, subscriptions_ready
from cloudland.bus.messages import (
    PROTOCOL_VERSION,
    ConsoleOutput,
    EnsureInstance,
    EnsureInstanceAbsent,
    EnsureNetwork,
    EnsureNetworkAbsent,
    GetConsoleOutput,
    GetHostState,
    GetSet,
    GroupMembers,
    Heartbeat,
    HostCommand,
    HostState,
    InstanceSpec,
    InstanceState,
    InstanceStatus,
    Message,
    NetworkPeers,
    NetworkSpec,
    Resources,
    SetChangeMessage,
    SetVersion,
    decode,
    encode,
    state_digest,
)
from cloudland.bus.shared_subscriptions import Following, SharedSubscriptions
from cloudland.config import Config

log = logging.getLogger(__name__)

_Update = TypeVar("_Update", bound=SetChangeMessage)

_INVALID_ID_CHARS = set(".*> \t\r\n")

SET_REQUEST_SPREAD = 0.5  # seconds: a GetSet waits up to this long first
SET_REQUEST_TIMEOUT = 5.0


class AgentService:
    def __init__(
        self,
        config: Config,
        compute: ComputeDriver,
        network: NetworkDriver,
        host_id: str | None = None,
        image_cache: ImageCache | None = None,
        records: InstanceStateStore | None = None,
        nc: Client | None = None,
        member_sets: MemberSets | None = None,
        subscriptions: SharedSubscriptions | None = None,
    ) -> None:
        """``nc``: a NATS connection to share (many simulated agents in one process); the agent
        then neither connects nor closes it, and the owner calls ``on_reconnect()`` for it.
        ``member_sets``: remote groups' member sets to share with the other agents of the process;
        ``subscriptions``: their subscriptions to sets on ``nc``, likewise."""
        self.config = config
        self.compute = compute
        self.network = network
        self.host_id = host_id or config.host_id()
        if not self.host_id or _INVALID_ID_CHARS & set(self.host_id):
            raise ValueError(f"host id {self.host_id!r} cannot be a NATS subject token (no '.', '*', '>')")
        self.zone = config.agent.zone
        state_dir = config.agent_state_dir(self.host_id)
        self.images = image_cache or ImageCache(state_dir / "images")
        self.records = records or InstanceStateStore(state_dir / "records")
        self.address = underlay_address(config)
        self.boot_id = ""
        self.nc: Client | None = None
        self._shared_nc = nc
        self._subs: list[Subscription] = []
        self._shared_subscriptions = subscriptions
        self.subscriptions: SharedSubscriptions | None = None  # set subjects (followed by many agents)
        # Networks this host carries: the last spec applied, and the peers subscription.
        self._net_specs: dict[str, NetworkSpec] = {}
        self._net_subs: dict[str, Following] = {}
        self._group_subs: dict[str, Following] = {}  # remote groups the network specs name
        self.member_sets = member_sets or MemberSets()
        self._asking: set[tuple[str, str]] = set()  # sets asked for whole (GetSet), not answered yet
        self._members_seen: dict[str, SetVersion] = {}  # the newest message of each member set
        self._following_groups = asyncio.Lock()  # networks' workers run side by side
        # Last reported status of every instance this host has (never "absent").
        self._status: dict[str, InstanceStatus] = {}
        self._digest: str | None = None  # state_digest of _status; None: to be computed
        # Per key ("instance:<id>" / "network:<id>"): the newest command not yet started,
        # and the task draining that key.
        self._pending: dict[str, HostCommand] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        # Instances with a command running, and a counter bumped around every command, so
        # the watcher never overwrites a report with a power state read during a command.
        self._busy: set[str] = set()
        self._seq: dict[str, int] = {}
        self._watch_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat_task: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.boot_id = secrets.token_hex(8)
        await self.compute.init_host()
        await self.network.init_host()
        self.records.load()
        self._status = {}
        self._digest = None
        for iid, state in (await self.compute.list_instances()).items():
            if state != "absent":
                self._status[iid] = self._make_status(iid, state)
        self.nc = self._shared_nc or await self._connect()
        self.subscriptions = self._shared_subscriptions or SharedSubscriptions(self.nc)
        self._subs = [
            await self.nc.subscribe(subjects.host_cmd(self.host_id), cb=self._on_command),
            await self.nc.subscribe(subjects.host_rpc(self.host_id), cb=self._on_request),
        ]
        # The server must have our subscriptions before we announce ourselves.
        await subscriptions_ready(self.nc)
        await self._publish(await self._host_state())
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name="agent-heartbeat")
        log.info("agent %s started (zone %s, %d instances, driver %s)",
                 self.host_id, self.zone, len(self._status), self.compute.name)

    async def stop(self) -> None:
        """Stop listening and release the drivers; guests keep running."""
        if self._heartbeat_task:
            self._heartbeat_task.cancel()
        for sub in [*self._subs, *self._net_subs.values(), *self._group_subs.values()]:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []
        self._net_subs = {}
        self._group_subs = {}
        # An interrupted command is harmless: the controller re-sends it, and it is idempotent.
        tasks = [t for t in (self._heartbeat_task, *self._workers.values(), *self._tasks) if t]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._heartbeat_task = None
        self._pending.clear()
        self.subscriptions = None
        if self.nc is not None and self._shared_nc is not None:
            self.nc = None
        if self.nc is not None:
            try:
                await asyncio.wait_for(self.nc.drain(), 5)
            except Exception:
                await self.nc.close()
            self.nc = None
        await self.compute.close()
        await self.network.close()

    async def run(self) -> None:
        """Start, then serve until cancelled."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def _connect(self) -> Client:
        delay = 0.5
        while True:
            try:
                return await connect(
                    self.config.nats.url, f"agent-{self.host_id}", on_reconnect=self._on_reconnect
                )
            except Exception as e:
                log.warning("cannot reach NATS at %s (%s); retrying", self.config.nats.url, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def on_reconnect(self) -> None:
        """After NATS reconnected: report the full state (the controller may have missed some)."""
        await self._on_reconnect()

    async def _on_reconnect(self) -> None:
        self._spawn(self._report_full_state())

    async def _report_full_state(self) -> None:
        await self._publish(await self._host_state())

    # --- commands ---------------------------------------------------------------------------

    async def _on_command(self, msg: Msg) -> None:
        try:
            cmd = decode(msg.data)
        except Exception as e:
            log.error("undecodable command on %s: %s", msg.subject, e)
            return
        if cmd.v > PROTOCOL_VERSION:
            log.warning("command %s has protocol version %d (agent speaks %d)",
                        type(cmd).__name__, cmd.v, PROTOCOL_VERSION)
        if isinstance(cmd, EnsureInstance):
            key = f"instance:{cmd.spec.id}"
        elif isinstance(cmd, EnsureInstanceAbsent):
            key = f"instance:{cmd.instance_id}"
        elif isinstance(cmd, EnsureNetwork):
            key = f"network:{cmd.spec.id}"
        elif isinstance(cmd, EnsureNetworkAbsent):
            key = f"network:{cmd.network_id}"
        else:
            log.warning("ignoring %s on the command subject", type(cmd).__name__)
            return
        self.submit(key, cmd)

    @property
    def idle(self) -> bool:
        """No command is running or waiting."""
        return not self._workers and not self._pending

    def submit(self, key: str, cmd: HostCommand) -> None:
        """Queue ``cmd`` behind the running command for ``key``; never blocks."""
        self._pending[key] = cmd
        if key not in self._workers:
            self._workers[key] = asyncio.create_task(self._drain(key), name=f"agent-{key}")

    async def _drain(self, key: str) -> None:
        try:
            while (cmd := self._pending.pop(key, None)) is not None:
                await self._execute(cmd)
        finally:
            self._workers.pop(key, None)

    async def _execute(self, cmd: HostCommand) -> None:
        if isinstance(cmd, EnsureInstance | EnsureInstanceAbsent):
            iid = cmd.spec.id if isinstance(cmd, EnsureInstance) else cmd.instance_id
            self._busy.add(iid)
            self._seq[iid] = self._seq.get(iid, 0) + 1
            try:
                if isinstance(cmd, EnsureInstance):
                    await self._ensure_instance(cmd.spec)
                else:
                    await self._ensure_instance_absent(iid)
            except Exception as e:
                log.exception("instance %s: %s failed", iid, type(cmd).__name__)
                await self._report(iid, "error", error=_describe(e))
            finally:
                self._busy.discard(iid)
                self._seq[iid] += 1
            return
        try:
            if isinstance(cmd, EnsureNetwork):
                # Recorded first: a peer list arriving meanwhile applies to this spec, not an older
                # one (then queued, it runs next); so again once its member sets are filled in.
                before = self._net_specs.get(cmd.spec.id)
                self._net_specs[cmd.spec.id] = cmd.spec
                spec = self._shared_members(await self._with_members(cmd.spec))
                self._net_specs[spec.id] = spec
                await self._follow_peers(spec.id, True)
                groups = spec.remote_groups.keys()
                # Most specs are the last one with a changed peer list or member set: the same groups.
                if before is None or before.remote_groups.keys() != groups \
                        or not groups <= self._group_subs.keys():
                    await self._follow_groups()
                await self.network.ensure_network(spec)
            else:
                self._net_specs.pop(cmd.network_id, None)
                await self._follow_peers(cmd.network_id, False)
                await self._follow_groups()
                await self.network.remove_network(cmd.network_id)
        except Exception:
            # No per-network report exists: the controller sees the network list in HostState.
            log.exception("%s failed", type(cmd).__name__)

    def _shared_members(self, spec: NetworkSpec) -> NetworkSpec:
        """``spec`` with each member set replaced by the equal one ``member_sets`` keeps."""
        if not spec.remote_groups:
            return spec
        shared = {g: self.member_sets.adopt(g, m) for g, m in spec.remote_groups.items()}
        for group, version in spec.remote_group_versions.items():
            if group in shared:
                self.member_sets.hold(group, version, shared[group])
        if all(shared[g] is m for g, m in spec.remote_groups.items()):
            return spec
        return msgspec.structs.replace(spec, remote_groups=shared)

    async def _with_members(self, spec: NetworkSpec) -> NetworkSpec:
        """``spec`` with the member sets it names by version only: from a spec this host holds at
        that version or later, else from ``member_sets``, else asked of a controller."""
        named = [g for g in spec.remote_group_versions if g not in spec.remote_groups]
        if not named:
            return spec
        groups, versions = dict(spec.remote_groups), dict(spec.remote_group_versions)
        for group in named:
            found = self._member_set_at(group, versions[group])
            if found is not None and self._newer_seen(group, found[0]):
                found = None  # a newer message came meanwhile (to a spec that could not take it)
            if found is None:
                whole, _ = await self.member_sets.fetch(group, lambda g=group: self._request_set(
                    "members", g))
                if isinstance(whole, GroupMembers) and whole.full and whole.epoch:
                    found = (SetVersion(whole.epoch, whole.seq), whole.addresses)  # sorted by the controller
            if found is None:  # not to be had now: an empty set, and the set's next message asks again
                groups[group] = []
                del versions[group]
            else:
                versions[group], groups[group] = found
                if self._newer_seen(group, found[0]):  # came while we asked: ask again, once applied
                    self._ask_for_set("members", group)
        return msgspec.structs.replace(spec, remote_groups=groups, remote_group_versions=versions)

    def _newer_seen(self, group: str, version: SetVersion) -> bool:
        seen = self._members_seen.get(group)
        return seen is not None and seen != version and seen.at_least(version)

    def _member_set_at(self, group: str, version: SetVersion) -> tuple[SetVersion, list[str]] | None:
        """The newest set of the group held here at ``version`` or later."""
        best = self.member_sets.held(group, version)
        for held in self._net_specs.values():
            at = held.remote_group_versions.get(group)
            if at is not None and at.at_least(version) and group in held.remote_groups \
                    and (best is None or not best[0].at_least(at)):
                best = at, held.remote_groups[group]
        return best

    async def _follow_peers(self, network_id: str, follow: bool) -> None:
        """Subscribe to the network's peer lists while this host carries it."""
        sub = self._net_subs.get(network_id)
        if follow and sub is None and self.subscriptions is not None:
            self._net_subs[network_id] = await self.subscriptions.subscribe(
                subjects.network_peers(network_id), cb=self._on_peers)
        elif not follow and sub is not None:
            del self._net_subs[network_id]
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _follow_groups(self) -> None:
        """Subscribe to the member sets of the remote groups the network specs name."""
        if self.subscriptions is None:
            return
        async with self._following_groups:
            # (A spec still waiting for a set it names by version only names it too.)
            named = {g for spec in self._net_specs.values()
                     for g in (*spec.remote_groups, *spec.remote_group_versions)}
            for group in named - self._group_subs.keys():
                self._group_subs[group] = await self.subscriptions.subscribe(
                    subjects.group_members(group), cb=self._on_group_members)
            for group in self._group_subs.keys() - named:
                self._members_seen.pop(group, None)
                with contextlib.suppress(Exception):
                    await self._group_subs.pop(group).unsubscribe()

    def _patch_network(self, network_id: str,
                       change: Callable[[NetworkSpec], NetworkSpec | None]) -> None:
        """Apply ``change`` to the network's spec: the newer one queued if any (it gets the
        change), else the one last applied, which is then applied again if it changed."""
        key = f"network:{network_id}"
        waiting = self._pending.get(key)
        if isinstance(waiting, EnsureNetworkAbsent):
            return
        spec = waiting.spec if isinstance(waiting, EnsureNetwork) else self._net_specs.get(network_id)
        if spec is None or (changed := change(spec)) is None:
            return
        if isinstance(waiting, EnsureNetwork):
            self._pending[key] = EnsureNetwork(spec=changed)
        else:
            self.submit(key, EnsureNetwork(spec=changed))

    async def _on_peers(self, msg: Msg) -> None:
        update = self._decode_update(msg, NetworkPeers)
        if update is not None:
            self._take_peers(update)

    def _take_peers(self, update: NetworkPeers) -> None:
        own = self.address
        ask = False

        def change(spec: NetworkSpec) -> NetworkSpec | None:
            nonlocal ask
            take, missing = _follows(spec.peers_version, update)
            ask = ask or missing
            if not take:
                return None
            version = spec.peers_version if missing else _version(update) or spec.peers_version
            peers = _changed_list(spec.peers, update.full, [a for a in update.addresses if a != own],
                                  [a for a in update.added if a != own], update.removed)
            if peers is None:
                spec.peers_version = version  # nothing to apply again
                return None
            return msgspec.structs.replace(spec, peers=peers, peers_version=version)

        self._patch_network(update.network_id, change)
        if ask:
            self._ask_for_set("peers", update.network_id)

    async def _on_group_members(self, msg: Msg) -> None:
        update = self._decode_update(msg, GroupMembers)
        if update is not None:
            self._take_members(update, msg.data)

    def _take_members(self, update: GroupMembers, data: bytes) -> None:
        """``data``: the message as it came (``member_sets`` computes a change once per message)."""
        group = update.group_id
        if (version := _version(update)) is not None:
            seen = self._members_seen.get(group)
            if seen is None or not seen.at_least(version):
                self._members_seen[group] = version
        done: tuple[list[str], list[str] | None] | None = None  # (old, new): specs mostly share the old
        ask = False

        def change(spec: NetworkSpec) -> NetworkSpec | None:
            nonlocal done, ask
            old = spec.remote_groups.get(group)
            if old is None:
                return None
            version = spec.remote_group_versions.get(group)
            take, missing = _follows(version, update)
            ask = ask or missing
            if not take:
                return None
            if done is None or (done[0] is not old and done[0] != old):
                done = (old, self.member_sets.change(old, data, lambda current: _changed_list(
                    current, update.full, update.addresses, update.added, update.removed)))
            members = done[1]
            versions = spec.remote_group_versions
            if not missing and (new := _version(update)) is not None and new != version:
                versions = {**versions, group: new}
            if members is None:
                spec.remote_group_versions = versions  # nothing to apply again
                return None
            return msgspec.structs.replace(spec, remote_groups={**spec.remote_groups, group: members},
                                           remote_group_versions=versions)

        for network_id in [n for n, spec in self._net_specs.items() if group in spec.remote_groups]:
            self._patch_network(network_id, change)
        if ask:
            self._ask_for_set("members", group)

    def _ask_for_set(self, kind: Literal["peers", "members"], key: str) -> None:
        """A message of the set is missing: ask a controller for the whole set (once at a time)."""
        if (kind, key) not in self._asking and self.nc is not None:
            self._asking.add((kind, key))
            self._spawn(self._get_set(kind, key))

    async def _get_set(self, kind: Literal["peers", "members"], key: str) -> None:
        try:
            # Many followers find the same message missing at once (a reconnect): spread them.
            await asyncio.sleep(random.uniform(0, SET_REQUEST_SPREAD))
            whole, data = await self._request_set(kind, key)
        finally:
            self._asking.discard((kind, key))
        if isinstance(whole, NetworkPeers) and whole.full:
            self._take_peers(whole)
        elif isinstance(whole, GroupMembers) and whole.full:
            self._take_members(whole, data)

    async def _request_set(self, kind: Literal["peers", "members"], key: str) -> tuple[Message | None, bytes]:
        """A set as a controller has published it, whole (``GetSet``), and the reply as it came;
        None if it has not or does not answer (the set's next message finds it missing, and asks
        again)."""
        if self.nc is None:
            return None, b""
        try:
            reply = await self.nc.request(subjects.CONTROLLER_SETS, encode(GetSet(set_kind=kind, key=key)),
                                          timeout=SET_REQUEST_TIMEOUT)
            return (decode(reply.data) if reply.data else None), reply.data
        except Exception as e:
            log.warning("cannot get the whole %s set of %s: %s", kind, key, _describe(e))
            return None, b""

    def _decode_update(self, msg: Msg, kind: type[_Update]) -> _Update | None:
        try:
            update = self.subscriptions.decoded(msg) if self.subscriptions else decode(msg.data)
        except Exception as e:
            log.error("undecodable message on %s: %s", msg.subject, e)
            return None
        return update if isinstance(update, kind) else None

    async def _ensure_instance(self, spec: InstanceSpec) -> None:
        iid = spec.id
        old = self.records.get(iid)
        if await self.compute.power_state(iid) == "absent":
            await self._report(iid, "building", generation=spec.reboot_generation)
        # A new instance boots fresh: no reboot is owed for generations before it existed.
        applied = old.applied_reboot_generation if old else spec.reboot_generation
        # Persist the spec before touching ports so an absent command can always clean up.
        await self.records.save(InstanceRecord(spec=spec, applied_reboot_generation=applied))
        if old:
            keep = {p.port_id for p in spec.ports}
            for port in old.spec.ports:
                if port.port_id not in keep:
                    await self.network.unplug_port(port.port_id)
        base_image = await self.images.ensure(spec.image) if spec.image else None
        for port in spec.ports:
            await self.network.plug_port(port)
        await self.compute.prepare(spec, base_image)

        state = await self.compute.power_state(iid)
        if spec.power == "running":
            if state != "running":
                await self.compute.power_on(spec)
                applied = max(applied, spec.reboot_generation)  # a fresh boot is the reboot
            elif spec.reboot_generation > applied:
                await self.compute.reboot(iid, spec.reboot_hard)
                applied = spec.reboot_generation
        else:
            if state in ("running", "paused"):
                await self.compute.power_off(iid, self.config.compute.shutdown_timeout)
            applied = max(applied, spec.reboot_generation)  # a stopped guest owes no reboot
        await self.records.save(InstanceRecord(spec=spec, applied_reboot_generation=applied))
        await self._report(iid, await self.compute.power_state(iid), generation=applied)

    async def _ensure_instance_absent(self, iid: str) -> None:
        record = self.records.get(iid)
        await self.compute.destroy(iid)
        if record:
            for port in record.spec.ports:
                await self.network.unplug_port(port.port_id)
        await self.records.forget(iid)
        await self._report(iid, "absent", generation=0)

    # --- requests ---------------------------------------------------------------------------

    async def _on_request(self, msg: Msg) -> None:
        self._spawn(self._answer(msg))

    async def _answer(self, msg: Msg) -> None:
        try:
            req = decode(msg.data)
            reply: Message
            if isinstance(req, GetConsoleOutput):
                output = await self.compute.console_output(req.instance_id, req.length)
                reply = ConsoleOutput(output=output or "", found=output is not None)
            elif isinstance(req, GetHostState):
                await self.watch()
                reply = await self._host_state()
            else:
                log.warning("ignoring %s on the request subject", type(req).__name__)
                return
            await msg.respond(encode(reply))
        except Exception:
            log.exception("request on %s failed", msg.subject)

    async def _host_state(self) -> HostState:
        return HostState(
            host_id=self.host_id,
            boot_id=self.boot_id,
            instances=list(self._status.values()),
            networks=await self.network.list_networks(),
        )

    # --- reports ----------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        # The first heartbeat of this incarnation follows its HostState on report.<zone>, so the
        # controller learns the new boot_id in order with it; the others go to a relay
        # (heartbeat.<zone>), which forwards them in batches.
        subject = subjects.report(self.zone)
        while True:
            try:
                await self.watch()
                await self._publish(self.heartbeat(), subject)
                subject = subjects.heartbeat(self.zone)
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(self.config.agent.heartbeat_seconds)

    def heartbeat(self) -> Heartbeat:
        if self._digest is None:  # most heartbeats: nothing changed since the last one
            self._digest = state_digest(list(self._status.values()))
        return Heartbeat(
            host_id=self.host_id,
            zone=self.zone,
            address=self.address,
            boot_id=self.boot_id,
            resources=self.resources(),
            state_digest=self._digest,
            instance_count=len(self._status),
            driver=self.compute.name,
            sent_at=time.time(),
        )

    def resources(self) -> Resources:
        measured = self.compute.resources()
        a = self.config.agent
        return Resources(
            vcpus=a.vcpus or measured.vcpus,
            memory_mb=a.memory_mb or measured.memory_mb,
            disk_gb=a.disk_gb or measured.disk_gb,
        )

    async def watch(self) -> None:
        """Report every instance whose power state changed without a command (a guest that
        shut itself down, a QEMU that died, a guest that disappeared)."""
        async with self._watch_lock:
            seq = dict(self._seq)
            actual = await self.compute.list_instances()

            def settled(iid: str) -> bool:
                return (iid not in self._busy and f"instance:{iid}" not in self._pending
                        and self._seq.get(iid) == seq.get(iid))

            for iid, state in actual.items():
                current = self._status.get(iid)
                # An error stays reported until the next command for the instance.
                if current is not None and (current.state == "error" or current.state == state):
                    continue
                if settled(iid):
                    await self._report(iid, state)
            for iid in [i for i, s in self._status.items() if i not in actual and s.state != "error"]:
                if settled(iid):
                    await self._report(iid, "absent", generation=0)

    def _make_status(
        self, iid: str, state: InstanceState, generation: int | None = None, error: str | None = None
    ) -> InstanceStatus:
        if generation is None:
            record = self.records.get(iid)
            generation = record.applied_reboot_generation if record else 0
        return InstanceStatus(
            host_id=self.host_id, instance_id=iid, state=state, reboot_generation=generation, error=error
        )

    async def _report(
        self, iid: str, state: InstanceState, generation: int | None = None, error: str | None = None
    ) -> None:
        status = self._make_status(iid, state, generation, error)
        if state == "absent":
            self._status.pop(iid, None)
        else:
            self._status[iid] = status
        self._digest = None
        await self._publish(status)

    async def _publish(self, msg: Message, subject: str | None = None) -> None:
        """On ``report.<zone>``, or ``subject`` (heartbeats: ``heartbeat.<zone>``, to a relay)."""
        nc = self.nc
        if nc is None or nc.is_closed:
            return
        try:
            await nc.publish(subject or subjects.report(self.zone), encode(msg))
        except Exception as e:
            # The level-triggered controller recovers from a lost report via the digest.
            log.warning("cannot publish %s: %s", type(msg).__name__, e)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _describe(e: BaseException) -> str:
    text = str(e)
    return text if text else type(e).__name__


def _follows(version: SetVersion | None, update: SetChangeMessage) -> tuple[bool, bool]:
    """Whether a set at ``version`` takes ``update``, and whether a message before it is
    missing (the set is then asked for whole; the message is still taken, its changes being set
    operations, and the version stays, so the next message finds the gap again until mended)."""
    if not update.epoch:  # an unversioned publisher
        return True, False
    same = version is not None and version.epoch == update.epoch
    if update.full:
        return not (same and version is not None and update.seq < version.seq), False
    if same and version is not None and update.seq <= version.seq:
        return False, False  # had it already, or a mark of the version it has
    if same and version is not None and update.seq == version.seq + 1:
        return True, False
    return True, True


def _version(update: SetChangeMessage) -> SetVersion | None:
    return SetVersion(update.epoch, update.seq) if update.epoch else None


def _changed_list(current: list[str], full: bool, whole: list[str], added: list[str],
                  removed: list[str]) -> list[str] | None:
    """A sorted set after a ``NetworkPeers``/``GroupMembers`` message, or None when the message
    changes nothing: the whole set, or ``current`` (sorted) changed by binary searches. A member
    set is hundreds long, its change a few, and a simulated hypervisor process takes each
    message once per host: ``current`` is copied only when something changes."""
    if full:
        result = sorted(set(whole))
        return None if result == current else result
    if not any(_find(current, a)[1] for a in removed) and all(_find(current, a)[1] for a in added):
        return None
    result = list(current)
    for address in removed:
        i, found = _find(result, address)
        if found:
            del result[i]
    for address in added:
        i, found = _find(result, address)
        if not found:
            result.insert(i, address)
    return result


def _find(items: list[str], address: str) -> tuple[int, bool]:
    """Where ``address`` is or would go in the sorted ``items``, and whether it is there."""
    i = bisect_left(items, address)
    return i, i < len(items) and items[i] == address
