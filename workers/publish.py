"""Publish a batch's results and acknowledge its frames in one atomic server-side step.

This is the worker's exactly-once guarantee: see `PUBLISH_AND_ACK`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
import structlog
from redis.exceptions import ClusterError, TryAgainError

from crd_model.stream.settings import StreamSettings

log = structlog.get_logger("crd.publish")

# Publish the results of a batch and acknowledge its frames in one atomic step. An entry is only
# published if it is still pending for *this* consumer: if another worker reclaimed it meanwhile
# (XAUTOCLAIM after we stalled), our copy is dropped and theirs wins, so no entry is published
# twice; and since publish and ack happen together, a crash before this point leaves the frame
# pending for a reclaim, a crash after it has done both. Nothing is lost, nothing doubled.
#
# The promise holds per frame, not per stream entry: the frame ids published within the dedup
# window are kept in a sorted set (score = server time). A second entry with a published frame id
# (a producer's retry after a lost reply, a restarted producer resending) is acknowledged without a
# result and dead-lettered with reason "duplicate", with its payload: an error's travels in ARGV, any
# other's is read from the frames entry here (the worker does not send every frame's bytes back).
#
# Results carry no MAXLEN here: the worker trims them below what every consumer group of the
# results stream has acknowledged (redis_streams.trim_results).
#
# KEYS: frames, results, dead, published.  ARGV: group, consumer, dead_maxlen, dedup_window_s, n,
# then per entry: id, frame_id, verdict, result_payload, dead_reason ('' = none), dead_message,
# dead_deliveries, original_payload.
PUBLISH_AND_ACK = """
local group, consumer = ARGV[1], ARGV[2]
local dmax, window, n = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - window)
local published, duplicates = 0, 0
for i = 0, n - 1 do
  local b = 6 + i * 8
  local id, frame_id = ARGV[b], ARGV[b + 1]
  local p = redis.call('XPENDING', KEYS[1], group, id, id, 1)
  if #p == 1 and p[1][2] == consumer then
    if redis.call('ZADD', KEYS[4], 'NX', now, frame_id) == 1 then
      redis.call('XADD', KEYS[2], '*', 'frame_id', frame_id, 'verdict', ARGV[b + 2], 'payload', ARGV[b + 3])
      if ARGV[b + 4] ~= '' then
        redis.call('XADD', KEYS[3], 'MAXLEN', '~', dmax, '*',
                   'frame_id', frame_id, 'reason', ARGV[b + 4], 'message', ARGV[b + 5],
                   'source_id', id, 'deliveries', ARGV[b + 6], 'worker', consumer,
                   'payload', ARGV[b + 7])
      end
      published = published + 1
    else
      local payload = ARGV[b + 7]
      if payload == '' then  -- a frame that decoded: its bytes are read here, not sent back by the worker
        local e = redis.call('XRANGE', KEYS[1], id, id)
        if #e == 1 then
          for j = 1, #e[1][2], 2 do
            if e[1][2][j] == 'payload' then payload = e[1][2][j + 1] end
          end
        end
      end
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', dmax, '*',
                 'frame_id', frame_id, 'reason', 'duplicate',
                 'message', 'this frame id already has a result (published within the dedup window)',
                 'source_id', id, 'deliveries', ARGV[b + 6], 'worker', consumer, 'payload', payload)
      duplicates = duplicates + 1
    end
    redis.call('XACK', KEYS[1], group, id)
  end
end
return {published, duplicates}
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


@dataclass
class Published:
    """What one publish call did: results published, duplicates dead-lettered (the rest of the batch
    was no longer this worker's: another one had reclaimed it)."""

    published: int
    duplicates: int


class Publisher:
    def __init__(
        self,
        r: redis.Redis | redis.RedisCluster,
        streams: StreamSettings,
        line: str,
        group: str,
        consumer: str,
        slot_move_wait_s: float = 30.0,
    ):
        self.r = r
        self.slot_move_wait_s = slot_move_wait_s
        self.keys = [streams.key(line, kind) for kind in ("frames", "results", "dead", "published")]
        self.group, self.consumer = group, consumer
        self.dead_maxlen, self.dedup_window_s = streams.dead_maxlen, streams.dedup_window_s
        self._script = r.register_script(PUBLISH_AND_ACK)

    def publish(self, outcomes: list[Outcome]) -> Published:
        """Publish + ack atomically. Idempotent: a retry after a lost reply publishes nothing twice."""
        if not outcomes:
            return Published(0, 0)
        args: list = [self.group, self.consumer, self.dead_maxlen, self.dedup_window_s, len(outcomes)]
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
        # Redis Cluster, while this line's slot migrates: until all of its keys are on one node the
        # script is refused with TRYAGAIN (the client retries that for ~0.4 s, then raises
        # ClusterError). It did nothing then, and it only ever publishes what is still pending for
        # us, so sending it again is safe: wait for the migration rather than drop the batch.
        deadline = time.monotonic() + self.slot_move_wait_s
        delay = 0.05
        while True:
            try:
                published, duplicates = self._script(keys=self.keys, args=args)
                return Published(int(published), int(duplicates))
            except (TryAgainError, ClusterError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.info("slot_migrating", stream=self.keys[0], error=str(exc), retry_in_s=delay)
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
