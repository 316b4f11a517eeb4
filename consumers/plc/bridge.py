"""The PLC bridge daemon: results of one or more lines -> a PLC, in order, confirmed before XACK.

Per line two tasks share a bounded queue (the buffer): a reader (XREADGROUP on the line's results in the
bridge's own group: its own pending entries first, after a restart, then new ones) and a deliverer
(assign the next sequence in the ledger, hand the record to the protocol adapter, XACK once the PLC
confirmed). A PLC that is unreachable or stops acking puts the line in alarm and everything waits: in
the buffer, then in the group (the results stream). Nothing is skipped, nothing is written twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis
import redis.asyncio
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from consumers.plc.adapter import LineStatus, PlcAdapter, PlcUnavailable
from consumers.plc.gaps import GapTracker
from consumers.plc.ledger import Ledger
from consumers.plc.records import PlcResult, record_from_entry
from crd_model.stream.daemon import Daemon
from crd_model.stream.redis_streams import TRANSIENT_ERRORS, connect_async, entry_time, read_interrupted_by_slot_move
from crd_model.stream.settings import Settings, check_plc_group

log = structlog.get_logger("crd.plc")
T = TypeVar("T")
# ClusterError (Redis Cluster): redis-py gave up following a slot that is being migrated ("TTL
# exhausted") or the cluster is failing over: as transient as a dropped connection, so retried alike.
REDIS_ERRORS = TRANSIENT_ERRORS  # back off and retry


class Stopped(Exception):
    """The bridge is stopping while it waited for Redis or the PLC."""


class PlcMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.results = Counter("crd_plc_results_total", "Results confirmed by the PLC, by verdict", ["line", "verdict"],
                               registry=registry)  # fmt: skip
        self.rejects = Counter("crd_plc_rejects_total", "Reject decisions confirmed by the PLC", ["line"],
                               registry=registry)  # fmt: skip
        self.latency = Histogram(
            "crd_plc_latency_seconds", "Capture to PLC confirmation", ["line"], registry=registry,
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )  # fmt: skip
        self.confirm = Histogram(
            "crd_plc_confirm_seconds", "Start of the PLC write to the PLC's confirmation (handshake included)",
            ["line"], registry=registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        self.buffered = Gauge("crd_plc_buffered", "Results read ahead, waiting for the PLC", ["line"],
                              registry=registry)  # fmt: skip
        self.alarm = Gauge("crd_plc_alarm", "1 while the line is in alarm (PLC unreachable or not acking)", ["line"],
                           registry=registry)  # fmt: skip
        self.connected = Gauge("crd_plc_connected", "1 while the PLC connection is up (server mode: serving)",
                               registry=registry)  # fmt: skip
        self.reconnects = Counter("crd_plc_reconnects_total", "Failed PLC connections and retries", registry=registry)
        self.missing = Counter("crd_plc_missing_results_total", "Gaps in a camera's sequence reported as missing",
                               ["line"], registry=registry)  # fmt: skip
        self.resumed = Counter(
            "crd_plc_resumed_total", "Results the PLC already had after a restart (not written or pulsed again)",
            ["line"], registry=registry,
        )  # fmt: skip
        self.lost = Counter(
            "crd_plc_trimmed_total", "Pending results trimmed from the stream before delivery (outage > retention)",
            ["line"], registry=registry,
        )  # fmt: skip
        self.heartbeat = Gauge("crd_plc_heartbeat", "Last heartbeat count written to the PLC", registry=registry)


def make_adapter(settings: Settings) -> PlcAdapter:
    p, lines = settings.plc, settings.plc_lines()
    if p.protocol == "modbus":
        from consumers.plc.modbus import ModbusAdapter

        return ModbusAdapter(lines, p.modbus, p.score_scale)
    if p.protocol == "opcua-client":
        from consumers.plc.opcua_client import OpcUaClientAdapter

        return OpcUaClientAdapter(lines, p.opcua_client, p.score_scale)
    from consumers.plc.opcua_server import OpcUaServerAdapter

    return OpcUaServerAdapter(lines, p.opcua_server)


SHUTDOWN_WAIT_S = 5.0  # for the bridge's own tasks to end once cancelled


class PlcBridge(Daemon):
    def __init__(self, settings: Settings, adapter: PlcAdapter | None = None):
        check_plc_group(settings)
        self.s, self.p = settings, settings.plc
        self.lines = settings.plc_lines()
        super().__init__(settings.observability, log.bind(protocol=self.p.protocol, lines=self.lines))
        self.adapter = adapter or make_adapter(settings)
        self.metrics = PlcMetrics(self.registry)
        self.status = {line: LineStatus(ready=False) for line in self.lines}
        self.alarms: dict[str, set[str]] = {line: set() for line in self.lines}
        self.ledgers: dict[str, Ledger] = {}
        self.delivered = 0
        self.heartbeats = 0
        self._plc_up = False
        self._max_results: int | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def run(self, max_results: int | None = None) -> int:
        """Serve until SIGTERM (or `max_results` confirmed). Returns results confirmed by the PLC."""
        self._max_results = max_results
        with self.running():
            asyncio.run(self._main())
        return self.delivered

    async def _main(self) -> None:
        self._stop = asyncio.Event()  # no new deliveries
        self._abandon = asyncio.Event()  # give up the delivery in hand (drain timeout)
        self._plc_lock = asyncio.Lock()
        self.r = connect_async(self.s.redis)
        watcher = asyncio.create_task(self._watch_signal())
        tasks: list[asyncio.Task] = []
        try:
            # A stop while the PLC or Redis is still unreachable at start ends the wait at once.
            setup = asyncio.create_task(self._setup())
            stop_wait = asyncio.create_task(self._stop.wait())
            await asyncio.wait([setup, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            if not setup.done():
                self._abandon.set()  # nothing in hand to drain yet (and pymodbus may swallow a cancel)
                setup.cancel()
                await asyncio.gather(setup, return_exceptions=True)
                raise Stopped
            setup.result()
            self.health.set_ready(True)
            self.log.info("bridging", group=self.p.group, consumer=self.p.consumer, buffer_depth=self.p.buffer_depth)
            deliverers = []
            for line in self.lines:
                queue: asyncio.Queue[PlcResult] = asyncio.Queue(self.p.buffer_depth)
                tasks.append(asyncio.create_task(self._read_loop(line, queue), name=f"read-{line}"))
                d = asyncio.create_task(self._deliver_loop(line, queue), name=f"deliver-{line}")
                deliverers.append(d)
                tasks.append(d)
            tasks.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
            stop = asyncio.create_task(self._stop.wait())
            await asyncio.wait([stop, *deliverers], return_when=asyncio.FIRST_COMPLETED)
            for t in deliverers:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            self._stop.set()
            # Drain: the delivery in hand may finish its handshake; the buffer stays pending in the group.
            _, slow = await asyncio.wait(deliverers, timeout=self.p.drain_timeout_s)
            if slow:
                self.log.warning("drain_timeout", note="the result in hand stays pending; resumed at the next start")
                self._abandon.set()
                await asyncio.wait(slow, timeout=5)
        except Stopped:
            pass
        finally:
            self._stop.set()
            self._abandon.set()
            for t in [*tasks, watcher]:
                t.cancel()
            # Bounded: a task whose cancellation a PLC library swallowed must not hold the shutdown.
            _, stuck = await asyncio.wait([*tasks, watcher], timeout=SHUTDOWN_WAIT_S)
            if stuck:
                self.log.error("tasks_not_stopping", tasks=sorted(t.get_name() for t in stuck))
            with contextlib.suppress(Exception):
                await self.adapter.stop()
            with contextlib.suppress(Exception):
                await self.r.aclose()
            self.health.set_ready(False, "stopped")
            self.log.info("stopped", delivered=self.delivered)

    async def _watch_signal(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(0.05)
        self._stop.set()

    async def _setup(self) -> None:
        for line in self.lines:
            key = self.s.streams.key(line, "results")
            await self._redis(lambda key=key: self._ensure_group(key))
            ledger = Ledger(self.r, self.s.streams, line, self.p.group)
            await self._redis(ledger.load)
            self.ledgers[line] = ledger
            self.status[line].missing_count = ledger.counters["missing"]
        await self._plc("connect", lambda: asyncio.sleep(0))  # connects (server: starts) with retries
        for line, ledger in self.ledgers.items():
            await self._plc("restore", lambda line=line, ledger=ledger: self.adapter.restore(
                line, ledger.counters, ledger.last))  # fmt: skip
            self.status[line].ready = True
            await self._push_status(line)

    async def _ensure_group(self, key: str) -> None:
        # '$': a new bridge starts with new results, not the whole retained history.
        try:
            await self.r.xgroup_create(key, self.p.group, id="$", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- retries ---------------------------------------------------------------------------
    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._abandon.wait() if self._stop.is_set() else self._stop.wait(), seconds)

    async def _redis(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Redis call with reconnects: a result is never dropped because Redis blipped."""
        delay = 0.1
        while True:
            try:
                out = await fn()
                if not self.health.ready and self.ledgers and self._plc_up:
                    self.health.set_ready(True)
                return out
            except redis.ResponseError as exc:
                if not read_interrupted_by_slot_move(exc):
                    raise
                # Redis Cluster moved the results stream under a blocked XREADGROUP: nothing was
                # delivered; read again (the client follows the stream to its new node).
                self.log.info("slot_moved", error=str(exc))
            except REDIS_ERRORS as exc:
                self.health.set_ready(False, "redis unreachable")
                self.health.beat()
                if self._abandon.is_set():
                    raise Stopped from exc
                self.log.warning("redis_unavailable", error=str(exc), retry_in_s=round(delay, 2))
                await self._sleep_or_stop(delay)
                delay = min(delay * 2, 5.0)

    async def _plc(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """PLC call with reconnects and backoff; while the PLC is away every line is in alarm."""
        while True:
            await self._connect_plc()
            try:
                return await fn()
            except PlcUnavailable as exc:
                if self._plc_up:
                    self.log.error("plc_unavailable", during=what, error=str(exc))
                self._set_plc_down()

    def _set_plc_down(self) -> None:
        self._plc_up = False
        self.metrics.connected.set(0)
        self.health.set_ready(False, "plc unreachable")
        for line in self.lines:
            self._alarm(line, "plc_unreachable", True)

    async def _connect_plc(self) -> None:
        async with self._plc_lock:
            delay = 0.1
            while not self._plc_up:
                if self._abandon.is_set():
                    raise Stopped
                try:
                    await self.adapter.reconnect()
                except PlcUnavailable as exc:
                    self.metrics.reconnects.inc()
                    self.health.set_ready(False, "plc unreachable")
                    self.health.beat()  # alive and retrying: readiness, not liveness, reports the outage
                    self.log.warning("plc_unreachable", error=str(exc), retry_in_s=round(delay, 2))
                    await self._sleep_or_stop(delay)
                    delay = min(delay * 2, self.p.reconnect_max_backoff_s)
                    continue
                self._plc_up = True
                self.metrics.connected.set(1)
                if self.ledgers:
                    self.health.set_ready(True)
                self.log.info("plc_connected", protocol=self.adapter.name)
                for line in self.lines:
                    self._alarm(line, "plc_unreachable", False)

    # -- alarm and status ------------------------------------------------------------------
    def _alarm(self, line: str, reason: str, on: bool) -> None:
        reasons = self.alarms[line]
        if on == (reason in reasons):
            return
        (reasons.add if on else reasons.discard)(reason)
        st = self.status[line]
        st.alarm, st.alarm_reason = bool(reasons), ",".join(sorted(reasons))
        self.metrics.alarm.labels(line).set(int(st.alarm))
        if on:
            self.log.error("alarm", line=line, reason=reason)
        else:
            self.log.info("alarm_cleared", line=line, reason=reason, remaining=st.alarm_reason)

    async def _push_status(self, line: str) -> None:
        if not self._plc_up:
            return  # pushed again on the next heartbeat after reconnecting
        try:
            await self.adapter.set_status(line, self.status[line])
        except PlcUnavailable as exc:
            self.log.warning("status_not_written", line=line, error=str(exc))
            self._set_plc_down()

    async def _heartbeat_loop(self) -> None:
        # Not `while True`: a cancellation swallowed at shutdown (pymodbus awaits each response with
        # asyncio.wait_for, which on Python 3.11 can lose a cancel that races the response: CPython
        # gh-86296) would keep this loop, and with it the bridge, alive forever.
        while not self._abandon.is_set():
            self.heartbeats += 1
            self.health.beat()
            for line in self.lines:
                await self._plc("heartbeat", lambda line=line: self.adapter.heartbeat(line, self.heartbeats))
                await self._push_status(line)
            self.metrics.heartbeat.set(self.heartbeats)
            await asyncio.sleep(self.p.heartbeat_s)

    # -- reading ---------------------------------------------------------------------------
    async def _read_loop(self, line: str, queue: asyncio.Queue[PlcResult]) -> None:
        key = self.s.streams.key(line, "results")
        tracker = GapTracker(self.p.missing_timeout_s)
        cursor = "0"  # this consumer's pending entries first (a restart resumes them), then '>'
        while not self._stop.is_set():
            if queue.full():  # read only what fits: the rest stays in the group, where nothing is lost
                await asyncio.sleep(0.01)
                continue
            count = min(100, self.p.buffer_depth - queue.qsize())
            block = self.p.block_ms if cursor == ">" else None
            resp = await self._redis(
                lambda c=cursor, n=count, b=block: self.r.xreadgroup(
                    self.p.group, self.p.consumer, {key: c}, count=n, block=b
                )
            )
            entries = (resp[0][1] if isinstance(resp, list) else next(iter(resp.values()))[0]) if resp else []
            if cursor != ">" and not entries:
                cursor = ">"
                continue
            for raw_id, fields in entries:
                eid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                if cursor != ">":
                    cursor = eid
                if not fields:  # pending, but trimmed from the stream meanwhile: it cannot be delivered
                    self.metrics.lost.labels(line).inc()
                    self.log.error("result_trimmed_before_delivery", line=line, entry_id=eid)
                    await self._redis(lambda eid=eid: self.r.xack(key, self.p.group, eid))
                    continue
                rec = record_from_entry(line, eid, fields, self.p)
                if tracker.observe(rec.camera, rec.capture_seq, entry_time(eid)):
                    self.log.info("late_result", line=line, camera=rec.camera, capture_seq=rec.capture_seq)
                await queue.put(rec)  # blocks while the buffer is full: the rest waits in the group
                self.metrics.buffered.labels(line).set(queue.qsize())
            caught_up = cursor == ">" and len(entries) < count
            now = time.time() if caught_up else entry_time(entries[-1][0]) if entries else time.time()
            for camera, seq in tracker.expired(now):
                await self._report_missing(line, camera, seq)

    async def _report_missing(self, line: str, camera: str, capture_seq: int) -> None:
        self.metrics.missing.labels(line).inc()
        ledger = self.ledgers[line]
        await self._redis(ledger.count_missing)
        st = self.status[line]
        st.missing_count, st.missing_capture_seq = ledger.counters["missing"], capture_seq
        self.log.warning("result_missing", line=line, camera=camera, capture_seq=capture_seq,
                         timeout_s=self.p.missing_timeout_s)  # fmt: skip
        await self._push_status(line)

    # -- delivering ------------------------------------------------------------------------
    async def _next(self, queue: asyncio.Queue[PlcResult]) -> PlcResult | None:
        if self._stop.is_set():
            return None
        get = asyncio.ensure_future(queue.get())
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([get, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if get.done():
            return get.result()
        get.cancel()
        return None

    async def _deliver_loop(self, line: str, queue: asyncio.Queue[PlcResult]) -> None:
        ledger = self.ledgers[line]
        while (rec := await self._next(queue)) is not None:
            self.metrics.buffered.labels(line).set(queue.qsize())
            if ledger.already_confirmed(rec):  # confirmed by an earlier run, only its XACK was missing
                await self._redis(lambda rec=rec: ledger.confirm(rec))
                continue
            resumed = await self._redis(lambda rec=rec: ledger.assign(rec))
            started = time.monotonic()
            if not await self._deliver(line, rec):
                return  # abandoned at the drain timeout: pending, resumed by the next start
            await self._redis(lambda rec=rec: ledger.confirm(rec))
            self._confirmed(line, rec, resumed, time.monotonic() - started)
            if self._max_results is not None and self.delivered >= self._max_results:
                self._stop.set()

    async def _deliver(self, line: str, rec: PlcResult) -> bool:
        """Deliver, raising the alarm whenever the PLC takes longer than ack_timeout_s; never skip."""
        task = asyncio.create_task(self._plc("deliver", lambda: self.adapter.deliver(rec, self._abandon)))
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=self.p.ack_timeout_s)
                if done:
                    break
                if "plc_not_acking" not in self.alarms[line]:
                    self._alarm(line, "plc_not_acking", True)
                    self.log.error("plc_not_acking", line=line, sequence=rec.sequence, frame_id=rec.frame_id,
                                   waited_s=self.p.ack_timeout_s)  # fmt: skip
                    await self._push_status(line)
                self.health.beat()
        except asyncio.CancelledError:
            task.cancel()
            raise
        try:
            ok = task.result()
        except Stopped:
            return False
        if "plc_not_acking" in self.alarms[line]:
            self._alarm(line, "plc_not_acking", False)
            await self._push_status(line)
        return ok

    def _confirmed(self, line: str, rec: PlcResult, resumed: bool, took_s: float) -> None:
        self.delivered += 1
        self.metrics.results.labels(line, rec.verdict).inc()
        if rec.reject:
            self.metrics.rejects.labels(line).inc()
        self.metrics.confirm.labels(line).observe(took_s)
        if rec.captured_at is not None:
            self.metrics.latency.labels(line).observe(max(0.0, time.time() - rec.captured_at))
        if resumed:
            self.metrics.resumed.labels(line).inc()
        self.log.info(
            "confirmed", line=line, sequence=rec.sequence, frame_id=rec.frame_id, part_id=rec.part_id,
            verdict=rec.verdict, reject=rec.reject, resumed=resumed, took_ms=round(took_s * 1000, 1),
        )  # fmt: skip
