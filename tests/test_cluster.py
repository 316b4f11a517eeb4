"""Redis Cluster, for real: 3 masters of real redis-server processes, deploy/redis/users.acl loaded.

Producers, workers, result tails, the PLC bridge and the dashboard log in as their ACL users and use
the cluster client (`RedisSettings.cluster`); lines are picked by their hash slot so they land on
different masters, and slots are moved under load with `redis-cli --cluster reshard` and with a
key-by-key MIGRATE. One cluster without TLS for most tests, one TLS-only cluster (throwaway CA) for
rediss://; each is started once for this module (about 2 s) and needs no REDIS_URL. Without
redis-server and redis-cli the tests skip, except under CI=1 (.ci/run installs them), where they fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from crd_model.stream import unpack_result
from crd_model.stream.local_cluster import LocalCluster, Node, TlsFiles, cluster_binaries, line_in_slot, slot_of
from crd_model.stream.redis_streams import (
    F_PAYLOAD,
    connect,
    ensure_group,
    group_states,
    outstanding,
    safe_trim_id,
    trim_processed,
    trim_results,
)
from crd_model.stream.results import tail_results
from crd_model.stream.settings import RedisSettings, Settings
from producers.producer import Producer
from producers.sources import SourceFrame
from workers.models import ModelRegistry, StandInInspector
from workers.publish import Outcome, Published, Publisher
from workers.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
ACL_FILE = ROOT / "deploy" / "redis" / "users.acl"
PASSWORD = "EXAMPLE-ONLY"  # the placeholder password of every user in users.acl
ADMIN = ("crd-admin", PASSWORD)


def _require_binaries() -> None:
    """Skip without redis-server + redis-cli, except under CI=1 (.ci/run installs them): fail there."""
    if cluster_binaries() is None:
        problem = "needs redis-server and redis-cli on the PATH (Debian: apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"{problem}; CI is set, so they are required")
        pytest.skip(problem)


def _acl_for_this_server(tmp: Path) -> Path:
    """users.acl as is, minus `+client|setinfo` on Redis < 7.2, which does not know that command."""
    server, _ = cluster_binaries()
    version = subprocess.run([server, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"v=(\d+)\.(\d+)", version)
    text = ACL_FILE.read_text()
    if "Redis" in version and m and (int(m[1]), int(m[2])) < (7, 2):
        text = text.replace(" +client|setinfo", "")
    (tmp / "users.acl").write_text(text)
    return tmp / "users.acl"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    _require_binaries()
    root = tmp_path_factory.mktemp("cluster")
    with LocalCluster(root, masters=3, acl_file=_acl_for_this_server(root), admin=ADMIN) as c:
        yield c


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The same, TLS only (clients and cluster bus), with a throwaway CA whose certificate names 127.0.0.1."""
    _require_binaries()
    pytest.importorskip("cryptography", reason="tests/servers.py makes the certificates with it")
    from tests.servers import make_pki

    root = tmp_path_factory.mktemp("tls-cluster")
    pki = make_pki(root / "pki")
    tls = TlsFiles(pki.ca, pki.server_cert, pki.server_key, pki.client_cert, pki.client_key)
    with LocalCluster(root, masters=3, acl_file=_acl_for_this_server(root), admin=ADMIN, tls=tls) as c:
        c.other_ca = pki.other_ca  # type: ignore[attr-defined]
        yield c


def _redis(cluster: LocalCluster, user: str, url: str | None = None) -> RedisSettings:
    tls = {"tls_ca_file": cluster.tls.ca} if cluster.tls else {}
    return RedisSettings(url=url or cluster.url, cluster=True, username=user, password=PASSWORD, **tls)


def _settings(cluster: LocalCluster, user: str, line: str, **sections: dict) -> Settings:
    s = Settings(line=line)
    # Not through the constructor: REDIS_URL in the environment would win over it (make test-streams).
    update: dict = {"redis": _redis(cluster, user)}
    update |= {k: getattr(s, k).model_copy(update=v) for k, v in sections.items()}
    return s.model_copy(update=update)


def _stem() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


def _line_on(node: Node, stem: str, lowest: bool = False) -> str:
    """A line whose streams live on `node` (in its lowest slot: the one redis-cli reshard moves)."""
    slots = sorted(node.slots)
    return line_in_slot(slots[0] if lowest else slots[len(slots) // 2], stem)


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _frames(n: int) -> list[SourceFrame]:
    rgb, xyz = np.zeros((24, 24, 3), np.uint8), np.zeros((24, 24, 3), np.float32)
    return [SourceFrame(rgb, xyz, "disc", meta={"i": i}) for i in range(n)]


def _acl_refusals(cluster: LocalCluster) -> list:
    return [e for n in cluster.nodes for e in cluster.client(n).execute_command("ACL", "LOG")]


class Line:
    """One line under load: a producer, `workers` workers and a `crd results` tail, each a thread."""

    def __init__(self, cluster: LocalCluster, line: str, n: int, fps: float, workers: int = 2, latency_ms: float = 2):
        self.cluster, self.line, self.n = cluster, line, n
        fast = {"max_wait_ms": 5, "claim_every_s": 0.5}
        self.producer = Producer(_settings(cluster, "crd-producer", line, producer={"fps": fps}), camera="cam1")
        self.workers = [
            Worker(
                _settings(cluster, "crd-worker", line, worker=fast | {"consumer": f"w{i}", "max_batch": 8}),
                ModelRegistry({"disc": StandInInspector(latency_ms)}),
            )
            for i in range(workers)
        ]
        self.admin = connect(_redis(cluster, "crd-admin"))
        self.keys = {k: self.producer.s.streams.key(line, k) for k in ("frames", "results", "dead")}
        self.tailed: list[str] = []
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._guard(w.run), daemon=True) for w in self.workers]
        self.threads.append(threading.Thread(target=self._guard(self._produce), daemon=True))
        self.threads.append(threading.Thread(target=self._guard(self._tail), daemon=True))

    def _guard(self, fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # surfaced by check(): a thread that died is a failure
                self.errors.append(exc)

        return run

    def _produce(self) -> None:
        ensure_group(self.admin, self.keys["frames"], self.producer.group)  # before the tail starts
        self.producer.run(_frames(self.n))

    def _tail(self) -> None:
        r = connect(_redis(self.cluster, "crd-results"))
        # Stops after n results, or 5 s without one (a stuck line fails the test instead of hanging it).
        for _, result in tail_results(r, self.keys["results"], start="0", count=self.n, timeout_s=5, block_ms=200):
            self.tailed.append(result.frame_id)

    def start(self) -> Line:
        for t in self.threads:
            t.start()
        return self

    def results(self) -> int:
        return int(self.admin.xlen(self.keys["results"]))

    def finish(self, timeout_s: float = 60) -> None:
        """Wait for n results, stop the workers, and join everything: after this nothing can publish."""
        _wait(lambda: self.results() >= self.n or bool(self.errors), timeout_s, f"{self.n} results on {self.line}")
        for daemon in [*self.workers, self.producer]:
            daemon.stop()
        for t in self.threads:
            t.join(timeout=30)
        assert not self.errors, [f"{type(e).__name__}: {e}" for e in self.errors]

    def check(self) -> None:
        """Every frame sent has exactly one result, nothing is left pending, the tail saw them all."""
        sent = [f"cam1:{self.producer.boot}:{i}" for i in range(self.n)]
        published = [unpack_result(f[F_PAYLOAD]).frame_id for _, f in self.admin.xrange(self.keys["results"])]
        assert sorted(published) == sorted(sent), f"{self.line}: {len(published)} results for {len(sent)} frames"
        assert sorted(self.tailed) == sorted(sent)
        assert self.admin.xpending(self.keys["frames"], self.producer.group)["pending"] == 0
        assert self.admin.xlen(self.keys["dead"]) == 0


# ---- the cluster client ------------------------------------------------------------------------
def test_the_cluster_setting_picks_the_cluster_client_and_refuses_other_databases(cluster):
    assert isinstance(connect(_redis(cluster, "crd-producer")), redis.RedisCluster)
    assert isinstance(connect(RedisSettings(url=cluster.url)), redis.Redis)  # off by default
    with pytest.raises(ValueError, match="database 0 only"):
        RedisSettings(url=cluster.url.replace("/0", "/3"), cluster=True)


@pytest.mark.parametrize("protocol", [2, 3])
def test_stream_helpers_on_lines_of_every_shard(cluster, protocol):
    """Groups, lag, safe trimming, the publish script: on three lines on three masters, RESP2 and RESP3."""
    stem = _stem()
    lines = [_line_on(node, stem) for node in cluster.nodes]
    assert len({cluster.owner(slot_of(line)).port for line in lines}) == 3
    r = connect(_redis(cluster, "crd-worker", url=f"{cluster.url}?protocol={protocol}"))
    admin = connect(_redis(cluster, "crd-admin"))
    s = Settings().streams
    for line in lines:
        frames, results = s.key(line, "frames"), s.key(line, "results")
        ensure_group(r, frames, "g")
        ensure_group(r, frames, "g")  # idempotent
        ids = [r.xadd(frames, {b"frame_id": f"f{i}".encode(), b"payload": b"x"}).decode() for i in range(6)]
        assert [g.name for g in group_states(r, frames)] == ["g"]
        r.xreadgroup("g", "w1", {frames: ">"}, count=4)
        assert outstanding(r, frames, "g", limit=100) == 6
        admin.xclaim(frames, "g", "w2", 0, [ids[3]])  # another worker took the fourth over
        pub = Publisher(r, s, line, "g", "w1")
        assert pub.publish([Outcome(i, f"f{n}", "ok", b"r") for n, i in enumerate(ids[:4])]) == Published(3, 0)
        assert r.xlen(results) == 3
        # A resent copy of f0 (a producer's retry) gets no second result: the dedup set is in the slot too.
        again = r.xadd(frames, {b"frame_id": b"f0", b"payload": b"x"}).decode()
        r.xreadgroup("g", "w1", {frames: ">"}, count=10)
        pending_w1 = [p["message_id"].decode() for p in r.xpending_range(frames, "g", "-", "+", 10, "w1")]
        outcomes = [Outcome(i, "f0" if i == again else f"x{i}", "ok", b"r") for i in pending_w1]
        assert pub.publish(outcomes) == Published(2, 1)
        assert [f[b"reason"] for _, f in r.xrange(s.key(line, "dead"))] == [b"duplicate"]
        ensure_group(admin, results, "plc")  # a consumer group on the results: trimming keeps what it needs
        assert trim_results(r, results, maxlen=100, retain_s=0, hard_maxlen=100).trimmed == 0
        assert r.xlen(results) == 5
        assert safe_trim_id(r, frames) == ids[3]  # still pending with w2
        trim_processed(r, frames)
        r.xtrim(frames, minid=safe_trim_id(r, frames), approximate=False)
        assert [e[0].decode() for e in r.xrange(frames)] == [*ids[3:], again]
        claimed = r.xautoclaim(frames, "g", "w1", 0, start_id="0-0", count=10)
        assert [e[0].decode() for e in claimed[1]] == [ids[3]]
        owner = cluster.owner(slot_of(line))
        assert cluster.client(owner).exists(frames, results) == 2  # really on that master
    assert _acl_refusals(cluster) == []


# ---- exactly once, across shards and while slots move --------------------------------------------
def test_every_frame_of_lines_on_three_shards_gets_exactly_one_result(cluster):
    stem = _stem()
    lines = [Line(cluster, _line_on(node, stem), n=40, fps=300).start() for node in cluster.nodes]
    for line in lines:
        line.finish()
    for line in lines:
        line.check()
    assert len({cluster.owner(slot_of(x.line)).port for x in lines}) == 3
    assert _acl_refusals(cluster) == []


def test_one_worker_serving_lines_on_three_shards_answers_every_frame_once(cluster):
    """A multi-line worker (CRD_WORKER__LINES) reads and publishes on three masters at once."""
    stem = _stem()
    lines = [Line(cluster, _line_on(node, stem), n=30, fps=300, workers=0) for node in cluster.nodes]
    s = _settings(cluster, "crd-worker", lines[0].line, worker={"lines": [x.line for x in lines], "max_wait_ms": 5})
    worker = Worker(s, ModelRegistry({"disc": StandInInspector(2)}))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    for line in lines:
        line.start()
    try:
        for line in lines:
            line.finish()
    finally:
        worker.stop()
        thread.join(timeout=30)
    assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
    for line in lines:
        line.check()
    assert worker.published == 90


@pytest.mark.parametrize("move", ["redis-cli-reshard", "migrate-key-by-key"])
def test_exactly_once_holds_while_the_line_slot_moves_to_another_master_under_load(cluster, move):
    source = cluster.nodes[0] if move == "redis-cli-reshard" else cluster.nodes[1]
    target = cluster.nodes[2]
    cluster.refresh()
    name = _line_on(source, _stem(), lowest=True)
    slot = slot_of(name)
    line = Line(cluster, name, n=240, fps=120).start()
    _wait(lambda: line.results() >= 40, 30, "the line in full swing")
    if move == "redis-cli-reshard":
        cluster.reshard(slot, target)
    else:
        # Frames, results and dead letters leave one at a time: the publish script meets TRYAGAIN.
        cluster.move_slot_key_by_key(slot, target, pause_s=0.3)
    moved_at = line.results()
    assert moved_at < line.n, "the move must happen under load"
    line.finish()
    line.check()
    assert cluster.owner(slot) is target
    assert cluster.client(target).exists(line.keys["frames"], line.keys["results"]) == 2
    assert _acl_refusals(cluster) == []


def test_over_tls_lines_on_three_shards_get_every_frame_once_while_a_slot_moves(tls_cluster):
    """rediss:// to every master (certificates verified, host names checked), the cluster bus and
    MIGRATE over TLS too; one line's slot moved with redis-cli reshard under load."""
    cluster = tls_cluster
    cluster.refresh()
    stem = _stem()
    names = [_line_on(cluster.nodes[0], stem, lowest=True), *(_line_on(n, stem) for n in cluster.nodes[1:])]
    lines = [Line(cluster, name, n=n, fps=100) for name, n in zip(names, (150, 40, 40), strict=True)]
    for line in lines:
        line.start()
    _wait(lambda: lines[0].results() >= 10, 30, "the first line in full swing")
    cluster.reshard(slot_of(names[0]), cluster.nodes[1])
    assert lines[0].results() < lines[0].n, "the move must happen under load"
    for line in lines:
        line.finish()
        line.check()
    assert cluster.owner(slot_of(names[0])) is cluster.nodes[1]
    assert _acl_refusals(cluster) == []


def test_a_cluster_with_a_certificate_from_another_ca_is_refused(tls_cluster):
    wrong = _redis(tls_cluster, "crd-producer").model_copy(
        update={"tls_ca_file": tls_cluster.other_ca, "retry_attempts": 0}
    )
    with pytest.raises((redis.exceptions.RedisClusterException, redis.ConnectionError), match="certificate verify"):
        connect(wrong).ping()


def test_a_worker_blocked_on_a_stream_whose_slot_moves_reads_again_on_the_new_master(cluster):
    """MIGRATE deletes the stream under a blocked XREADGROUP (`UNBLOCKED ...`): the worker reads again."""
    name = _line_on(cluster.nodes[1], _stem())
    slot = slot_of(name)
    s = _settings(cluster, "crd-worker", name, worker={"block_ms": 3_000, "max_wait_ms": 0})
    admin = connect(_redis(cluster, "crd-admin"))
    frames_key = s.streams.key(name, "frames")
    ensure_group(admin, frames_key, s.streams.group)
    worker = Worker(s, ModelRegistry({"disc": StandInInspector(1)}))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            worker.run(max_frames=3)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    owner = cluster.owner(slot)

    def blocked_in_xreadgroup() -> bool:
        clients = cluster.client(owner).execute_command("CLIENT", "LIST").decode()
        return any("cmd=xreadgroup" in c and "flags=b" in c for c in clients.splitlines())

    _wait(blocked_in_xreadgroup, 20, "the worker blocked in XREADGROUP")
    cluster.move_slot_key_by_key(slot, cluster.nodes[0], pause_s=0)
    producer = Producer(_settings(cluster, "crd-producer", name, producer={"fps": 100.0}), camera="cam1")
    assert producer.run(_frames(3)) == 3
    thread.join(timeout=30)
    assert not errors, [f"{type(e).__name__}: {e}" for e in errors]
    assert worker.published == 3 and admin.xlen(s.streams.key(name, "results")) == 3


def test_publish_waits_out_a_slot_split_between_two_masters(cluster):
    """Frames already on the new master, results still on the old: TRYAGAIN until the move ends."""
    name = _line_on(cluster.nodes[2], _stem())
    slot = slot_of(name)
    r = connect(_redis(cluster, "crd-worker"))
    s = Settings().streams
    frames, results = s.key(name, "frames"), s.key(name, "results")
    ensure_group(r, frames, "g")
    entry = r.xadd(frames, {b"frame_id": b"f0", b"payload": b"x"}).decode()
    r.xreadgroup("g", "w1", {frames: ">"}, count=1)
    r.xadd(results, {b"frame_id": b"earlier", b"payload": b"x"})
    source = cluster.begin_migration(slot, cluster.nodes[0])
    cluster.migrate(source, cluster.nodes[0], [frames])
    outcome: list[int | BaseException] = []

    def publish() -> None:
        try:
            outcome.append(Publisher(r, s, name, "g", "w1").publish([Outcome(entry, "f0", "ok", b"r0")]).published)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    time.sleep(1.0)  # longer than the client's own TRYAGAIN retries (~0.4 s)
    assert outcome == [], f"publish returned while the line's streams were on two masters: {outcome!r}"
    cluster.migrate(source, cluster.nodes[0], [results])
    cluster.finish_migration(slot, cluster.nodes[0])
    thread.join(timeout=30)
    assert outcome == [1]
    assert [f[b"frame_id"] for _, f in r.xrange(results)] == [b"earlier", b"f0"]
    assert r.xpending(frames, "g")["pending"] == 0


# ---- plant consumers (asyncio clients) -----------------------------------------------------------
def test_the_plc_bridge_serves_lines_on_three_masters_and_follows_a_moved_slot(cluster):
    """The PLC bridge (connect_async: the asyncio cluster client) as the ACL user crd-plc: three lines on
    three masters through one bridge into a Modbus PLC stand-in; then one line's slot moves under it
    (its results stream and its ledger hash, key by key) and every result still reaches the PLC once."""
    pytest.importorskip("consumers.plc.bridge", reason="needs the plc extra")
    from tests.plc_sims import ModbusPlc, free_port, wait_for
    from tests.test_plc import BridgeThread, _with_plc, publish

    stem = _stem()
    lines = [_line_on(node, stem) for node in cluster.nodes]
    modbus = {"port": free_port(), "poll_ms": 5}
    s = _with_plc(_settings(cluster, "crd-plc", lines[0]), protocol="modbus", lines=lines, modbus=modbus)
    admin = connect(_redis(cluster, "crd-admin"))
    plc = ModbusPlc(lines, s.plc.modbus).start()
    bridge = BridgeThread(s)
    try:
        for i in range(3):
            for line in lines:
                publish(admin, s, "anomalous" if i == 1 else "ok", i, line=line)
        wait_for(lambda: len(plc.seen) == 9, 20, "three results per line at the PLC")
        moved = lines[1]
        cluster.move_slot_key_by_key(slot_of(moved), cluster.nodes[0], pause_s=0.3)
        for i in range(3, 6):
            for line in lines:
                publish(admin, s, "ok", i, line=line)
        wait_for(lambda: len(plc.seen) == 18, 20, "three more per line, the moved one included")
        for line in lines:
            assert [x.sequence for x in plc.seen if x.line == line] == [1, 2, 3, 4, 5, 6], line
            results = s.streams.key(line, "results")
            wait_for(lambda k=results: admin.xpending(k, s.plc.group)["pending"] == 0, 10, "acknowledged")
        assert cluster.owner(slot_of(moved)) is cluster.nodes[0]
        assert bridge.thread.is_alive()
    finally:
        bridge.stop()
        plc.close()
    assert _acl_refusals(cluster) == []


def test_the_dashboard_reads_lines_on_three_masters_and_follows_a_moved_slot(cluster):
    """The dashboard (asyncio cluster client, ACL user crd-dashboard): XREAD on three masters, then on
    a line whose slot moved under it."""
    pytest.importorskip("consumers.dashboard.service", reason="needs the dashboard extra")
    from consumers.dashboard.service import Dashboard
    from tests.plc_sims import free_port, wait_for
    from tests.test_plc import publish

    stem = _stem()
    lines = [_line_on(node, stem) for node in cluster.nodes]
    dashboard = {"lines": lines, "port": free_port(), "poll_s": 0.2, "frame_images": False}
    s = _settings(cluster, "crd-dashboard", lines[0], dashboard=dashboard)
    admin = connect(_redis(cluster, "crd-admin"))
    for i in range(3):  # results already there when it starts (read as history: no race with its first XREAD)
        for line in lines:
            publish(admin, s, "anomalous" if i == 1 else "ok", i, line=line)
    dash = Dashboard(s)
    thread = threading.Thread(target=dash.run, daemon=True)
    thread.start()

    def shown(line: str) -> int:
        return sum(dash.states[line].counts.values())

    try:
        wait_for(lambda: dash.health.ready, 20, "dashboard serving")
        wait_for(lambda: all(shown(line) == 3 for line in lines), 20, "three results per line shown")
        cluster.move_slot_key_by_key(slot_of(lines[2]), cluster.nodes[1], pause_s=0.3)
        for i in range(3, 6):
            for line in lines:
                publish(admin, s, "ok", i, line=line)
        wait_for(lambda: all(shown(line) == 6 for line in lines), 20, "three more per line, the moved one included")
        assert all(dash.states[line].read_error == "" for line in lines)
        assert thread.is_alive()
    finally:
        dash.stop()
        thread.join(timeout=20)
    assert _acl_refusals(cluster) == []
