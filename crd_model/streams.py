"""Redis Streams plumbing shared by producers, workers and consumers (torch-free).

Works with Redis >= 6.2 and Valkey: XAUTOCLAIM and exclusive ranges need 6.2; the `lag` field of
XINFO GROUPS (7.0+) is used when present and computed with a bounded XRANGE otherwise.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from crd_model.settings import RedisSettings, StreamSettings

# Entry field names (see docs/wire-format.md).
F_FRAME_ID = b"frame_id"
F_PAYLOAD = b"payload"
F_VERSION = b"v"


def connect(cfg: RedisSettings, decode_responses: bool = False) -> redis.Redis:
    """A client with auth, TLS and retries with exponential backoff on connection errors."""
    kwargs: dict = dict(
        socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.connect_timeout_s,
        health_check_interval=cfg.health_check_interval_s,
        retry=Retry(ExponentialBackoff(cap=5.0, base=0.1), cfg.retry_attempts),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        decode_responses=decode_responses,
    )
    if cfg.username:
        kwargs["username"] = cfg.username
    if cfg.password is not None:
        kwargs["password"] = cfg.password.get_secret_value()
    if cfg.url.startswith("rediss://"):
        kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        kwargs["ssl_check_hostname"] = cfg.tls_check_hostname
        if cfg.tls_ca_file:
            kwargs["ssl_ca_certs"] = str(cfg.tls_ca_file)
        if cfg.tls_cert_file:
            kwargs["ssl_certfile"] = str(cfg.tls_cert_file)
        if cfg.tls_key_file:
            kwargs["ssl_keyfile"] = str(cfg.tls_key_file)
    return redis.Redis.from_url(cfg.url, **kwargs)


def ensure_group(r: redis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) if missing; idempotent across pods."""
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class GroupState:
    name: str
    pending: int
    last_delivered_id: str
    lag: int | None  # None: Redis < 7 could not tell and we did not count


def group_states(r: redis.Redis, stream: str) -> list[GroupState]:
    try:
        infos = r.xinfo_groups(stream)
    except redis.ResponseError:
        return []  # no such stream yet
    out = []
    for g in infos:
        g = {_s(k): v for k, v in g.items()}
        lag = g.get("lag")
        out.append(GroupState(_s(g["name"]), int(g["pending"]), _s(g["last-delivered-id"]),
                              None if lag is None else int(lag)))
    return out


def outstanding(r: redis.Redis, stream: str, group: str, limit: int) -> int:
    """Entries of `stream` the group has not finished: undelivered (lag) + pending (not acked).

    Counting stops a little past `limit` on servers without the `lag` field (Redis 6.2), so the
    cost stays bounded however deep the backlog.
    """
    for g in group_states(r, stream):
        if g.name != group:
            continue
        lag = g.lag
        if lag is None:
            lag = len(r.xrange(stream, min=f"({g.last_delivered_id}", max="+", count=limit + 1))
        return lag + g.pending
    return int(r.xlen(stream))  # no group yet: everything is outstanding


def safe_trim_id(r: redis.Redis, stream: str) -> str | None:
    """The oldest entry id any consumer group still needs; everything older may go.

    A group needs its pending entries (delivered, not acked: a crashed worker's frames are
    reclaimed from there) and everything after its last-delivered id.
    """
    groups = group_states(r, stream)
    if not groups:
        return None  # nobody reads this stream yet: keep everything
    candidates = []
    for g in groups:
        ms, seq = _id_tuple(g.last_delivered_id)
        candidates.append((ms, seq + 1))
        if g.pending:
            summary = r.xpending(stream, g.name)
            if summary and summary.get("min"):
                candidates.append(_id_tuple(_s(summary["min"])))
    ms, seq = min(candidates)
    return f"{ms}-{seq}"


def trim_processed(r: redis.Redis, stream: str) -> int:
    """XTRIM MINID ~ <safe id>: frames no group still needs; approximate, so it never over-trims."""
    min_id = safe_trim_id(r, stream)
    if min_id is None:
        return 0
    return int(r.xtrim(stream, minid=min_id, approximate=True))


def entry_time(entry_id: str | bytes) -> float:
    """Unix seconds at which the server added the entry (the ms part of its id)."""
    return _id_tuple(_s(entry_id))[0] / 1000.0


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
            args += [o.entry_id, o.frame_id, o.verdict, o.result_payload, o.dead_reason, o.dead_message,
                     o.deliveries, o.original_payload]
        return int(self._script(keys=self.keys, args=args))


class Backoff:
    """Exponential backoff with a cap, for reconnect loops."""

    def __init__(self, base: float = 0.1, cap: float = 10.0):
        self.base, self.cap, self.attempt = base, cap, 0

    def sleep(self) -> float:
        delay = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        time.sleep(delay)
        return delay

    def reset(self) -> None:
        self.attempt = 0
