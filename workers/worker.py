"""`crd work`: a batched inference worker on one line's frames stream.

Loop: read up to `max_batch` entries (XREADGROUP, then up to `max_wait_ms` more to fill the
batch), decode + preprocess them in a thread pool while the previous batch runs on the device,
publish results and XACK in one atomic script, and reclaim entries that dead workers left
pending (XAUTOCLAIM). SIGTERM: stop reading, finish what is in hand, ack, exit.
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

import redis
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from crd_model.stream import Limits
from crd_model.stream.daemon import Daemon
from crd_model.stream.redis_streams import Backoff, connect, ensure_group, outstanding, trim_processed
from crd_model.stream.settings import Settings
from workers.models import ModelRegistry
from workers.processing import Item, build_outcome, decode_item
from workers.publish import Publisher

log = structlog.get_logger("crd.worker")

Batch = list[Future[Item]]


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.frames = Counter("crd_worker_frames_total", "Frames finished, by verdict", ["verdict"], registry=registry)
        self.errors = Counter("crd_worker_errors_total", "Error results, by code", ["code"], registry=registry)
        self.batch_size = Histogram(
            "crd_worker_batch_size",
            "Frames per inference batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=registry,
        )
        self.infer_seconds = Histogram("crd_worker_inference_seconds", "Model time per batch", registry=registry)
        self.latency = Histogram(
            "crd_worker_latency_seconds",
            "Capture to result",
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.lag = Gauge(
            "crd_worker_group_outstanding", "Frames in the stream not yet finished by the group", registry=registry
        )
        self.reclaimed = Counter("crd_worker_reclaimed_total", "Entries reclaimed from dead workers", registry=registry)
        self.lost_to_other = Counter(
            "crd_worker_superseded_total",
            "Results not published: another worker had reclaimed the frame",
            registry=registry,
        )


class Worker(Daemon):
    def __init__(
        self, settings: Settings, models: ModelRegistry, r: redis.Redis | None = None, limits: Limits | None = None
    ):
        super().__init__(settings.observability, log.bind(line=settings.line, consumer=settings.worker.consumer))
        self.s = settings
        self.w = settings.worker
        self.models = models
        self.r = r or connect(settings.redis)
        self.frames_key = settings.streams.key(settings.line, "frames")
        self.group = settings.streams.group
        self.consumer = self.w.consumer
        self.limits = limits or Limits()
        self.publisher = Publisher(self.r, settings.streams, settings.line, self.group, self.consumer)
        self.pool = ThreadPoolExecutor(self.w.decode_threads, thread_name_prefix="decode")
        self.metrics = WorkerMetrics(self.registry)
        self._last_claim = 0.0
        self._last_trim = 0.0
        self._claim_cursor = "0-0"
        self.published = 0

    def run(self, max_frames: int | None = None, idle_exit_s: float | None = None) -> int:
        """Serve until stopped (or `max_frames` published, or idle for `idle_exit_s`). Returns frames published."""
        backoff = Backoff(cap=10.0)
        in_hand: Batch = []
        last_activity = time.monotonic()
        try:
            with self.running():
                while not self.stopping.is_set():
                    try:
                        if not self.health.ready:
                            ensure_group(self.r, self.frames_key, self.group)
                            self.health.set_ready(True)
                            self.log.info("ready", categories=self.models.categories, group=self.group)
                        # Block only when nothing is in hand; otherwise just top up, so the batch in
                        # hand is not held back by an idle stream.
                        fresh = self._reclaim() or self._read(block=not in_hand)
                        if in_hand:
                            self._finish(in_hand)
                        in_hand = fresh
                        self.health.beat()
                        backoff.reset()
                        self._maintain()
                        if fresh:
                            last_activity = time.monotonic()
                        elif idle_exit_s is not None and time.monotonic() - last_activity > idle_exit_s:
                            break
                        if max_frames is not None and self.published >= max_frames and not in_hand:
                            break
                    except redis.ResponseError as exc:
                        if "NOGROUP" not in str(exc):
                            raise
                        # The server lost the group (restart without persistence, FLUSHALL): recreate it.
                        self.health.set_ready(False, "consumer group missing")
                        self.log.warning("group_missing", error=str(exc))
                    except (redis.ConnectionError, redis.TimeoutError) as exc:
                        # What is in hand stays pending on the server; it is finished after reconnecting
                        # (or reclaimed by another worker if this one never comes back).
                        self.health.set_ready(False, "redis unreachable")
                        self.health.beat()  # alive and retrying: readiness, not liveness, reports the outage
                        delay = backoff.sleep()
                        self.log.warning("redis_unavailable", error=str(exc), retry_in_s=round(delay, 2))
                if in_hand:
                    self._finish(in_hand)  # drain: finish the batch in hand before exiting
                self._leave_group()
        finally:
            self.pool.shutdown(wait=True)
            self.log.info("stopped", published=self.published)
        return self.published

    def _leave_group(self) -> None:
        """On a clean exit with nothing pending, remove this consumer so names of finished pods
        do not pile up in the group. With anything pending it stays, for XAUTOCLAIM to find."""
        try:
            for c in self.r.xinfo_consumers(self.frames_key, self.group):
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if name == self.consumer and int(c["pending"]) == 0:
                    self.r.xgroup_delconsumer(self.frames_key, self.group, self.consumer)
        except redis.RedisError as exc:
            self.log.warning("leave_group_failed", error=str(exc))

    # -- reading ---------------------------------------------------------------------------
    def _submit(self, entries: list[tuple[bytes, dict[bytes, bytes]]], deliveries: dict[str, int]) -> Batch:
        return [
            self.pool.submit(
                decode_item,
                eid.decode(),
                fields,
                deliveries.get(eid.decode(), 1),
                self.models,
                self.limits,
                self.w.max_deliveries,
            )
            for eid, fields in entries
        ]

    def _xreadgroup(self, count: int, block_ms: int | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        resp = self.r.xreadgroup(self.group, self.consumer, {self.frames_key: ">"}, count=count, block=block_ms)
        if not resp:
            return []
        # RESP2: [[stream, entries]]; RESP3: {stream: [entries]}
        entries = resp[0][1] if isinstance(resp, list) else next(iter(resp.values()))[0]
        return [(eid, fields) for eid, fields in entries if fields is not None]

    def _read(self, block: bool) -> Batch:
        """Dynamic batching: whatever is there, then up to `max_wait_ms` more to fill the batch.

        With a batch in hand (`block=False`) there is no extra wait: what arrived while the device
        was busy is the next batch, and waiting longer would only delay the batch in hand.
        """
        entries = self._xreadgroup(self.w.max_batch, self.w.block_ms if block else None)
        if block and entries and len(entries) < self.w.max_batch and self.w.max_wait_ms > 0:
            deadline = time.monotonic() + self.w.max_wait_ms / 1000.0
            while len(entries) < self.w.max_batch and not self.stopping.is_set():
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms < 1:
                    break
                more = self._xreadgroup(self.w.max_batch - len(entries), remaining_ms)
                if not more:
                    break
                entries += more
        return self._submit(entries, {})

    def _reclaim(self) -> Batch:
        """XAUTOCLAIM entries idle longer than `claim_idle_ms`: their worker is presumed dead."""
        now = time.monotonic()
        if now - self._last_claim < self.w.claim_every_s:
            return []
        self._last_claim = now
        resp = self.r.xautoclaim(
            self.frames_key,
            self.group,
            self.consumer,
            self.w.claim_idle_ms,
            start_id=self._claim_cursor,
            count=self.w.max_batch,
        )
        self._claim_cursor = resp[0].decode() if isinstance(resp[0], bytes) else str(resp[0])
        entries = [(eid, fields) for eid, fields in resp[1] if fields is not None]
        deleted = resp[2] if len(resp) > 2 else []
        if deleted:
            self.log.error("pending_entries_were_deleted", ids=[d.decode() for d in deleted])
        if not entries:
            return []
        deliveries = {}
        for eid, _ in entries:
            info = self.r.xpending_range(self.frames_key, self.group, min=eid, max=eid, count=1)
            deliveries[eid.decode()] = int(info[0]["times_delivered"]) if info else 1
        self.metrics.reclaimed.inc(len(entries))
        self.log.info("reclaimed", n=len(entries), ids=list(deliveries))
        return self._submit(entries, deliveries)

    # -- inference and publishing ----------------------------------------------------------
    def _finish(self, batch: Batch) -> None:
        items = [f.result() for f in batch]
        by_category: dict[str, list[Item]] = defaultdict(list)
        for it in items:
            if it.error is None and it.frame is not None:
                by_category[it.frame.category].append(it)
        failed: set[str] = set()
        for category, group in by_category.items():
            inspector = self.models.get(category)
            assert inspector is not None
            t = time.perf_counter()
            try:
                results = inspector.infer([it.prepared for it in group])
            except Exception as exc:  # e.g. device OOM: leave pending, retried later (then dead-lettered)
                self.log.error("inference_failed", category=category, n=len(group), error=repr(exc))
                failed.update(it.entry_id for it in group)
                continue
            self.metrics.infer_seconds.observe(time.perf_counter() - t)
            self.metrics.batch_size.observe(len(group))
            for it, res in zip(group, results, strict=True):
                it.inspection = res
        outcomes = [
            build_outcome(
                it,
                self.models,
                self.consumer,
                self.s.line,
                self.w.result_map_max_side,
                self.w.result_map_encoding,
                self.w.region_min_area,
            )
            for it in items
            if it.entry_id not in failed
        ]
        published = self.publisher.publish(outcomes)
        self.published += published
        if published < len(outcomes):
            self.metrics.lost_to_other.inc(len(outcomes) - published)
            self.log.warning("superseded", n=len(outcomes) - published)
        now = time.time()
        for it, o in zip([it for it in items if it.entry_id not in failed], outcomes, strict=True):
            self.metrics.frames.labels(o.verdict).inc()
            if o.verdict == "error":
                self.metrics.errors.labels(o.dead_reason).inc()
                self.log.warning(
                    "frame_error",
                    frame_id=o.frame_id,
                    entry_id=o.entry_id,
                    code=o.dead_reason,
                    message=o.dead_message[:200],
                )
            if it.frame is not None:
                self.metrics.latency.observe(max(0.0, now - it.frame.captured_at))
        self.log.debug("batch_done", n=len(items), published=published, frame_ids=[o.frame_id for o in outcomes][:64])

    def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_trim < self.s.streams.frames_trim_every_s:
            return
        self._last_trim = now
        self.metrics.lag.set(outstanding(self.r, self.frames_key, self.group, limit=100_000))
        trim_processed(self.r, self.frames_key)
