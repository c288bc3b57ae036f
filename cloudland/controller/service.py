"""``cloudland controller``: NATS wiring and the loop that drives the reconciler.

Reports (``report.*``) and heartbeats (in batches from the relays, ``heartbeats.batch``) update
the in-memory view at once; the database work happens in the loop, batched: a pass runs when
something changed (a Wake, a guest gone, a host's state) and at least every
``controller.reconcile_seconds`` (then with a slice of the rolling sweep). Reports of guests that
exist are written by a task of their own, the status writer, as they come (20 ms batches), so
a server shows ACTIVE without waiting for the passes. Every controller also runs a heartbeat relay in-process
(``cloudland/bus/heartbeat_relay.py``), for the agents that have no relay on their own server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from cloudland.bus import subjects
from cloudland.bus.connection import connect, subscriptions_ready
from cloudland.bus.heartbeat_relay import DEFAULT_FLUSH_SECONDS, HeartbeatRelay
from cloudland.bus.messages import (
    GetHostState,
    GetSet,
    Heartbeat,
    HeartbeatBatch,
    HostCommand,
    HostState,
    InstanceStatus,
    Message,
    Wake,
    decode,
    encode,
)
from cloudland.config import Config
from cloudland.controller.hosts import HostIndex
from cloudland.controller.reconciler import Reconciler
from cloudland.controller.stats import ControllerStats
from cloudland.db.engine import make_engine, make_sessionmaker
from cloudland.db.models import Host

log = logging.getLogger(__name__)

STATE_REQUEST_TIMEOUT = 10.0
# A host's full state is asked for at most this often (a digest mismatch can repeat).
STATE_REQUEST_INTERVAL = 3.0
# Full-state requests in flight at once: after an outage thousands of hosts come back together,
# and their replies (each the host's whole state) must not flood the controller's connection.
STATE_REQUESTS_IN_FLIGHT = 64
# Reports and wakes are gathered this long before a pass runs after an idle moment (a pass
# that follows a busy one starts at once: the reports gathered while it ran are the batch).
DEBOUNCE = 0.05
# The status writer waits this long after a report for the ones that come with it (one write).
STATUS_BATCH = 0.02
# Seconds between checks for hosts whose heartbeats stopped.
DOWN_CHECK = 1.0
# How often set changes waiting for their interval are looked at.
SETS_CHECK = 0.25
# Undecodable heartbeat batches are logged at most this often.
BAD_BATCH_LOG_INTERVAL = 10.0
# Heartbeats come through a relay (up to a flush period late), reports straight: a heartbeat
# sent before the host's last report may carry the digest of before it. Its mismatch is not acted
# on (the next heartbeat checks again); how far back: the heartbeat's lag, at most this.
DIGEST_RACE_MAX = 5.0
# A heartbeat sent up to this long before the host's newest one is stale (it was overtaken, e.g.
# the last one of the previous incarnation, still in a relay while the new one reported): dropped.
# Older ones are taken (the host's clock stepped back).
STALE_WINDOW = 2.0

_batch_decoder = msgspec.json.Decoder(HeartbeatBatch)
_heartbeat_decoder = msgspec.json.Decoder(Heartbeat)


class _RawBatch(msgspec.Struct):
    """A batch with its heartbeats still encoded: the fallback when the whole does not decode."""

    heartbeats: list[msgspec.Raw] = []


class ControllerService:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.engine: AsyncEngine | None = None
        self.sessionmaker: async_sessionmaker[AsyncSession] | None = None
        self.nc: Client | None = None
        self.hosts = HostIndex(down_after=config.controller.host_down_seconds)
        self.reconciler: Reconciler | None = None
        self._subs: list[Subscription] = []
        self._kick = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._sets_task: asyncio.Task[None] | None = None
        self._requests: dict[str, float] = {}
        self._fetching: set[str] = set()  # hosts whose state is asked for or waits its turn
        self._state_slots = asyncio.Semaphore(STATE_REQUESTS_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self.passes = 0
        self.stats = ControllerStats()
        self.relay: HeartbeatRelay | None = None
        self.heartbeat_batches = 0
        self.bad_heartbeats = 0
        self.stale_heartbeats = 0
        self._bad_logged_at = 0.0
        self._sent_at: dict[str, float] = {}  # host → sent_at of its newest heartbeat
        self._reported_at: dict[str, float] = {}  # host → when its last report arrived (time.time())
        self.sets_requested = 0  # GetSet answered: followers that found a message of a set missing

    async def start(self) -> None:
        self.engine = make_engine(self.config.database_url, custom_plans=True)
        self.sessionmaker = make_sessionmaker(self.engine)
        async with self.sessionmaker() as session:
            self.hosts.load(await session.scalars(select(Host)))
        self.reconciler = Reconciler(self.config, self.sessionmaker, self.hosts, self._send,
                                     broadcast=self._broadcast)
        self.nc = await connect(self.config.nats.url, "cloudland-controller")
        self._subs = [
            await self.nc.subscribe(subjects.REPORT_ALL, cb=self._on_report),
            await self.nc.subscribe(subjects.CONTROLLER_WAKE, cb=self._on_wake),
            await self.nc.subscribe(subjects.CONTROLLER_STATS, cb=self._on_stats),
            await self.nc.subscribe(subjects.HEARTBEAT_BATCH, cb=self._on_heartbeat_batch),
            await self.nc.subscribe(subjects.CONTROLLER_SETS, queue=subjects.CONTROLLER_SETS_QUEUE,
                                    cb=self._on_get_set),
        ]
        await subscriptions_ready(self.nc)
        # Flushes well within the down threshold, whatever it is configured to.
        flush = min(DEFAULT_FLUSH_SECONDS, self.config.controller.host_down_seconds / 4)
        self.relay = HeartbeatRelay(self.config.nats.url, flush_seconds=flush,
                                    name="cloudland-controller-relay")
        await self.relay.start()
        self._loop_task = asyncio.create_task(self._loop(), name="controller-loop")
        self._writer_task = asyncio.create_task(self._write_statuses(), name="controller-status-writer")
        self._watch_task = asyncio.create_task(self._watch_hosts(), name="controller-host-watcher")
        self._sets_task = asyncio.create_task(self._publish_sets(), name="controller-set-publisher")
        log.info("controller started (%d known hosts)", len(self.hosts.hosts))

    async def stop(self) -> None:
        own = (self._loop_task, self._writer_task, self._watch_task, self._sets_task)
        tasks = [t for t in (*own, *self._tasks) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = self._writer_task = self._watch_task = self._sets_task = None
        if self.reconciler is not None:
            await self.reconciler.usage.stop()
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5)
            self.nc = None
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    async def run(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    def kick(self) -> None:
        """Run a pass soon."""
        self._kick.set()

    # --- the loop --------------------------------------------------------------------------

    async def _loop(self) -> None:
        assert self.reconciler is not None
        period = self.config.controller.reconcile_seconds
        next_sweep = time.monotonic()
        backlog = False
        while True:
            timeout = max(0.0, next_sweep - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), timeout)
            sweep = time.monotonic() >= next_sweep
            if not self._kick.is_set() and not sweep:
                continue
            if not backlog:
                await asyncio.sleep(DEBOUNCE)
            self._kick.clear()
            sweep = time.monotonic() >= next_sweep
            if sweep:
                next_sweep = time.monotonic() + period
            started = time.monotonic()
            try:
                await self.reconciler.run_pass(sweep=sweep)
            except Exception:
                log.exception("reconcile pass failed")
                await asyncio.sleep(1.0)
            self.passes += 1
            self.stats.passes += 1
            self.stats.pass_seconds.append(time.monotonic() - started)
            backlog = self.reconciler.has_work
            if backlog:
                self._kick.set()

    async def _watch_hosts(self) -> None:
        """Every second: hosts whose heartbeats stopped are marked and written down at once,
        beside the passes, then a pass reacts (their instances, their networks' peers)."""
        assert self.reconciler is not None
        while True:
            await asyncio.sleep(DOWN_CHECK)
            if not self.hosts.overdue() or not self.reconciler.mark_silent_hosts_down():
                continue
            try:
                await self.reconciler.write_hosts()
            except Exception:
                log.exception("writing hosts that went down failed (the next pass writes them)")
            self.kick()

    async def _publish_sets(self) -> None:
        """Set changes held back by their interval go out without waiting for a pass."""
        assert self.reconciler is not None
        while True:
            await asyncio.sleep(SETS_CHECK)
            if self.reconciler.sets_waiting:
                try:
                    await self.reconciler.publish_sets()
                except Exception:
                    log.exception("publishing peer lists and member sets failed")

    async def _write_statuses(self) -> None:
        """Reports of guests that exist go to the table as they come, beside the passes."""
        assert self.reconciler is not None
        waiting = self.reconciler.reports_waiting
        while True:
            await waiting.wait()
            await asyncio.sleep(STATUS_BATCH)
            waiting.clear()
            try:
                await self.reconciler.write_statuses()
            except Exception:
                log.exception("writing status reports failed")
                await asyncio.sleep(1.0)

    # --- NATS ------------------------------------------------------------------------------

    async def _send(self, host_id: str, command: HostCommand, data: bytes) -> None:
        if self.nc is None or not self.nc.is_connected:
            return  # the next pass sends it again
        try:
            await self.nc.publish(subjects.host_cmd(host_id), data)
        except Exception as e:
            log.warning("cannot send %s to %s: %s", type(command).__name__, host_id, e)

    async def _broadcast(self, subject: str, message: Message) -> None:
        if self.nc is None or not self.nc.is_connected:
            return  # a later change (or a full spec on resync) carries it
        try:
            await self.nc.publish(subject, encode(message))
        except Exception as e:
            log.warning("cannot publish %s on %s: %s", type(message).__name__, subject, e)

    async def _on_report(self, msg: Msg) -> None:
        assert self.reconciler is not None
        try:
            report = decode(msg.data)
        except msgspec.DecodeError as e:
            log.warning("undecodable report on %s: %s", msg.subject, e)
            return
        if isinstance(report, Heartbeat):  # agents send them on heartbeat.<zone>; harmless here
            self._on_heartbeat(report)
        elif isinstance(report, InstanceStatus):
            self.stats.statuses += 1
            self._reported_at[report.host_id] = time.time()
            self.reconciler.on_status(report)
            if report.state == "absent":  # a delete to finalize; other reports: the status writer
                self.kick()
        elif isinstance(report, HostState):
            self.stats.host_states += 1
            self._reported_at[report.host_id] = time.time()
            self.reconciler.on_host_state(report)
            self.kick()

    def _on_heartbeat(self, hb: Heartbeat) -> None:
        assert self.reconciler is not None
        host, sent_at = hb.host_id, hb.sent_at
        if sent_at:
            newest = self._sent_at.get(host, 0.0)
            if newest - STALE_WINDOW < sent_at <= newest:
                self.stale_heartbeats += 1
                return
            self._sent_at[host] = sent_at
        self.stats.heartbeat(sent_at)
        if not self.reconciler.on_heartbeat(hb):
            return
        if host in self.reconciler.synced and sent_at:
            # A digest mismatch: real, or the heartbeat was sent before the last report arrived.
            now = time.time()
            lag = min(DIGEST_RACE_MAX, max(0.0, now - sent_at))
            if self._reported_at.get(host, 0.0) >= now - lag - 0.05:
                return
        self._request_state(host)

    async def _on_heartbeat_batch(self, msg: Msg) -> None:
        self.heartbeat_batches += 1
        try:
            heartbeats = _batch_decoder.decode(msg.data).heartbeats
        except msgspec.DecodeError as e:
            heartbeats = self._salvage(msg.data, e)
        for hb in heartbeats:
            self._on_heartbeat(hb)

    def _salvage(self, data: bytes, error: msgspec.DecodeError) -> list[Heartbeat]:
        """The heartbeats that decode, of a batch that did not (all of them are lost only when
        the batch itself is not JSON)."""
        good: list[Heartbeat] = []
        bad = 0
        try:
            raws = msgspec.json.decode(data, type=_RawBatch).heartbeats
        except msgspec.DecodeError:
            raws = []
            bad = 1
        for raw in raws:
            try:
                good.append(_heartbeat_decoder.decode(raw))
            except msgspec.DecodeError:
                bad += 1
        self.bad_heartbeats += bad
        now = time.monotonic()
        if now - self._bad_logged_at >= BAD_BATCH_LOG_INTERVAL:
            self._bad_logged_at = now
            log.warning("undecodable heartbeat batch (%s): %d heartbeats kept, %s dropped "
                        "(%d bad so far)", error, len(good), bad if raws else "all", self.bad_heartbeats)
        return good

    async def _on_wake(self, msg: Msg) -> None:
        assert self.reconciler is not None
        try:
            wake = decode(msg.data)
        except msgspec.DecodeError:
            return
        if isinstance(wake, Wake):
            self.reconciler.wake(wake.instance_ids, wake.network_ids)
            self.kick()

    async def _on_get_set(self, msg: Msg) -> None:
        assert self.reconciler is not None
        try:
            request = decode(msg.data)
        except msgspec.DecodeError:
            return
        if not isinstance(request, GetSet) or not msg.reply:
            return
        self.sets_requested += 1
        whole = self.reconciler.whole_set(request)
        with contextlib.suppress(Exception):
            await msg.respond(encode(whole) if whole is not None else b"")

    async def _on_stats(self, msg: Msg) -> None:
        if b"reset" in msg.data:
            self.stats.reset()
            if self.reconciler is not None:
                self.reconciler.phase_seconds.clear()
        up = sum(1 for h in self.hosts.hosts.values() if h.up)
        extra = {"hosts": len(self.hosts.hosts), "hosts_up": up,
                 "synced": len(self.reconciler.synced) if self.reconciler else 0,
                 "heartbeat_batches": self.heartbeat_batches, "bad_heartbeats": self.bad_heartbeats,
                 "stale_heartbeats": self.stale_heartbeats, "sets_requested": self.sets_requested,
                 "relayed_in_process": self.relay.relayed if self.relay else 0,
                 "pass_phase_seconds": dict(self.reconciler.phase_seconds) if self.reconciler else {}}
        with contextlib.suppress(Exception):
            await msg.respond(self.stats.encode(extra))

    def _request_state(self, host_id: str) -> None:
        now = time.monotonic()
        if host_id in self._fetching or \
                now - self._requests.get(host_id, -STATE_REQUEST_INTERVAL) < STATE_REQUEST_INTERVAL:
            return
        self._requests[host_id] = now
        self._fetching.add(host_id)
        task = asyncio.create_task(self._fetch_state(host_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch_state(self, host_id: str) -> None:
        assert self.nc is not None and self.reconciler is not None
        try:
            async with self._state_slots:
                reply = await self.nc.request(subjects.host_rpc(host_id), encode(GetHostState()),
                                              timeout=STATE_REQUEST_TIMEOUT)
            state = decode(reply.data)
        except Exception as e:
            log.info("no state from host %s: %s", host_id, e)
            return
        finally:
            self._fetching.discard(host_id)
        if isinstance(state, HostState) and state.host_id == host_id:
            self.reconciler.on_host_state(state)
            self.kick()
