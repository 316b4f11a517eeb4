"""`crd work`: a batched inference worker on one or more lines' frames streams.

Four stages overlap, joined by bounded queues, so one worker keeps its device busy:

    line readers (a thread per line)   XREADGROUP / XAUTOCLAIM -> unpack -> intake
    batcher (a thread)                 latency-bounded batches under a decoded-bytes cap; decoding
                                       starts at once, in threads or in processes
                                       (workers/hostpool.py)                       -> ready
    device (the main loop)             one copy to the device, preprocess, model, wire maps
                                                                                   -> outbox
    publisher (a thread)               results built on the pool, then published and acknowledged
                                       per line in one atomic script (workers/publish.py)

A frame waits at most `max_wait_ms` for its batch to fill. Entries idle longer than `claim_idle_ms`
are reclaimed from dead workers; one delivered more than `max_deliveries` times is dead-lettered with
an error result. SIGTERM: stop reading, finish and publish everything in hand, leave the groups, exit.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import redis
import structlog
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from crd_model.preprocessing import intra_op_threads
from crd_model.stream import Limits, Shadow
from crd_model.stream.daemon import Daemon
from crd_model.stream.messages import is_anomalous
from crd_model.stream.redis_streams import (
    TRANSIENT_ERRORS,
    Backoff,
    connect,
    ensure_group,
    outstanding,
    read_interrupted_by_slot_move,
    trim_processed,
    trim_results,
)
from crd_model.stream.settings import Settings
from workers import collector
from workers.device import Staging, wire_maps
from workers.hostpool import SLABS, HostPool, PendingDecode, default_processes, shm_shortfall, slab_cost
from workers.models import ModelRegistry
from workers.processing import Item, build_outcome, check_item, decode_item, prepare_process, unpack_item
from workers.publish import Publisher
from workers.rollout import ModelsFile

log = structlog.get_logger("crd.worker")

STAGES = ("read", "unpack", "decode_rgb", "decode_xyz", "h2d", "preprocess", "model", "postprocess", "encode",
          "publish")  # fmt: skip
_POLL_S = 0.2  # how often idle stages look at the stop flag
_BUSY_POLL_S = 0.002  # how often a due batch looks whether the device side can take it


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.frames = Counter("crd_worker_frames_total", "Frames finished, by verdict", ["verdict"], registry=registry)
        self.errors = Counter("crd_worker_errors_total", "Error results, by code", ["code"], registry=registry)
        self.batch_size = Histogram(
            "crd_worker_batch_size",
            "Frames per inference batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=registry,
        )
        self.infer_seconds = Histogram("crd_worker_inference_seconds", "Device time per batch", registry=registry)
        self.latency = Histogram(
            "crd_worker_latency_seconds",
            "Capture to result",
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.lag = Gauge(
            "crd_worker_group_outstanding", "Frames in the stream not yet finished by the group", ["line"],
            registry=registry,
        )  # fmt: skip
        self.reclaimed = Counter("crd_worker_reclaimed_total", "Entries reclaimed from dead workers", registry=registry)
        self.duplicates = Counter(
            "crd_worker_duplicates_total",
            "Entries whose frame id already had a result: acknowledged, dead-lettered as duplicate",
            registry=registry,
        )
        self.results_overflow = Counter(
            "crd_worker_results_overflow_total",
            "Results trimmed before every consumer group had acknowledged them (results_hard_maxlen reached)",
            ["line"],
            registry=registry,
        )
        self.lost_to_other = Counter(
            "crd_worker_superseded_total",
            "Results not published: another worker had reclaimed the frame",
            registry=registry,
        )
        self.model_info = Gauge(
            "crd_worker_model_info", "The model serving each category (1); `<category>:shadow` for a candidate",
            ["category", "model_id"], registry=registry,
        )  # fmt: skip
        self.model_swaps = Counter("crd_worker_model_swaps_total", "Model sets swapped in", registry=registry)
        self.reload_failures = Counter(
            "crd_worker_model_reload_failures_total", "Model sets that failed to load (the old ones kept serving)",
            registry=registry,
        )  # fmt: skip
        self.stage_seconds = Counter(
            "crd_worker_stage_seconds_total", "Time spent per stage, CPU (thread time) and wall", ["stage", "clock"],
            registry=registry,
        )  # fmt: skip
        self.stage_frames = Counter(
            "crd_worker_stage_frames_total", "Frames through each stage", ["stage"], registry=registry
        )
        self.gc_pauses = Histogram(
            "crd_worker_gc_pause_seconds",
            "Python garbage collections in the worker process (every thread waits), by generation",
            ["generation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.decoder_restarts = Counter(
            "crd_worker_decoder_restarts_total",
            "Decode process pools replaced after a process died (a codec crash on a payload, the OOM killer)",
            registry=registry,
        )

    def stage(self, name: str, cpu_s: float, wall_s: float | None = None, frames: int = 1) -> None:
        self.stage_seconds.labels(name, "cpu").inc(max(cpu_s, 0.0))
        self.stage_seconds.labels(name, "wall").inc(max(cpu_s if wall_s is None else wall_s, 0.0))
        self.stage_frames.labels(name).inc(frames)


class ThreadDecode:
    """A batch decoding on the thread pool (the same interface as hostpool.PendingDecode)."""

    def __init__(self, items: list[Item], futures: list[Future[Item]]):
        self.items, self.futures = items, futures

    def wait(self, check: Callable[[Item], None]) -> list[Item]:
        return [f.result() for f in self.futures]  # decode_item checked each

    def release(self) -> None:
        for it in self.items:
            it.rgb = it.xyz = None  # decoded payloads are no longer needed: free them now


@dataclass
class Batch:
    items: list[Item]
    decoding: ThreadDecode | PendingDecode


class _InFlight:
    """Entries read but not yet published (or abandoned for a retry): the drain waits for zero."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self._n += n

    @property
    def n(self) -> int:
        return self._n


Loader = Callable[[dict, dict], ModelRegistry]  # (models, shadow_models) -> a loaded, warmed registry


class Worker(Daemon):
    def __init__(
        self,
        settings: Settings,
        models: ModelRegistry,
        r: redis.Redis | None = None,
        limits: Limits | None = None,
        loader: Loader | None = None,
    ):
        super().__init__(settings.observability, log.bind(consumer=settings.worker.consumer))
        self.s = settings
        self.w = settings.worker
        self.models = models
        self.r = r or connect(settings.redis)
        self.lines = list(self.w.lines) or [settings.line]
        # A blocking read must return before the client's socket timeout, or every idle read would end
        # in a TimeoutError (and a reconnect) instead of an empty answer.
        self.block_ms = max(1, min(self.w.block_ms, int(settings.redis.socket_timeout_s * 1000 * 0.5)))
        self.group = settings.streams.group
        self.consumer = self.w.consumer
        self.limits = limits or Limits()
        self.frames_keys = {line: settings.streams.key(line, "frames") for line in self.lines}
        self.publishers = {
            line: Publisher(self.r, settings.streams, line, self.group, self.consumer) for line in self.lines
        }
        self.pool = ThreadPoolExecutor(self.w.decode_threads, thread_name_prefix="codec")
        self.metrics = WorkerMetrics(self.registry)
        prepare_process(self.w.keep_freed_memory)  # results are built in the pool threads too
        processes = decode_processes(self.w.decode_processes, models.devices)
        slab_bytes = int(self.w.max_batch_decoded_mb * 2**20)
        self.hostpool = self._host_pool(processes, slab_bytes) if processes else None
        capacity = self.w.max_batch * self.w.prefetch_batches
        self.intake: queue.Queue[Item] = queue.Queue()
        self.intake_room = threading.Semaphore(capacity)  # read no further ahead than this
        self.ready: queue.Queue[Batch] = queue.Queue(maxsize=1)
        self.outbox: queue.Queue[list[Item]] = queue.Queue(maxsize=2)
        self.reading = threading.Event()  # set while readers should read
        self.in_flight = _InFlight()
        self.staging = {d: Staging(d) for d in models.devices}
        self.published = 0
        self._last_read = time.monotonic()
        self._fatal: BaseException | None = None
        self._readers: list[threading.Thread] = []
        self._device_done = threading.Event()
        self._gc_pauses = collector.Pauses()
        # Rollout: a models file watched by a thread that loads new models beside the live ones.
        self.loader = loader
        self.models_file = ModelsFile(self.w.models_file) if self.w.models_file and loader else None
        if self.models_file is not None:
            self.models_file.loaded_fingerprint = self.models_file.snapshot()[0]
        self._reload_now = threading.Event()
        self._next_models: ModelRegistry | None = None
        self._show_models()
        self.log = self.log.bind(lines=self.lines)

    def _host_pool(self, processes: int, slab_bytes: int) -> HostPool | None:
        """Decode processes and their slabs, or None (threads decode) when /dev/shm cannot hold them."""
        hint = "mount a larger /dev/shm (docs/deploy.md) or lower max_batch_decoded_mb; decoding in threads"
        needed_mb = SLABS * slab_bytes // 2**20
        if missing := shm_shortfall(slab_bytes):
            self.log.error("shm_too_small", needed_mb=needed_mb, missing_mb=-(-missing // 2**20), hint=hint)
            return None
        try:
            return HostPool(
                processes, slab_bytes, self.limits, on_restart=self.metrics.decoder_restarts.inc,
                keep_freed_memory=self.w.keep_freed_memory,
            )  # fmt: skip
        except OSError as exc:  # ENOSPC while reserving the slabs: the room went meanwhile
            self.log.error("shm_too_small", needed_mb=needed_mb, error=str(exc), hint=hint)
            return None

    # -- the loop --------------------------------------------------------------------------------------
    def run(self, max_frames: int | None = None, idle_exit_s: float | None = None) -> int:
        """Serve until stopped (or `max_frames` published, or idle for `idle_exit_s`). Returns frames published."""
        self._readers = [
            threading.Thread(target=self._read_line, args=(line,), name=f"read-{line}") for line in self.lines
        ]
        batcher = threading.Thread(target=self._batch, name="batcher")
        publisher = threading.Thread(target=self._publish_loop, name="publisher")
        threads = [*self._readers, batcher]
        if self.models_file is not None:
            threads.append(threading.Thread(target=self._watch_models, name="rollout", daemon=True))
        self.reading.set()
        if self.w.freeze_startup_objects:
            self.log.info("startup_objects_frozen", objects=collector.freeze())
        try:
            with self.running(), intra_op_threads(self.w.torch_threads), self._gc_pauses:
                for t in [*threads, publisher]:
                    t.start()
                while True:
                    self.health.beat()
                    self._count_gc_pauses()
                    if self._fatal is not None:
                        raise self._fatal
                    if self._should_stop_reading(max_frames, idle_exit_s):
                        self.reading.clear()
                    # Drained: nothing can arrive any more (readers gone) and nothing is in hand.
                    readers_alive = any(t.is_alive() for t in [*self._readers, batcher])
                    if not self.reading.is_set() and not readers_alive and not self.in_flight.n:
                        break
                    try:
                        batch = self.ready.get(timeout=_POLL_S)  # poll
                    except queue.Empty:
                        self._swap_models()  # an idle line gets its new models too
                        continue
                    try:
                        items = batch.decoding.wait(self._check)  # start: decoded meanwhile
                        self._swap_models()  # between batches: a new model set, if one is loaded and warm
                        self._infer(items)  # run: device work, per category
                    finally:
                        batch.decoding.release()
                    self.outbox.put(items)  # finish: encoded, published and acked on the publisher thread
        finally:
            self.reading.clear()
            self._device_done.set()
            self._reload_now.set()  # wakes the rollout thread, which then sees reading cleared
            for t in threads:
                t.join()
            if publisher.is_alive():
                self.outbox.put([])  # the publisher's end marker, after everything in hand
                publisher.join()
            self.pool.shutdown(wait=True)
            if self.hostpool is not None:
                self.hostpool.close()
            for line in self.lines:
                self._leave_group(line)
            self._count_gc_pauses()
            if self.w.freeze_startup_objects:
                collector.thaw()
            self.log.info("stopped", published=self.published)
        return self.published

    def _count_gc_pauses(self) -> None:
        for generation, seconds in self._gc_pauses.drain():
            self.metrics.gc_pauses.labels(str(generation)).observe(seconds)

    def _should_stop_reading(self, max_frames: int | None, idle_exit_s: float | None) -> bool:
        if self.stopping.is_set():
            return True
        if max_frames is not None and self.published >= max_frames:
            return True
        idle = time.monotonic() - self._last_read
        return idle_exit_s is not None and self.in_flight.n == 0 and idle > idle_exit_s

    # -- stage 1: a reader per line ------------------------------------------------------------------------
    def _read_line(self, line: str) -> None:
        key = self.frames_keys[line]
        backoff = Backoff(cap=10.0)
        ready = False
        last_claim = last_maintain = 0.0
        claim_cursor = "0-0"
        while self.reading.is_set():
            try:
                if not ready:
                    ensure_group(self.r, key, self.group)
                    ready = True
                    self.health.set_ready(True)
                    self.log.info("ready", line=line, categories=self.models.categories, group=self.group,
                                  torch_threads=torch.get_num_threads())  # fmt: skip
                now = time.monotonic()
                if now - last_claim >= self.w.claim_every_s:
                    last_claim = now
                    claim_cursor = self._reclaim(line, claim_cursor)
                if now - last_maintain >= self.s.streams.frames_trim_every_s:
                    last_maintain = now
                    self._maintain(line)
                self._read(line)
                backoff.reset()
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    self._fail(exc)
                    return
                # The server lost the group (restart without persistence, FLUSHALL): recreate it.
                ready = False
                self.health.set_ready(False, "consumer group missing")
                self.log.warning("group_missing", line=line, error=str(exc))
            except TRANSIENT_ERRORS as exc:
                # What is in hand stays pending on the server; it is finished after reconnecting (or
                # reclaimed by another worker if this one never comes back).
                self.health.set_ready(False, "redis unreachable")
                delay = backoff.sleep()
                self.log.warning("redis_unavailable", line=line, error=str(exc), retry_in_s=round(delay, 2))
                ready = False
            except Exception as exc:
                self._fail(exc)
                return

    def _maintain(self, line: str) -> None:
        """Backlog gauge; frames trimmed below what the group still needs; results below what every
        results consumer group has acknowledged (never from under one, unless the hard cap forces it:
        then counted and logged)."""
        key, streams = self.frames_keys[line], self.s.streams
        self.metrics.lag.labels(line).set(outstanding(self.r, key, self.group, limit=100_000))
        trim_processed(self.r, key)
        trim = trim_results(
            self.r, streams.key(line, "results"), streams.results_maxlen, streams.results_retain_s,
            streams.results_hard_maxlen,
        )  # fmt: skip
        if trim.overflow:
            self.metrics.results_overflow.labels(line).inc(trim.overflow)
            self.log.error(
                "results_overflow", line=line, dropped=trim.overflow, lagging_groups=trim.lagging,
                hard_maxlen=streams.results_hard_maxlen,
            )  # fmt: skip

    def _read(self, line: str) -> None:
        """XREADGROUP as many entries as the intake has room for (waiting for room first)."""
        if not self.intake_room.acquire(timeout=_POLL_S):
            return
        room = 1
        while room < self.w.max_batch and self.intake_room.acquire(blocking=False):
            room += 1
        try:
            t, c = time.perf_counter(), time.thread_time()
            try:
                resp = self.r.xreadgroup(
                    self.group, self.consumer, {self.frames_keys[line]: ">"}, count=room, block=self.block_ms
                )
            except redis.ResponseError as exc:
                if not read_interrupted_by_slot_move(exc):
                    raise
                resp = None  # Redis Cluster moved the stream while we waited: nothing delivered, read again
            entries = _entries(resp)
            if entries:
                self.metrics.stage("read", time.thread_time() - c, time.perf_counter() - t, len(entries))
        except BaseException:
            self.intake_room.release(room)
            raise
        if room > len(entries):
            self.intake_room.release(room - len(entries))
        self._admit(line, entries, {})

    def _reclaim(self, line: str, cursor: str) -> str:
        """XAUTOCLAIM entries idle longer than `claim_idle_ms`: their worker is presumed dead."""
        key = self.frames_keys[line]
        resp = self.r.xautoclaim(
            key, self.group, self.consumer, self.w.claim_idle_ms, start_id=cursor, count=self.w.max_batch
        )
        cursor = resp[0].decode() if isinstance(resp[0], bytes) else str(resp[0])
        entries = [(eid, fields) for eid, fields in resp[1] if fields is not None]
        deleted = resp[2] if len(resp) > 2 else []
        if deleted:
            self.log.error("pending_entries_were_deleted", line=line, ids=[d.decode() for d in deleted])
        if entries:
            deliveries = {}
            for eid, _ in entries:
                info = self.r.xpending_range(key, self.group, min=eid, max=eid, count=1)
                deliveries[eid.decode()] = int(info[0]["times_delivered"]) if info else 1
            self.metrics.reclaimed.inc(len(entries))
            self.log.info("reclaimed", line=line, n=len(entries), ids=list(deliveries))
            for _ in entries:
                self.intake_room.acquire()  # reclaimed entries count against the read-ahead too
            self._admit(line, entries, deliveries)
        return cursor

    def _admit(self, line: str, entries: list, deliveries: dict[str, int]) -> None:
        if not entries:
            return
        self._last_read = time.monotonic()
        self.in_flight.add(len(entries))
        for eid, fields in entries:
            entry_id = eid.decode() if isinstance(eid, bytes) else eid
            item = unpack_item(
                line,
                entry_id,
                fields,
                deliveries.get(entry_id, 1),
                self.models,
                self.limits,
                self.w.max_deliveries,
                self.w.max_frame_pixels,
            )
            self.metrics.stage("unpack", item.cpu["unpack"])
            self.intake.put(item)

    # -- stage 2: the batcher ------------------------------------------------------------------------------
    def _batch(self) -> None:
        """Latency-bounded batches: up to `max_batch` frames, at most `max_wait_ms` after the first one was
        read (or, when the device is behind, until it can take the batch), and no more decoded bytes than
        `max_batch_decoded_mb` (a larger frame goes alone)."""
        cap = self.w.max_batch_decoded_mb * 2**20
        cost = slab_cost if self.hostpool is not None else (lambda it: it.decoded_bytes)
        carry: Item | None = None
        try:
            while any(t.is_alive() for t in self._readers) or carry is not None or not self.intake.empty():
                if carry is None:
                    try:
                        carry = self.intake.get(timeout=_POLL_S)
                    except queue.Empty:
                        continue
                batch, size, carry = [carry], cost(carry), None
                deadline = batch[0].read_at + self.w.max_wait_ms / 1000.0
                while len(batch) < self.w.max_batch:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        if not self.ready.full() or self._device_side_gone():
                            break  # due, and the device side can take it now
                        # The device is behind (a batch is already waiting for it): rather than queue
                        # another small batch behind that one, this one keeps filling meanwhile.
                        wait = _BUSY_POLL_S
                    try:
                        item = self.intake.get(timeout=wait)
                    except queue.Empty:
                        continue
                    item_cost = cost(item)
                    if size + item_cost > cap:
                        carry = item  # starts the next batch
                        break
                    batch.append(item)
                    size += item_cost
                decoding = self._start_decoding(batch, size)
                if decoding is None:
                    return
                while True:  # hand over, but keep noticing a fatal error elsewhere
                    try:
                        self.ready.put(Batch(batch, decoding), timeout=_POLL_S)
                        break
                    except queue.Full:
                        if self._device_side_gone():
                            return
        except Exception as exc:
            self._fail(exc)

    def _device_side_gone(self) -> bool:
        """A stage failed or the device loop ended: nothing handed over would be taken any more."""
        return self._fatal is not None or self._device_done.is_set()

    def _start_decoding(self, batch: list[Item], size: int) -> ThreadDecode | PendingDecode | None:
        """Decoding of a batch of `size` slab bytes, started: in the host pool's processes when it fits a
        slab (a frame larger than a slab, alone in its batch, is decoded by threads). None when the worker
        stopped meanwhile."""
        if self.hostpool is not None and size <= self.hostpool.slab_bytes:
            return self.hostpool.decode(batch, give_up=self._device_side_gone)
        futures = [self.pool.submit(decode_item, it, self.models, self.limits) for it in batch]
        return ThreadDecode(batch, futures)

    def _check(self, item: Item) -> None:
        check_item(item, self.models)

    # -- stage 3: the device ---------------------------------------------------------------------------------
    def _infer(self, items: list[Item]) -> None:
        """Scores and wire maps of every decoded item; items whose inference raised stay pending."""
        for it in items:
            for stage in ("decode_rgb", "decode_xyz"):
                if stage in it.cpu:
                    self.metrics.stage(stage, it.cpu[stage])
        by_category: dict[str, list[Item]] = defaultdict(list)
        for it in items:
            if it.error is None and it.frame is not None:
                by_category[it.frame.category].append(it)
        for category, group in by_category.items():
            inspector = self.models.get(category)
            if inspector is None:  # the category left with a model swap after these frames were read
                for it in group:
                    it.fail("unknown_category", f"no model for category {category!r} any more")
                continue
            t0 = time.perf_counter()
            try:
                self._infer_group(inspector, group)
            except Exception as exc:  # e.g. device OOM: leave pending, retried later (then dead-lettered)
                self.log.error("inference_failed", category=category, n=len(group), error=repr(exc))
                for it in group:
                    it.abandoned = True
            self.metrics.infer_seconds.observe(time.perf_counter() - t0)
            self.metrics.batch_size.observe(len(group))

    def _infer_group(self, inspector, group: list[Item]) -> None:
        device = inspector.device
        timed = self.w.time_stages and device.type == "cuda"
        clock = _StageClock(self.metrics, len(group), device if timed else None)
        with clock("h2d"):
            arrays = [a for it in group for a in (it.rgb, it.xyz)]
            on_device = self.staging.setdefault(device, Staging(device)).upload(arrays)
        with clock("preprocess"):
            inputs = inspector.preprocess(on_device[0::2], on_device[1::2])
        with clock("model"):
            out = inspector.forward(inputs)
        threshold = float(inspector.threshold)
        with clock("postprocess"):
            scores = out.pred_score.float().cpu().tolist()
            maps = wire_maps(
                out.anomaly_map,
                [it.image_hw for it in group],
                self.w.result_map_max_side,
                self.w.result_map_encoding,
                keep_values=[is_anomalous(score, threshold) for score in scores],  # regions: anomalous only
            )
        version = self.models.model_version(group[0].frame.category)
        for it, wm, score in zip(group, maps, scores, strict=True):
            it.wire_map, it.score, it.threshold = wm, float(score), threshold
            it.model_id, it.model_version = inspector.model_id, version
        candidate = self.models.shadow(group[0].frame.category)
        if candidate is not None:
            self._score_shadow(candidate, group, on_device)

    def _score_shadow(self, candidate, group: list[Item], on_device: list) -> None:
        """The candidate model scores the same frames; a failure there never touches the live results."""
        try:
            if candidate.device != on_device[0].device:
                on_device = [t.to(candidate.device) for t in on_device]
            scores = candidate.forward(candidate.preprocess(on_device[0::2], on_device[1::2])).pred_score
            threshold = float(candidate.threshold)
            for it, score in zip(group, scores.float().cpu().tolist(), strict=True):
                verdict = "anomalous" if is_anomalous(score, threshold) else "ok"
                it.shadow = Shadow(
                    model_id=candidate.model_id, score=float(score), threshold=threshold, verdict=verdict
                )
        except Exception as exc:
            self.log.error("shadow_failed", model_id=candidate.model_id, n=len(group), error=repr(exc))

    # -- stage 4: the publisher -----------------------------------------------------------------------------
    def _publish_loop(self) -> None:
        while True:
            items = self.outbox.get()
            if not items:
                return
            try:
                self._publish(items)
            except Exception as exc:
                self._fail(exc)
                return

    def _publish(self, items: list[Item]) -> None:
        done = [it for it in items if not it.abandoned]
        abandoned = len(items) - len(done)  # inference failed: they stay pending for a retry
        if self.hostpool is not None:
            outcomes = self.hostpool.build_outcomes(done, self.consumer, self.w.region_min_area)
        else:
            outcomes = list(self.pool.map(lambda it: build_outcome(it, self.consumer, self.w.region_min_area), done))
        for it in done:
            self.metrics.stage("encode", it.cpu.get("encode", 0.0))
        by_line: dict[str, list[int]] = defaultdict(list)
        for i, it in enumerate(done):
            by_line[it.line].append(i)
        backoff = Backoff(cap=5.0)
        for line, idx in by_line.items():
            while True:
                t, c = time.perf_counter(), time.thread_time()
                try:
                    # Idempotent: a retry after a lost reply publishes nothing twice (only entries still
                    # pending for this consumer are published, and publishing acks them).
                    done_now = self.publishers[line].publish([outcomes[i] for i in idx])
                    break
                except TRANSIENT_ERRORS as exc:
                    self.health.set_ready(False, "redis unreachable")
                    delay = backoff.sleep()
                    self.log.warning("publish_retry", line=line, error=str(exc), retry_in_s=round(delay, 2))
            self.metrics.stage("publish", time.thread_time() - c, time.perf_counter() - t, len(idx))
            self.published += done_now.published
            if done_now.duplicates:
                self.metrics.duplicates.inc(done_now.duplicates)
                self.log.warning("duplicates", line=line, n=done_now.duplicates)
            lost = len(idx) - done_now.published - done_now.duplicates
            if lost:
                self.metrics.lost_to_other.inc(lost)
                self.log.warning("superseded", line=line, n=lost)
        now = time.time()
        for it, o in zip(done, outcomes, strict=True):
            self.metrics.frames.labels(o.verdict).inc()
            if o.verdict == "error":
                self.metrics.errors.labels(o.dead_reason).inc()
                self.log.warning(
                    "frame_error", line=it.line, frame_id=o.frame_id, entry_id=o.entry_id, code=o.dead_reason,
                    message=o.dead_message[:200],
                )  # fmt: skip
            if it.frame is not None:
                self.metrics.latency.observe(max(0.0, now - it.frame.captured_at))
        self.log.debug("batch_done", n=len(items), frame_ids=[o.frame_id for o in outcomes][:64])
        if items:
            self.intake_room.release(len(items))
        self.in_flight.add(-len(items))
        if abandoned:
            self.log.warning("left_pending_for_retry", n=abandoned)

    # -- rollout -----------------------------------------------------------------------------------------------
    def reload(self, *_: object) -> None:
        """SIGHUP: look at the models file now."""
        self._reload_now.set()

    def _watch_models(self) -> None:
        assert self.models_file is not None and self.loader is not None
        while self.reading.is_set():
            self._reload_now.wait(timeout=self.w.reload_check_s)
            self._reload_now.clear()
            try:
                fingerprint, spec, error = self.models_file.snapshot()  # one read of the file per check
                if fingerprint == self.models_file.loaded_fingerprint:
                    continue
                self.models_file.loaded_fingerprint = fingerprint  # a failure is reported once per change
                if spec is None:
                    raise ValueError(error)
                self.log.info("models_loading", models={k: str(v) for k, v in spec.models.items()},
                              shadow_models={k: str(v) for k, v in spec.shadow_models.items()})  # fmt: skip
                self._next_models = self.loader(spec.models, spec.shadow_models)  # loaded and warmed
            except Exception as exc:  # a broken file or checkpoint: keep serving the models in hand
                self.metrics.reload_failures.inc()
                self.log.error("models_reload_failed", error=f"{type(exc).__name__}: {exc}")

    def _swap_models(self) -> None:
        new, self._next_models = self._next_models, None
        if new is None:
            return
        old = self.models.model_ids()
        self.models = new  # a new device gets its staging buffers on its first batch (_infer_group)
        if self.w.freeze_startup_objects:  # the old set may be held by cycles alone: frozen, never freed
            self.log.info("objects_refrozen", objects=collector.freeze())
        self.metrics.model_swaps.inc()
        self._show_models()
        self.log.info("models_swapped", old=old, new=new.model_ids())

    def _show_models(self) -> None:
        self.metrics.model_info.clear()
        for category, model_id in self.models.model_ids().items():
            self.metrics.model_info.labels(category, model_id).set(1)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        """An unexpected error in a stage thread: stop everything and re-raise it from `run`."""
        self.log.error("stage_failed", error=repr(exc), thread=threading.current_thread().name)
        if self._fatal is None:
            self._fatal = exc
        self.reading.clear()

    def _leave_group(self, line: str) -> None:
        """On a clean exit with nothing pending, remove this consumer so names of finished pods
        do not pile up in the group. With anything pending it stays, for XAUTOCLAIM to find."""
        key = self.frames_keys[line]
        try:
            for c in self.r.xinfo_consumers(key, self.group):
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if name == self.consumer and int(c["pending"]) == 0:
                    self.r.xgroup_delconsumer(key, self.group, self.consumer)
        except redis.RedisError as exc:
            self.log.warning("leave_group_failed", line=line, error=str(exc))


class _StageClock:
    """Times device stages into the worker's metrics; with a device, synchronises it so each stage's
    wall time is its own (benchmarks only: it costs the overlap of host and device)."""

    def __init__(self, metrics: WorkerMetrics, frames: int, sync_device: torch.device | None):
        self.metrics, self.frames, self.sync = metrics, frames, sync_device

    def __call__(self, name: str):
        clock = self

        class _Timer:
            def __enter__(self):
                self.t, self.c = time.perf_counter(), time.thread_time()

            def __exit__(self, *exc):
                if clock.sync is not None and exc[0] is None:
                    torch.cuda.synchronize(clock.sync)
                clock.metrics.stage(name, time.thread_time() - self.c, time.perf_counter() - self.t, clock.frames)

        return _Timer()


def decode_processes(setting: int | None, devices) -> int:
    """Host-pool processes: the setting, or by default one per core less two (at most 16) when a model
    runs on a GPU, else none (on a CPU the model needs the cores; threads decode). A supervisor sets
    each of its workers' share."""
    if setting is not None:
        return setting
    if not any(torch.device(d).type == "cuda" for d in devices):
        return 0
    return default_processes()


def _entries(resp) -> list:
    """XREADGROUP's entries for one stream, RESP2 ([[stream, entries]]) or RESP3 ({stream: [entries]})."""
    if not resp:
        return []
    entries = resp[0][1] if isinstance(resp, list) else next(iter(resp.values()))[0]
    return [(eid, fields) for eid, fields in entries if fields is not None]
