"""The level-triggered reconciler: compare desired state (rows) with reported state, send commands.

What the controller believes each host has (``actual``) comes only from the agents' reports
and full state replies; commands are idempotent and carry the whole spec, so a lost one is
simply sent again once its in-flight window expires. Work per pass is bounded: only dirty
instances (woken, reported, expired, on a resynced host) plus a slice of a rolling sweep.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Integer, Select, bindparam, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from cloudland.bus import subjects
from cloudland.bus.messages import (
    EnsureInstance,
    EnsureInstanceAbsent,
    EnsureNetwork,
    EnsureNetworkAbsent,
    GetSet,
    GroupMembers,
    Heartbeat,
    HostCommand,
    HostState,
    InstanceStatus,
    Message,
    NetworkPeers,
    NetworkSpec,
    SetChangeMessage,
    encode,
    state_digest,
)
from cloudland.config import Config
from cloudland.controller import scheduler, specs
from cloudland.controller.broadcast_sets import BroadcastSets
from cloudland.controller.columns import OneOf, json_text, json_value, per_dialect
from cloudland.controller.group_members import GroupMemberIndex
from cloudland.controller.hosts import HostIndex, HostInfo
from cloudland.controller.instance_status import Outcome, apply_statuses, finalize_delete
from cloudland.controller.network_hosts import NetworkHostCache
from cloudland.controller.specs import InstanceRow
from cloudland.controller.usage import HostUsage
from cloudland.db.models import HOST_DISABLED, UNPLACED, Host, Instance

log = logging.getLogger(__name__)

# Deliveries a second of remote groups' member sets, all groups together (see broadcast_sets):
# what the full specs' fan-out sent before, at most (128 a pass).
GROUP_SETS_BUDGET = 2000.0

# The groups considered, and the member sets of those named as remote group (``_converge``).
MemberSets = tuple[set[str], dict[str, list[str]]]

Outgoing = tuple[str, HostCommand, bytes]  # (host, command, the command encoded)
# Sends an ``Outgoing``: commands come encoded (a network spec is encoded for its digest anyway).
Send = Callable[[str, HostCommand, bytes], Awaitable[None]]
Broadcast = Callable[[str, Message], Awaitable[None]]
HostNet = tuple[str, str]


_instances = Instance.__table__
_PENDING = (select(_instances.c.id, _instances.c.deleted, json_text(_instances.c.flavor),
                   _instances.c.availability_zone, _instances.c.requested_host)
            .where(text(UNPLACED))  # ix_instances_unplaced, in its order
            .order_by(_instances.c.created_at, _instances.c.id).limit(bindparam("limit", type_=Integer)))
# Disabled hosts, from the partial index ``ix_hosts_disabled`` (its predicate, literally).
_DISABLED_HOSTS = select(Host.__table__.c.id).where(text(HOST_DISABLED))


@per_dialect
def _on_hosts_stmt(one_of: OneOf) -> Select[Any]:
    return select(_instances.c.id).where(one_of(_instances.c.host, "hosts"),
                                         _instances.c.deleted_at.is_(None))


@per_dialect
def _load_stmt(one_of: OneOf) -> Select[Any]:
    return select(*specs.INSTANCE_COLUMNS).where(one_of(specs.INSTANCE_COLUMNS[0], "ids"))


V = TypeVar("V")


class HostKeyed(MutableMapping[HostNet, V]):
    """A dict keyed by (host, item) that also knows each host's keys: what a host state or an
    agent restart touches is found without walking every pair (half a million at 500,000
    servers: a walk per host state stalled the event loop for seconds)."""

    def __init__(self) -> None:
        self._items: dict[HostNet, V] = {}
        self._of: dict[str, set[str]] = {}

    def __getitem__(self, key: HostNet) -> V:
        return self._items[key]

    def __setitem__(self, key: HostNet, value: V) -> None:
        self._items[key] = value
        self._of.setdefault(key[0], set()).add(key[1])

    def __delitem__(self, key: HostNet) -> None:
        del self._items[key]
        items = self._of[key[0]]
        items.discard(key[1])
        if not items:
            del self._of[key[0]]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[HostNet]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def of_host(self, host: str) -> list[str]:
        """The items of ``host`` (a copy: safe to delete while walking it)."""
        return list(self._of.get(host, ()))


@dataclass
class InFlight:
    fingerprint: tuple[object, ...]
    sent_at: float


def _reached(fingerprint: tuple[object, ...], status: InstanceStatus) -> bool:
    """The host reports what the command with this fingerprint asked for (``_matches``)."""
    if fingerprint[0] != "present":
        return False
    generation = fingerprint[2]
    return (status.state == fingerprint[1] and isinstance(generation, int)
            and status.reboot_generation >= generation)


class Reconciler:
    """All state is in memory and rebuilt from reports; the database holds desired state."""

    def __init__(self, config: Config, sessionmaker: async_sessionmaker[AsyncSession], hosts: HostIndex,
                 send: Send, clock: Callable[[], float] = time.monotonic,
                 broadcast: Broadcast | None = None) -> None:
        self.config = config
        self.broadcast = broadcast
        # What agents are told of network peers and remote groups' members (with a broadcast).
        self.peer_sets = BroadcastSets()
        self.group_sets = BroadcastSets(budget=GROUP_SETS_BUDGET)
        self._publishing = asyncio.Lock()  # one sender: a set's messages go out in order
        self.sessionmaker = sessionmaker
        self.hosts = hosts
        self.send = send
        self.clock = clock
        c = config.controller
        # How long a command may be worked on before it is sent again.
        self.command_timeout = max(30.0, 6 * c.reconcile_seconds)
        self.network_resend = 300.0
        self.schedule_batch = 500
        self.dirty_batch = 2000
        # Specs for other member hosts of a network with a router whose members changed (the
        # router's neighbours) are sent at most this many per pass: during a launch they would
        # otherwise dominate every pass (each new port re-specs every member host). The rest
        # waits in ``fanout_nets`` (a set: a later pass sends each pair once, with the state of
        # then). Peer lists and member sets are published instead (``publish_sets``).
        self.fanout_batch = 128
        # (host, network) pairs whose spec is due, built at most this many per pass besides those
        # of the instances converged: when every host comes back at once (a partition healed)
        # they are all due, and one pass building them all held 60,000 specs (2.4 GiB at 20,000
        # hosts). The rest wait in ``dirty_nets``; the next pass follows at once.
        self.net_spec_batch = 4000
        self.sweep_batch = 1000
        self._queue_full = False
        self.schedule_after = self.clock() + 1.5 * config.agent.heartbeat_seconds
        self.usage = HostUsage(sessionmaker, clock)
        self._placement: scheduler.Placement | None = None
        # host -> instance -> last status (never "absent"); hosts whose full state is known.
        self.actual: dict[str, dict[str, InstanceStatus]] = defaultdict(dict)
        self.synced: set[str] = set()
        self._digests: dict[str, str] = {}
        # (host, instance) -> the last command sent for it, until the host reports it done.
        self.inflight: HostKeyed[InFlight] = HostKeyed()
        self.net_sent: HostKeyed[tuple[str, float]] = HostKeyed()
        self.dirty: set[str] = set()
        self.dirty_nets: set[HostNet] = set()
        self.fanout_nets: set[HostNet] = set()
        self._sg_networks: set[str] = set()
        self.members = GroupMemberIndex(clock)
        self.hosts_to_check: set[str] = set()
        self.hosts_changed: set[str] = set()  # came up or went down: their networks' peers change
        # Reports of guests that exist (and restores, below): written by ``write_statuses``, as
        # they come (the service's status writer) and in every pass. Reports of guests gone
        # finalize deletes: they stay with the passes (converge finalizes too).
        self.pending_reports: list[InstanceStatus] = []
        self.pending_gone: list[InstanceStatus] = []
        self.reports_waiting = asyncio.Event()
        self._writing = asyncio.Lock()
        self._hosts_writing = asyncio.Lock()
        # First full reports of a (re)started agent: a guest found stopped there is brought
        # back if it should run (host reboot, `cloudland down`), not adopted as stopped.
        self.pending_restores: list[InstanceStatus] = []
        self._state_boot_ids: dict[str, str] = {}
        self._reported_networks: dict[str, set[str]] = {}
        self._peers_of: set[str] = set()  # networks whose member hosts need fresh peer lists
        self.network_hosts = NetworkHostCache()
        self._sweep_marker = ""
        # Wall seconds spent in each phase of the passes (the controller's stats).
        self.phase_seconds: defaultdict[str, float] = defaultdict(float)

    # --- reports (called from the NATS callbacks; no I/O) ------------------------------------

    def on_status(self, status: InstanceStatus) -> None:
        states = self.actual[status.host_id]
        if status.state == "absent":
            states.pop(status.instance_id, None)
            self.inflight.pop((status.host_id, status.instance_id), None)
        else:
            states[status.instance_id] = status
            # The command's work is done: no longer in flight (else the expiry scan in
            # ``_collect`` would walk every command of the last ``command_timeout`` seconds).
            key = (status.host_id, status.instance_id)
            flight = self.inflight.get(key)
            if flight is not None and _reached(flight.fingerprint, status):
                del self.inflight[key]
        self._digests.pop(status.host_id, None)
        if status.state == "absent":
            self.pending_gone.append(status)
        else:
            self.pending_reports.append(status)
            self.reports_waiting.set()

    def on_host_state(self, state: HostState) -> None:
        host = state.host_id
        first_report = host not in self.synced or self._state_boot_ids.get(host) != state.boot_id
        self._state_boot_ids[host] = state.boot_id
        self.actual[host] = {s.instance_id: s for s in state.instances if s.state != "absent"}
        self._digests.pop(host, None)
        self.synced.add(host)
        reported = set(state.networks)
        for net in self.net_sent.of_host(host):
            if net not in reported:
                del self.net_sent[(host, net)]  # the host lost it: send again
        pending = self.pending_restores if first_report else self.pending_reports
        pending.extend(s for s in state.instances if s.state != "absent")
        self.reports_waiting.set()
        self.hosts_to_check.add(host)
        self._reported_networks[host] = reported

    def on_heartbeat(self, hb: Heartbeat) -> bool:
        """Update the index; True when the host's full state must be fetched."""
        result = self.hosts.observe(hb)
        if result.came_up:
            self.hosts_changed.add(hb.host_id)
        if result.restarted:
            self.forget_host(hb.host_id)
        return hb.host_id not in self.synced or hb.state_digest != self.believed_digest(hb.host_id)

    def forget_host(self, host: str) -> None:
        """The agent restarted: its in-flight commands may be lost, and its state is unknown."""
        self.synced.discard(host)
        for iid in self.inflight.of_host(host):
            del self.inflight[(host, iid)]
        for net in self.net_sent.of_host(host):
            del self.net_sent[(host, net)]

    def believed_digest(self, host: str) -> str:
        digest = self._digests.get(host)
        if digest is None:
            digest = self._digests[host] = state_digest(list(self.actual[host].values()))
        return digest

    def wake(self, instance_ids: Iterable[str], network_ids: Iterable[str] = ()) -> None:
        self.dirty.update(instance_ids)
        # Security groups or ports changed on these networks: their member hosts get new specs,
        # and the member index reads their ports again.
        nets = list(network_ids)
        self._sg_networks.update(nets)
        self.members.networks_changed(nets)
        self.network_hosts.drop(nets)

    @property
    def has_work(self) -> bool:
        return bool(self.dirty or self.dirty_nets or self.fanout_nets or self._sg_networks
                    or self.hosts_to_check or self.pending_gone or self._queue_full)

    # --- the pass --------------------------------------------------------------------------

    def mark_silent_hosts_down(self) -> bool:
        """Hosts without a heartbeat for ``host_down_seconds`` are down; True if any went down."""
        gone = self.hosts.sweep()
        for host in gone:
            log.warning("host %s is down (no heartbeat for %.0fs)", host, self.hosts.down_after)
            self.hosts_changed.add(host)
            self.synced.discard(host)
        return bool(gone)

    async def write_hosts(self) -> None:
        """Write the hosts that changed (gone down) now, in a transaction of their own: the
        service's host watcher calls this beside the passes, so a dead host shows ``down``
        without waiting for a long pass."""
        async with self.sessionmaker() as session, session.begin():
            await self._persist_hosts(session)

    async def _persist_hosts(self, session: AsyncSession) -> None:
        async with self._hosts_writing:
            await self.hosts.persist(session)

    async def run_pass(self, sweep: bool = False) -> None:
        try:
            await self._run_pass(sweep)
        except BaseException:
            # Its transactions may have read network members they then rolled back.
            self.network_hosts.drop_all()
            raise

    async def _run_pass(self, sweep: bool) -> None:
        self.mark_silent_hosts_down()
        started = time.monotonic()
        await self.flush_reports()
        started = self._timed("reports", started)
        async with self.sessionmaker() as session, session.begin():
            await self._persist_hosts(session)
            disabled = set(await session.scalars(_DISABLED_HOSTS))
            self.hosts.set_disabled(disabled)
            await self._collect(session, sweep)
        started = self._timed("collect", started)
        if self.clock() >= self.schedule_after:
            await self.schedule()
        started = self._timed("schedule", started)
        await self.converge()
        await self.publish_sets()
        started = self._timed("converge", started)
        await self.write_statuses()  # converge's (rows that missed their report)
        self._timed("reports", started)

    def _timed(self, phase: str, since: float) -> float:
        """Adds the seconds since ``since`` to the phase's total (``phase_seconds``); returns now."""
        now = time.monotonic()
        self.phase_seconds[phase] += now - since
        return now

    async def flush_reports(self) -> None:
        """All reports so far: those of guests that exist, then those of guests gone."""
        await self.write_statuses()
        if not self.pending_gone:
            return
        gone, self.pending_gone = self.pending_gone, []
        try:
            async with self.sessionmaker() as session, session.begin():
                outcome = await apply_statuses(session, gone)
        except BaseException:
            self.pending_gone[:0] = gone  # not written: the next attempt takes them first
            raise
        await self._after_reports(outcome)

    async def write_statuses(self) -> None:
        """Write the reports of guests that exist (one writer at a time). The service calls this
        as reports come, apart from the passes: a server is ACTIVE in the table without waiting
        for the pass in progress and the next one. Their outcome is at most strays (a guest
        on a host it does not belong to): nothing a pass in progress depends on."""
        async with self._writing:
            if not self.pending_reports and not self.pending_restores:
                return
            reports, self.pending_reports = self.pending_reports, []
            restores, self.pending_restores = self.pending_restores, []
            try:
                async with self.sessionmaker() as session, session.begin():
                    outcome = await apply_statuses(session, restores, adopt_guest_shutdown=False)
                    outcome.merge(await apply_statuses(session, reports))
            except BaseException:
                # Not written (the database went away, the task was cancelled): kept, in order.
                self.pending_reports[:0] = reports
                self.pending_restores[:0] = restores
                raise
            await self._after_reports(outcome)

    async def _after_reports(self, outcome: Outcome) -> None:
        self.members.ports_changed(outcome.freed_ports)
        for inst, host, networks in outcome.finalized:
            self.usage.release(host, inst.flavor)
            self.inflight.pop((host or "", inst.id), None)
            self._networks_changed(host, networks)
        self.dirty.update(outcome.missing)
        for host, iid in outcome.strays:
            await self._send_absent(host, iid)

    async def _peer_updates(self, session: AsyncSession, memo: dict[str, set[str]] | None = None) -> None:
        """Networks whose membership changed: one ``NetworkPeers`` each (sent after the pass),
        not a spec to every member. Without a broadcast channel every member gets a spec."""
        if not self._peers_of:
            return
        nets, self._peers_of = self._peers_of, set()
        # A host that joined or left a network also joined or left the networks a router links
        # to it (it realises the router).
        linked = await specs.router_specs.linked_networks(session, nets)
        via_router = {m for n in nets for m in linked.get(n, ())} - nets
        nets = nets | via_router
        members = await self._hosts_of(session, nets, memo)
        # Routers' static neighbours travel in full specs, not in NetworkPeers. (Remote groups'
        # members go out as GroupMembers.)
        with_routers: set[str] = set()
        if self.broadcast:
            with_routers = await specs.router_specs.networks_with_routers(session, nets)
        else:
            # A group's members span its project: without a broadcast, hosts on other networks
            # whose rules admit a group with members here need a new spec too.
            admitting = await self.members.networks_admitting_members_of(session, nets) - nets
            for net, hosts in (await self._hosts_of(session, admitting)).items():
                self.dirty_nets.update((h, net) for h in hosts)
        routed = via_router | (nets & linked.keys())
        if routed:
            # A host that stopped realising a router keeps its networks until told otherwise.
            self.dirty_nets.update((h, n) for h, n in self.net_sent
                                   if n in routed and h not in members[n])
        for net, hosts in members.items():
            if self.broadcast is None:
                self.dirty_nets.update((h, net) for h in hosts)
                continue
            if net in with_routers:
                self.fanout_nets.update((h, net) for h in hosts)
            addresses = sorted({a for h in hosts for a in [self._peer_address(h)] if a})
            self.peer_sets.update(net, addresses)

    async def _hosts_of(self, session: AsyncSession, nets: Iterable[str],
                        memo: dict[str, set[str]] | None = None) -> dict[str, set[str]]:
        return await specs.hosts_of_networks(session, nets, memo, self.network_hosts)

    @property
    def sets_waiting(self) -> bool:
        """Peer lists or member sets changed and not published yet (some wait for their interval)."""
        return self.peer_sets.pending or self.group_sets.pending

    async def _publish_peers_now(self, networks: set[str]) -> None:
        assert self.broadcast is not None
        async with self._publishing:
            for c in self.peer_sets.changes_of(networks, self.clock()):
                message = NetworkPeers(network_id=c.key, **c.fields())
                await self.broadcast(subjects.network_peers(c.key), message)

    async def publish_sets(self) -> None:
        """Publish the changes of peer lists and remote groups' member sets that are due. After
        every pass, and by the service while some wait for their interval."""
        if self.broadcast is None:
            return
        async with self._publishing:
            now = self.clock()
            for c in self.peer_sets.changes(now):
                message: Message = NetworkPeers(network_id=c.key, **c.fields())
                await self.broadcast(subjects.network_peers(c.key), message)
            for c in self.group_sets.changes(now):
                message = GroupMembers(group_id=c.key, **c.fields())
                await self.broadcast(subjects.group_members(c.key), message)

    def _networks_changed(self, host: str | None, networks: Iterable[str], gained: bool = False) -> None:
        """Ports came or went on ``host``: it and its peers on those networks need new specs.
        ``gained``: the controller bound them there (committed), so ``host`` carries them."""
        networks = list(networks)
        for net in networks:
            if host:
                self.dirty_nets.add((host, net))
            self._peers_of.add(net)
        if gained and host:
            self.network_hosts.gained(host, networks)
        else:
            self.network_hosts.drop(networks)

    async def _collect(self, session: AsyncSession, sweep: bool) -> None:
        """Turn host events and expired commands into dirty instances and networks."""
        now = self.clock()
        for (host, iid), flight in list(self.inflight.items()):
            status = self.actual.get(host, {}).get(iid)
            if now - flight.sent_at > self.command_timeout and not (status and status.state == "error"):
                del self.inflight[(host, iid)]
                self.dirty.add(iid)
        # Take the sets before the first await: reports keep arriving while we query.
        to_check, self.hosts_to_check = self.hosts_to_check, set()
        changed, self.hosts_changed = self.hosts_changed, set()
        check = to_check | {h for h in changed if not self.hosts.is_up(h)}
        if check:
            self.dirty.update(await session.scalars(_on_hosts_stmt(session), {"hosts": list(check)}))
        if to_check:
            wanted = await specs.networks_of_hosts(session, to_check)
            for host in to_check:
                for net in wanted[host] | self._reported_networks.get(host, set()):
                    self.dirty_nets.add((host, net))
        if self._sg_networks:
            sg_nets, self._sg_networks = self._sg_networks, set()
            for net, hosts in (await self._hosts_of(session, sg_nets)).items():
                self.dirty_nets.update((h, net) for h in hosts)
        if changed:
            nets = await specs.networks_of_hosts(session, changed)
            self._peers_of.update(n for ns in nets.values() for n in ns)
        await self._peer_updates(session)
        if sweep:
            released = await specs.router_specs.release_gateways(session)
            self.network_hosts.drop(net for _, net in released)
            self.dirty_nets.update(released)
            ids = list(await session.scalars(
                select(Instance.id).where(Instance.deleted_at.is_(None), Instance.id > self._sweep_marker)
                .order_by(Instance.id).limit(self.sweep_batch)))
            self.dirty.update(ids)
            self._sweep_marker = ids[-1] if len(ids) == self.sweep_batch else ""

    # --- scheduling ------------------------------------------------------------------------

    async def _placement_now(self, session: AsyncSession) -> scheduler.Placement:
        """The placement, brought up to date: hosts that changed (up, down, enabled, capacity)
        and hosts whose usage changed are recomputed.

        Claimed resources per host: ``HostUsage`` (kept in memory by claims and finalized
        deletes, read again in the background now and then)."""
        usage = await self.usage.current(session)
        changed = self.usage.take_changed() | self.hosts.take_changed()
        if self._placement is None:
            self._placement = scheduler.Placement(self.hosts.up_hosts(), usage, self.config.controller)
        else:
            self._placement.update([h for h in map(self.hosts.get, changed) if h is not None], usage)
        return self._placement

    async def schedule(self) -> None:
        async with self.sessionmaker() as session, session.begin():
            # Only the columns placement needs (no ORM objects: converge loads the claimed rows).
            pending = list(await session.execute(_PENDING, {"limit": self.schedule_batch}))
            # A full batch: more servers wait to be placed, the next pass follows at once.
            self._queue_full = len(pending) == self.schedule_batch
            if not pending:
                return
            # Their ports get bound (or stay unbound on a failure): the member index reads them again.
            self.members.devices_changed(iid for iid, deleted, *_ in pending if not deleted)
            placement = await self._placement_now(session)
            picks: list[tuple[str, HostInfo]] = []
            try:
                flavors: dict[str, tuple[int, int, int]] = {}
                for iid, deleted, flavor_text, zone, requested_host in pending:
                    if deleted:
                        self.dirty.add(iid)  # local delete, in converge()
                        continue
                    flavor = json_value(flavor_text) or {}
                    host_id = placement.pick(flavor, zone, requested_host)
                    if host_id is None:
                        log.info("instance %s: no valid host", iid)
                        await scheduler.fail_no_host(session, iid)
                        continue
                    host = self.hosts.get(host_id)
                    assert host is not None
                    picks.append((iid, host))
                    flavors[iid] = scheduler.flavor_needs(flavor)
                claimed = await scheduler.claim_many(session, picks)
            except BaseException:
                self._placement = None  # capacity taken by picks never claimed: rebuild next time
                raise
            for iid, host in picks:
                if iid in claimed:
                    self.dirty.add(iid)
                    self.usage.claim(host.id, flavors[iid])
            # The picked hosts from capacity - usage again: a claim's usage was just added, a failed
            # claim (placed or deleted meanwhile) gives its capacity back.
            placement.update([host for _, host in picks], self.usage.by_host)
        for iid, host in picks:  # committed: their hosts carry those networks
            if iid in claimed:
                self._networks_changed(host.id, claimed[iid], gained=True)
        # The claimed instances are dirty: converge() (next in the pass) sends the peer updates.

    # --- converging ------------------------------------------------------------------------

    def _matches(self, inst: InstanceRow, status: InstanceStatus | None) -> bool:
        return (status is not None and status.state == inst.desired_power
                and status.reboot_generation >= inst.reboot_generation)

    def _fingerprint(self, inst: InstanceRow) -> tuple[object, ...]:
        if inst.deleted:
            return ("absent",)
        return ("present", inst.desired_power, inst.reboot_generation)

    def _in_flight(self, iid: str, host: str, fingerprint: tuple[object, ...]) -> bool:
        flight = self.inflight.get((host, iid))
        if flight is None or flight.fingerprint != fingerprint:
            return False
        status = self.actual.get(host, {}).get(iid)
        if status is not None and status.state == "error":
            return True  # no retry loop on a failing guest; a new request (reboot) changes the fingerprint
        return self.clock() - flight.sent_at < self.command_timeout

    async def converge(self) -> None:
        if not (self.dirty or self.dirty_nets or self.fanout_nets or self._peers_of
                or (self.broadcast is not None and self.members.pending)):
            return
        batch = set()
        while self.dirty and len(batch) < self.dirty_batch:
            batch.add(self.dirty.pop())
        # Finalized deletes are read back by the member index before the commit: if the
        # transaction fails, what it read then is forgotten.
        self.members.record()
        try:
            commands, absent, finalized, (considered, member_sets) = await self._converge(batch)
        except BaseException:
            self.members.discard_recorded()
            raise
        self.members.stop_recording()
        for group, addresses in member_sets.items():  # committed: what the agents are to know
            self.group_sets.update(group, addresses)
        self.members.member_sets_published(considered)
        for inst in finalized:  # committed: their claims end
            self.usage.release(inst.host, inst.flavor)
        for inst in absent:
            await self._send_absent(inst.host or "", inst.id)
        for host, command, data in commands:
            await self.send(host, command, data)

    async def _converge(self, batch: set[str]) -> tuple[
            list[Outgoing], list[InstanceRow], list[Instance], MemberSets]:
        """Commands to send, instances to tell their host to destroy, instances finalized, and
        the remote groups whose members may have changed with their member sets now."""
        ensure: dict[str, list[InstanceRow]] = defaultdict(list)
        absent: list[InstanceRow] = []
        finalized: list[Instance] = []
        async with self.sessionmaker() as session, session.begin():
            rows = await self._load(session, batch)
            synced_statuses = []
            finalize: list[InstanceRow] = []
            for inst in rows:
                if inst.deleted_at is not None:
                    # Deleted by the API itself (its host was down or it had none): its ports
                    # went without the controller, so their project is read again.
                    self.members.project_changed(inst.project_id)
                    if inst.host:
                        self.network_hosts.drop_host(inst.host)
                    continue
                host = inst.host
                up = self.hosts.is_up(host)
                if inst.deleted:
                    if host is None or not up:
                        # Nova's local delete: the host cannot answer, so do not wait for it; its
                        # HostState lists the guest when it returns and it is destroyed then.
                        finalize.append(inst)
                        self.inflight.pop((host or "", inst.id), None)
                    elif (host in self.synced and inst.id not in self.actual[host]
                          and (host, inst.id) not in self.inflight):
                        # Gone from the host and no EnsureInstance still on its way to it.
                        finalize.append(inst)
                    elif not self._in_flight(inst.id, host, ("absent",)):
                        absent.append(inst)
                    continue
                if host is None or not up or host not in self.synced:
                    continue
                status = self.actual[host].get(inst.id)
                if self._matches(inst, status):
                    self.inflight.pop((host, inst.id), None)
                    if inst.task_state is not None or inst.vm_state in ("building", "error"):
                        synced_statuses.append(status)
                    continue
                if not self._in_flight(inst.id, host, self._fingerprint(inst)):
                    ensure[host].append(inst)
            if finalize:  # finalize_delete changes the ORM object: load those (few) rows whole
                objects = {i.id: i for i in await session.scalars(
                    select(Instance).where(Instance.id.in_([i.id for i in finalize])))}
                freed: list[tuple[str, str]] = []
                for inst in finalize:
                    if (obj := objects.get(inst.id)) is not None:
                        networks = await finalize_delete(session, obj, freed)
                        self._networks_changed(inst.host, networks)
                        finalized.append(obj)
                self.members.ports_changed(freed)
            if synced_statuses:  # written with the reports (one writer of status columns)
                self.pending_reports.extend(synced_statuses)
            memo: dict[str, set[str]] = {}  # network members, read once for both
            await self._peer_updates(session, memo)
            commands = await self._build_commands(session, ensure, memo)
            groups: MemberSets = (set(), {})
            if self.broadcast is not None:
                groups = await self.members.changed_member_sets(session)
        return commands, absent, finalized, groups

    async def _load(self, session: AsyncSession, ids: set[str]) -> list[InstanceRow]:
        """The instances' columns converge and the specs read (no ORM objects)."""
        if not ids:
            return []
        rows = await session.execute(_load_stmt(session), {"ids": sorted(ids)})
        return [InstanceRow(row) for row in rows]

    async def _build_commands(self, session: AsyncSession, ensure: dict[str, list[InstanceRow]],
                              members_memo: dict[str, set[str]] | None = None
                              ) -> list[Outgoing]:
        """Network commands first (the agent plugs ports into existing bridges), then instances."""
        instances = [i for items in ensure.values() for i in items]
        ports = await specs.instance_ports(session, [i.id for i in instances])
        images = await specs.image_refs(session, self.config, [i.image_id for i in instances if i.image_id])
        pairs: set[HostNet] = set()
        if len(self.dirty_nets) <= self.net_spec_batch:
            pairs, self.dirty_nets = self.dirty_nets, set()
        else:
            while len(pairs) < self.net_spec_batch:
                pairs.add(self.dirty_nets.pop())
        for host, items in ensure.items():
            pairs.update((host, p.network_id) for i in items for p in ports[i.id])
        self.fanout_nets -= pairs
        budget = self.fanout_batch
        if len(self.fanout_nets) <= budget:
            pairs |= self.fanout_nets
            self.fanout_nets = set()
        else:
            for _ in range(budget):
                pairs.add(self.fanout_nets.pop())
        pairs = {(h, n) for h, n in pairs if self.hosts.is_up(h)}
        now = self.clock()
        commands: list[Outgoing] = []
        force = {(h, p.network_id) for h, items in ensure.items() for i in items for p in ports[i.id]}
        bindings = specs.router_specs.GatewayBindings()
        net_specs = await specs.network_specs(session, pairs, self._peer_address, bindings, self.members,
                                              members_memo, self.network_hosts,
                                              self.group_sets if self.broadcast is not None else None)
        if self.broadcast is not None:
            # A host that joins a network gets its spec after the peer-list change that adds it
            # went out: it subscribes after that message, and would find it missing.
            await self._publish_peers_now({net for (_, net), spec in net_specs.items() if spec is not None})
            self._as_published(net_specs)
        if bindings.new:  # a host got its gateway port on an external network: it needs that network
            self.network_hosts.drop(net for _, net in bindings.new)
            self.dirty_nets.update(bindings.new)
            self._peers_of.update(net for _, net in bindings.new)
        for (host, net), spec in sorted(net_specs.items(), key=lambda kv: kv[0]):
            cmd: HostCommand = EnsureNetwork(spec=spec) if spec else EnsureNetworkAbsent(network_id=net)
            if spec is None and net not in self._reported_networks.get(host, set()) \
                    and (host, net) not in self.net_sent:
                continue  # never had it
            data = encode(cmd)
            digest = hashlib.sha256(data).hexdigest()
            sent = self.net_sent.get((host, net))
            if sent and sent[0] == digest and now - sent[1] < self.network_resend \
                    and (host, net) not in force:
                continue
            if spec is None:
                self.net_sent.pop((host, net), None)
                self._reported_networks.get(host, set()).discard(net)
            else:
                self.net_sent[(host, net)] = (digest, now)
            commands.append((host, cmd, data))
        for host, items in ensure.items():
            for inst in items:
                image = images.get(inst.image_id) if inst.image_id else None
                spec = specs.instance_spec(inst, ports[inst.id], image)
                self.inflight[(host, inst.id)] = InFlight(self._fingerprint(inst), now)
                command = EnsureInstance(spec=spec)
                commands.append((host, command, encode(command)))
        return commands

    def _as_published(self, net_specs: dict[tuple[str, str], NetworkSpec | None]) -> None:
        """Give each spec the peer list as published, with its version (``network_specs`` does
        the member sets): the agent then takes the set's next messages as changes of exactly what
        it has. (A set not published yet stays as built; its first message is whole.)"""
        for (host, net), spec in net_specs.items():
            if spec is None:
                continue
            if (peers := self.peer_sets.version(net)) is not None:
                own = self._peer_address(host)
                spec.peers = [a for a in peers[0] if a != own]
                spec.peers_version = peers[1]

    def whole_set(self, request: GetSet) -> SetChangeMessage | None:
        """A published set, whole, with its version (``GetSet``); None if it never was."""
        if request.set_kind == "peers":
            if (peers := self.peer_sets.version(request.key)) is None:
                return None
            return NetworkPeers(network_id=request.key, addresses=peers[0],
                                epoch=peers[1].epoch, seq=peers[1].seq)
        if (members := self.group_sets.version(request.key)) is None:
            return None
        # Encoded once per version (msgspec writes a Raw as it is): many hosts ask for a big set.
        return GroupMembers(group_id=request.key, addresses=self.group_sets.encoded(request.key),  # type: ignore[arg-type]
                            epoch=members[1].epoch, seq=members[1].seq)

    def _peer_address(self, host: str) -> str | None:
        info = self.hosts.get(host)
        return info.address if info is not None and info.up and info.address else None

    async def _send_absent(self, host: str, iid: str) -> None:
        if not host or not self.hosts.is_up(host) or self._in_flight(iid, host, ("absent",)):
            return
        self.inflight[(host, iid)] = InFlight(("absent",), self.clock())
        command = EnsureInstanceAbsent(instance_id=iid)
        await self.send(host, command, encode(command))
