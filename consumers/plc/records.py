"""What the PLC gets for one result: a flat, typed record built from a results-stream entry."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from crd_model.stream import Limits, Result, WireError, unpack_result
from crd_model.stream.messages import is_ident
from crd_model.stream.redis_streams import F_FRAME_ID, F_PAYLOAD
from crd_model.stream.settings import PLC_VERDICT_CODES, PlcSettings

# A result holds a ~40 kB map at most with default settings; nothing the PLC needs is bigger than this.
RESULT_LIMITS = Limits(max_message_bytes=8 * 1024 * 1024)


class PlcResult(BaseModel):
    """One result as the PLC sees it. `sequence` is the bridge's own per-line counter (1, 2, ...)."""

    line: str
    entry_id: str
    sequence: int = 0  # assigned by the ledger just before the PLC write
    frame_id: str
    part_id: str = ""
    camera: str = ""
    capture_seq: int | None = None
    category: str = ""
    verdict: Literal["ok", "anomalous", "error"]
    reject: bool
    score: float | None = None
    threshold: float | None = None
    model_id: str | None = None
    error_code: str | None = None
    captured_at: float | None = None
    finished_at: float | None = None
    meta: dict[str, str | int | float | bool] = {}

    @property
    def verdict_code(self) -> int:
        return PLC_VERDICT_CODES[self.verdict]


def _s(v: object) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def record_from_entry(line: str, entry_id: str, fields: dict[bytes, bytes], plc: PlcSettings) -> PlcResult:
    """Decode an entry; an undecodable one becomes an `error` record (fail-safe: the PLC is still answered)."""
    try:
        result: Result | None = unpack_result(fields.get(F_PAYLOAD, b""), RESULT_LIMITS)
        error: WireError | None = None
    except WireError as exc:
        result, error = None, exc
    if result is None:
        assert error is not None
        raw_id = _s(fields.get(F_FRAME_ID, b""))
        frame_id = raw_id if is_ident(raw_id, 128) else f"entry:{entry_id}"
        return PlcResult(
            line=line,
            entry_id=entry_id,
            frame_id=frame_id,
            verdict="error",
            reject=plc.error_is_reject,
            error_code=f"result_{error.code}",
        )
    part = result.meta.get(plc.part_id_key, "")
    reject = result.verdict == "anomalous" or (result.verdict == "error" and plc.error_is_reject)
    return PlcResult(
        line=line,
        entry_id=entry_id,
        frame_id=result.frame_id,
        part_id=str(part),
        camera=result.camera,
        capture_seq=result.seq,
        category=result.category,
        verdict=result.verdict,
        reject=reject,
        score=result.score,
        threshold=result.threshold,
        model_id=result.model_id,
        error_code=result.error.code if result.error else None,
        captured_at=result.timings.captured_at,
        finished_at=result.timings.finished_at,
        meta=dict(result.meta),
    )
