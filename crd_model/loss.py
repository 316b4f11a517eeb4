"""Cosine reconstruction loss of reverse distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_distance_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position 1 - cos(a, b) over channels: (B, C, H, W) x2 -> (B, H, W)."""
    return 1.0 - F.cosine_similarity(a, b, dim=1)


def distillation_loss(predicted: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """Sum over scales of the mean over positions of (1 - cos)."""
    return sum(
        (cosine_distance_map(p, t).mean() for p, t in zip(predicted, target, strict=True)),
        start=torch.zeros((), device=target[0].device),
    )
