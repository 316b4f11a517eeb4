"""From per-scale feature discrepancies to anomaly maps and image scores: the model's one scoring path.

Each scale's map is (1 - cos) between teacher and student features (`scale_anomaly_maps`), or, with
`CRDConfig.scoring="whitened"` (the default), the students' error whitened with its mean and covariance
measured at calibration (`ErrorWhitening`). `AnomalyMapGenerator` is the head every caller goes through
(training's calibration, `eval`, `predict`, the `Inspector`, the workers): standardise each branch's raw
map with its calibration mean/std (held as buffers), sum the branches, blur, and take the maximum as the
image score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from crd_model.loss import cosine_distance_map


class InferenceBatch(NamedTuple):
    """What the model returns in eval mode."""

    anomaly_map: torch.Tensor  # float32 (B, H, W) at the model's input resolution
    pred_score: torch.Tensor  # float32 (B,): the image scores


def scale_anomaly_maps(
    teacher: list[torch.Tensor], student: list[torch.Tensor], size: tuple[int, int]
) -> list[torch.Tensor]:
    """Each scale's (1 - cos) map upsampled bilinearly to `size`, (B, H, W) each (diagnostics)."""
    out = []
    for t, s in zip(teacher, student, strict=True):
        d = cosine_distance_map(t.float(), s.float()).unsqueeze(1)
        out.append(F.interpolate(d, size=size, mode="bilinear", align_corners=False)[:, 0])
    return out


def unit_error(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """The student's error on the unit sphere, (B, C, h, w) float32: its squared length over 2 is 1 - cos."""
    return F.normalize(teacher.float(), dim=1) - F.normalize(student.float(), dim=1)


def error_sums(teacher: list[torch.Tensor], student: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    """Per scale, each image's sums over positions of the unit error e, of e e^T (flattened), and the number
    of positions: (B, C + C * C + 1) float64, what calibration accumulates into `ErrorWhitening`'s moments
    (`size` is unused: the signature is `CRDModel.scale_maps`')."""
    out = []
    with torch.autocast(device_type=teacher[0].device.type, enabled=False):
        for t, s in zip(teacher, student, strict=True):
            e = unit_error(t, s).double().flatten(2)  # (B, C, positions)
            count = torch.full((e.shape[0], 1), float(e.shape[2]), dtype=e.dtype, device=e.device)
            outer = torch.bmm(e, e.transpose(1, 2)).flatten(1)
            out.append(torch.cat([e.sum(dim=2), outer, count], dim=1))
    return out


class ErrorWhitening(nn.Module):
    """Each scale's map as the student's unit error whitened (`CRDConfig.scoring="whitened"`): with e the
    error at a position, m its mean and W the inverse square root of its (shrunk) covariance over good
    parts, both measured at calibration, the map is |W (e - m)|^2 / C, a Mahalanobis distance per channel.

    Where (1 - cos) = |e|^2 / 2 weighs every direction of the error alike, this weighs it by how the
    students err on good parts: the directions they always get a little wrong on normal texture count
    less than those they reproduce closely, where a defect's deviation stands out (docs/model.md,
    "Whitened errors"). Each scale's map then averages about 1 over good parts, so the scales weigh alike.
    Non-persistent buffers, as `AnomalyMapGenerator`'s statistics: they live in config.json, not in the
    weights. Until `set_moments` (m = 0, W = I) the map is |e|^2 / C = (1 - cos) x 2 / C.
    """

    def __init__(self, widths: Mapping[str, Sequence[int]]):
        super().__init__()
        self.widths = {name: tuple(int(c) for c in w) for name, w in widths.items()}
        for name, w in self.widths.items():
            for k, c in enumerate(w):
                self.register_buffer(self._key("mean", name, k), torch.zeros(c), persistent=False)
                self.register_buffer(self._key("whitener", name, k), torch.eye(c), persistent=False)

    @staticmethod
    def _key(what: str, name: str, k: int) -> str:
        return f"{what}_{name}_{k}"

    def set_moments(self, moments: Mapping[str, Sequence[tuple[Sequence[float], Sequence[float]]]]) -> None:
        """Per branch, per scale: (mean, whitener) of the unit error, the whitener a row-major C x C list."""
        for name, w in self.widths.items():
            scales = moments.get(name)
            if scales is None or len(scales) != len(w):
                raise ValueError(f"error moments of branch {name!r}: expected {len(w)} scales")
            for k, (c, (mean, whitener)) in enumerate(zip(w, scales, strict=True)):
                if len(mean) != c or len(whitener) != c * c:
                    raise ValueError(f"error moments of branch {name!r}, scale {k}: expected {c} channels")
                getattr(self, self._key("mean", name, k)).copy_(torch.tensor(mean, dtype=torch.float32))
                getattr(self, self._key("whitener", name, k)).copy_(
                    torch.tensor(whitener, dtype=torch.float32).view(c, c)
                )

    def scale_maps(
        self, name: str, teacher: list[torch.Tensor], student: list[torch.Tensor], size: tuple[int, int]
    ) -> list[torch.Tensor]:
        """Branch `name`'s per-scale whitened maps upsampled bilinearly to `size`, (B, H, W) each."""
        out = []
        # float32 even under bf16 autocast, which would run the matrix product in bf16 (3 digits)
        with torch.autocast(device_type=teacher[0].device.type, enabled=False):
            for k, (t, s) in enumerate(zip(teacher, student, strict=True)):
                mean = getattr(self, self._key("mean", name, k)).view(1, -1, 1, 1)
                whitener = getattr(self, self._key("whitener", name, k))
                z = torch.einsum("ij,bjhw->bihw", whitener, unit_error(t, s) - mean)
                d = (z * z).mean(dim=1, keepdim=True)
                out.append(F.interpolate(d, size=size, mode="bilinear", align_corners=False)[:, 0])
        return out


def gaussian_kernel1d(sigma: float, device: torch.device | None = None, truncate: float = 4.0) -> torch.Tensor:
    radius = max(int(truncate * sigma + 0.5), 1)
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _separable_blur(maps: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Blur (B, H, W) maps with the 1-D kernel `k` along both axes, reflect padding (scipy's mode="mirror")."""
    r = k.numel() // 2
    x = maps.unsqueeze(1)
    h, w = x.shape[-2:]
    # Reflect padding must be smaller than the input; clamp for tiny maps.
    ph, pw = min(r, h - 1), min(r, w - 1)
    x = F.pad(x, (pw, pw, 0, 0), mode="reflect")
    x = F.conv2d(x, k[r - pw : r + pw + 1].view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, ph, ph), mode="reflect")
    x = F.conv2d(x, k[r - ph : r + ph + 1].view(1, 1, -1, 1))
    return x[:, 0]


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps; reflect padding (scipy's mode="mirror")."""
    if sigma <= 0:
        return maps
    return _separable_blur(maps, gaussian_kernel1d(sigma, maps.device))


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """Image score = maximum of the (blurred) map."""
    return maps.flatten(1).amax(dim=1)


class AnomalyMapGenerator(nn.Module):
    """Raw per-branch maps -> fused, blurred anomaly map and image score.

    The calibration statistics are non-persistent buffers: they travel with the module (device moves,
    export) but are stored in the checkpoint's config.json, so the weights and their digest (the model
    id) do not depend on calibration, and a checkpoint can be recalibrated without touching its weights.
    Until `set_statistics` is called the branches are summed unstandardised (mean 0, std 1).
    """

    def __init__(self, branches: tuple[str, ...], sigma: float):
        super().__init__()
        self.branches = tuple(branches)
        self.sigma = float(sigma)
        self.register_buffer("mean", torch.zeros(len(self.branches)), persistent=False)
        self.register_buffer("std", torch.ones(len(self.branches)), persistent=False)
        kernel = gaussian_kernel1d(self.sigma) if self.sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    def set_statistics(self, stats: Mapping[str, tuple[float, float]]) -> None:
        """Per-branch (mean, std) of the raw maps over normal validation pixels."""
        missing = set(self.branches) - set(stats)
        if missing:
            raise ValueError(f"calibration statistics lack branches {sorted(missing)}")
        self.mean.copy_(torch.tensor([stats[b][0] for b in self.branches], dtype=torch.float32))
        self.std.copy_(torch.tensor([stats[b][1] for b in self.branches], dtype=torch.float32))

    def forward(self, branch_maps: Mapping[str, torch.Tensor]) -> InferenceBatch:
        # Always float32: under bf16 autocast the blur's convolutions would otherwise drop to bf16.
        with torch.autocast(device_type=self.mean.device.type, enabled=False):
            fused = None
            for i, name in enumerate(self.branches):
                m = (branch_maps[name].float() - self.mean[i]) / self.std[i]
                fused = m if fused is None else fused + m
            assert fused is not None
            if self.sigma > 0:
                fused = _separable_blur(fused, self.kernel)
            return InferenceBatch(fused, image_scores(fused))


def resize_map(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) -> size, bilinear; the map is smooth, so no aliasing concerns."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


__all__ = [
    "AnomalyMapGenerator",
    "ErrorWhitening",
    "InferenceBatch",
    "error_sums",
    "gaussian_blur",
    "image_scores",
    "resize_map",
    "scale_anomaly_maps",
    "unit_error",
]
