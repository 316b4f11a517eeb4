"""Cosine reconstruction loss of reverse distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_KINDS = ("position", "global", "magnitude", "hard")
HARD_SHARE = 0.1  # "hard": the share of each scale's positions (over the batch) whose mean is added


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
      docs/model.md);
    - "hard": "position" plus the mean of the hardest `HARD_SHARE` of each scale's positions in the batch
      (EfficientAD's hard feature loss, as a term: the worst-reproduced normal texture is what sets a
      good part's score; an experiment: docs/model.md).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss {kind!r}; expected one of {list(LOSS_KINDS)}")
    terms = (_scale_loss(kind, p, t) for p, t in zip(predicted, target, strict=True))
    return sum(terms, start=torch.zeros((), device=target[0].device))


def _scale_loss(kind: str, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One scale's term of `distillation_loss`."""
    if kind == "global":
        return (1.0 - F.cosine_similarity(p.flatten(1), t.flatten(1), dim=1)).mean()
    d = cosine_distance_map(p, t)  # once per scale: "hard" reuses it
    if kind == "hard":
        return d.mean() + _hardest_mean(d)
    if kind == "magnitude":
        return d.mean() + _relative_norm_error(p, t)
    return d.mean()


def _relative_norm_error(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ((|p| - |t|) / |t|)^2, feature vectors along dim 1."""
    t_norm = t.float().norm(dim=1)
    return (((p.float().norm(dim=1) - t_norm) / t_norm.clamp_min(1e-6)) ** 2).mean()


def _hardest_mean(d: torch.Tensor) -> torch.Tensor:
    """Mean of the largest `HARD_SHARE` of the values of d."""
    flat = d.flatten()
    return flat.topk(max(1, int(HARD_SHARE * flat.numel()))).values.mean()
