"""Which model inspects which category: one `Inspector` per category, loaded and warmed once per worker."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from crd_model.anomaly_map import InferenceBatch
from crd_model.config import CRDConfig
from crd_model.inputs import check_pair
from crd_model.preprocessing import ModelInput


class InspectorLike(Protocol):
    """What the worker calls: the device path of `crd_model.inspector.Inspector` in its pieces."""

    model_id: str
    threshold: float
    device: torch.device

    def check(self, rgb: np.ndarray | None, xyz: np.ndarray | None) -> tuple[int, int]: ...

    def preprocess(self, rgbs: Sequence[torch.Tensor], xyzs: Sequence[torch.Tensor]) -> ModelInput: ...

    def forward(self, inputs: ModelInput) -> InferenceBatch: ...


class ModelRegistry:
    """The live model of each category, and optionally a candidate per category scoring in shadow mode."""

    def __init__(self, inspectors: Mapping[str, InspectorLike], shadows: Mapping[str, InspectorLike] | None = None):
        self._by_category = dict(inspectors)
        self._shadows = dict(shadows or {})
        unknown = set(self._shadows) - set(self._by_category)
        if unknown:
            raise ValueError(f"shadow models for categories without a live model: {sorted(unknown)}")

    @classmethod
    def load(
        cls,
        models: Mapping[str, Path],
        device: str | None = None,
        bf16: bool | None = None,
        compile: bool | None = None,
        max_batch: int = 32,
        shadow_models: Mapping[str, Path] | None = None,
        buckets: Sequence[int] | None = None,
    ) -> ModelRegistry:
        """Load every checkpoint up front and run every batch shape once: a worker that cannot serve a
        category fails at start, and no frame waits for compilation or autotuning after /readyz."""
        from crd_model.inspector import Inspector

        def load_one(path: Path) -> InspectorLike:
            inspector = Inspector(path, device, bf16=bf16, compile=compile, max_batch=max_batch, buckets=buckets)
            inspector.warmup()
            return inspector

        live = {category: load_one(path) for category, path in models.items()}
        shadows = {category: load_one(path) for category, path in (shadow_models or {}).items()}
        return cls(live, shadows)

    def shadow(self, category: str) -> InspectorLike | None:
        """The candidate model scoring this category in shadow mode, if any."""
        return self._shadows.get(category)

    def model_ids(self) -> dict[str, str]:
        """category -> live model id (and `<category>:shadow` -> candidate id): what this registry serves."""
        ids = {c: i.model_id for c, i in self._by_category.items()}
        ids.update({f"{c}:shadow": i.model_id for c, i in self._shadows.items()})
        return ids

    def get(self, category: str) -> InspectorLike | None:
        return self._by_category.get(category)

    @property
    def categories(self) -> list[str]:
        return sorted(self._by_category)

    @property
    def devices(self) -> set[torch.device]:
        return {i.device for i in [*self._by_category.values(), *self._shadows.values()]}

    def model_version(self, category: str) -> str | None:
        inspector = self._by_category.get(category)
        meta = getattr(inspector, "meta", None)
        if meta is None or meta.training is None:
            return None
        # The training time stamp, as an identifier (wire ids allow [A-Za-z0-9._:-]).
        return meta.training.created_at.replace("+00:00", "Z").replace("+", "p")


class StandInInspector:
    """A fixed-latency stand-in for the model, for measuring the queueing and the data path alone.

    Labelled as such in every result (`model_id` = "stand-in-sleep-<ms>ms"); never a product model.
    Its maps are zeros at a small fixed size, its scores 0.
    """

    MAP_SIZE = 16

    def __init__(self, latency_ms: float, per_frame_ms: float = 0.0, threshold: float = 1.0):
        self.latency_s, self.per_frame_s = latency_ms / 1000.0, per_frame_ms / 1000.0
        self.threshold = threshold
        self.model_id = f"stand-in-sleep-{latency_ms:g}ms"
        self.device = torch.device("cpu")
        self._config = CRDConfig()

    def check(self, rgb: np.ndarray | None, xyz: np.ndarray | None) -> tuple[int, int]:
        return check_pair(rgb, xyz, self._config)

    def preprocess(self, rgbs: Sequence[torch.Tensor], xyzs: Sequence[torch.Tensor]) -> ModelInput:
        return ModelInput(torch.zeros((len(rgbs), 1, 1, 1)), None)

    def forward(self, inputs: ModelInput) -> InferenceBatch:
        n = len(inputs)
        time.sleep(self.latency_s + self.per_frame_s * n)
        return InferenceBatch(torch.zeros((n, self.MAP_SIZE, self.MAP_SIZE)), torch.zeros(n))


class NullModelInspector:
    """A real checkpoint's data path (checks, preprocessing) with a model that costs nothing: what the
    worker spends besides the model, for benchmarks. Labelled `null-model` in every result."""

    def __init__(self, inspector: InspectorLike):
        self.inner = inspector
        self.device = inspector.device
        self.threshold = inspector.threshold
        self.model_id = "null-model"

    def check(self, rgb: np.ndarray | None, xyz: np.ndarray | None) -> tuple[int, int]:
        return self.inner.check(rgb, xyz)

    def preprocess(self, rgbs: Sequence[torch.Tensor], xyzs: Sequence[torch.Tensor]) -> ModelInput:
        return self.inner.preprocess(rgbs, xyzs)

    def forward(self, inputs: ModelInput) -> InferenceBatch:
        x = inputs.rgb if inputs.rgb is not None else inputs.x3d
        assert x is not None
        n, size = x.shape[0], x.shape[-1]
        return InferenceBatch(torch.zeros((n, size, size), device=x.device), torch.zeros(n, device=x.device))
