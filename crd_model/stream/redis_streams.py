"""Redis Streams plumbing shared by every daemon: connections, consumer groups, backlog, trimming.

Works with Redis >= 6.2 and Valkey: XAUTOCLAIM and exclusive ranges need 6.2; the `lag` field of
XINFO GROUPS (7.0+) is used when present and computed with a bounded XRANGE otherwise.
"""

from __future__ import annotations

import inspect
import ssl
import time
from dataclasses import dataclass

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from crd_model.stream.settings import RedisSettings

# Entry field names (see docs/wire-format.md).
F_FRAME_ID = b"frame_id"
F_PAYLOAD = b"payload"
F_VERSION = b"v"


class TLSVerificationError(ValueError):
    """The server's certificate failed verification (unknown CA, wrong host name, expired).

    Deliberately not a redis.ConnectionError: the daemons retry those forever, and retrying cannot fix a
    CA file or a host name, so this one ends the command with a readable message (`crd ...: error: ...`).
    """


def _verification_failed(
    exc: ssl.SSLCertVerificationError, host: str, port: int, ca: str | None
) -> TLSVerificationError:
    trusted = f"the CA in {ca}" if ca else "the system's CAs (no tls_ca_file set)"
    why = str(exc.verify_message or exc.reason).rstrip(".")
    return TLSVerificationError(
        f"TLS: the certificate of {host}:{port} failed verification against {trusted}: {why}. "
        "Check CRD_REDIS__TLS_CA_FILE and that the server's certificate names the host in CRD_REDIS__URL"
    )


class VerifiedSSLConnection(redis.SSLConnection):
    """redis-py's TLS connection with readable, non-retried certificate failures."""

    def _connect(self):  # type: ignore[no-untyped-def]
        try:
            return super()._connect()
        except ssl.SSLCertVerificationError as exc:
            raise _verification_failed(exc, self.host, self.port, self.ca_certs) from None

    def connect_check_health(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return super().connect_check_health(*args, **kwargs)
        except redis.ConnectionError as exc:
            # With TLS 1.3 a server that requires a client certificate completes the handshake and then
            # drops the connection (an EOF, or a certificate-required alert): say so. Still a ConnectionError
            # (retried): a restart looks the same.
            if self.certfile is None and isinstance(exc.__context__, ssl.SSLError | ConnectionResetError):
                raise redis.ConnectionError(
                    f"{exc} (the server closed the TLS connection right after the handshake; if it requires client "
                    "certificates, set CRD_REDIS__TLS_CERT_FILE and CRD_REDIS__TLS_KEY_FILE)"
                ) from exc
            raise


class VerifiedAsyncSSLConnection(redis.asyncio.SSLConnection):
    """The asyncio twin of VerifiedSSLConnection (the plant consumers' clients)."""

    async def _connect(self):  # type: ignore[no-untyped-def]
        try:
            return await super()._connect()
        except ssl.SSLCertVerificationError as exc:
            raise _verification_failed(exc, self.host, self.port, self.ssl_context.ca_certs) from None

    async def connect_check_health(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return await super().connect_check_health(*args, **kwargs)
        except redis.ConnectionError as exc:
            # The asyncio connection wraps every exception of _connect in a ConnectionError: unwrap ours.
            if isinstance(exc.__cause__, TLSVerificationError):
                raise exc.__cause__ from None
            raise


# redis-py >= 7 takes `driver_info=None`; older versions `lib_name=None, lib_version=None`.
_NO_CLIENT_SETINFO: dict = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(redis.Redis.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


# Errors after which the same command may simply be tried again (the server or a shard is away for a
# moment, a slot is moving): daemons back off and retry instead of failing.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterError,
    redis.exceptions.RedisClusterException,
    redis.exceptions.TryAgainError,
)


def _client_kwargs(cfg: RedisSettings, decode_responses: bool) -> dict:
    """Auth, TLS, timeouts and health checks shared by the sync and the asyncio clients."""
    kwargs: dict = dict(
        socket_timeout=cfg.socket_timeout_s,
        socket_connect_timeout=cfg.connect_timeout_s,
        health_check_interval=cfg.health_check_interval_s,
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        decode_responses=decode_responses,
    )
    if cfg.username:
        kwargs["username"] = cfg.username
    if cfg.client_name:
        kwargs["client_name"] = cfg.client_name
    # No CLIENT SETINFO on connect: Redis < 7.2 does not know it, and an ACL file that grants it
    # (`+client|setinfo`) does not load there at all.
    kwargs.update(_NO_CLIENT_SETINFO)
    password = cfg.resolved_password()
    if password is not None:
        kwargs["password"] = password.get_secret_value()
    if cfg.url.startswith("rediss://"):
        for setting, path in (("TLS_CA_FILE", cfg.tls_ca_file), ("TLS_CERT_FILE", cfg.tls_cert_file),
                              ("TLS_KEY_FILE", cfg.tls_key_file)):  # fmt: skip
            if path is not None and not path.is_file():
                # Found now, not as a connection error retried forever.
                raise FileNotFoundError(f"CRD_REDIS__{setting}: no such file: {path}")
        kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        kwargs["ssl_check_hostname"] = cfg.tls_check_hostname
        if cfg.tls_ca_file:
            kwargs["ssl_ca_certs"] = str(cfg.tls_ca_file)
        if cfg.tls_cert_file:
            kwargs["ssl_certfile"] = str(cfg.tls_cert_file)
        if cfg.tls_key_file:
            kwargs["ssl_keyfile"] = str(cfg.tls_key_file)
    return kwargs


# Either client: every helper here and every daemon takes one or the other (`RedisSettings.cluster`).
RedisClient = redis.Redis | redis.RedisCluster


def connect(cfg: RedisSettings, decode_responses: bool = False) -> RedisClient:
    """A client with auth, TLS and retries with exponential backoff on connection errors.

    With a rediss:// URL the server's certificate is always verified (and its host name, unless
    tls_check_hostname is off); a failed verification raises TLSVerificationError, not retried.

    With `cfg.cluster` it is redis-py's cluster client: it reads the slot map from the node in the
    URL, sends each command to the node holding its key's slot, and follows MOVED/ASK redirections
    while slots move; auth and TLS settings apply to every node it connects to (certificates are
    verified there too, with redis-py's own TLS connection: a failure is a retried connection error).
    """
    kwargs = _client_kwargs(cfg, decode_responses)
    kwargs["retry"] = Retry(ExponentialBackoff(cap=5.0, base=0.1), cfg.retry_attempts)
    if cfg.cluster:
        # Node connections do not retry by themselves here (redis-py drops retry_on_error and the
        # health checks for them): the cluster client re-reads the slot map and resends the command,
        # up to retry_attempts times. The URL's host stays the discovery address instead of being
        # replaced by the node addresses it lists, so a Service name keeps working when pods move.
        kwargs.pop("retry_on_error")
        kwargs.pop("health_check_interval")
        return redis.RedisCluster.from_url(cfg.url, dynamic_startup_nodes=False, **kwargs)
    if cfg.url.startswith("rediss://"):
        kwargs["connection_class"] = VerifiedSSLConnection
    return redis.Redis.from_url(cfg.url, **kwargs)


def connect_async(
    cfg: RedisSettings, decode_responses: bool = False
) -> redis.asyncio.Redis | redis.asyncio.RedisCluster:
    """The asyncio twin of `connect` (same auth, TLS, retries and cluster setting), for the asyncio consumers."""
    kwargs = _client_kwargs(cfg, decode_responses)
    kwargs["retry"] = AsyncRetry(ExponentialBackoff(cap=5.0, base=0.1), cfg.retry_attempts)
    if cfg.cluster:
        # As in `connect`: the URL's host stays the discovery address (a Service name survives pod moves).
        return redis.asyncio.RedisCluster.from_url(cfg.url, dynamic_startup_nodes=False, **kwargs)
    client = redis.asyncio.Redis.from_url(cfg.url, **kwargs)
    if cfg.url.startswith("rediss://"):
        # The asyncio pool's from_url ignores a connection_class argument for rediss://: set it on the
        # pool before it has made any connection.
        client.connection_pool.connection_class = VerifiedAsyncSSLConnection
    return client


def ensure_group(r: RedisClient, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) if missing; idempotent across pods."""
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def read_interrupted_by_slot_move(exc: redis.ResponseError) -> bool:
    """A blocked XREADGROUP ended with `UNBLOCKED the stream key no longer exists`.

    Redis Cluster moves a slot's keys with MIGRATE, which deletes them on the old node; a consumer
    blocked there on the stream gets this error. Nothing was delivered, so the read can simply be
    sent again: the client then follows the stream to its new node (ASK/MOVED).
    """
    return str(exc).startswith("UNBLOCKED")


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


def group_states(r: RedisClient, stream: str) -> list[GroupState]:
    try:
        infos = r.xinfo_groups(stream)
    except redis.ResponseError:
        return []  # no such stream yet
    out = []
    for g in infos:
        g = {_s(k): v for k, v in g.items()}
        lag = g.get("lag")
        out.append(
            GroupState(_s(g["name"]), int(g["pending"]), _s(g["last-delivered-id"]), None if lag is None else int(lag))
        )
    return out


def outstanding(r: RedisClient, stream: str, group: str, limit: int) -> int:
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
        else:
            # Undelivered entries are still in the stream (trimming never takes them), so the stream's
            # length bounds the lag. Redis's own `lag` (entries added - entries read) can be stale
            # after a restart from the AOF (seen on 7.0: 10,199 on an empty, fully delivered stream),
            # which would hold producers in backpressure for ever.
            lag = min(lag, int(r.xlen(stream))) if lag else 0  # one round trip fewer when there is none
        return lag + g.pending
    return int(r.xlen(stream))  # no group yet: everything is outstanding


def safe_trim_id(r: RedisClient, stream: str) -> str | None:
    """The oldest entry id any consumer group still needs; everything older may go.

    A group needs its pending entries (delivered, not acked: a crashed worker's frames are
    reclaimed from there) and everything after its last-delivered id.
    """
    groups = group_states(r, stream)
    if not groups:
        return None  # nobody reads this stream yet: keep everything
    ms, seq = min(_group_needs(r, stream, g) for g in groups)
    return f"{ms}-{seq}"


def trim_processed(r: RedisClient, stream: str) -> int:
    """XTRIM MINID ~ <safe id>: frames no group still needs; approximate, so it never over-trims."""
    min_id = safe_trim_id(r, stream)
    if min_id is None:
        return 0
    return int(r.xtrim(stream, minid=min_id, approximate=True))


@dataclass
class ResultsTrim:
    trimmed: int  # acknowledged by every group (or beyond MAXLEN without groups): gone as planned
    overflow: int  # dropped at the hard cap although a group had not acknowledged them
    lagging: list[str]  # groups that had not acknowledged what was dropped


def trim_results(r: RedisClient, stream: str, maxlen: int, retain_s: float, hard_maxlen: int) -> ResultsTrim:
    """Trim a results stream without taking results from under a consumer group.

    With groups: XTRIM MINID ~ below what every group still needs and below `retain_s` ago. Without:
    XTRIM MAXLEN ~ `maxlen`. Then, if the stream is still longer than `hard_maxlen` (a group stopped
    acknowledging), trim it to that exactly and report what went unacknowledged: memory stays bounded,
    and the loss is counted, never silent.
    """
    groups = group_states(r, stream)
    if not groups:
        return ResultsTrim(int(r.xtrim(stream, maxlen=maxlen, approximate=True)), 0, [])
    safe = safe_trim_id(r, stream)
    assert safe is not None
    retain_ms = max(0, int((time.time() - retain_s) * 1000))
    cut = min(_id_tuple(safe), (retain_ms, 0))
    trimmed = int(r.xtrim(stream, minid=f"{cut[0]}-{cut[1]}", approximate=True))
    if int(r.xlen(stream)) <= hard_maxlen:
        return ResultsTrim(trimmed, 0, [])
    # Over the cap: first the history every group has acknowledged, then (counted) what one has not.
    trimmed += int(r.xtrim(stream, minid=safe, approximate=False))
    dropped = int(r.xtrim(stream, maxlen=hard_maxlen, approximate=False)) if r.xlen(stream) > hard_maxlen else 0
    if not dropped:
        return ResultsTrim(trimmed, 0, [])
    first = r.xrange(stream, count=1)
    first_id = _id_tuple(_s(first[0][0])) if first else (2**63, 0)
    lagging = [g.name for g in groups if _group_needs(r, stream, g) < first_id]
    return ResultsTrim(trimmed, dropped if lagging else 0, lagging)


def _group_needs(r: RedisClient, stream: str, g: GroupState) -> tuple[int, int]:
    """The oldest entry id group `g` still needs: its oldest pending entry, else the one after its cursor."""
    if g.pending:
        summary = r.xpending(stream, g.name)
        if summary and summary.get("min"):
            return _id_tuple(_s(summary["min"]))
    ms, seq = _id_tuple(g.last_delivered_id)
    return ms, seq + 1


def entry_time(entry_id: str | bytes) -> float:
    """Unix seconds at which the server added the entry (the ms part of its id)."""
    return _id_tuple(_s(entry_id))[0] / 1000.0


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
