"""Producers against a real server: backpressure, sources, rate, reconnects."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import redis

from crd_model.data.mvtec3d import list_samples
from crd_model.stream import frame_arrays, unpack_frame
from crd_model.stream.redis_streams import F_PAYLOAD, ensure_group, outstanding
from producers.producer import Producer
from producers.sources import ReplaySource, SourceFrame, SyntheticSource, WatchFolderSource
from tests.conftest import TINY_CATEGORY


def _frames(n: int) -> list[SourceFrame]:
    rgb = np.zeros((16, 16, 3), np.uint8)
    xyz = np.zeros((16, 16, 3), np.float32)
    return [SourceFrame(rgb, xyz, "disc") for _ in range(n)]


def _settings(settings, **producer):
    p = settings.producer.model_copy(update=dict(dict(fps=1000.0), **producer))
    return settings.model_copy(update={"producer": p})


def test_backpressure_holds_the_producer_until_workers_catch_up(settings, r):
    s = _settings(settings, max_outstanding=5, backpressure="block", backpressure_poll_s=0.02)
    key = s.streams.key(s.line, "frames")
    producer = Producer(s, camera="c", r=r)
    thread = threading.Thread(target=producer.run, args=(_frames(12),))
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive() and r.xlen(key) == 5  # held at the limit, nothing dropped
    # A consumer finishes three frames: exactly three more may go.
    entries = r.xreadgroup(s.streams.group, "w", {key: ">"}, count=3)[0][1]
    r.xack(key, s.streams.group, *[e[0] for e in entries])
    time.sleep(0.5)
    assert r.xlen(key) == 8 and thread.is_alive()
    while thread.is_alive():  # drain everything
        entries = r.xreadgroup(s.streams.group, "w", {key: ">"}, count=10, block=100)
        if entries:
            r.xack(key, s.streams.group, *[e[0] for e in entries[0][1]])
    thread.join(timeout=10)
    assert producer.sent == 12 and r.xlen(key) == 12
    assert producer.metrics.backpressure_seconds._value.get() > 0.9


def test_slow_policy_slows_down_but_keeps_sending(settings, r):
    s = _settings(settings, max_outstanding=2, backpressure="slow", backpressure_poll_s=0.05)
    producer = Producer(s, camera="c", r=r)
    t = time.monotonic()
    assert producer.run(_frames(6)) == 6
    assert time.monotonic() - t > 0.2  # it paused for the overshoot
    assert outstanding(r, s.streams.key(s.line, "frames"), s.streams.group, 100) == 6


def test_fixed_rate(settings, r):
    s = _settings(settings, fps=20.0)
    producer = Producer(s, camera="c", r=r)
    t = time.monotonic()
    producer.run(_frames(11))
    assert 0.45 < time.monotonic() - t < 1.5  # 10 intervals of 50 ms


def test_replay_source_sends_real_pairs(settings, r, tiny_data):
    s = _settings(settings)
    producer = Producer(s, camera="c", r=r)
    assert producer.run(ReplaySource(tiny_data, TINY_CATEGORY, "test"), max_frames=3) == 3
    (_, fields), *_ = r.xrange(s.streams.key(s.line, "frames"))
    frame = unpack_frame(fields[F_PAYLOAD])
    rgb, xyz = frame_arrays(frame)
    assert frame.category == TINY_CATEGORY and frame.meta["path"].startswith("test/")
    assert rgb.dtype == np.uint8 and xyz.dtype == np.float32 and rgb.shape[:2] == xyz.shape[:2]


def test_synthetic_source_is_a_live_camera(settings, r):
    producer = Producer(_settings(settings), camera="c", r=r)
    assert producer.run(SyntheticSource("rod", seed=1, anomaly_rate=0.5), max_frames=4) == 4


def test_watch_folder_sends_settled_pairs_once(settings, r, tiny_data, tmp_path):
    src = tiny_data / TINY_CATEGORY / "validation" / "good"
    watch = tmp_path / "drop"
    producer = Producer(_settings(settings), camera="c", r=r)
    source = WatchFolderSource(watch, TINY_CATEGORY, settle_s=0.2, poll_s=0.05, stop=producer.stopping.is_set)
    thread = threading.Thread(target=producer.run, args=(source,), kwargs=dict(max_frames=2))
    thread.start()
    shutil.copy(src / "rgb" / "000.png", watch / "rgb" / "a.png")  # xyz not there yet: must wait
    time.sleep(0.5)
    assert r.xlen(settings.streams.key(settings.line, "frames")) == 0
    shutil.copy(src / "xyz" / "000.tiff", watch / "xyz" / "a.tiff")
    shutil.copy(src / "rgb" / "001.png", watch / "rgb" / "b.png")
    shutil.copy(src / "xyz" / "001.tiff", watch / "xyz" / "b.tiff")
    thread.join(timeout=10)
    assert not thread.is_alive() and producer.sent == 2
    assert sorted(p.name for p in (watch / "sent" / "rgb").iterdir()) == ["a.png", "b.png"]
    assert not list((watch / "rgb").iterdir())  # moved away: a restart does not resend them


def test_producer_rides_out_a_server_restart(tmp_path):
    """Reconnect with backoff: the frame in flight during an outage is retried, never dropped or doubled."""
    from crd_model.stream.redis_streams import connect
    from tests.servers import DurableValkey

    server = DurableValkey(tmp_path)  # the restarted server has every write it acknowledged
    s = server.settings("restart", socket_timeout_s=1.0)
    s = s.model_copy(update={"producer": s.producer.model_copy(update={"fps": 20.0, "reconnect_max_backoff_s": 0.2})})
    producer = Producer(s, camera="c")
    thread = threading.Thread(target=producer.run, args=(_frames(20),))
    thread.start()
    time.sleep(0.3)
    server.stop()
    time.sleep(1.0)
    assert thread.is_alive()
    server.start()
    try:
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert producer.sent == 20 and producer.metrics.reconnects._value.get() >= 1
        # Every frame is on the stream once, in order: the one in flight at the outage was retried.
        entries = connect(s.redis).xrange(s.streams.key(s.line, "frames"))
        ids = [f[b"frame_id"].decode() for _, f in entries]
        assert ids == [f"c:{producer.boot}:{i}" for i in range(20)]
    finally:
        server.stop()


def test_a_restarted_producer_continues_its_sequence_and_its_source(settings, r, tiny_data):
    first = Producer(settings, camera="cam3", r=r)
    assert first.run(ReplaySource(tiny_data, TINY_CATEGORY, "test"), max_frames=5) == 5
    # Killed and started again (a new process): same camera, same line.
    second = Producer(settings, camera="cam3", r=r)
    assert second.run(ReplaySource(tiny_data, TINY_CATEGORY, "test"), max_frames=4) == 4
    entries = r.xrange(settings.streams.key(settings.line, "frames"))
    frames = [unpack_frame(f[F_PAYLOAD]) for _, f in entries]
    assert [f.frame_id for f in frames] == [f"cam3:{first.boot}:{i}" for i in range(9)]
    assert [f.seq for f in frames] == list(range(9)) and second.boot == first.boot
    samples = list_samples(tiny_data, TINY_CATEGORY, "test")
    assert [f.meta["path"] for f in frames] == [x.relpath for x in samples[:9]]  # nothing skipped or resent


def test_a_send_retried_after_a_lost_reply_keeps_its_frame_id(settings, r):
    """The server did the XADD but the reply was lost: the producer resends the same frame (same id)."""
    producer = Producer(settings, camera="cam4", r=r)
    real_pipeline = r.pipeline
    lost = []

    def pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        execute = pipe.execute

        def execute_then_lose_reply(*a, **k):
            out = execute(*a, **k)
            if not lost:
                lost.append(out)
                raise redis.ConnectionError("reply lost")
            return out

        pipe.execute = execute_then_lose_reply
        return pipe

    r.pipeline = pipeline
    try:
        producer.send(SourceFrame(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.float32), "disc"))
    finally:
        r.pipeline = real_pipeline
    ids = [f[b"frame_id"].decode() for _, f in r.xrange(settings.streams.key(settings.line, "frames"))]
    assert ids == [f"cam4:{producer.boot}:0"] * 2  # two entries, one frame: the workers publish it once
    assert producer.seq == 1


def test_group_created_by_producer(settings, r):
    key = settings.streams.key(settings.line, "frames")
    Producer(_settings(settings), camera="c", r=r).run(_frames(1))
    # The producer created the group before its first frame, so the workers see every frame.
    groups = r.xinfo_groups(key)
    assert [g["name"] for g in groups] in ([settings.streams.group], [settings.streams.group.encode()])
    assert groups[0].get("lag", 1) == 1  # the frame is there for the group (Redis < 7 reports no lag)
    ensure_group(r, key, settings.streams.group)  # idempotent
    assert len(r.xinfo_groups(key)) == 1


def test_producer_side_never_imports_torch():
    """Camera PCs install the base distribution only: every module of the stream protocol package and of
    the producers, the data reader, the synthetic camera and the CLI's parser import without torch, timm,
    scipy or open3d. So do the plant consumers (PLC bridge, dashboard) with their extras."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys\n"
        "import crd_model.stream, producers, consumers, crd_model.cli, crd_model.data.mvtec3d, crd_model.data.synth\n"
        "for pkg in (crd_model.stream, producers, consumers):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "crd_model.cli.build_parser()\n"
        "heavy = [m for m in ('torch', 'timm', 'scipy', 'open3d') if m in sys.modules]\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_opt_in_downscale_and_float16_shrink_what_goes_on_the_wire(settings, r):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
    xyz = rng.random((600, 800, 3), dtype=np.float32) + 0.5
    xyz[rng.random((600, 800)) < 0.1] = 0.0
    sizes = {}
    for name, update in {
        "full": {},
        "small": {"downscale_max_side": 256},
        "small16": {"downscale_max_side": 256, "xyz_dtype": "float16"},
    }.items():
        s = settings.model_copy(update={"producer": settings.producer.model_copy(update=update)})
        Producer(s, camera=name, r=r).send(SourceFrame(rgb, xyz, "disc", {"k": 1}))
        _, fields = r.xrevrange(s.streams.key(s.line, "frames"), count=1)[0]
        sizes[name] = len(fields[F_PAYLOAD])
        frame = unpack_frame(fields[F_PAYLOAD])
        got_rgb, got_xyz = frame_arrays(frame)
        if name == "full":
            assert got_rgb.shape == (600, 800, 3) and "downscaled_from" not in frame.meta
            continue
        assert got_rgb.shape == got_xyz.shape == (192, 256, 3)
        assert frame.meta == {"k": 1, "downscaled_from": "600x800"}
        source = {tuple(p) for p in xyz.reshape(-1, 3).astype(got_xyz.dtype if name == "small" else np.float16)}
        sample = got_xyz.reshape(-1, 3)[::97]
        if name == "small":  # nearest neighbour: every point is a camera point (or missing), never a blend
            assert all(tuple(p) in source for p in sample)
    assert sizes["small"] < sizes["full"] / 5 and sizes["small16"] < sizes["small"]


def test_a_pair_that_cannot_be_read_goes_to_failed_with_its_reason(settings, r, tiny_data, tmp_path):
    src = tiny_data / TINY_CATEGORY / "validation" / "good"
    watch = tmp_path / "drop"
    producer = Producer(_settings(settings), camera="c", r=r)
    source = WatchFolderSource(watch, TINY_CATEGORY, settle_s=0.1, poll_s=0.05, stop=producer.stopping.is_set)
    (watch / "rgb" / "bad.png").write_bytes((src / "rgb" / "000.png").read_bytes()[:200])  # truncated
    shutil.copy(src / "xyz" / "000.tiff", watch / "xyz" / "bad.tiff")
    shutil.copy(src / "rgb" / "001.png", watch / "rgb" / "good.png")
    shutil.copy(src / "xyz" / "001.tiff", watch / "xyz" / "good.tiff")
    thread = threading.Thread(target=producer.run, args=(source,), kwargs=dict(max_frames=1))
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive() and producer.sent == 1
    assert sorted(p.name for p in (watch / "failed" / "rgb").iterdir()) == ["bad.png"]
    assert (watch / "failed" / "xyz" / "bad.tiff").is_file()
    reason = (watch / "failed" / "bad.error.txt").read_text()
    assert "bad.png" in reason  # the reason names the file
    (entry,) = r.xrange(settings.streams.key(settings.line, "frames"))
    assert unpack_frame(entry[1][F_PAYLOAD]).meta["path"] == "rgb/good.png"


def test_sigterm_stops_a_producer_after_the_frame_in_hand(settings, r):
    import os
    import signal
    import subprocess
    import sys

    env = dict(os.environ, REDIS_URL=settings.redis.url, CRD_LINE=settings.line, PYTHONUNBUFFERED="1")
    env.pop("CRD_REDIS__URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "crd_model.cli", "produce", "--camera", "term", "--source", "synthetic",
         "--category", "disc", "--fps", "20", "--plain-logs"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    key = settings.streams.key(settings.line, "frames")
    deadline = time.monotonic() + 60
    while r.xlen(key) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()[-2000:]
    sent = int(out.decode().rsplit("sent ", 1)[1].split()[0])
    # Every frame it counted as sent is on the stream, numbered without a gap, and nothing after.
    seqs = [unpack_frame(f[F_PAYLOAD]).seq for _, f in r.xrange(key)]
    assert sent >= 3 and seqs == list(range(sent))
    assert int(r.hget(settings.streams.producer_key(settings.line, "term"), "seq")) == sent - 1
