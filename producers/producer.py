"""The producer daemon: rate control, backpressure, reconnects, graceful stop."""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import structlog
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from crd_model.stream import WIRE_VERSION, make_frame, pack_frame
from crd_model.stream.daemon import Daemon
from crd_model.stream.redis_streams import (
    F_FRAME_ID,
    F_PAYLOAD,
    F_VERSION,
    TRANSIENT_ERRORS,
    Backoff,
    RedisClient,
    connect,
    ensure_group,
    outstanding,
)
from crd_model.stream.settings import Settings
from producers.sources import SourceFrame

log = structlog.get_logger("crd.producer")


def downscale(rgb: np.ndarray, xyz: np.ndarray, meta: dict, max_side: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Shrink a pair so its longer side is at most `max_side` (opt-in, to save bytes on the wire).

    RGB: Pillow's bilinear resize (antialiased); xyz: nearest neighbour (missing points are never mixed
    into valid ones). The frame then is the smaller image: its anomaly map and regions cover that, and
    `meta["downscaled_from"]` = "<H>x<W>" tells consumers the camera's own size.
    """
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb, xyz, meta
    s = max_side / max(h, w)
    oh, ow = max(1, round(h * s)), max(1, round(w * s))
    small_rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((ow, oh), Image.Resampling.BILINEAR))
    rows = np.minimum(((np.arange(oh) + 0.5) * (h / oh)).astype(np.intp), h - 1)  # pixel-centre sampling
    cols = np.minimum(((np.arange(ow) + 0.5) * (w / ow)).astype(np.intp), w - 1)
    return small_rgb, xyz[rows[:, None], cols[None, :]], {**meta, "downscaled_from": f"{h}x{w}"}


class ProducerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.sent = Counter("crd_producer_frames_total", "Frames put on the stream", registry=registry)
        self.bytes = Counter("crd_producer_bytes_total", "Payload bytes put on the stream", registry=registry)
        self.send_seconds = Histogram("crd_producer_send_seconds", "XADD round trip", registry=registry)
        self.backpressure_seconds = Counter(
            "crd_producer_backpressure_seconds_total", "Time held back because the workers lag", registry=registry
        )
        self.outstanding = Gauge(
            "crd_producer_outstanding", "Group lag + pending seen at the last check", registry=registry
        )
        self.reconnects = Counter("crd_producer_reconnects_total", "Redis connection failures", registry=registry)


class Producer(Daemon):
    def __init__(self, settings: Settings, camera: str, r: RedisClient | None = None):
        super().__init__(settings.observability, log.bind(line=settings.line, camera=camera))
        self.s, self.p = settings, settings.producer
        self.camera = camera
        self.r = r or connect(settings.redis)
        self.frames_key = settings.streams.key(settings.line, "frames")
        self.group = settings.streams.group
        self.metrics = ProducerMetrics(self.registry)
        # Frame ids are <camera>:<epoch>:<seq>. The epoch (the camera's first start) and the last
        # confirmed seq live in Redis, written with each frame in one transaction: a restarted
        # producer continues the sequence (and its source from there) instead of starting over, so
        # it neither skips nor re-numbers what it had confirmed. A frame resent after a lost reply
        # keeps its id, and the workers publish one result per frame id.
        self.state_key = settings.streams.producer_key(settings.line, camera)
        self.boot = int(time.time() * 1000)
        self.seq = 0
        self.sent = 0
        self._resumed = False

    def resume(self) -> int:
        """Continue this camera's sequence where the last confirmed frame left it; returns the next seq."""
        if not self._resumed:
            state = self._with_reconnect("resume", lambda: self.r.hgetall(self.state_key))
            if state:
                self.boot = int(state[b"epoch"])
                self.seq = int(state[b"seq"]) + 1
                self.log.info("resumed", epoch=self.boot, next_seq=self.seq)
            self._resumed = True
        return self.seq

    def _with_reconnect(self, what: str, fn):
        """Run `fn` until it succeeds or we are stopped; a frame is retried, never dropped."""
        backoff = Backoff(cap=self.p.reconnect_max_backoff_s)
        while True:
            try:
                result = fn()
                self.health.set_ready(True)
                return result
            except TRANSIENT_ERRORS as exc:
                self.metrics.reconnects.inc()
                self.health.set_ready(False, "redis unreachable")
                self.health.beat()  # alive and retrying: readiness, not liveness, reports the outage
                if self.stopping.is_set():
                    raise
                delay = backoff.sleep()
                self.log.warning("redis_unavailable", during=what, error=str(exc), retry_in_s=round(delay, 2))

    def _wait_for_capacity(self) -> None:
        """Backpressure: never drop; block (or slow down) while the group is too far behind."""
        limit = self.p.max_outstanding
        started = time.monotonic()
        while not self.stopping.is_set():
            n = self._with_reconnect("lag check", lambda: outstanding(self.r, self.frames_key, self.group, limit))
            self.metrics.outstanding.set(n)
            if n < limit:
                break
            self.health.beat()
            if self.p.backpressure == "slow":
                # Slow down in proportion to the overshoot, then send anyway.
                time.sleep(min(5.0, self.p.backpressure_poll_s * (1 + n - limit)))
                break
            time.sleep(self.p.backpressure_poll_s)
        waited = time.monotonic() - started
        if waited > 0.5:
            self.log.info("backpressure", waited_s=round(waited, 2), limit=limit)
        self.metrics.backpressure_seconds.inc(waited)

    def send(self, sf: SourceFrame) -> str:
        self.resume()
        frame_id = f"{self.camera}:{sf.key}" if sf.key else f"{self.camera}:{self.boot}:{self.seq}"
        rgb, xyz, meta = sf.rgb, sf.xyz, sf.meta
        if self.p.downscale_max_side is not None:
            rgb, xyz, meta = downscale(rgb, xyz, meta, self.p.downscale_max_side)
        frame = make_frame(
            rgb,
            xyz,
            frame_id=frame_id,
            line=self.s.line,
            camera=self.camera,
            seq=self.seq,
            category=sf.category,
            rgb_encoding=self.p.rgb_encoding,
            xyz_dtype=self.p.xyz_dtype,
            xyz_compression=self.p.xyz_compression,
            meta=meta,
        )
        payload = pack_frame(frame)
        fields = {F_FRAME_ID: frame_id.encode(), F_VERSION: str(WIRE_VERSION).encode(), F_PAYLOAD: payload}
        state = {"epoch": self.boot, "seq": self.seq}

        def xadd() -> bytes:
            # One transaction: the frame and the record that it was sent. Retried with the same frame id.
            pipe = self.r.pipeline(transaction=True)
            pipe.xadd(self.frames_key, fields)
            pipe.hset(self.state_key, mapping=state)
            return pipe.execute()[0]

        t = time.perf_counter()
        entry_id = self._with_reconnect("xadd", xadd)
        self.metrics.send_seconds.observe(time.perf_counter() - t)
        self.metrics.sent.inc()
        self.metrics.bytes.inc(len(payload))
        self.seq += 1
        self.sent += 1
        if sf.on_sent is not None:
            sf.on_sent()
        self.log.debug("sent", frame_id=frame_id, entry_id=entry_id, bytes=len(payload))
        return frame_id

    def run(self, source: Iterable[SourceFrame], max_frames: int | None = None) -> int:
        """Send frames at `fps` until the source ends, `max_frames`, or SIGTERM. Returns frames sent.

        A source with `frames(start)` (replay, synthetic) is read from this camera's next sequence
        number, so a restarted producer continues where its last confirmed frame left off.
        """
        with self.running():
            self._with_reconnect("create group", lambda: ensure_group(self.r, self.frames_key, self.group))
            start = self.resume()
            frames = source.frames(start) if hasattr(source, "frames") else iter(source)
            period = 1.0 / self.p.fps
            next_at = time.monotonic()
            self.log.info("producing", fps=self.p.fps, stream=self.frames_key, first_seq=start)
            try:
                for sf in frames:
                    if self.stopping.is_set():
                        break
                    self._wait_for_capacity()
                    if self.stopping.is_set():
                        break
                    now = time.monotonic()
                    if next_at > now:
                        time.sleep(next_at - now)
                    # Fixed rate without drift; after a stall, do not burst to catch up.
                    next_at = max(next_at + period, time.monotonic() - period)
                    try:
                        self.send(sf)
                    except TRANSIENT_ERRORS:
                        break  # stopped while disconnected: the frame was not sent and is not marked sent
                    self.health.beat()
                    if max_frames is not None and self.sent >= max_frames:
                        break
            finally:
                self.log.info("stopped", sent=self.sent)
        return self.sent
