"""Crossmodal Filter: the helper modality's features through a narrow bottleneck.

Trained to predict the target modality's teacher features from the helper's. Because it squeezes
the helper's features down to a small grid and few channels, it can only carry *normal* context
across: an anomaly in the helper modality is filtered out rather than copied into the target
branch's input (CRD, Sec. 3.2).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from crd_model.components.blocks import UpsampleBlock, conv_bn_relu


class FilterProjection(nn.Module):
    """One scale: strided convs down `steps` times, transposed convs back up to the input grid."""

    def __init__(self, c_in: int, c_out: int, steps: int, width: int):
        super().__init__()
        self.down = nn.ModuleList([conv_bn_relu(c_in if i == 0 else width, width, 3, stride=2) for i in range(steps)])
        self.up = nn.ModuleList([UpsampleBlock(width, width) for _ in range(steps)])
        # Linear head: teacher features can be negative (EfficientNet blocks have no final ReLU).
        self.head = nn.Conv2d(width, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = []
        for layer in self.down:
            sizes.append(tuple(x.shape[-2:]))
            x = layer(x)
        for layer, size in zip(self.up, reversed(sizes), strict=True):
            x = layer(x, size)
        return self.head(x)


class CrossmodalFilter(nn.Module):
    """A FilterProjection per scale; every scale is squeezed down to the bottleneck's grid."""

    def __init__(self, helper_channels: list[int], target_channels: list[int], reductions: list[int]):
        super().__init__()
        deepest = 2 * max(reductions)
        self.projections = nn.ModuleList(
            FilterProjection(c_in, c_out, steps=int(math.log2(deepest // r)), width=max(c_out // 2, 16))
            for c_in, c_out, r in zip(helper_channels, target_channels, reductions, strict=True)
        )

    def forward(self, helper: list[torch.Tensor]) -> list[torch.Tensor]:
        return [proj(f) for proj, f in zip(self.projections, helper, strict=True)]
