"""The worker's host pool: decoding in processes through shared memory, and results built there."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from crd_model.data.mvtec3d import list_samples, read_rgb, read_xyz
from crd_model.stream import (
    Limits,
    decode_map,
    decode_rgb,
    decode_xyz,
    encode_rgb,
    encode_xyz,
    make_frame,
    pack_frame,
    unpack_result,
)
from tests.conftest import TINY_CATEGORY
from workers.hostpool import ALIGN, SLABS, HostPool, slab_cost
from workers.processing import Item, WireMap, build_outcome, unpack_item


class _Categories:
    """What `unpack_item` asks of a model registry: which categories are served."""

    def __init__(self, *categories: str):
        self.categories = list(categories)

    def get(self, category: str):
        return object() if category in self.categories else None


def _item(payload: bytes, i: int = 0) -> Item:
    fields = {b"payload": payload, b"frame_id": f"f{i}".encode()}
    return unpack_item("L", f"1-{i}", fields, 1, _Categories("disc"), Limits(), 5)


def _payload(rgb: np.ndarray, xyz: np.ndarray, i: int = 0, **kw) -> bytes:
    return pack_frame(make_frame(rgb, xyz, frame_id=f"f{i}", line="L", camera="c", seq=i, category="disc", **kw))


@pytest.fixture
def pool():
    p = HostPool(2, 16 * 2**20, Limits())
    yield p
    p.close()


def _frames(tiny_data: Path, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    samples = list_samples(tiny_data, TINY_CATEGORY, "test")
    return [(read_rgb(s.rgb_path), read_xyz(s.xyz_path)) for s in (samples * n)[:n]]


def test_processes_decode_exactly_what_the_codecs_decode(pool, tiny_data):
    items, expected = [], []
    encodings = [dict(), dict(rgb_encoding="jpeg"), dict(xyz_dtype="float16"), dict(rgb_encoding="raw")]
    for i, (rgb, xyz) in enumerate(_frames(tiny_data, 8)):
        payload = _payload(rgb, xyz, i, **encodings[i % len(encodings)])
        items.append(_item(payload, i))
        frame = items[-1].frame
        expected.append((decode_rgb(frame.rgb), decode_xyz(frame.xyz)))
    pending = pool.decode(items, give_up=lambda: False)
    checked = []
    out = pending.wait(checked.append)
    assert len(checked) == len(items)  # every decoded frame goes through the model's check
    for it, (rgb, xyz) in zip(out, expected, strict=True):
        assert it.error is None
        assert it.rgb.dtype == np.uint8 and it.xyz.dtype == np.float32
        np.testing.assert_array_equal(it.rgb, rgb)
        np.testing.assert_array_equal(it.xyz, xyz)
        assert it.cpu["decode_rgb"] > 0 and it.cpu["decode_xyz"] > 0
    pending.release()
    assert all(it.rgb is None and it.xyz is None for it in out)  # no view of a reused slab survives


def test_a_bad_payload_fails_its_own_frame_only(pool):
    rgb, xyz = np.full((32, 40, 3), 7, np.uint8), np.ones((32, 40, 3), np.float32)
    good = _item(_payload(rgb, xyz, 0), 0)
    truncated = _item(_payload(rgb, xyz, 1), 1)
    png = truncated.frame.rgb
    truncated.frame = truncated.frame.model_copy(update={"rgb": png.model_copy(update={"data": png.data[:60]})})
    far = xyz.copy()
    far[3, 4] = 1e9
    out_of_range = _item(_payload(rgb, far, 2), 2)
    out = pool.decode([good, truncated, out_of_range], give_up=lambda: False).wait(lambda it: None)
    assert out[0].error is None and np.array_equal(out[0].rgb, rgb)
    assert out[1].error.code == "bad_rgb" and out[1].rgb is None
    assert out[2].error.code == "xyz_out_of_range" and "row 3, col 4" in out[2].error.message


def test_a_killed_pool_process_loses_no_frame(pool, tiny_data):
    restarts = []
    pool.on_restart = lambda: restarts.append(1)  # the worker counts crd_worker_decoder_restarts_total
    frames = _frames(tiny_data, 6)
    items = [_item(_payload(rgb, xyz, i), i) for i, (rgb, xyz) in enumerate(frames)]
    for pid in list(pool._executor._processes):  # the OOM killer, or a codec crash on an earlier frame
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    out = pool.decode(items, give_up=lambda: False).wait(lambda it: None)
    assert pool.restarts == 1 and restarts == [1]
    for it, (rgb, xyz) in zip(out, frames, strict=True):
        assert it.error is None
        np.testing.assert_array_equal(it.rgb, rgb)
        np.testing.assert_array_equal(it.xyz, xyz)


def test_slabs_are_reused_batch_after_batch_and_removed_on_close(tiny_data):
    pool = HostPool(1, 4 * 2**20, Limits())
    names = [s.name for s in pool._slabs]
    frames = _frames(tiny_data, 2)
    for batch in range(3 * SLABS):  # more batches than slabs: each must come back
        items = [_item(_payload(rgb, xyz, i), i) for i, (rgb, xyz) in enumerate(frames)]
        t0 = time.monotonic()
        pending = pool.decode(items, give_up=lambda t0=t0: time.monotonic() - t0 > 5)
        assert pending is not None, f"no free slab for batch {batch}"
        assert all(it.error is None for it in pending.wait(lambda it: None))
        pending.release()
    # All slabs taken and none released: the next batch waits, and gives up when told to.
    held = [pool.decode([_item(_payload(*frames[0]))], give_up=lambda: False) for _ in range(SLABS)]
    t = time.monotonic()
    assert pool.decode([_item(_payload(*frames[0]))], give_up=lambda: time.monotonic() - t > 0.3) is None
    for p in held:
        p.release()
    pool.close()
    for name in names:
        assert not Path("/dev/shm", name.lstrip("/")).exists()


def test_pool_processes_never_import_torch(pool):
    for pid in pool._executor._processes:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps, f"pool process {pid} loaded torch"


def test_a_frame_s_slab_cost_counts_its_payloads_and_its_decoded_arrays():
    rgb, xyz = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.float32)
    item = _item(_payload(rgb, xyz))
    decoded = 64 * 64 * 3 + 64 * 64 * 12
    encoded = len(item.frame.rgb.data) + len(item.frame.xyz.data)
    assert decoded + encoded <= slab_cost(item) < decoded + encoded + 4 * ALIGN


def test_results_built_in_the_pool_equal_results_built_here(pool):
    rng = np.random.default_rng(0)
    items = []
    for i, score in enumerate([0.2, 3.0, 5.0]):
        rgb, xyz = np.zeros((48, 64, 3), np.uint8), np.zeros((48, 64, 3), np.float32)
        it = _item(_payload(rgb, xyz, i), i)
        values = rng.random((48, 64)).astype(np.float32) * score
        values[10:20, 10:30] = score  # a region above the threshold when the frame is anomalous
        px = np.rint((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)
        it.wire_map = WireMap(values, px, float(values.min()), float(values.max()), (48, 64))
        it.score, it.threshold, it.model_id, it.model_version = score, 1.0, "m", "1"
        items.append(it)
    items.append(_item(b"\x00 not msgpack", 9))  # an error: built here, with its payload for the dead letter
    pooled = pool.build_outcomes(items, "w", region_min_area=4)
    assert [o.verdict for o in pooled] == ["ok", "anomalous", "anomalous", "error"]
    assert pooled[3].original_payload == b"\x00 not msgpack"
    for it, o in zip(items, pooled, strict=True):
        here = build_outcome(it, "w", 4)
        a, b = unpack_result(o.result_payload), unpack_result(here.result_payload)
        assert a.model_dump(exclude={"timings"}) == b.model_dump(exclude={"timings"})
        if a.anomaly_map is not None:
            np.testing.assert_array_equal(decode_map(a.anomaly_map), decode_map(b.anomaly_map))
    assert unpack_result(pooled[1].result_payload).regions  # regions were cut in the pool process


def test_encoders_round_trip_through_a_slab(pool):
    # Frames of different sizes in one batch land at aligned offsets and do not overlap.
    items = []
    sizes = [(17, 23), (64, 48), (9, 9), (33, 70)]
    for i, (h, w) in enumerate(sizes):
        rgb = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        xyz = np.random.default_rng(i).random((h, w, 3), dtype=np.float32)
        frame = make_frame(rgb, xyz, frame_id=f"f{i}", line="L", camera="c", seq=i, category="disc")
        frame = frame.model_copy(update={"rgb": encode_rgb(rgb), "xyz": encode_xyz(xyz)})
        items.append((_item(pack_frame(frame), i), rgb, xyz))
    out = pool.decode([it for it, _, _ in items], give_up=lambda: False).wait(lambda it: None)
    for it, (_, rgb, xyz) in zip(out, items, strict=True):
        np.testing.assert_array_equal(it.rgb, rgb)
        np.testing.assert_array_equal(it.xyz, xyz)
        assert it.rgb.ctypes.data % 64 == 0 and it.xyz.ctypes.data % 64 == 0


def test_the_default_is_processes_on_a_gpu_and_threads_on_a_cpu():
    from workers.worker import decode_processes

    assert decode_processes(None, ["cpu"]) == 0
    assert 1 <= decode_processes(None, ["cuda:0"]) <= 16
    assert decode_processes(3, ["cpu"]) == 3 and decode_processes(0, ["cuda:0"]) == 0


def test_a_dev_shm_too_small_for_the_slabs_falls_back_to_threads(settings, r, monkeypatch):
    from structlog.testing import capture_logs

    import workers.hostpool as hostpool
    from workers.models import ModelRegistry, StandInInspector
    from workers.worker import Worker

    s = settings.model_copy(update={"worker": settings.worker.model_copy(update={"decode_processes": 2})})
    assert hostpool.shm_shortfall(int(s.worker.max_batch_decoded_mb * 2**20)) == 0  # this machine's fits
    worker = Worker(s, ModelRegistry({"disc": StandInInspector(1)}), r=r)
    assert worker.hostpool is not None
    worker.hostpool.close()
    monkeypatch.setattr(hostpool, "shm_free_bytes", lambda: 64 * 2**20)  # Docker's default /dev/shm
    with capture_logs() as logs:
        worker = Worker(s, ModelRegistry({"disc": StandInInspector(1)}), r=r)
    assert worker.hostpool is None  # threads decode: a SIGBUS later would lose the batch in hand
    assert [x["missing_mb"] for x in logs if x["event"] == "shm_too_small"] == [3 * 512 - 64]


def test_the_slabs_are_reserved_at_start_and_a_failed_reservation_falls_back_to_threads(settings, r, monkeypatch):
    import errno

    from structlog.testing import capture_logs

    from workers.models import ModelRegistry, StandInInspector
    from workers.worker import Worker

    pool = HostPool(1, 8 * 2**20, Limits())
    try:  # the pages are allocated now (no SIGBUS on a later write, no first-touch faults per batch)
        for shm in pool._slabs:
            assert os.stat(Path("/dev/shm", shm.name.lstrip("/"))).st_blocks * 512 >= 8 * 2**20
    finally:
        pool.close()

    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)  # another pod filled the node's /dev/shm
    before = {p.name for p in Path("/dev/shm").glob("psm_*")}
    s = settings.model_copy(update={"worker": settings.worker.model_copy(update={"decode_processes": 2})})
    with capture_logs() as logs:
        worker = Worker(s, ModelRegistry({"disc": StandInInspector(1)}), r=r)
    assert worker.hostpool is None
    assert any(x["event"] == "shm_too_small" and "No space" in x["error"] for x in logs)
    assert {p.name for p in Path("/dev/shm").glob("psm_*")} == before  # the slabs it made are removed
