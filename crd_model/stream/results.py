"""Consumers of the results stream: `crd results` tails it live in a terminal (torch-free).

A plant attaches its own consumers the same way (docs/wire-format.md): XREAD (or XREADGROUP for
a consumer group of its own) on `crd:{<line>}:results`, decode `payload` with `unpack_result`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from crd_model.stream import Limits, Result, WireError, unpack_result
from crd_model.stream.redis_streams import F_PAYLOAD, RedisClient


def tail_results(
    r: RedisClient,
    key: str,
    start: str = "$",
    count: int | None = None,
    timeout_s: float | None = None,
    block_ms: int = 500,
    limits: Limits | None = None,
) -> Iterator[tuple[str, Result | WireError]]:
    """Yield (entry id, result) from `start` ('$' = only new ones, '0' = from the beginning).

    Stops after `count` results or `timeout_s` without a new one. A result that cannot be
    decoded is yielded as its WireError, not skipped.
    """
    last = start
    seen = 0
    idle_since = time.monotonic()
    limits = limits or Limits()
    while count is None or seen < count:
        resp = r.xread({key: last}, count=100, block=block_ms)
        if not resp:
            if timeout_s is not None and time.monotonic() - idle_since > timeout_s:
                return
            continue
        entries = resp[0][1] if isinstance(resp, list) else next(iter(resp.values()))[0]
        idle_since = time.monotonic()
        for eid, fields in entries:
            last = eid.decode() if isinstance(eid, bytes) else eid
            try:
                item: Result | WireError = unpack_result(fields.get(F_PAYLOAD, b""), limits)
            except WireError as exc:
                item = exc
            yield last, item
            seen += 1
            if count is not None and seen >= count:
                return


def latency_ms(result: Result) -> float | None:
    t = result.timings
    if t.captured_at is None or t.finished_at is None:
        return None
    return (t.finished_at - t.captured_at) * 1000.0


def format_result(result: Result | WireError) -> str:
    if isinstance(result, WireError):
        return f"{'?':<36} undecodable result: {result.code}: {result}"
    lat = latency_ms(result)
    lat_s = f"{lat:7.1f} ms" if lat is not None else "      - ms"
    if result.verdict == "error":
        assert result.error is not None
        return f"{result.frame_id:<36} {'ERROR':<10} {'':>17} {lat_s}  {result.error.code}: {result.error.message[:80]}"
    mark = "ANOMALOUS" if result.verdict == "anomalous" else "ok"
    regions = f"  regions={len(result.regions)}" if result.regions else ""
    return (
        f"{result.frame_id:<36} {mark:<10} {result.score:8.3f}/{result.threshold:<8.3f} {lat_s}"
        f"  {result.category}{regions}"
    )
