"""`Inspector`: load a checkpoint once, score batches of (rgb, xyz) pairs. What workers call.

    inspector = Inspector("runs/disc")
    results = inspector.inspect([rgb1, rgb2], [xyz1, xyz2])
    results[0].verdict, results[0].score, results[0].anomaly_map  # map at the input's resolution

`prepare()` is numpy-only and thread-safe, so a worker can preprocess the next batch in a thread
pool while `infer()` runs the current one on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crd_model.anomaly_map import InferenceBatch, resize_map
from crd_model.checkpoint import load_checkpoint
from crd_model.inputs import PreparedFrame, prepare_frame
from crd_model.torch_model import CRDModel


@dataclass
class Inspection:
    score: float
    threshold: float
    anomaly_map: np.ndarray  # float32 (H, W) at the input image's own resolution
    model_map: np.ndarray  # float32 (S, S) at the model's resolution (for evaluation)

    @property
    def anomalous(self) -> bool:
        return self.score >= self.threshold

    @property
    def verdict(self) -> str:
        return "anomalous" if self.anomalous else "ok"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Inspector:
    def __init__(
        self,
        checkpoint: str | Path,
        device: str | torch.device | None = None,
        *,
        bf16: bool = False,
        compile: bool = False,
        channels_last: bool = True,
    ):
        self.device = torch.device(device) if device is not None else default_device()
        model, meta = load_checkpoint(checkpoint, self.device)
        if meta.calibration is None:
            raise ValueError(f"checkpoint {checkpoint} is not calibrated: it has no threshold")
        self.meta = meta
        self.config = meta.config
        self.threshold = float(meta.calibration.threshold)
        self.model_id = meta.model_id
        # bf16 and compile only pay off (and are only well supported) on CUDA.
        self._bf16 = bf16 and self.device.type == "cuda"
        self._channels_last = channels_last
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model: CRDModel = model
        if compile and self.device.type == "cuda":
            self.model.forward = torch.compile(self.model.forward, dynamic=True)  # type: ignore[method-assign]

    def warmup(self, batch_size: int = 1) -> None:
        """Run one dummy batch so the first real frame does not pay for lazy initialisation
        (allocator, kernels, cudnn autotuning, torch.compile)."""
        s = self.config.image_size
        blank = np.zeros((3, s, s), np.float32)
        frame = PreparedFrame(blank if self.config.uses_rgb else None, blank if self.config.uses_3d else None, (s, s))
        self.infer([frame] * batch_size)

    def prepare(self, rgb: np.ndarray | None, xyz: np.ndarray | None) -> PreparedFrame:
        """Validate and preprocess one pair (raises `FrameError` with a code on bad input)."""
        return prepare_frame(rgb, xyz, self.config)

    def forward(self, rgb: np.ndarray | None, x3d: np.ndarray | None) -> InferenceBatch:
        """The model's own scoring on a stacked batch: fused maps (B, S, S) and scores (B,), float32, on device."""

        def to_device(a: np.ndarray | None) -> torch.Tensor | None:
            if a is None:
                return None
            t = torch.from_numpy(a).to(self.device, non_blocking=True)
            return t.contiguous(memory_format=torch.channels_last) if self._channels_last else t

        autocast = (
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
            if self._bf16
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            return self.model(to_device(rgb), to_device(x3d))

    def infer(self, frames: Sequence[PreparedFrame]) -> list[Inspection]:
        if not frames:
            return []
        rgb = np.stack([f.rgb for f in frames]) if self.config.uses_rgb else None
        x3d = np.stack([f.x3d for f in frames]) if self.config.uses_3d else None
        maps, scores = self.forward(rgb, x3d)
        out = []
        for frame, m, s in zip(frames, maps, scores.tolist(), strict=True):
            with torch.inference_mode():
                full = resize_map(m, frame.original_hw)
            out.append(
                Inspection(
                    score=float(s),
                    threshold=self.threshold,
                    anomaly_map=full.cpu().numpy().astype(np.float32, copy=False),
                    model_map=m.cpu().numpy(),
                )
            )
        return out

    def inspect(
        self, rgb_batch: Sequence[np.ndarray | None], xyz_batch: Sequence[np.ndarray | None]
    ) -> list[Inspection]:
        if len(rgb_batch) != len(xyz_batch):
            raise ValueError(f"{len(rgb_batch)} rgb images but {len(xyz_batch)} xyz images")
        return self.infer([self.prepare(r, x) for r, x in zip(rgb_batch, xyz_batch, strict=True)])
