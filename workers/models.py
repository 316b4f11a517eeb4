"""Which model inspects which category: one `Inspector` per category, loaded once per worker."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from crd_model.inputs import PreparedFrame, check_pair
from crd_model.inspector import Inspection


class InspectorLike(Protocol):
    model_id: str
    threshold: float

    def prepare(self, rgb: np.ndarray | None, xyz: np.ndarray | None) -> PreparedFrame: ...

    def infer(self, frames: Sequence[PreparedFrame]) -> list[Inspection]: ...


class ModelRegistry:
    def __init__(self, inspectors: Mapping[str, InspectorLike]):
        self._by_category = dict(inspectors)

    @classmethod
    def load(
        cls, models: Mapping[str, Path], device: str | None = None, bf16: bool = False, compile: bool = False
    ) -> ModelRegistry:
        """Load every checkpoint up front: a worker that cannot serve a category fails at start."""
        from crd_model.inspector import Inspector

        inspectors = {c: Inspector(p, device, bf16=bf16, compile=compile) for c, p in models.items()}
        for inspector in inspectors.values():
            inspector.warmup()  # before the worker reports ready
        return cls(inspectors)

    def get(self, category: str) -> InspectorLike | None:
        return self._by_category.get(category)

    @property
    def categories(self) -> list[str]:
        return sorted(self._by_category)

    def model_version(self, category: str) -> str | None:
        inspector = self._by_category.get(category)
        meta = getattr(inspector, "meta", None)
        if meta is None or meta.training is None:
            return None
        # The training time stamp, as an identifier (wire ids allow [A-Za-z0-9._:-]).
        return meta.training.created_at.replace("+00:00", "Z").replace("+", "p")


class StandInInspector:
    """A fixed-latency stand-in for the model, for measuring the queueing alone.

    Labelled as such in every result (`model_id` = "stand-in-sleep-<ms>ms"); never a product model.
    """

    def __init__(self, latency_ms: float, per_frame_ms: float = 0.0, threshold: float = 1.0):
        self.latency_s, self.per_frame_s = latency_ms / 1000.0, per_frame_ms / 1000.0
        self.threshold = threshold
        self.model_id = f"stand-in-sleep-{latency_ms:g}ms"

    def prepare(self, rgb: np.ndarray | None, xyz: np.ndarray | None) -> PreparedFrame:
        from crd_model.config import CRDConfig

        return PreparedFrame(None, None, check_pair(rgb, xyz, CRDConfig()))

    def infer(self, frames: Sequence[PreparedFrame]) -> list[Inspection]:
        time.sleep(self.latency_s + self.per_frame_s * len(frames))
        out = []
        for f in frames:
            m = np.zeros(f.original_hw, dtype=np.float32)
            out.append(Inspection(score=0.0, threshold=self.threshold, anomaly_map=m, model_map=m))
        return out
