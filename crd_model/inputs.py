"""Turn one raw (rgb, xyz) pair into the model's input arrays. Torch-free, thread-safe.

Workers run this in a thread pool next to inference, so it must stay numpy-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crd_model.config import CRDConfig
from crd_model.data.preprocess import resize_rgb, xyz_to_3d_input


class FrameError(ValueError):
    """A frame the model cannot use (wrong shapes, dtypes, empty); carries a machine-readable code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class PreparedFrame:
    rgb: np.ndarray | None  # float32 (3, S, S) in [0, 1]
    x3d: np.ndarray | None  # float32 (3, S, S) in [0, 1]
    original_hw: tuple[int, int]


def check_pair(rgb: np.ndarray | None, xyz: np.ndarray | None, config: CRDConfig) -> tuple[int, int]:
    if config.uses_rgb:
        if rgb is None or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise FrameError("bad_rgb", f"rgb must be uint8 (H, W, 3), got {_describe(rgb)}")
    if config.uses_3d:
        if xyz is None or xyz.ndim != 3 or xyz.shape[2] != 3 or not np.issubdtype(xyz.dtype, np.floating):
            raise FrameError("bad_xyz", f"xyz must be float (H, W, 3), got {_describe(xyz)}")
    if config.uses_rgb and config.uses_3d and rgb.shape[:2] != xyz.shape[:2]:
        raise FrameError("shape_mismatch", f"rgb {rgb.shape[:2]} and xyz {xyz.shape[:2]} differ in size")
    ref = rgb if config.uses_rgb else xyz
    h, w = ref.shape[:2]
    if min(h, w) < 8:
        raise FrameError("too_small", f"image of {h}x{w} pixels is too small")
    return int(h), int(w)


def prepare_frame(rgb: np.ndarray | None, xyz: np.ndarray | None, config: CRDConfig) -> PreparedFrame:
    hw = check_pair(rgb, xyz, config)
    size = config.image_size
    rgb_in = resize_rgb(rgb, size) if config.uses_rgb else None
    x3d_in = None
    if config.uses_3d:
        xyz = np.nan_to_num(xyz.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
        x3d_in, _ = xyz_to_3d_input(
            xyz,
            size,
            representation=config.representation_3d,
            plane=config.plane,
            distance=config.plane_distance,
        )
    return PreparedFrame(rgb_in, x3d_in, hw)


def _describe(a: np.ndarray | None) -> str:
    return "nothing" if a is None else f"{a.dtype} {tuple(a.shape)}"
