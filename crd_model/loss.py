"""Cosine reconstruction loss of reverse distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_KINDS = ("position", "global", "magnitude")


def cosine_distance_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position 1 - cos(a, b) over channels: (B, C, H, W) x2 -> (B, H, W)."""
    return 1.0 - F.cosine_similarity(a, b, dim=1)


def distillation_loss(
    predicted: list[torch.Tensor], target: list[torch.Tensor], kind: str = "position"
) -> torch.Tensor:
    """Sum over scales of a cosine loss.

    - "position": mean over positions of (1 - cos) between feature vectors (what `scoring="cosine"` scores);
    - "global": 1 - cos between each image's whole flattened feature map, averaged over the batch
      (RD4AD's and TRD's `loss_distil`): large-norm positions weigh more;
    - "magnitude": "position" plus the mean squared relative norm error ((|p| - |t|) / |t|)^2, so the
      student also learns each feature vector's length, which (1 - cos) ignores (an experiment:
      docs/model.md).
    """
    if kind == "magnitude":
        norms = (_relative_norm_error(p, t) for p, t in zip(predicted, target, strict=True))
        return distillation_loss(predicted, target, "position") + sum(
            norms, start=torch.zeros((), device=target[0].device)
        )
    if kind == "position":
        terms = (cosine_distance_map(p, t).mean() for p, t in zip(predicted, target, strict=True))
    elif kind == "global":
        terms = (
            (1.0 - F.cosine_similarity(p.flatten(1), t.flatten(1), dim=1)).mean()
            for p, t in zip(predicted, target, strict=True)
        )
    else:
        raise ValueError(f"unknown loss {kind!r}; expected one of {list(LOSS_KINDS)}")
    return sum(terms, start=torch.zeros((), device=target[0].device))


def _relative_norm_error(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ((|p| - |t|) / |t|)^2, feature vectors along dim 1."""
    t_norm = t.float().norm(dim=1)
    return (((p.float().norm(dim=1) - t_norm) / t_norm.clamp_min(1e-6)) ** 2).mean()
