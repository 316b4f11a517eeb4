"""From per-scale feature discrepancies to anomaly maps and image scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crd_model.loss import cosine_distance_map


def branch_anomaly_map(
    teacher: list[torch.Tensor], student: list[torch.Tensor], size: tuple[int, int]
) -> torch.Tensor:
    """Sum over scales of (1 - cos), each upsampled bilinearly to `size`: (B, H, W)."""
    total = None
    for t, s in zip(teacher, student, strict=True):
        d = cosine_distance_map(t.float(), s.float()).unsqueeze(1)
        d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        total = d if total is None else total + d
    assert total is not None
    return total[:, 0]


def gaussian_kernel1d(sigma: float, device: torch.device, truncate: float = 4.0) -> torch.Tensor:
    radius = max(int(truncate * sigma + 0.5), 1)
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding (scipy's default mode)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.device)
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


def fuse_maps(
    branch_maps: dict[str, torch.Tensor],
    stats: dict[str, tuple[float, float]] | None,
    sigma: float,
) -> torch.Tensor:
    """Standardise each branch with its validation mean/std, sum, blur."""
    fused = None
    for name, m in branch_maps.items():
        if stats is not None:
            mean, std = stats[name]
            m = (m - mean) / std
        fused = m if fused is None else fused + m
    assert fused is not None
    return gaussian_blur(fused, sigma)


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """Image score = maximum of the (blurred) map."""
    return maps.flatten(1).amax(dim=1)


def resize_map(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) -> size, bilinear; the map is smooth, so no aliasing concerns."""
    if tuple(m.shape[-2:]) == tuple(size):
        return m
    return F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


__all__ = [
    "branch_anomaly_map",
    "fuse_maps",
    "gaussian_blur",
    "image_scores",
    "resize_map",
]
