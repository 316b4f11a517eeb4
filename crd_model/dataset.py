"""Load a split of an MVTec 3D-AD-layout folder into model-ready arrays (torch-free)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crd_model.config import CRDConfig
from crd_model.data.mvtec3d import Sample, list_samples, read_gt, read_rgb, read_xyz
from crd_model.data.preprocess import resize_nearest
from crd_model.inputs import PreparedFrame, prepare_frame


@dataclass
class LoadedSplit:
    samples: list[Sample]
    frames: list[PreparedFrame]
    gt: list[np.ndarray] | None = None  # bool masks at the model's resolution (test split)

    def stack(self, field: str, idx: Sequence[int] | None = None) -> np.ndarray | None:
        chosen = self.frames if idx is None else [self.frames[i] for i in idx]
        arrays = [getattr(f, field) for f in chosen]
        return None if arrays[0] is None else np.stack(arrays)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.is_anomalous for s in self.samples], dtype=bool)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def load_samples(
    samples: list[Sample], config: CRDConfig, with_gt: bool = False, workers: int | None = None
) -> LoadedSplit:
    size = config.image_size

    def load(s: Sample) -> tuple[PreparedFrame, np.ndarray | None]:
        rgb = read_rgb(s.rgb_path) if config.uses_rgb else None
        xyz = read_xyz(s.xyz_path) if config.uses_3d else None
        frame = prepare_frame(rgb, xyz, config)
        gt = None
        if with_gt:
            # Nearest resize keeps the mask binary; evaluation runs at the model's resolution.
            gt = resize_nearest(read_gt(s.gt_path, frame.original_hw), (size, size))
        return frame, gt

    with ThreadPoolExecutor(workers or default_workers()) as pool:
        loaded = list(pool.map(load, samples))
    frames = [f for f, _ in loaded]
    gts = [g for _, g in loaded] if with_gt else None
    return LoadedSplit(samples, frames, gts)


def load_split(
    root: str | Path, category: str, split: str, config: CRDConfig, workers: int | None = None
) -> LoadedSplit:
    samples = list_samples(Path(root), category, split)
    if not samples:
        raise ValueError(f"no samples in {root}/{category}/{split}")
    return load_samples(samples, config, with_gt=(split == "test"), workers=workers)
