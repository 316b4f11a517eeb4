"""One-class bottleneck embedding (OCBE) of reverse distillation, for any number of scales.

Every scale is brought to the deepest scale's grid by stride-2 convs (each step widening to the
next scale's channel count, as RD4AD does for ResNet layer1/2), the results are concatenated and
squeezed by residual blocks, the first with stride 2, into one compact code.
"""

from __future__ import annotations

import torch
from torch import nn

from crd_model.components.blocks import Bottleneck, conv_bn_relu


class OneClassBottleneck(nn.Module):
    def __init__(self, in_channels: list[int], widths: list[int], n_blocks: int = 3):
        """`in_channels`: channels entering per scale; `widths`: the teacher's channels per scale."""
        super().__init__()
        n = len(widths)
        self.align = nn.ModuleList()
        for i, c_in in enumerate(in_channels):
            steps: list[nn.Module] = []
            c = c_in
            for j in range(i + 1, n):
                steps.append(conv_bn_relu(c, widths[j], 3, stride=2))
                c = widths[j]
            if not steps:  # deepest scale: a 3x3 conv so every input gets a learned transform
                steps.append(conv_bn_relu(c, widths[-1], 3))
            self.align.append(nn.Sequential(*steps))
        self.out_channels = 2 * widths[-1]
        blocks: list[nn.Module] = [Bottleneck(n * widths[-1], self.out_channels, stride=2)]
        blocks += [Bottleneck(self.out_channels, self.out_channels) for _ in range(n_blocks - 1)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        aligned = [layer(f) for layer, f in zip(self.align, features, strict=True)]
        size = aligned[-1].shape[-2:]
        aligned = [
            a if a.shape[-2:] == size else nn.functional.interpolate(a, size=size, mode="bilinear") for a in aligned
        ]
        return self.blocks(torch.cat(aligned, dim=1))
