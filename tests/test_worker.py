"""Workers against a real server: exact results, bad input, crashes, draining, batching."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from crd_model.data.mvtec3d import list_samples, read_rgb, read_xyz
from crd_model.inspector import Inspector
from crd_model.stream import Limits, decode_map, encode_xyz, make_frame, pack_frame, unpack_result
from crd_model.stream.redis_streams import F_FRAME_ID, F_PAYLOAD, ensure_group
from producers.producer import Producer
from producers.sources import ReplaySource, SourceFrame
from tests.conftest import TINY_CATEGORY
from workers.models import ModelRegistry, StandInInspector
from workers.worker import Worker

ROOT = Path(__file__).resolve().parent.parent


def _results(r, settings) -> list:
    return [unpack_result(f[F_PAYLOAD]) for _, f in r.xrange(settings.streams.key(settings.line, "results"))]


def _fast(settings, **worker):
    w = settings.worker.model_copy(update=dict(dict(max_wait_ms=5, block_ms=100, claim_every_s=0.2), **worker))
    p = settings.producer.model_copy(update={"fps": 1000.0})
    return settings.model_copy(update={"worker": w, "producer": p})


@pytest.mark.parametrize("decode_processes", [0, 1], ids=["threads", "processes"])
def test_the_region_finder_is_loaded_before_the_first_anomalous_frame(settings, decode_processes):
    # scipy.ndimage takes about half a second to import: loaded lazily, the first anomalous frame's
    # result waited for it. A fresh interpreter, so nothing else has imported it yet.
    code = """
import sys
from crd_model.stream.settings import Settings
from workers.models import ModelRegistry, StandInInspector
from workers.worker import Worker
s = Settings.model_validate_json(sys.argv[1])
assert "scipy.ndimage" not in sys.modules
worker = Worker(s, ModelRegistry({"disc": StandInInspector(1)}))
assert "scipy.ndimage" in sys.modules, "not loaded by the worker"
if worker.hostpool is not None:
    probe = worker.hostpool._submit(eval, "'scipy.ndimage' in __import__('sys').modules")
    assert probe.result(timeout=60), "not loaded by the pool processes"
    worker.hostpool.close()
print("ok")
"""
    s = _fast(settings, decode_processes=decode_processes)
    out = subprocess.run([sys.executable, "-c", code, s.model_dump_json()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize(
    "decode_processes, keep", [(0, True), (1, True), (1, False)], ids=["threads", "processes", "processes-off"]
)
def test_freed_frame_buffers_serve_the_next_batch_without_fresh_pages(settings, decode_processes, keep):
    # Each frame passes through buffers of its own size, freed with its batch. With glibc's defaults the
    # next batch faults in fresh zeroed pages for them (~113 per 460 kB buffer); the worker and its pool
    # processes keep freed memory for reuse unless keep_freed_memory is off. A fresh interpreter: nothing
    # has changed the defaults yet.
    code = """
import sys
from crd_model.stream.settings import Settings
from workers.allocator import recycled_page_faults
from workers.models import ModelRegistry, StandInInspector
from workers.worker import Worker
s = Settings.model_validate_json(sys.argv[1])
keep = s.worker.keep_freed_memory
before = recycled_page_faults()
assert before > 50, f"glibc's defaults should fault pages in: {before}"
worker = Worker(s, ModelRegistry({"disc": StandInInspector(1)}))
after = recycled_page_faults()
assert (after < 5) == keep, f"worker process: {after} fresh pages per buffer"
if worker.hostpool is not None:
    pooled = worker.hostpool._submit(recycled_page_faults).result(timeout=60)
    assert (pooled < 5) == keep, f"pool process: {pooled} fresh pages per buffer"
    worker.hostpool.close()
print("ok")
"""
    s = _fast(settings, decode_processes=decode_processes, keep_freed_memory=keep)
    out = subprocess.run([sys.executable, "-c", code, s.model_dump_json()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("torch_threads", [None, 1], ids=["default", "one"])
def test_the_model_runs_with_the_torch_threads_set(settings, r, tiny_data, tiny_checkpoint, torch_threads):
    # The thread count the model really runs with, seen from the device loop, and restored afterwards.
    import torch

    s = _fast(settings, max_batch=4, torch_threads=torch_threads)
    producer = Producer(s, camera="cam1", r=r)
    assert producer.run(ReplaySource(tiny_data, TINY_CATEGORY, "test"), max_frames=4) == 4
    inspector = Inspector(tiny_checkpoint, "cpu")
    seen: list[int] = []
    preprocess = inspector.preprocess

    def watched(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return preprocess(*args, **kwargs)

    inspector.preprocess = watched
    worker = Worker(s, ModelRegistry({TINY_CATEGORY: inspector}), r=r)
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # what the process had: unset keeps it, and the worker leaves nothing behind
    try:
        assert worker.run(max_frames=4, idle_exit_s=5) == 4
        assert seen and set(seen) == {torch_threads or 3}
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("decode_processes", [0, 2], ids=["threads", "processes"])
def test_n_frames_in_exactly_n_results_out_matching_the_offline_model(
    settings, r, tiny_data, tiny_checkpoint, decode_processes
):
    s = _fast(settings, max_batch=4, decode_processes=decode_processes)
    producer = Producer(s, camera="cam7", r=r)
    source = ReplaySource(tiny_data, TINY_CATEGORY, "test")
    n = 10
    assert producer.run(source, max_frames=n) == n
    inspector = Inspector(tiny_checkpoint, "cpu")
    worker = Worker(s, ModelRegistry({TINY_CATEGORY: inspector}), r=r)
    assert (worker.hostpool is not None) == (decode_processes > 0)
    assert worker.run(max_frames=n, idle_exit_s=5) == n
    results = _results(r, s)
    assert len(results) == n
    assert [x.frame_id for x in results] == [f"cam7:{producer.boot}:{i}" for i in range(n)]
    samples = list_samples(tiny_data, TINY_CATEGORY, "test")[:n]
    offline = inspector.inspect([read_rgb(x.rgb_path) for x in samples], [read_xyz(x.xyz_path) for x in samples])
    for res, off, smp in zip(results, offline, samples, strict=True):
        assert res.verdict == off.verdict
        assert res.score == pytest.approx(off.score, rel=1e-4, abs=1e-4)
        assert res.threshold == pytest.approx(inspector.threshold)
        assert res.model_id == inspector.model_id
        assert res.anomaly_map is not None and tuple(res.anomaly_map.image_shape) == read_rgb(smp.rgb_path).shape[:2]
        assert res.timings.captured_at <= res.timings.enqueued_at <= res.timings.started_at <= res.timings.finished_at
        if res.verdict == "anomalous":
            assert res.regions
        # The published map is the map that gave the score (its peak survives the resize to the wire).
        peak = float(decode_map(res.anomaly_map).max())
        assert peak == pytest.approx(res.score, abs=0.15 * abs(inspector.threshold))
    pending = r.xpending(s.streams.key(s.line, "frames"), s.streams.group)
    assert pending["pending"] == 0


def test_bad_frames_become_error_results_and_dead_letters(settings, r):
    s = _fast(settings, max_batch=8)
    frames_key = s.streams.key(s.line, "frames")
    ensure_group(r, frames_key, s.streams.group)
    rgb = np.zeros((40, 50, 3), np.uint8)
    xyz = np.zeros((40, 50, 3), np.float32)

    def add(frame_id: str, payload: bytes) -> None:
        r.xadd(frames_key, {F_FRAME_ID: frame_id.encode(), F_PAYLOAD: payload})

    def frame(fid: str, **kw) -> bytes:
        args = dict(frame_id=fid, line=s.line, camera="c", seq=0, category="disc") | kw
        return pack_frame(make_frame(args.pop("rgb", rgb), args.pop("xyz", xyz), **args))

    add("garbage", b"\x00\xffnot msgpack at all")
    add("empty", b"")
    add("unknown-cat", frame("unknown-cat", category="nope"))
    # make_frame refuses a mismatched pair, so build it by hand, as a buggy producer might.
    good = make_frame(rgb, xyz, frame_id="mismatch", line=s.line, camera="c", seq=0, category="disc")
    add("mismatch", pack_frame(good.model_copy(update={"xyz": encode_xyz(np.zeros((40, 51, 3), np.float32))})))
    add(
        "huge",
        frame(
            "huge",
            rgb=np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8),
            xyz=np.zeros((300, 300, 3), np.float32),
            rgb_encoding="raw",
        ),
    )
    import msgpack

    add("v2", msgpack.packb({"v": 2, "type": "frame", "frame_id": "v2"}))
    add("other-line", frame("other-line", line=s.line + "-other"))
    add("good", frame("good"))
    worker = Worker(s, ModelRegistry({"disc": StandInInspector(1)}), r=r, limits=Limits(max_message_bytes=100_000))
    assert worker.run(max_frames=8, idle_exit_s=3) == 8
    by_id = {x.frame_id: x for x in _results(r, s)}
    assert set(by_id) == {"garbage", "empty", "unknown-cat", "mismatch", "huge", "v2", "other-line", "good"}
    assert {x.line for x in by_id.values()} == {s.line}  # every result names the line whose stream it is on
    codes = {fid: (x.error.code if x.error else x.verdict) for fid, x in by_id.items()}
    assert codes == {
        "garbage": "bad_msgpack",
        "empty": "invalid",
        "unknown-cat": "unknown_category",
        "mismatch": "shape_mismatch",
        "huge": "too_large",
        "v2": "unsupported_version",
        "other-line": "invalid",
        "good": "ok",
    }
    dead = {f[b"frame_id"].decode(): f for _, f in r.xrange(s.streams.key(s.line, "dead"))}
    assert set(dead) == set(by_id) - {"good"}
    assert dead["garbage"][b"payload"] == b"\x00\xffnot msgpack at all"  # the original, for inspection
    assert dead["v2"][b"reason"] == b"unsupported_version"
    assert r.xpending(frames_key, s.streams.group)["pending"] == 0  # nothing left hanging


def _spawn_worker(settings, *extra: str, consumer: str) -> subprocess.Popen:
    env = dict(os.environ, REDIS_URL=settings.redis.url, CRD_LINE=settings.line, PYTHONUNBUFFERED="1")
    env.pop("CRD_REDIS__URL", None)
    cmd = [sys.executable, "-m", "crd_model.cli", "work", "--consumer", consumer, "--plain-logs", *extra]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _produce(settings, r, n: int) -> list[str]:
    producer = Producer(_fast(settings), camera="c", r=r)
    rgb = np.zeros((32, 32, 3), np.uint8)
    xyz = np.zeros((32, 32, 3), np.float32)
    producer.run([SourceFrame(rgb, xyz, "disc") for _ in range(n)])
    return [f"c:{producer.boot}:{i}" for i in range(n)]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    out, todo = [], list(children.get(pid, []))
    while todo:
        out.append(todo.pop())
        todo.extend(children.get(out[-1], []))
    return out


def _shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("psm_*")}


@pytest.mark.parametrize("decode_processes", ["0", "2"], ids=["threads", "processes"])
def test_a_killed_worker_loses_nothing_and_nothing_is_published_twice(settings, r, decode_processes):
    n = 24
    ids = _produce(settings, r, n)
    frames_key = settings.streams.key(settings.line, "frames")
    results_key = settings.streams.key(settings.line, "results")
    # Slow stand-in model: 400 ms per batch of 4, so the kill lands with a batch in flight.
    slow = ("--stand-in-latency-ms", "400", "--max-batch", "4", "--claim-idle-ms", "1000")
    segments_before = _shm_segments()
    w1 = _spawn_worker(settings, *slow, "--decode-processes", decode_processes, consumer="w1")
    try:
        _wait(lambda: r.xlen(results_key) >= 4, 60, "first results from w1")
        _wait(
            lambda: any(
                c["name"] in (b"w1", "w1") and c["pending"] > 0
                for c in r.xinfo_consumers(frames_key, settings.streams.group)
            ),
            10,
            "w1 mid-batch",
        )
        helpers = _descendants(w1.pid)  # decode processes, their fork server, the resource tracker
        assert len(helpers) >= (4 if decode_processes == "2" else 0)
        w1.send_signal(signal.SIGKILL)
        w1.wait(timeout=10)
    finally:
        if w1.poll() is None:
            w1.kill()
    # Nothing of the killed worker lives on: its processes follow it, its shared memory is removed.
    _wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in helpers), 15, "w1's processes to exit")
    _wait(lambda: not (_shm_segments() - segments_before), 15, "w1's shared memory to be removed")
    left_pending = r.xpending(frames_key, settings.streams.group)["pending"]
    assert left_pending > 0  # the kill really left frames in flight
    w2 = _spawn_worker(settings, "--stand-in-latency-ms", "5", "--claim-idle-ms", "1000", consumer="w2")
    try:
        _wait(lambda: r.xlen(results_key) >= n, 90, "all results")
        time.sleep(1.5)  # anything published twice would show up now
    finally:
        w2.send_signal(signal.SIGTERM)
        w2.wait(timeout=30)
    results = _results(r, settings)
    assert sorted(x.frame_id for x in results) == sorted(ids)  # exactly n, none twice
    assert any(x.deliveries >= 2 and x.worker == "w2" for x in results)  # reclaimed from the dead one
    assert r.xpending(frames_key, settings.streams.group)["pending"] == 0


def test_sigterm_finishes_the_batch_in_hand_then_exits(settings, r):
    n = 40
    _produce(settings, r, n)
    frames_key = settings.streams.key(settings.line, "frames")
    results_key = settings.streams.key(settings.line, "results")
    w = _spawn_worker(settings, "--stand-in-latency-ms", "300", "--max-batch", "4", consumer="w1")
    _wait(lambda: r.xlen(results_key) >= 4, 60, "first results")
    w.send_signal(signal.SIGTERM)
    out, _ = w.communicate(timeout=30)
    assert w.returncode == 0, out.decode()[-2000:]
    # Everything the worker took was finished: no pending entries, one result per delivered frame.
    groups = {g["name"].decode(): g for g in r.xinfo_groups(frames_key)}
    group = groups[settings.streams.group]
    assert group["pending"] == 0
    delivered = len(r.xrange(frames_key, "-", group["last-delivered-id"]))
    assert r.xlen(results_key) == delivered < n  # it stopped early, and drained what it had


def test_one_worker_serves_several_categories_and_batches_dynamically(settings, r):
    s = _fast(settings, max_batch=8, max_wait_ms=200)
    frames_key = s.streams.key(s.line, "frames")
    ensure_group(r, frames_key, s.streams.group)
    producer = Producer(s, camera="c", r=r)
    rgb = np.zeros((32, 32, 3), np.uint8)
    xyz = np.zeros((32, 32, 3), np.float32)
    cats = ["disc", "rod"] * 6
    seen: dict[str, list[int]] = {"disc": [], "rod": []}

    class Recording(StandInInspector):
        def __init__(self, name: str):
            super().__init__(1)
            self.name = name

        def forward(self, inputs):
            seen[self.name].append(len(inputs))
            return super().forward(inputs)

    registry = ModelRegistry({"disc": Recording("disc"), "rod": Recording("rod")})
    worker = Worker(s, registry, r=r)
    thread = threading.Thread(target=worker.run, kwargs=dict(max_frames=12, idle_exit_s=3))
    thread.start()
    time.sleep(0.5)  # the worker is blocked on an empty stream; frames now arrive 5 ms apart
    for c in cats:
        producer.send(SourceFrame(rgb, xyz, c))
        time.sleep(0.005)
    thread.join(timeout=30)
    results = _results(r, s)
    assert len(results) == 12
    assert {x.model_id for x in results} == {"stand-in-sleep-1ms"}
    assert sum(seen["disc"]) == 6 and sum(seen["rod"]) == 6
    # max_wait_ms lets the batch fill instead of running frame by frame.
    assert max(seen["disc"]) > 1


def test_metrics_and_health_endpoints(settings, r):
    import urllib.error
    import urllib.request

    obs = settings.observability.model_copy(update={"http_port": 0, "http_host": "127.0.0.1"})
    s = _fast(settings).model_copy(update={"observability": obs})
    _produce(s, r, 3)
    worker = Worker(s, ModelRegistry({"disc": StandInInspector(1)}), r=r)
    thread = threading.Thread(target=worker.run, kwargs=dict(idle_exit_s=4))
    thread.start()
    _wait(lambda: worker.http_server is not None and worker.published == 3, 20, "worker serving")
    base = f"http://127.0.0.1:{worker.http_server.server_address[1]}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    assert get("/healthz")[0] == 200
    assert get("/readyz")[0] == 200
    status, body = get("/metrics")
    assert status == 200 and 'crd_worker_frames_total{verdict="ok"} 3.0' in body
    assert "crd_worker_batch_size_bucket" in body
    assert get("/nope")[0] == 404
    thread.join(timeout=20)


class _CollectingStandIn(StandInInspector):
    """Notes, at each batch, how many objects are frozen out of the garbage collector, and runs a full
    collection (the kind that paused every thread for 100+ ms with start-up's objects in sight)."""

    def __init__(self) -> None:
        super().__init__(1)
        self.frozen: list[int] = []

    def forward(self, inputs):
        import gc

        self.frozen.append(gc.get_freeze_count())
        gc.collect()
        return super().forward(inputs)


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "off"])
def test_startup_objects_are_frozen_while_serving_and_collections_are_measured(settings, r, freeze):
    import gc

    s = _fast(settings, freeze_startup_objects=freeze)
    _produce(s, r, 3)
    inspector = _CollectingStandIn()
    worker = Worker(s, ModelRegistry({"disc": inspector}), r=r)
    alive_before = len(gc.get_objects())
    assert worker.run(max_frames=3) == 3
    if freeze:  # everything alive when serving began: torch, the registry, this test's process
        assert min(inspector.frozen) > alive_before // 2, (inspector.frozen, alive_before)
    else:
        assert max(inspector.frozen) == 0
    assert gc.get_freeze_count() == 0  # thawed when the worker stopped
    body = worker.metrics.gc_pauses.labels("2").collect()[0].samples
    count = next(x.value for x in body if x.name.endswith("_count"))
    assert count >= len(inspector.frozen), body


def test_a_model_set_swapped_out_is_freed_while_startup_objects_stay_frozen(settings, r):
    """A model held only by a reference cycle is freed by the cyclic collector alone: frozen with the
    rest of start-up, it would stay in memory (a GPU's too) for good after a swap."""
    import gc
    import weakref

    from workers import collector

    old = StandInInspector(1)
    old.cycle = old  # type: ignore[attr-defined]  # reachable only through itself once swapped out
    gone = weakref.ref(old)
    worker = Worker(_fast(settings), ModelRegistry({"disc": old}), r=r)
    del old
    try:
        collector.freeze()  # what run() does when serving starts
        worker._next_models = ModelRegistry({"disc": StandInInspector(1)})
        worker._swap_models()
        gc.collect()
        assert gone() is None, "the swapped-out model is still alive"
        assert gc.get_freeze_count() > 0  # the new set and the rest of start-up: frozen again
    finally:
        collector.thaw()
        if worker.hostpool is not None:
            worker.hostpool.close()


def test_a_frame_redelivered_too_often_is_dead_lettered_with_an_error_result(settings, r):
    """A poison frame (it keeps killing workers) stops after max_deliveries, and its PLC gets an answer."""
    s = _fast(settings, claim_idle_ms=100, max_deliveries=3)
    frames_key = s.streams.key(s.line, "frames")
    (fid,) = _produce(s, r, 1)
    entry = r.xreadgroup(s.streams.group, "crashed-worker", {frames_key: ">"}, count=1)[0][1][0][0]
    # As if three workers had taken it and died: its delivery count is now 3.
    r.xclaim(frames_key, s.streams.group, "crashed-worker", 0, [entry], retrycount=3)
    time.sleep(0.2)
    worker = Worker(s, ModelRegistry({"disc": StandInInspector(1)}), r=r)
    assert worker.run(max_frames=1, idle_exit_s=3) == 1
    (result,) = _results(r, s)
    assert result.frame_id == fid and result.verdict == "error" and result.error.code == "max_deliveries"
    assert result.deliveries == 4
    ((_, dead),) = r.xrange(s.streams.key(s.line, "dead"))
    assert dead[b"reason"] == b"max_deliveries" and dead[b"deliveries"] == b"4"
    assert r.xpending(frames_key, s.streams.group)["pending"] == 0


class _Recording(StandInInspector):
    """The stand-in model, recording each batch's size and when it ran."""

    def __init__(self, latency_ms: float = 1.0):
        super().__init__(latency_ms)
        self.batches: list[tuple[int, float]] = []

    def forward(self, inputs):
        self.batches.append((len(inputs), time.time()))
        return super().forward(inputs)


def test_one_worker_serves_several_lines_with_results_on_each_lines_own_stream(settings, r):
    lines = [f"{settings.line}a", f"{settings.line}b", f"{settings.line}c"]
    s = _fast(settings, max_batch=8, lines=lines)
    rgb = np.zeros((24, 24, 3), np.uint8)
    xyz = np.zeros((24, 24, 3), np.float32)
    sent = {}
    for k, line in enumerate(lines):
        producer = Producer(s.model_copy(update={"line": line}), camera=f"cam{k}", r=r)
        sent[line] = [producer.send(SourceFrame(rgb, xyz, "disc")) for _ in range(4 + k)]
    model = _Recording()
    worker = Worker(s, ModelRegistry({"disc": model}), r=r)
    assert worker.run(max_frames=sum(len(v) for v in sent.values()), idle_exit_s=3) == 15
    try:
        for line in lines:
            results = [unpack_result(f[F_PAYLOAD]) for _, f in r.xrange(s.streams.key(line, "results"))]
            assert sorted(x.frame_id for x in results) == sorted(sent[line])  # each once, on its own line
            assert {x.line for x in results} == {line}
            assert r.xpending(s.streams.key(line, "frames"), s.streams.group)["pending"] == 0
        assert max(n for n, _ in model.batches) > 1
    finally:
        for line in lines:
            r.delete(*(s.streams.key(line, kind) for kind in ("frames", "results", "dead")))


def test_a_frame_waits_at_most_max_wait_ms_for_its_batch(settings, r):
    s = _fast(settings, max_batch=64, max_wait_ms=300)
    frames_key = s.streams.key(s.line, "frames")
    ensure_group(r, frames_key, s.streams.group)
    producer = Producer(s, camera="c", r=r)
    model = _Recording()
    worker = Worker(s, ModelRegistry({"disc": model}), r=r)
    thread = threading.Thread(target=worker.run, kwargs=dict(max_frames=3, idle_exit_s=3))
    thread.start()
    time.sleep(0.5)  # the worker waits on an empty stream
    rgb, xyz = np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.float32)
    for _ in range(3):
        producer.send(SourceFrame(rgb, xyz, "disc"))
        time.sleep(0.02)
    thread.join(timeout=30)
    results = _results(r, s)
    assert len(results) == 3
    # The three frames arrived within the wait and went as one batch; the batch did not wait to fill 64.
    assert [n for n, _ in model.batches] == [3]
    ran_at = model.batches[0][1]
    waited = ran_at - min(x.timings.started_at for x in results)
    assert 0.2 < waited < 0.3 + 0.25  # max_wait_ms after the first frame was read, plus scheduling


def test_while_the_device_is_behind_the_next_batch_keeps_filling(settings, r):
    # A slow model (400 ms a batch) and frames every 15 ms: once one batch runs and the next waits for
    # the device, the third does not close at max_wait_ms and queue as a small batch; it fills until
    # the device can take it, so a busy worker runs fewer, larger batches.
    s = _fast(settings, max_batch=64, max_wait_ms=50)
    frames_key = s.streams.key(s.line, "frames")
    ensure_group(r, frames_key, s.streams.group)
    producer = Producer(s, camera="c", r=r)
    model = _Recording(latency_ms=400)
    worker = Worker(s, ModelRegistry({"disc": model}), r=r)
    n = 14
    thread = threading.Thread(target=worker.run, kwargs=dict(max_frames=n, idle_exit_s=3))
    thread.start()
    time.sleep(0.5)
    rgb, xyz = np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.float32)
    producer.send(SourceFrame(rgb, xyz, "disc"))
    time.sleep(0.15)  # batch 1 (one frame) is on the device now
    for _ in range(n - 1):
        producer.send(SourceFrame(rgb, xyz, "disc"))
        time.sleep(0.015)
    thread.join(timeout=30)
    sizes = [k for k, _ in model.batches]
    assert sum(sizes) == n and len(_results(r, s)) == n
    # Batch 2 closes at its deadline (the device side could take it); everything after it waits for the
    # device in one batch instead of several small ones.
    assert len(sizes) == 3 and sizes[0] == 1 and sizes[2] >= n - 1 - sizes[1] and sizes[1] <= 4, sizes


@pytest.mark.parametrize("decode_processes", [0, 2], ids=["threads", "processes"])
def test_a_batch_holds_no_more_decoded_bytes_than_its_cap(settings, r, decode_processes):
    # A 64x64 frame decodes to 64 * 64 * 15 = 61,440 bytes: with a 0.1 MB cap two never share a batch,
    # and the 128x128 frame (245,760 bytes, over the cap on its own, so larger than a decode process's
    # shared-memory slab) is inspected alone.
    s = _fast(settings, max_batch=16, max_wait_ms=200, max_batch_decoded_mb=0.1, decode_processes=decode_processes)
    frames_key = s.streams.key(s.line, "frames")
    ensure_group(r, frames_key, s.streams.group)
    producer = Producer(s, camera="c", r=r)
    for side in (64, 64, 128, 64):
        producer.send(SourceFrame(np.zeros((side, side, 3), np.uint8), np.zeros((side, side, 3), np.float32), "disc"))
    model = _Recording()
    worker = Worker(s, ModelRegistry({"disc": model}), r=r)
    assert worker.run(max_frames=4, idle_exit_s=3) == 4
    assert [n for n, _ in model.batches] == [1, 1, 1, 1]
    assert len(_results(r, s)) == 4


def _send(producer, n: int, category: str = "disc") -> list[str]:
    rgb, xyz = np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.float32)
    return [producer.send(SourceFrame(rgb, xyz, category)) for _ in range(n)]


def _wait_results(r, s, n: int, timeout: float = 30) -> list:
    _wait(lambda: r.xlen(s.streams.key(s.line, "results")) >= n, timeout, f"{n} results")
    return _results(r, s)


def test_the_worker_recreates_a_lost_consumer_group(settings, r):
    s = _fast(settings, max_batch=4)
    producer = Producer(s, camera="c", r=r)
    sent = _send(producer, 3)
    worker = Worker(s, ModelRegistry({"disc": StandInInspector(1)}), r=r)
    thread = threading.Thread(target=worker.run, kwargs=dict(max_frames=6, idle_exit_s=10))
    thread.start()
    _wait_results(r, s, 3)
    # The server lost the group (a restart without persistence, a FLUSHALL, an operator's mistake).
    r.xgroup_destroy(s.streams.key(s.line, "frames"), s.streams.group)
    time.sleep(0.5)
    sent += _send(producer, 3)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert sorted(x.frame_id for x in _results(r, s)) == sorted(sent)


def test_the_worker_rides_out_a_redis_outage_and_loses_nothing(tmp_path):
    from crd_model.stream.redis_streams import connect
    from tests.servers import DurableValkey

    server = DurableValkey(tmp_path)
    s = _fast(server.settings("outage", socket_timeout_s=2.0), max_batch=4)
    r = connect(s.redis)
    sent = _send(Producer(s, camera="c", r=r), 4)
    worker = Worker(s, ModelRegistry({"disc": StandInInspector(50)}), r=r)
    thread = threading.Thread(target=worker.run, kwargs=dict(max_frames=12, idle_exit_s=20))
    thread.start()
    _wait(lambda: r.xlen(s.streams.key(s.line, "results")) >= 2, 30, "first results")
    server.stop()
    time.sleep(1.5)
    assert thread.is_alive() and not worker.health.ready  # alive, retrying, reported not ready
    server.start()
    try:
        sent += _send(Producer(s, camera="c", r=r), 8)  # the line goes on after the outage
        thread.join(timeout=60)
        assert not thread.is_alive()
        results = _results(r, s)
        assert sorted(x.frame_id for x in results) == sorted(sent)  # every frame once
        assert r.xpending(s.streams.key(s.line, "frames"), s.streams.group)["pending"] == 0
    finally:
        server.stop()


def test_a_batch_whose_inference_raises_stays_pending_and_is_retried(settings, r):
    s = _fast(settings, max_batch=4, claim_idle_ms=300, claim_every_s=0.1)
    sent = _send(Producer(s, camera="c", r=r), 3)

    class FailsOnce(StandInInspector):
        calls, failed_batch = 0, 0

        def forward(self, inputs):
            FailsOnce.calls += 1
            if FailsOnce.calls == 1:
                FailsOnce.failed_batch = len(inputs)
                raise RuntimeError("CUDA out of memory (simulated)")
            return super().forward(inputs)

    worker = Worker(s, ModelRegistry({"disc": FailsOnce(1)}), r=r)
    assert worker.run(max_frames=3, idle_exit_s=5) == 3
    results = _results(r, s)
    assert sorted(x.frame_id for x in results) == sorted(sent)  # each once, after the retry
    assert all(x.verdict == "ok" for x in results)
    # How the three frames split into batches depends on decode timing; the failed batch's frames,
    # and only those, come back on a second delivery.
    retried = sorted(x.deliveries for x in results)
    assert FailsOnce.failed_batch >= 1
    assert retried == [1] * (3 - FailsOnce.failed_batch) + [2] * FailsOnce.failed_batch


def test_a_clean_exit_leaves_the_group_but_a_consumer_with_pending_frames_stays(settings, r):
    s = _fast(settings, max_batch=4)
    key = s.streams.key(s.line, "frames")
    _send(Producer(s, camera="c", r=r), 2)
    worker = Worker(s.model_copy(update={"worker": s.worker.model_copy(update={"consumer": "leaver"})}),
                    ModelRegistry({"disc": StandInInspector(1)}), r=r)  # fmt: skip
    assert worker.run(max_frames=2, idle_exit_s=3) == 2
    assert "leaver" not in {c["name"].decode() for c in r.xinfo_consumers(key, s.streams.group)}
    # A consumer that still holds a frame must stay, so XAUTOCLAIM can find the frame.
    _send(Producer(s, camera="c2", r=r), 1)
    r.xreadgroup(s.streams.group, "holder", {key: ">"}, count=1)
    worker = Worker(s.model_copy(update={"worker": s.worker.model_copy(update={"consumer": "holder"})}),
                    ModelRegistry({"disc": StandInInspector(1)}), r=r)  # fmt: skip
    worker._leave_group(s.line)
    assert "holder" in {c["name"].decode() for c in r.xinfo_consumers(key, s.streams.group)}


def _variant(checkpoint: Path, out: Path) -> str:
    """A copy of a checkpoint with slightly different weights: another model id, near-identical scores."""
    import torch

    from crd_model.checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(checkpoint)
    with torch.no_grad():
        next(model.branches.parameters()).mul_(1.01)
    return save_checkpoint(out, model, meta).model_id


def test_models_roll_out_without_a_stop_and_a_candidate_scores_in_shadow(settings, r, tiny_data, tiny_checkpoint,
                                                                          tmp_path):  # fmt: skip
    import json

    from crd_model.stream.shadow_report import compare, read_results

    b_id = _variant(tiny_checkpoint, tmp_path / "b")
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps({"models": {TINY_CATEGORY: str(tiny_checkpoint)}}))
    s = _fast(settings, max_batch=4, models_file=models_file, reload_check_s=30)

    def load(models, shadow_models):
        return ModelRegistry.load(models, "cpu", shadow_models=shadow_models)

    worker = Worker(s, load({TINY_CATEGORY: tiny_checkpoint}, {}), r=r, loader=load)
    a_id = worker.models.get(TINY_CATEGORY).model_id
    thread = threading.Thread(target=worker.run, kwargs=dict(max_frames=12, idle_exit_s=60))
    thread.start()
    producer = Producer(s, camera="cam", r=r)
    frames = iter(ReplaySource(tiny_data, TINY_CATEGORY, "test", loop=True))
    sent = [producer.send(next(frames)) for _ in range(6)]
    _wait(lambda: r.xlen(s.streams.key(s.line, "results")) >= 6, 120, "results of the first model")
    # The new model goes live, the old one stays on as the shadow; SIGHUP (reload()) says: look now.
    models_file.write_text(json.dumps({"models": {TINY_CATEGORY: str(tmp_path / "b")},
                                       "shadow_models": {TINY_CATEGORY: str(tiny_checkpoint)}}))  # fmt: skip
    worker.reload()
    _wait(lambda: worker.metrics.model_swaps._value.get() == 1, 120, "the swap")
    sent += [producer.send(next(frames)) for _ in range(6)]
    thread.join(timeout=120)
    assert not thread.is_alive()
    results = _results(r, s)
    assert sorted(x.frame_id for x in results) == sorted(sent)  # every frame once across the swap
    by_id = {x.frame_id: x for x in results}
    before, after = [by_id[f] for f in sent[:6]], [by_id[f] for f in sent[6:]]
    assert {x.model_id for x in before} == {a_id} and all(x.shadow is None for x in before)
    assert {x.model_id for x in after} == {b_id} and {x.shadow.model_id for x in after} == {a_id}
    for x in after:  # the verdict is the live model's; the shadow only reports
        assert x.verdict == ("anomalous" if x.score >= x.threshold else "ok")
        assert x.shadow.verdict == ("anomalous" if x.shadow.score >= x.shadow.threshold else "ok")
    report = compare(read_results(r, s.streams.key(s.line, "results")), s.line)
    assert report.compared == 6 and report.candidate_models == {a_id: 6}
    assert report.both_reject + report.live_only + report.candidate_only + report.both_pass == 6
    assert report.pearson > 0.9  # near-identical weights score near-identically


def test_a_broken_model_set_is_refused_and_the_live_models_keep_serving(settings, r, tmp_path):
    import json

    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps({"models": {"disc": "/nonexistent"}}))
    s = _fast(settings, max_batch=4, models_file=models_file, reload_check_s=0.1)

    def load(models, shadow_models):
        raise FileNotFoundError(f"not a checkpoint directory: {models}")

    worker = Worker(s, ModelRegistry({"disc": StandInInspector(1)}), r=r, loader=load)
    worker.models_file.loaded_fingerprint = None  # as if the file changed after start
    thread = threading.Thread(target=worker.run, kwargs=dict(max_frames=3, idle_exit_s=10))
    thread.start()
    _wait(lambda: worker.metrics.reload_failures._value.get() >= 1, 30, "the failed reload")
    time.sleep(0.5)  # five more checks of the unchanged file: the failure is reported once per change
    assert worker.metrics.reload_failures._value.get() == 1
    sent = _send(Producer(s, camera="c", r=r), 3)
    thread.join(timeout=60)
    assert sorted(x.frame_id for x in _results(r, s)) == sorted(sent)
    assert {x.model_id for x in _results(r, s)} == {"stand-in-sleep-1ms"}


def test_a_frame_over_the_workers_pixel_bound_is_refused_before_decoding(settings, r):
    s = _fast(settings, max_batch=4, max_frame_pixels=32 * 32)
    producer = Producer(s, camera="c", r=r)
    small = producer.send(SourceFrame(np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.float32), "disc"))
    big = producer.send(SourceFrame(np.zeros((40, 50, 3), np.uint8), np.zeros((40, 50, 3), np.float32), "disc"))
    worker = Worker(s, ModelRegistry({"disc": StandInInspector(1)}), r=r)
    assert worker.run(max_frames=2, idle_exit_s=3) == 2
    by_id = {x.frame_id: x for x in _results(r, s)}
    assert by_id[small].verdict == "ok"
    assert by_id[big].verdict == "error" and by_id[big].error.code == "too_large"
    assert "max_frame_pixels" in by_id[big].error.message


def test_an_idle_worker_reads_within_its_socket_timeout(settings, tiny_checkpoint):
    # A blocking read longer than the socket timeout would end every idle read in a TimeoutError and a
    # reconnect (the worker reported Redis unreachable while it was only idle).
    from structlog.testing import capture_logs

    s = _fast(settings, block_ms=2000)
    s = s.model_copy(update={"redis": s.redis.model_copy(update={"socket_timeout_s": 1.0})})
    worker = Worker(s, ModelRegistry({TINY_CATEGORY: Inspector(tiny_checkpoint, "cpu")}))
    with capture_logs() as logs:
        assert worker.run(idle_exit_s=3) == 0
    assert [e for e in logs if e["event"] == "redis_unavailable"] == [], [(e["event"], e.get("error")) for e in logs]
