"""Load a split of an MVTec 3D-AD-layout folder into model-ready arrays.

Files are read in a thread pool; preprocessing runs batched on the model's device (the same
`Preprocessor` the Inspector and the workers use), then the arrays are kept on the host.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crd_model.config import CRDConfig
from crd_model.data.mvtec3d import DataError, Sample, list_samples, read_gt, read_rgb, read_xyz
from crd_model.inputs import FrameError, PreparedFrame, check_pair
from crd_model.preprocessing import Preprocessor, resize_nearest

PREPROCESS_BATCH = 32


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


def prepare_frames(
    rgbs: Sequence[np.ndarray | None],
    xyzs: Sequence[np.ndarray | None],
    config: CRDConfig,
    device: torch.device | str | None = None,
) -> list[PreparedFrame]:
    """Check and preprocess pairs in batches on `device`; host arrays out."""
    preprocess = Preprocessor(config, device or "cpu")
    frames: list[PreparedFrame] = []
    for i in range(0, len(rgbs), PREPROCESS_BATCH):
        chunk = range(i, min(len(rgbs), i + PREPROCESS_BATCH))
        hws = [check_pair(rgbs[j], xyzs[j], config) for j in chunk]
        batch = preprocess(
            [torch.from_numpy(rgbs[j]) for j in chunk] if config.uses_rgb else [],
            [torch.from_numpy(xyzs[j]) for j in chunk] if config.uses_3d else [],
        )
        rgb = None if batch.rgb is None else batch.rgb.cpu().numpy()
        x3d = None if batch.x3d is None else batch.x3d.cpu().numpy()
        for k, hw in enumerate(hws):
            frames.append(PreparedFrame(None if rgb is None else rgb[k], None if x3d is None else x3d[k], hw))
    return frames


def load_samples(
    samples: list[Sample],
    config: CRDConfig,
    with_gt: bool = False,
    workers: int | None = None,
    device: torch.device | str | None = None,
) -> LoadedSplit:
    size = config.image_size

    def read(s: Sample) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        rgb = read_rgb(s.rgb_path) if config.uses_rgb else None
        xyz = read_xyz(s.xyz_path) if config.uses_3d else None
        try:
            check_pair(rgb, xyz, config)
        except FrameError as exc:  # name the files, not just the problem
            raise DataError(s.rgb_path, f"{exc} (xyz: {s.xyz_path})") from exc
        gt = None
        if with_gt:
            hw = (rgb if rgb is not None else xyz).shape[:2]
            # Nearest resize keeps the mask binary; evaluation runs at the model's resolution.
            gt = resize_nearest(torch.from_numpy(read_gt(s.gt_path, hw)), (size, size)).numpy()
        return rgb, xyz, gt

    with ThreadPoolExecutor(workers or default_workers()) as pool:
        loaded = list(pool.map(read, samples))
    frames = prepare_frames([r for r, _, _ in loaded], [x for _, x, _ in loaded], config, device)
    gts = [g for _, _, g in loaded] if with_gt else None
    return LoadedSplit(samples, frames, gts)


def load_split(
    root: str | Path,
    category: str,
    split: str,
    config: CRDConfig,
    workers: int | None = None,
    device: torch.device | str | None = None,
) -> LoadedSplit:
    samples = list_samples(Path(root), category, split)
    if not samples:
        raise ValueError(f"no samples in {root}/{category}/{split}")
    return load_samples(samples, config, with_gt=(split == "test"), workers=workers, device=device)
