"""Per-frame work of a worker, on the host: unpack an entry, decode its payloads, build its result.

Each function takes one `Item` (one frames-stream entry on its way through the worker) and never
raises: a failure becomes `item.error`, so a bad frame ends as an error result and a dead letter.
Decoding and result building run in the worker's thread pool, or in its processes
(workers/hostpool.py, `decode_processes`): this module never imports torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from crd_model.inputs import FrameError
from crd_model.stream import (
    ErrorInfo,
    Frame,
    Limits,
    PointMap,
    Result,
    RGBImage,
    Shadow,
    Timings,
    WireError,
    decode_rgb,
    decode_xyz,
    pack_result,
    peek_frame_id,
    quantised_map,
)
from crd_model.stream.messages import is_anomalous, is_ident
from crd_model.stream.packing import unpack_frame_views
from crd_model.stream.redis_streams import F_FRAME_ID, F_PAYLOAD, entry_time
from workers import allocator, regions
from workers.publish import Outcome
from workers.regions import find_regions

if TYPE_CHECKING:  # torch: this module runs in the decode processes too, which never import it
    from workers.models import ModelRegistry


@dataclass
class WireMap:
    """One frame's anomaly map at wire resolution, back on the host."""

    values: np.ndarray | None  # float32 (h, w) at wire resolution, for regions: anomalous frames only
    pixels: np.ndarray  # uint8 (h, w) for "png8" (value = lo + px / 255 * (hi - lo)), float16 for "float16"
    lo: float
    hi: float
    image_shape: tuple[int, int]  # (H, W) of the original image the map covers


@dataclass
class Item:
    """One frames-stream entry on its way through the worker."""

    line: str
    entry_id: str
    payload: bytes
    deliveries: int
    frame_id: str
    started_at: float  # wall clock, when the worker read the entry
    read_at: float = field(default_factory=time.monotonic)  # for the batching deadline
    frame: Frame | None = None  # its rgb.data and xyz.data: memoryviews of `payload` (unpack_frame_views)
    rgb: np.ndarray | None = None
    xyz: np.ndarray | None = None
    image_hw: tuple[int, int] | None = None
    error: ErrorInfo | None = None
    score: float | None = None
    threshold: float | None = None
    # The model that scored the frame, taken when it did: a swap may happen before the result is built.
    model_id: str | None = None
    model_version: str | None = None
    wire_map: WireMap | None = None
    shadow: Shadow | None = None
    abandoned: bool = False  # inference failed: no result now, the entry stays pending for a retry
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per stage (thread time)

    @property
    def decoded_bytes(self) -> int:
        """What decoding this frame allocates, from its declared shapes (before anything is decoded): uint8
        rgb and float32 xyz (a float16 point map is widened when decoded)."""
        if self.frame is None or self.error is not None:
            return 0
        h, w, _ = self.frame.xyz.shape
        return self.frame.rgb.shape[0] * self.frame.rgb.shape[1] * 3 + h * w * 3 * 4

    def fail(self, code: str, message: str) -> None:
        self.error = ErrorInfo.make(code, message)
        self.rgb = self.xyz = None


def fallback_frame_id(entry_id: str, fields: dict[bytes, bytes]) -> str:
    """The entry's plain `frame_id` field if it is a valid id, else `entry:<entry id>` (never a rewritten
    id, which could collide with another frame's)."""
    raw = fields.get(F_FRAME_ID, b"")
    try:
        fid = raw.decode("utf-8")
    except UnicodeDecodeError:
        fid = ""
    return fid if is_ident(fid, Limits().max_id_len) else f"entry:{entry_id}"


def prepare_process(keep_freed_memory: bool) -> None:
    """Once per process that builds results (the worker, each decode process): the region finder
    loaded now rather than on the first anomalous frame, and with `keep_freed_memory` glibc told to
    keep freed frame buffers for the next batch (workers/allocator.py)."""
    regions.preload()
    if keep_freed_memory:
        allocator.keep_freed_memory()


def unpack_item(
    line: str,
    entry_id: str,
    fields: dict[bytes, bytes],
    deliveries: int,
    registry: ModelRegistry,
    limits: Limits,
    max_deliveries: int,
    max_frame_pixels: int | None = None,
) -> Item:
    """Parse and validate one entry's message (no payload decoded yet)."""
    t = time.thread_time()
    payload = fields.get(F_PAYLOAD, b"")
    item = Item(line, entry_id, payload, deliveries, fallback_frame_id(entry_id, fields), time.time())
    try:
        if deliveries > max_deliveries:
            # Delivered again and again without a result: it probably kills workers. Stop the loop.
            raise WireError("max_deliveries", f"delivered {deliveries} times (limit {max_deliveries})")
        if not payload:
            raise WireError("invalid", "entry has no payload field")
        item.frame = unpack_frame_views(payload, limits)  # payloads as views of `payload`: no copy
        item.frame_id = item.frame.frame_id
        if item.frame.line != line:  # its result would go to this line's stream, labelled as another line's
            raise WireError("invalid", f"frame is for line {item.frame.line!r} but came on line {line!r}'s stream")
        if registry.get(item.frame.category) is None:
            raise WireError(
                "unknown_category",
                f"no model for category {item.frame.category!r} (serving: {', '.join(registry.categories)})",
            )
        h, w = item.frame.rgb.shape[:2]
        if max_frame_pixels is not None and h * w > max_frame_pixels:  # this worker's bound, before decoding
            raise WireError(
                "too_large", f"frame of {h}x{w} pixels is over this worker's max_frame_pixels ({max_frame_pixels})"
            )
        if item.frame.rgb.shape[:2] != item.frame.xyz.shape[:2]:  # before anything is decoded
            raise WireError(
                "shape_mismatch",
                f"rgb is {item.frame.rgb.shape[0]}x{item.frame.rgb.shape[1]}, "
                f"xyz is {item.frame.xyz.shape[0]}x{item.frame.xyz.shape[1]}",
            )
    except WireError as exc:
        item.fail(exc.code, str(exc))
        if item.frame is None and item.frame_id.startswith("entry:"):
            item.frame_id = peek_frame_id(payload) or item.frame_id
    except Exception as exc:  # a bug or an unforeseen input must not take the worker down
        item.fail("internal", f"{type(exc).__name__}: {exc}")
    item.cpu["unpack"] = time.thread_time() - t
    return item


def decode_pair(rgb: RGBImage, xyz: PointMap, limits: Limits) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(rgb array, xyz array, CPU seconds of each decode); raises WireError (threads and pool processes)."""
    t = time.thread_time()
    rgb_array = decode_rgb(rgb, limits)
    t2 = time.thread_time()
    xyz_array = decode_xyz(xyz, limits)
    return rgb_array, xyz_array, t2 - t, time.thread_time() - t2


def error_code(exc: Exception) -> tuple[str, str]:
    """(code, message) of a failure: a wire error's own code, anything else (a bug, an unforeseen input)
    "internal"."""
    if isinstance(exc, WireError | FrameError):
        return exc.code, str(exc)
    return "internal", f"{type(exc).__name__}: {exc}"


def decode_item(item: Item, registry: ModelRegistry, limits: Limits) -> Item:
    """Decode the RGB and point-map payloads and check them against the model (pool thread; the
    process pool's path is workers/hostpool.py)."""
    if item.error is not None or item.frame is None:
        return item
    try:
        item.rgb, item.xyz, item.cpu["decode_rgb"], item.cpu["decode_xyz"] = decode_pair(
            item.frame.rgb, item.frame.xyz, limits
        )
    except Exception as exc:  # never raises: a bad payload becomes an error result
        item.fail(*error_code(exc))
    check_item(item, registry)
    return item


def check_item(item: Item, registry: ModelRegistry) -> None:
    """Check decoded arrays against the frame's model (cheap: shapes and dtypes); sets `image_hw`."""
    if item.error is not None or item.frame is None:
        return
    try:
        inspector = registry.get(item.frame.category)
        assert inspector is not None  # unpack_item checked it
        item.image_hw = inspector.check(item.rgb, item.xyz)
    except Exception as exc:
        item.fail(*error_code(exc))


def build_outcome(item: Item, worker: str, region_min_area: int, max_regions: int = 16) -> Outcome:
    """The result (and dead letter, for errors) of one item; never raises (pool thread)."""
    t = time.thread_time()
    try:
        outcome = _build_outcome(item, worker, region_min_area, max_regions)
    except Exception as exc:  # e.g. a non-finite map: still answer the frame, as an error
        item.fail("internal", f"building the result failed: {type(exc).__name__}: {exc}")
        item.wire_map = None
        outcome = _build_outcome(item, worker, region_min_area, max_regions)
    item.cpu["encode"] = time.thread_time() - t
    return outcome


def _build_outcome(item: Item, worker: str, region_min_area: int, max_regions: int) -> Outcome:
    f = item.frame
    timings = Timings(
        captured_at=f.captured_at if f else None,
        enqueued_at=entry_time(item.entry_id),
        started_at=item.started_at,
        finished_at=time.time(),
    )
    common = dict(
        frame_id=item.frame_id,
        line=item.line,
        camera=f.camera if f else "",
        seq=f.seq if f else None,
        category=f.category if f else "",
        timings=timings,
        worker=worker,
        deliveries=max(1, item.deliveries),
        meta=dict(f.meta) if f else {},
    )
    if item.error is not None or item.wire_map is None or item.score is None or item.threshold is None:
        error = item.error or ErrorInfo.make("internal", "no inspection result")
        result = Result(verdict="error", error=error, **common)
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
    assert f is not None
    wm = item.wire_map
    anomalous = is_anomalous(item.score, item.threshold)
    regions = []
    if anomalous:
        regions = find_regions(wm.values, item.threshold, region_min_area, max_regions, image_shape=wm.image_shape)
    result = Result(
        verdict="anomalous" if anomalous else "ok",
        score=float(item.score),
        threshold=float(item.threshold),
        anomaly_map=quantised_map(wm.pixels, wm.image_shape, (wm.lo, wm.hi)),
        regions=regions,
        model_id=item.model_id,
        model_version=item.model_version,
        shadow=item.shadow,
        **common,
    )
    return Outcome(item.entry_id, item.frame_id, result.verdict, pack_result(result), deliveries=item.deliveries)
