"""Keep freed memory in the process for the next batch instead of handing it back to the kernel.

Every frame passes through several buffers of its own size (the reply, the unpacked payloads, the
decoded arrays), all freed when its batch is done. With glibc's defaults a buffer of a few hundred
kilobytes is either its own mapping or at the top of a heap that is trimmed once the batch is freed:
the next batch's buffers then fault in fresh, zeroed pages: a third of the worker process's page
faults per frame (bench/worker_overhead.py). Raising the mapping and trimming thresholds makes the
freed memory serve the next batch; the process's memory stays at its peak (what a batch's caps
bound) instead of shrinking between batches. Where faults are cheap that saves no measurable time;
under a sandbox that makes them dear (gVisor) it can.
"""

from __future__ import annotations

import ctypes
import resource

import structlog

log = structlog.get_logger("crd.worker.allocator")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 512 * 2**20


def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process; False (and nothing changed) where the C library has no
    `mallopt` or refuses it (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.info("allocator_thresholds_not_set", reason="mallopt refused (not glibc)")
    return ok


def recycled_page_faults(buffers: int = 64, size: int = 460_000, rounds: int = 3) -> float:
    """Fresh pages faulted in per buffer when a batch of `buffers` buffers of `size` bytes is allocated,
    filled and freed again, after a first such batch: about size / 4096 with glibc's defaults, about 0
    once `keep_freed_memory` has run."""

    def batch() -> None:
        held = [b"\x01" * size for _ in range(buffers)]  # written: every page touched
        del held

    batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        batch()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (rounds * buffers)
