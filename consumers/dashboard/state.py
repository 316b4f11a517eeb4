"""What the dashboard knows about a line, built only from what it reads: results, frames, dead letters, groups."""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from crd_model.stream import Limits, Result, RGBImage, WireError, unpack_frame, unpack_result
from crd_model.stream.settings import DashboardSettings

# Results hold a small map; a frame may be megabytes (the dashboard keeps only its RGB part).
RESULT_LIMITS = Limits(max_message_bytes=8 * 1024 * 1024)


def _s(v: object) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def entry_seconds(entry_id: str) -> float:
    return int(entry_id.split("-", 1)[0]) / 1000.0


@dataclass
class Row:
    """One result in the feed and the plot."""

    entry_id: str
    t: float  # when the result was published (its entry id)
    frame_id: str
    verdict: str
    score: float | None
    threshold: float | None
    latency_ms: float | None
    camera: str = ""
    seq: int | None = None
    worker: str = ""
    error_code: str | None = None
    model_id: str | None = None

    def json(self) -> dict:
        return {
            "id": self.entry_id, "t": self.t, "frame_id": self.frame_id, "verdict": self.verdict, "score": self.score,
            "threshold": self.threshold, "latency_ms": self.latency_ms, "camera": self.camera, "seq": self.seq,
            "worker": self.worker, "error_code": self.error_code, "model_id": self.model_id,
        }  # fmt: skip


@dataclass
class Flagged:
    """A recent anomalous frame: its result, and its RGB once the frames stream gave it to us."""

    result: Result
    t: float
    rgb: RGBImage | None = None


@dataclass
class GroupInfo:
    name: str
    lag: int | None
    pending: int
    consumers: int = 0
    active: int = 0


@dataclass
class LineState:
    line: str
    cfg: DashboardSettings
    rows: deque[Row] = field(init=False)
    counts: Counter = field(default_factory=Counter)
    error_codes: Counter = field(default_factory=Counter)
    last_errors: deque[dict] = field(default_factory=lambda: deque(maxlen=20))
    flagged: OrderedDict[str, Flagged] = field(default_factory=OrderedDict)
    frames: OrderedDict[str, RGBImage] = field(default_factory=OrderedDict)
    frame_bytes: int = 0
    dead: deque[dict] = field(init=False)
    workers_group: GroupInfo | None = None
    plant_groups: list[GroupInfo] = field(default_factory=list)
    undecodable: int = 0
    last_result_id: str | None = None
    last_dead_id: str | None = None
    read_error: str = ""

    def __post_init__(self) -> None:
        self.rows = deque(maxlen=self.cfg.history)
        self.dead = deque(maxlen=self.cfg.dead_letters)

    # -- input -----------------------------------------------------------------------------
    def add_frame(self, fields: dict[bytes, bytes]) -> None:
        """Keep a just-published frame's RGB (encoded, as sent) until its result says whether to show it."""
        try:
            frame = unpack_frame(fields.get(b"payload", b""))
        except WireError:
            return
        rgb = frame.rgb
        if frame.frame_id in self.flagged and self.flagged[frame.frame_id].rgb is None:
            self.flagged[frame.frame_id].rgb = rgb  # the result came first
            return
        self.frames[frame.frame_id] = rgb
        self.frame_bytes += len(rgb.data)
        budget = self.cfg.frame_cache_mb * 1024 * 1024
        while self.frame_bytes > budget and self.frames:
            _, old = self.frames.popitem(last=False)
            self.frame_bytes -= len(old.data)

    def add_result(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        self.last_result_id = entry_id
        t = entry_seconds(entry_id)
        try:
            res = unpack_result(fields.get(b"payload", b""), RESULT_LIMITS)
        except WireError as exc:
            self.undecodable += 1
            self.counts["undecodable"] += 1
            self._error(t, _s(fields.get(b"frame_id", b"?")), f"result_{exc.code}")
            return
        tm = res.timings
        latency = (tm.finished_at - tm.captured_at) * 1000.0 if tm.finished_at and tm.captured_at else None
        code = res.error.code if res.error else None
        self.rows.append(Row(entry_id, t, res.frame_id, res.verdict, res.score, res.threshold, latency, res.camera,
                             res.seq, res.worker, code, res.model_id))  # fmt: skip
        self.counts[res.verdict] += 1
        if code:
            self._error(t, res.frame_id, code)
        if res.verdict == "anomalous":
            rgb = self.frames.pop(res.frame_id, None)
            if rgb is not None:
                self.frame_bytes -= len(rgb.data)
            self.flagged[res.frame_id] = Flagged(res, t, rgb)
            while len(self.flagged) > self.cfg.anomalies:
                self.flagged.popitem(last=False)

    def _error(self, t: float, frame_id: str, code: str) -> None:
        self.error_codes[code] += 1
        self.last_errors.appendleft({"t": t, "frame_id": frame_id, "code": code})

    def add_dead(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        self.last_dead_id = entry_id
        self.dead.appendleft({
            "id": entry_id, "t": entry_seconds(entry_id), "frame_id": _s(fields.get(b"frame_id", b""))[:160],
            "reason": _s(fields.get(b"reason", b""))[:64], "message": _s(fields.get(b"message", b""))[:1024],
            "deliveries": _s(fields.get(b"deliveries", b"")), "worker": _s(fields.get(b"worker", b""))[:128],
            "source_id": _s(fields.get(b"source_id", b""))[:40],
        })  # fmt: skip

    # -- output ----------------------------------------------------------------------------
    def snapshot(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        window = [r for r in self.rows if r.t >= now - self.cfg.window_s]
        last_minute = [r for r in window if r.t >= now - 60.0]
        rejects = sum(r.verdict != "ok" for r in window)
        latencies = np.array([r.latency_ms for r in window if r.latency_ms is not None], dtype=np.float64)
        span = min(60.0, now - self.rows[0].t) if self.rows else 0.0
        threshold = next((r.threshold for r in reversed(self.rows) if r.threshold is not None), None)
        return {
            "line": self.line,
            "now": now,
            "counts": {k: self.counts.get(k, 0) for k in ("ok", "anomalous", "error")}
            | {"total": sum(self.counts.get(k, 0) for k in ("ok", "anomalous", "error"))},
            "window_s": self.cfg.window_s,
            "window_results": len(window),
            "reject_rate": rejects / len(window) if window else None,
            "throughput": len(last_minute) / span if span > 1.0 else None,
            "latency_p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
            "latency_p99_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
            "threshold": threshold,
            "group": None if self.workers_group is None else vars(self.workers_group),
            "plant_groups": [vars(g) for g in self.plant_groups],
            "feed": [r.json() for r in list(self.rows)[-30:][::-1]],
            "scores": [[r.t, r.score, r.verdict] for r in self.rows],
            "error_codes": dict(self.error_codes.most_common(10)),
            "last_errors": list(self.last_errors)[:10],
            "anomalies": [self.flagged_json(fid) for fid in reversed(self.flagged)],
            "dead": list(self.dead),
            "read_error": self.read_error,
        }

    def flagged_json(self, frame_id: str) -> dict:
        f = self.flagged[frame_id]
        res = f.result
        return {
            "frame_id": frame_id, "t": f.t, "score": res.score, "threshold": res.threshold, "model_id": res.model_id,
            "model_version": res.model_version, "camera": res.camera, "seq": res.seq, "category": res.category,
            "worker": res.worker, "has_image": f.rgb is not None, "has_map": res.anomaly_map is not None,
            "regions": [r.model_dump() for r in res.regions], "meta": res.meta,
            "timings": res.timings.model_dump(),
        }  # fmt: skip
