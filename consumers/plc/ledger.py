"""Per line, in Redis: the last result sequence the bridge assigned and the entry it went to, plus counters.

The sequence is assigned (and stored) *before* the PLC write and the entry is acknowledged only *after*
the PLC confirmed; a bridge restarted in between finds the pending entry here with its old sequence and
reads the PLC's own copy of the last sequence to tell whether the PLC already saw it. That is what keeps a
reject from being pulsed twice.
"""

from __future__ import annotations

import redis.asyncio

from consumers.plc.records import PlcResult
from crd_model.stream.settings import StreamSettings

COUNTERS = ("inspected", "rejected", "errors", "missing")
MAX_LAST_BYTES = 1 << 20  # the last record (its meta is bounded by the wire limits to ~256 kB)


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def ledger_key(streams: StreamSettings, line: str, group: str) -> str:
    # Same hash tag as the line's streams: one slot, so it can share a transaction with the XACK.
    return f"{streams.prefix}:{{{line}}}:plc:{group}"


class Ledger:
    def __init__(self, r: redis.asyncio.Redis, streams: StreamSettings, line: str, group: str):
        self.r = r
        self.key = ledger_key(streams, line, group)
        self.results_key = streams.key(line, "results")
        self.group = group
        self.seq = 0
        self.entry = ""
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.last: PlcResult | None = None

    async def load(self) -> None:
        h = {k.decode(): v.decode() for k, v in (await self.r.hgetall(self.key)).items()}
        if h.get("seq") and h.get("last") and len(h["last"]) > MAX_LAST_BYTES:
            h.pop("last")  # not ours, or corrupt: the sequence alone is enough to stay idempotent
        self.seq = int(h.get("seq", 0))
        self.entry = h.get("entry", "")
        self.counters = {c: int(h.get(c, 0)) for c in COUNTERS}
        self.last = PlcResult.model_validate_json(h["last"]) if h.get("last") else None

    def already_confirmed(self, rec: PlcResult) -> bool:
        """An entry older than the last assigned one was confirmed before (only its XACK is missing)."""
        return bool(self.entry) and _id_tuple(rec.entry_id) < _id_tuple(self.entry)

    async def assign(self, rec: PlcResult) -> bool:
        """Give `rec` its sequence; returns True if it already had one (a restart between write and XACK)."""
        if rec.entry_id == self.entry:
            rec.sequence = self.seq
            return True
        n = self.seq + 1
        rec.sequence = n
        inc = {"inspected": 1, "rejected": int(rec.reject), "errors": int(rec.verdict == "error")}
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key, mapping={"seq": n, "entry": rec.entry_id, "last": rec.model_dump_json()})
        for name, by in inc.items():
            if by:
                pipe.hincrby(self.key, name, by)
        await pipe.execute()
        self.seq, self.entry, self.last = n, rec.entry_id, rec
        for name, by in inc.items():
            self.counters[name] += by
        return False

    async def confirm(self, rec: PlcResult) -> None:
        """The PLC has it: acknowledge the entry in the bridge's group."""
        await self.r.xack(self.results_key, self.group, rec.entry_id)

    async def count_missing(self, n: int = 1) -> None:
        self.counters["missing"] = int(await self.r.hincrby(self.key, "missing", n))
