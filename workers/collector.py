"""Python's cyclic garbage collector in a serving worker: start-up's objects frozen, pauses measured.

A full collection walks every object the collector tracks, and a worker holds hundreds of thousands
from its start-up (torch, the models, compiled graphs): after the imports alone one full collection
takes 170 ms on a 2-core CPU, with the GIL held. The collector starts one whenever enough new objects
have survived, inside whatever allocation tips it over, so every few thousand frames some batch
waited that long. `gc.freeze()` once the worker is loaded and warm moves start-up's objects out of the
collector's sight: later collections walk only what serving allocated.

Frozen objects are never collected, so a model set swapped out (perhaps held only by reference
cycles) would never be freed: after a swap the worker thaws, collects and freezes again, one pause
between batches.
"""

from __future__ import annotations

import collections
import gc
import time
from collections.abc import Iterator


def freeze() -> int:
    """Collect, then freeze everything alive (what start-up or a model swap left); objects frozen."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw() -> None:
    """Give frozen objects back to the collector (a worker that stops serving)."""
    gc.unfreeze()


class Pauses:
    """Each collection's generation and duration, recorded from `gc.callbacks`.

    The callback runs inside whatever allocation started the collection, maybe while that thread holds
    a lock (a metrics lock, a queue's): it takes none and only appends to a bounded deque; `drain`
    hands the pauses over from a thread that may take locks.
    """

    def __init__(self, maxlen: int = 10_000):
        self._pauses: collections.deque[tuple[int, float]] = collections.deque(maxlen=maxlen)
        self._started = 0.0

    def __enter__(self) -> Pauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":  # collections never overlap: they run with the GIL held
            self._started = time.perf_counter()
        else:
            self._pauses.append((info["generation"], time.perf_counter() - self._started))

    def drain(self) -> Iterator[tuple[int, float]]:
        """(generation, seconds) of each collection since the last drain."""
        while self._pauses:
            yield self._pauses.popleft()
