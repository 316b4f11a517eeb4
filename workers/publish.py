"""Publish a batch's results and acknowledge its frames in one atomic server-side step.

This is the worker's exactly-once guarantee: see `PUBLISH_AND_ACK`.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from crd_model.stream.settings import StreamSettings

# Publish the results of a batch and acknowledge its frames in one atomic step. An entry is only
# published if it is still pending for *this* consumer: if another worker reclaimed it meanwhile
# (XAUTOCLAIM after we stalled), our copy is dropped and theirs wins, so no frame is published
# twice; and since publish and ack happen together, a crash before this point leaves the frame
# pending for a reclaim, a crash after it has done both. Nothing is lost, nothing doubled.
#
# KEYS: frames, results, dead.  ARGV: group, consumer, results_maxlen, dead_maxlen, n, then per
# entry: id, frame_id, verdict, result_payload, dead_reason ('' = none), dead_message,
# dead_deliveries, original_payload.
PUBLISH_AND_ACK = """
local group, consumer = ARGV[1], ARGV[2]
local rmax, dmax, n = ARGV[3], ARGV[4], tonumber(ARGV[5])
local published = 0
for i = 0, n - 1 do
  local b = 6 + i * 8
  local id = ARGV[b]
  local p = redis.call('XPENDING', KEYS[1], group, id, id, 1)
  if #p == 1 and p[1][2] == consumer then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', rmax, '*',
               'frame_id', ARGV[b + 1], 'verdict', ARGV[b + 2], 'payload', ARGV[b + 3])
    if ARGV[b + 4] ~= '' then
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', dmax, '*',
                 'frame_id', ARGV[b + 1], 'reason', ARGV[b + 4], 'message', ARGV[b + 5],
                 'source_id', id, 'deliveries', ARGV[b + 6], 'worker', consumer,
                 'payload', ARGV[b + 7])
    end
    redis.call('XACK', KEYS[1], group, id)
    published = published + 1
  end
end
return published
"""


@dataclass
class Outcome:
    """What to publish for one frames-stream entry."""

    entry_id: str
    frame_id: str
    verdict: str
    result_payload: bytes
    dead_reason: str = ""  # non-empty: also write a dead-letter entry
    dead_message: str = ""
    deliveries: int = 1
    original_payload: bytes = b""


class Publisher:
    def __init__(self, r: redis.Redis, streams: StreamSettings, line: str, group: str, consumer: str):
        self.r = r
        self.keys = [streams.key(line, "frames"), streams.key(line, "results"), streams.key(line, "dead")]
        self.group, self.consumer = group, consumer
        self.results_maxlen, self.dead_maxlen = streams.results_maxlen, streams.dead_maxlen
        self._script = r.register_script(PUBLISH_AND_ACK)

    def publish(self, outcomes: list[Outcome]) -> int:
        """Publish + ack atomically; returns how many were still ours (the rest went to another worker)."""
        if not outcomes:
            return 0
        args: list = [self.group, self.consumer, self.results_maxlen, self.dead_maxlen, len(outcomes)]
        for o in outcomes:
            args += [
                o.entry_id,
                o.frame_id,
                o.verdict,
                o.result_payload,
                o.dead_reason,
                o.dead_message,
                o.deliveries,
                o.original_payload,
            ]
        return int(self._script(keys=self.keys, args=args))
