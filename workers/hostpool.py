"""The worker's host work in processes: frame decoding and result building, off the device loop's GIL.

Threads decoding PNG and zlib stop scaling near 900 frames/s on a 16-core host, whatever their number
(bench/decode_scaling.py): the GIL. With `decode_processes` > 0 the worker copies each batch's encoded
payloads into a shared-memory slab; a pool of processes decodes them into the same slab; the device
loop uploads the arrays from there. No pixels cross a pipe, only offsets and short status tuples.
Results (regions, the PNG map, msgpack) are built in the same processes.

Torch-free: the processes start from a fork server and never import torch. A process that dies
(a codec crash on a hostile payload, the OOM killer) breaks the pool: the pool is replaced and the
batch's frames are decoded again one at a time, so only the frame that kills a process gets an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import structlog

from crd_model.stream import Limits, PointMap, RGBImage
from workers.processing import Item, build_outcome, decode_pair, error_code, prepare_process
from workers.publish import Outcome

log = structlog.get_logger("crd.worker.hostpool")

ALIGN = 64  # byte alignment of every region of a slab (each dtype's view stays aligned)
SLABS = 3  # one batch being decoded, one waiting for the device, one on the device
_CRASH = "the decoding process died on this frame (a codec crash on its payload, or the OOM killer)"


def default_processes(workers_on_host: int = 1) -> int:
    """Pool processes for one GPU worker by default: the host's cores less two (the device loop and
    its threads), shared among the host's GPU workers, at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, (cores - 2) // max(1, workers_on_host)))


def shm_free_bytes() -> int | None:
    """Free bytes of the shared-memory file system (None where there is none to ask)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def shm_shortfall(slab_bytes: int) -> int:
    """Bytes missing in /dev/shm for the slabs (0: they fit). Slabs are allocated lazily, so a /dev/shm
    too small (Docker's default is 64 MiB) would fail later, as a SIGBUS on a write, not at start."""
    free = shm_free_bytes()
    return 0 if free is None else max(0, SLABS * slab_bytes - free)


def _reserve(shm: SharedMemory, nbytes: int) -> None:
    """Allocate the slab's pages now: a /dev/shm too small fails here (ENOSPC), at start, rather than
    as a SIGBUS on some later write; and no batch pays the pages' first-touch faults."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(shm._fd, 0, nbytes)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def slab_cost(item: Item) -> int:
    """Slab bytes one item takes: its encoded payloads and its decoded arrays, each aligned."""
    if item.frame is None or item.error is not None:
        return 0
    f = item.frame
    return (_aligned(len(f.rgb.data)) + _aligned(len(f.xyz.data)) + _aligned(f.rgb.shape[0] * f.rgb.shape[1] * 3)
            + _aligned(f.xyz.shape[0] * f.xyz.shape[1] * 3 * 4))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Job:
    """One frame to decode: headers (data left out), where its payloads are, where its arrays go."""

    index: int
    rgb: RGBImage
    xyz: PointMap
    rgb_in: tuple[int, int]  # (offset, length) in the slab
    xyz_in: tuple[int, int]
    rgb_out: int  # offset of the uint8 (H, W, 3) array
    xyz_out: int  # offset of the float32 (H, W, 3) array


# -- in the pool's processes ----------------------------------------------------------------------------------
_limits = Limits()
_attached: dict[str, SharedMemory] = {}


def _start_process(limits_json: str, keep_freed_memory: bool) -> None:
    global _limits
    _limits = Limits.model_validate_json(limits_json)
    prepare_process(keep_freed_memory)
    # A worker killed outright (SIGKILL, the OOM killer) cannot stop its pool, and a pool process
    # blocked on its call queue would live on: it follows its worker instead.
    parent = mp.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True, name="follow-worker").start()


def _exit_with(sentinel: int) -> None:
    mp.connection.wait([sentinel])
    os._exit(0)


def _started(hold_s: float) -> int:
    time.sleep(hold_s)  # held, so that each of the pool's processes takes one
    return 0


def _slab(name: str) -> SharedMemory:
    if name not in _attached:
        _attached[name] = SharedMemory(name=name)
    return _attached[name]


def _decode_jobs(slab_name: str, jobs: list[_Job]) -> list[tuple[int, str | None, str, float, float]]:
    """Decode each job into the slab: (index, error code or None, message, cpu rgb, cpu xyz)."""
    buf = _slab(slab_name).buf
    out = []
    for job in jobs:
        try:
            (o, n), (o2, n2) = job.rgb_in, job.xyz_in
            rgb, xyz, cpu_rgb, cpu_xyz = decode_pair(
                job.rgb.model_copy(update={"data": bytes(buf[o : o + n])}),
                job.xyz.model_copy(update={"data": bytes(buf[o2 : o2 + n2])}),
                _limits,
            )
            np.copyto(np.ndarray(rgb.shape, np.uint8, buf, job.rgb_out), rgb)
            np.copyto(np.ndarray(xyz.shape, np.float32, buf, job.xyz_out), xyz)
            out.append((job.index, None, "", cpu_rgb, cpu_xyz))
        except Exception as exc:  # an error result, never a dead process
            out.append((job.index, *error_code(exc), 0.0, 0.0))
    return out


def _build_outcomes(items: list[Item], worker: str, region_min_area: int) -> list[tuple[Outcome, float]]:
    return [(build_outcome(it, worker, region_min_area), it.cpu.get("encode", 0.0)) for it in items]


# -- in the worker ------------------------------------------------------------------------------------------------
def _chunks(seq: Sequence, n: int) -> list[list]:
    n = max(1, min(n, len(seq)))
    return [list(seq[i::n]) for i in range(n)]


def _without_data(payload: RGBImage | PointMap):
    """A payload's header (encoding, shape, dtype) without its bytes: cheap to send to a process."""
    return payload.model_copy(update={"data": b""})


def _header_only(item: Item) -> Item:
    """The item without its payload bytes or pixels (what building its result needs, cheap to send)."""
    f = item.frame
    assert f is not None
    frame = f.model_copy(update={"rgb": _without_data(f.rgb), "xyz": _without_data(f.xyz)})
    return dataclasses.replace(item, payload=b"", frame=frame, rgb=None, xyz=None)


class HostPool:
    """Processes that decode batches into shared-memory slabs and build results."""

    def __init__(
        self,
        processes: int,
        slab_bytes: int,
        limits: Limits,
        on_restart: Callable[[], None] | None = None,
        keep_freed_memory: bool = True,
    ):
        self.processes = processes
        self.keep_freed_memory = keep_freed_memory
        self.on_restart = on_restart  # called when a dead process made the pool be replaced
        self.slab_bytes = slab_bytes
        self._limits_json = limits.model_dump_json()
        self._slabs: list[SharedMemory] = []
        try:
            for _ in range(SLABS):
                self._slabs.append(SharedMemory(create=True, size=slab_bytes))
                _reserve(self._slabs[-1], slab_bytes)
        except OSError:
            self._unlink_slabs()
            raise
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(SLABS):
            self._free.put(i)
        self._lock = threading.Lock()
        self.restarts = 0
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        """A pool with every process started (before the worker says ready; starting is lazy)."""
        executor = ProcessPoolExecutor(
            self.processes,
            mp_context=mp.get_context("forkserver"),
            initializer=_start_process,
            initargs=(self._limits_json, self.keep_freed_memory),
        )
        for f in [executor.submit(_started, 0.05) for _ in range(self.processes)]:
            f.result()
        return executor

    def _submit(self, fn: Callable, *args) -> Future:
        with self._lock:
            return self._executor.submit(fn, *args)

    def _replace_broken(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken:  # another thread may have replaced it already
                self.restarts += 1
                log.error("host_pool_broken", restarts=self.restarts)
                if self.on_restart is not None:
                    self.on_restart()
                broken.shutdown(wait=False, cancel_futures=True)
                self._executor = self._new_executor()

    # -- decoding --------------------------------------------------------------------------------------------------
    def decode(self, items: list[Item], give_up: Callable[[], bool]) -> PendingDecode | None:
        """Copy the batch's payloads into a free slab (waiting for one) and start decoding them.
        None if `give_up()` turns true while waiting."""
        while True:
            try:
                slab = self._free.get(timeout=0.2)
                break
            except queue.Empty:
                if give_up():
                    return None
        buf = self._slabs[slab].buf
        jobs, offset = [], 0
        for i, it in enumerate(items):
            if it.frame is None or it.error is not None:
                continue
            f = it.frame
            spans = []
            for data in (f.rgb.data, f.xyz.data):
                buf[offset : offset + len(data)] = data
                spans.append((offset, len(data)))
                offset += _aligned(len(data))
            rgb_out = offset
            offset += _aligned(f.rgb.shape[0] * f.rgb.shape[1] * 3)
            xyz_out = offset
            offset += _aligned(f.xyz.shape[0] * f.xyz.shape[1] * 3 * 4)
            jobs.append(_Job(i, _without_data(f.rgb), _without_data(f.xyz), spans[0], spans[1],
                             rgb_out, xyz_out))  # fmt: skip
        return PendingDecode(self, slab, items, jobs)

    def _run_jobs(self, slab: int, jobs: list[_Job]) -> list[tuple]:
        """Decode jobs in the pool; after a broken pool, again one at a time in a new pool."""
        if not jobs:  # every frame of the batch failed before decoding
            return []
        name = self._slabs[slab].name
        executor = self._executor
        try:
            futures = [self._submit(_decode_jobs, name, chunk) for chunk in _chunks(jobs, self.processes)]
            return [r for f in futures for r in f.result()]
        except BrokenProcessPool:
            self._replace_broken(executor)
        results = []
        for job in jobs:
            executor = self._executor
            try:
                results.extend(self._submit(_decode_jobs, name, [job]).result())
            except BrokenProcessPool:
                self._replace_broken(executor)
                results.append((job.index, "internal", _CRASH, 0.0, 0.0))
        return results

    def arrays(self, slab: int, job: _Job) -> tuple[np.ndarray, np.ndarray]:
        buf = self._slabs[slab].buf
        (h, w, _), (h2, w2, _) = job.rgb.shape, job.xyz.shape
        return np.ndarray((h, w, 3), np.uint8, buf, job.rgb_out), np.ndarray((h2, w2, 3), np.float32, buf, job.xyz_out)

    def release(self, slab: int) -> None:
        self._free.put(slab)

    # -- results ---------------------------------------------------------------------------------------------------
    def build_outcomes(self, items: list[Item], worker: str, region_min_area: int) -> list[Outcome]:
        """Each item's outcome; frames that are not errors are built in the pool (errors, which carry
        their original payload for the dead letters, here)."""
        out: list[Outcome | None] = [None] * len(items)
        pooled = [i for i, it in enumerate(items) if it.error is None and it.frame is not None]
        executor = self._executor
        chunks = _chunks(pooled, self.processes) if pooled else []
        try:
            futures = [self._submit(_build_outcomes, [_header_only(items[i]) for i in c], worker, region_min_area)
                       for c in chunks]  # fmt: skip
            for chunk, fut in zip(chunks, futures, strict=True):
                for i, (outcome, cpu) in zip(chunk, fut.result(), strict=True):
                    out[i] = outcome
                    items[i].cpu["encode"] = cpu
        except BrokenProcessPool:
            self._replace_broken(executor)
        for i, it in enumerate(items):
            if out[i] is None:  # errors, or the pool broke: built here
                out[i] = build_outcome(it, worker, region_min_area)
        return [o for o in out if o is not None]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._unlink_slabs()

    def _unlink_slabs(self) -> None:
        for shm in self._slabs:
            with contextlib.suppress(BufferError):  # a view still exists (a batch abandoned on a failure)
                shm.close()
            shm.unlink()
        self._slabs = []


class PendingDecode:
    """A batch being decoded into a slab; `wait` gives its items with arrays that are views of the slab,
    valid until `release`."""

    def __init__(self, pool: HostPool, slab: int, items: list[Item], jobs: list[_Job]):
        self.pool, self.slab, self.items, self.jobs = pool, slab, items, jobs
        self._released = False

    def wait(self, check: Callable[[Item], None]) -> list[Item]:
        by_index = {job.index: job for job in self.jobs}
        for index, code, message, cpu_rgb, cpu_xyz in self.pool._run_jobs(self.slab, self.jobs):
            it = self.items[index]
            if code is not None:
                it.fail(code, message)
                continue
            it.rgb, it.xyz = self.pool.arrays(self.slab, by_index[index])
            it.cpu["decode_rgb"], it.cpu["decode_xyz"] = cpu_rgb, cpu_xyz
            check(it)
        return self.items

    def release(self) -> None:
        if not self._released:
            self._released = True
            for it in self.items:
                it.rgb = it.xyz = None  # views of the slab: the next batch overwrites it
            self.pool.release(self.slab)
