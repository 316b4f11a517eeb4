"""`Inspector`: load a checkpoint once, score batches of (rgb, xyz) pairs. What workers call.

    inspector = Inspector("runs/disc")
    results = inspector.inspect([rgb1, rgb2], [xyz1, xyz2])
    results[0].verdict, results[0].score, results[0].anomaly_map  # map at the input's resolution

The device path a worker takes in pieces: `check()` (cheap, on the host, raises `FrameError`),
`preprocess()` (batched, on the device) and `forward()` (the model's own scoring: maps and scores,
padded to a fixed batch bucket on CUDA so no shape is compiled or autotuned after warm-up).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch

from crd_model.anomaly_map import InferenceBatch, resize_map
from crd_model.checkpoint import load_checkpoint
from crd_model.config import CheckpointMeta, CRDConfig
from crd_model.inputs import PreparedFrame, check_pair
from crd_model.preprocessing import ModelInput, Preprocessor
from crd_model.stream.messages import is_anomalous
from crd_model.torch_model import CRDModel

log = structlog.get_logger(__name__)


@dataclass
class Inspection:
    score: float
    threshold: float
    anomaly_map: np.ndarray  # float32 (H, W) at the input image's own resolution
    model_map: np.ndarray  # float32 (S, S) at the model's resolution (for evaluation)

    @property
    def anomalous(self) -> bool:
        return is_anomalous(self.score, self.threshold)

    @property
    def verdict(self) -> str:
        return "anomalous" if self.anomalous else "ok"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to `max_batch` (and `max_batch` itself): the batch shapes a worker runs."""
    sizes = {1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch}
    return tuple(sorted(sizes | {max_batch}))


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16 maps as float32; float64 sums (calibration's error moments) stay float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class Inspector:
    def __init__(
        self,
        checkpoint: str | Path,
        device: str | torch.device | None = None,
        *,
        bf16: bool | None = None,
        compile: bool | None = None,
        channels_last: bool = True,
        buckets: Sequence[int] | None = None,
        max_batch: int = 32,
    ):
        """`bf16`, `compile` (static shapes): None = on where they pay off (CUDA). `buckets`: batch sizes
        every batch is padded up to (None = powers of two up to `max_batch` on CUDA; none on a CPU, where
        padding only costs)."""
        device = torch.device(device) if device is not None else default_device()
        model, meta = load_checkpoint(checkpoint, device)
        if meta.calibration is None:
            raise ValueError(f"checkpoint {checkpoint} is not calibrated: it has no threshold")
        self._setup(model, meta.config, device, bf16, compile, channels_last, buckets, max_batch)
        self.meta: CheckpointMeta | None = meta
        self.threshold = float(meta.calibration.threshold)
        self.model_id = meta.model_id

    @classmethod
    def from_model(
        cls,
        model: CRDModel,
        device: str | torch.device | None = None,
        *,
        threshold: float = float("nan"),
        model_id: str = "in-memory",
        bf16: bool | None = None,
        compile: bool | None = None,
        channels_last: bool = True,
        buckets: Sequence[int] | None = None,
        max_batch: int = 32,
    ) -> Inspector:
        """An Inspector around a model in memory (training's calibration): the same device path, settings
        and defaults as one loaded from a checkpoint, so it computes the same scores."""
        self = cls.__new__(cls)
        device = torch.device(device) if device is not None else default_device()
        self._setup(model.to(device).eval(), model.config, device, bf16, compile, channels_last, buckets, max_batch)
        self.meta = None
        self.threshold = float(threshold)
        self.model_id = model_id
        return self

    def _setup(
        self,
        model: CRDModel,
        config: CRDConfig,
        device: torch.device,
        bf16: bool | None,
        compile: bool | None,
        channels_last: bool,
        buckets: Sequence[int] | None,
        max_batch: int,
    ) -> None:
        self.device = device
        self.config = config
        cuda = self.device.type == "cuda"
        self._bf16 = cuda if bf16 is None else (bf16 and cuda)  # bf16 autocast: CUDA only
        self._channels_last = channels_last
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model: CRDModel = model
        self.buckets = tuple(sorted(buckets)) if buckets is not None else (batch_buckets(max_batch) if cuda else ())
        self._compiled = (cuda if compile is None else compile) and self.device.type != "mps"
        if self._compiled:
            _allow_recompiles(len(self.buckets) + 2)  # one static graph per bucket, all compiled at warm-up
        self._forward = torch.compile(self.model, dynamic=False) if self._compiled else self.model
        self.preprocessor = Preprocessor(self.config, self.device)

    # -- the pieces a worker calls ----------------------------------------------------------------
    def check(self, rgb: np.ndarray | None, xyz: np.ndarray | None) -> tuple[int, int]:
        """(H, W) of a pair the model can take; `FrameError` with a code otherwise (host, cheap)."""
        return check_pair(rgb, xyz, self.config)

    def preprocess(self, rgbs: Sequence[torch.Tensor], xyzs: Sequence[torch.Tensor]) -> ModelInput:
        """Batched preprocessing on the device (tensors from anywhere; uint8 rgb, float xyz)."""
        return self.preprocessor(rgbs if self.config.uses_rgb else [], xyzs if self.config.uses_3d else [])

    def forward(self, inputs: ModelInput) -> InferenceBatch:
        """Fused maps (B, S, S) and scores (B,), float32, on the device."""
        parts = self._in_buckets(inputs, self._run)
        if len(parts) == 1 and len(parts[0][0].pred_score) == parts[0][1]:
            return parts[0][0]  # one unpadded batch: no copies
        return InferenceBatch(
            torch.cat([out.anomaly_map[:m] for out, m in parts]), torch.cat([out.pred_score[:m] for out, m in parts])
        )

    def branch_maps(self, inputs: ModelInput) -> dict[str, torch.Tensor]:
        """Raw (unstandardised) map per branch, (B, S, S), through the same device path as `forward`
        (memory format, autocast, batch buckets): what calibration measures the statistics on."""
        parts = self._in_buckets(inputs, lambda rgb, x3d: self._context_run(self.model.branch_maps, rgb, x3d))
        return {name: torch.cat([maps[name][:m].float() for maps, m in parts]) for name in parts[0][0]}

    def scale_maps(self, inputs: ModelInput, per_scale=None) -> dict[str, list[torch.Tensor]]:
        """Diagnostics (bench/quality.py): each branch's per-scale maps as the model scores them, or `per_scale`'s (see
        `CRDModel.scale_maps`), through the same path."""
        kw = {} if per_scale is None else {"per_scale": per_scale}
        parts = self._in_buckets(
            inputs, lambda rgb, x3d: self._context_run(lambda r, x: self.model.scale_maps(r, x, **kw), rgb, x3d)
        )
        return {
            name: [torch.cat([_at_least_float32(maps[name][k][:m]) for maps, m in parts]) for k in range(len(scales))]
            for name, scales in parts[0][0].items()
        }

    def _in_buckets(self, inputs: ModelInput, fn):
        """[(fn's output, rows that are real)] over the batch, padded to the buckets when there are any."""
        if not self.buckets:
            return [(fn(inputs.rgb, inputs.x3d), len(inputs))]
        parts = []
        top = self.buckets[-1]
        for start in range(0, len(inputs), top):
            rgb = None if inputs.rgb is None else inputs.rgb[start : start + top]
            x3d = None if inputs.x3d is None else inputs.x3d[start : start + top]
            m = len(rgb if rgb is not None else x3d)
            size = next(b for b in self.buckets if b >= m)
            parts.append((fn(_pad(rgb, size), _pad(x3d, size)), m))
        return parts

    def _run(self, rgb: torch.Tensor | None, x3d: torch.Tensor | None) -> InferenceBatch:
        return self._context_run(self._forward, rgb, x3d)

    def _context_run(self, fn, rgb: torch.Tensor | None, x3d: torch.Tensor | None):
        def ready(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.to(self.device, non_blocking=True)
            return t.contiguous(memory_format=torch.channels_last) if self._channels_last else t

        autocast = (
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
            if self._bf16
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            return fn(ready(rgb), ready(x3d))

    def warmup(self, batch_sizes: Sequence[int] | None = None) -> None:
        """Run every batch shape once before serving, so no frame pays for lazy initialisation, cudnn
        autotuning or compilation. A compilation that fails falls back to eager, with a warning.
        The preprocessing runs once too, on a batch of the largest shape of one synthetic good part
        (an object, so every step runs): on a GPU its kernels load lazily and the plane fit's solver
        initialises on first use, which the first served batch would otherwise wait for."""
        from crd_model.data.synth import render_sample  # the data generator's renderer: only warm-up needs it

        s = self.config.image_size
        sizes = list(batch_sizes or self.buckets or (1,))
        rgb, xyz, _ = render_sample("disc", "good", np.random.default_rng(0))
        rgb_t, xyz_t = torch.from_numpy(rgb), torch.from_numpy(xyz)
        self.preprocess([rgb_t] * max(sizes), [xyz_t] * max(sizes))
        for n in sizes:
            blank = torch.zeros((n, 3, s, s), device=self.device)
            inputs = ModelInput(blank if self.config.uses_rgb else None, blank if self.config.uses_3d else None)
            try:
                self.forward(inputs)
            except Exception as exc:
                if not self._compiled:
                    raise
                log.warning("compile_failed_using_eager", error=f"{type(exc).__name__}: {str(exc)[:300]}")
                self._compiled, self._forward = False, self.model
                self.forward(inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- whole frames ------------------------------------------------------------------------------
    def infer(self, frames: Sequence[PreparedFrame]) -> list[Inspection]:
        """Already-prepared frames (as training and evaluation keep them) -> inspections."""
        if not frames:
            return []
        return self._inspections(self.forward(self.stack(frames)), [f.original_hw for f in frames])

    def stack(self, frames: Sequence[PreparedFrame]) -> ModelInput:
        """Prepared frames as one batch on the host (`forward` moves it to the device)."""
        rgb = torch.from_numpy(np.stack([f.rgb for f in frames])) if self.config.uses_rgb else None
        x3d = torch.from_numpy(np.stack([f.x3d for f in frames])) if self.config.uses_3d else None
        return ModelInput(rgb, x3d)

    def inspect(
        self, rgb_batch: Sequence[np.ndarray | None], xyz_batch: Sequence[np.ndarray | None]
    ) -> list[Inspection]:
        if len(rgb_batch) != len(xyz_batch):
            raise ValueError(f"{len(rgb_batch)} rgb images but {len(xyz_batch)} xyz images")
        if not rgb_batch:
            return []
        hws = [self.check(r, x) for r, x in zip(rgb_batch, xyz_batch, strict=True)]
        inputs = self.preprocess(
            [torch.from_numpy(r) for r in rgb_batch] if self.config.uses_rgb else [],
            [torch.from_numpy(x) for x in xyz_batch] if self.config.uses_3d else [],
        )
        return self._inspections(self.forward(inputs), hws)

    def _inspections(self, out: InferenceBatch, hws: Sequence[tuple[int, int]]) -> list[Inspection]:
        results = []
        with torch.inference_mode():
            for m, s, hw in zip(out.anomaly_map, out.pred_score.tolist(), hws, strict=True):
                full = resize_map(m, hw)
                results.append(
                    Inspection(
                        score=float(s),
                        threshold=self.threshold,
                        anomaly_map=full.cpu().numpy().astype(np.float32, copy=False),
                        model_map=m.cpu().numpy(),
                    )
                )
        return results


def _allow_recompiles(n: int) -> None:
    """Let dynamo keep `n` graphs of one function (default 8) instead of falling back to eager."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), n))


def _pad(t: torch.Tensor | None, size: int) -> torch.Tensor | None:
    if t is None or len(t) == size:
        return t
    return torch.cat([t, t.new_zeros((size - len(t), *t.shape[1:]))])
