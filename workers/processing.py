"""Per-frame work of a worker: decode + preprocess (thread pool), then results for publishing."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np

from crd_model.inputs import FrameError, PreparedFrame
from crd_model.inspector import Inspection
from crd_model.stream import (
    ErrorInfo,
    Frame,
    Limits,
    Result,
    Timings,
    WireError,
    encode_map,
    frame_arrays,
    pack_result,
    peek_frame_id,
    unpack_frame,
)
from crd_model.stream.redis_streams import F_FRAME_ID, F_PAYLOAD, entry_time
from workers.models import ModelRegistry
from workers.publish import Outcome
from workers.regions import find_regions

MAX_ID = 128


@dataclass
class Item:
    """One frames-stream entry on its way through the worker."""

    entry_id: str
    payload: bytes
    deliveries: int
    frame_id: str
    started_at: float
    frame: Frame | None = None
    prepared: PreparedFrame | None = None
    error: ErrorInfo | None = None
    inspection: Inspection | None = None
    timings: dict[str, float] = field(default_factory=dict)


_NOT_ID = re.compile(r"[^A-Za-z0-9._:-]")


def _fallback_frame_id(entry_id: str, fields: dict[bytes, bytes]) -> str:
    """The entry's plain `frame_id` field, made a valid id; else one derived from the entry id."""
    fid = _NOT_ID.sub("_", fields.get(F_FRAME_ID, b"").decode("utf-8", "replace"))[:MAX_ID]
    return fid or f"entry:{entry_id}"


def decode_item(
    entry_id: str,
    fields: dict[bytes, bytes],
    deliveries: int,
    registry: ModelRegistry,
    limits: Limits,
    max_deliveries: int,
) -> Item:
    """Decode and preprocess one entry; never raises: failures become `item.error`."""
    payload = fields.get(F_PAYLOAD, b"")
    item = Item(entry_id, payload, deliveries, _fallback_frame_id(entry_id, fields), time.time())
    try:
        if deliveries > max_deliveries:
            # Delivered again and again without a result: it probably kills workers. Stop the loop.
            raise WireError("max_deliveries", f"delivered {deliveries} times (limit {max_deliveries})")
        if not payload:
            raise WireError("invalid", "entry has no payload field")
        item.frame = unpack_frame(payload, limits)
        item.frame_id = item.frame.frame_id
        inspector = registry.get(item.frame.category)
        if inspector is None:
            raise WireError(
                "unknown_category",
                f"no model for category {item.frame.category!r} (serving: {', '.join(registry.categories)})",
            )
        rgb, xyz = frame_arrays(item.frame, limits)
        item.prepared = inspector.prepare(rgb, xyz)
    except (WireError, FrameError) as exc:
        item.error = ErrorInfo.make(exc.code, str(exc))
        if item.frame is None and item.frame_id.startswith("entry:"):
            item.frame_id = peek_frame_id(payload) or item.frame_id
    except Exception as exc:  # a bug or an unforeseen input must not take the worker down
        item.error = ErrorInfo.make("internal", f"{type(exc).__name__}: {exc}")
    item.timings["decoded_at"] = time.time()
    return item


def build_outcome(
    item: Item,
    registry: ModelRegistry,
    worker: str,
    line: str,
    map_max_side: int,
    map_encoding: str,
    region_min_area: int,
) -> Outcome:
    """The result (and dead letter, for errors) of one item; never raises."""
    try:
        return _build_outcome(item, registry, worker, line, map_max_side, map_encoding, region_min_area)
    except Exception as exc:  # e.g. a non-finite map: still answer the frame, as an error
        item.error = ErrorInfo.make("internal", f"building the result failed: {type(exc).__name__}: {exc}")
        item.inspection = None
        return _build_outcome(item, registry, worker, line, map_max_side, map_encoding, region_min_area)


def _build_outcome(
    item: Item,
    registry: ModelRegistry,
    worker: str,
    line: str,
    map_max_side: int,
    map_encoding: str,
    region_min_area: int,
) -> Outcome:
    f = item.frame
    timings = Timings(
        captured_at=f.captured_at if f else None,
        enqueued_at=entry_time(item.entry_id),
        started_at=item.started_at,
        finished_at=time.time(),
    )
    common = dict(
        frame_id=item.frame_id,
        line=f.line if f else line,
        camera=f.camera if f else "",
        seq=f.seq if f else None,
        category=f.category if f else "",
        timings=timings,
        worker=worker,
        deliveries=max(1, item.deliveries),
        meta=dict(f.meta) if f else {},
    )
    if item.error is not None or item.inspection is None:
        error = item.error or ErrorInfo.make("internal", "no inspection result")
        result = Result(
            verdict="error",
            score=None,
            threshold=None,
            anomaly_map=None,
            regions=[],
            model_id=None,
            model_version=None,
            error=error,
            **common,
        )
        return Outcome(
            item.entry_id,
            item.frame_id,
            "error",
            pack_result(result),
            dead_reason=error.code,
            dead_message=error.message,
            deliveries=item.deliveries,
            original_payload=item.payload,
        )
    ins = item.inspection
    assert f is not None
    inspector = registry.get(f.category)
    regions = find_regions(ins.anomaly_map, ins.threshold, min_area=region_min_area) if ins.anomalous else []
    result = Result(
        verdict=ins.verdict,
        score=float(ins.score),
        threshold=float(ins.threshold),
        anomaly_map=encode_map(np.asarray(ins.anomaly_map, np.float32), max_side=map_max_side, encoding=map_encoding),
        regions=regions,
        model_id=inspector.model_id if inspector is not None else None,
        model_version=registry.model_version(f.category),
        error=None,
        **common,
    )
    return Outcome(item.entry_id, item.frame_id, result.verdict, pack_result(result), deliveries=item.deliveries)
