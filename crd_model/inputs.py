"""What a frame must be before the model can take it: the checks (torch-free), `FrameError`, and the
`PreparedFrame` that holds a frame's model-ready arrays (as training and evaluation keep them).

The preprocessing itself runs batched on the model's device: crd_model/preprocessing.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crd_model.config import CRDConfig


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
    """(H, W) of a pair the model can take; `FrameError` with a code otherwise."""
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


def _describe(a: np.ndarray | None) -> str:
    return "nothing" if a is None else f"{a.dtype} {tuple(a.shape)}"
