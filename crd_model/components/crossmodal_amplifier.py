"""Crossmodal Amplifier: an inverted-bottleneck projection mixed into the student's output.

Per scale: conv3x3 -> conv1x1 (widen) -> conv1x1 (back), trained to predict the target teacher's
features from the helper's. It is *not* a bottleneck, so an anomaly visible only in the helper
modality reaches the target branch's reconstruction and is detected there too (CRD, Sec. 3.3).
The mix `F = a * F_decoder + (1 - a) * F_amplifier` uses `(a, 1 - a) = softmax(w_k)` with a
learnable `w_k` per scale, initialised equal.
"""

from __future__ import annotations

import torch
from torch import nn

from crd_model.components.blocks import conv_bn_relu


class AmplifierProjection(nn.Module):
    def __init__(self, c_in: int, c_out: int, expansion: int):
        super().__init__()
        wide = c_out * expansion
        self.body = nn.Sequential(
            conv_bn_relu(c_in, c_out, 3),
            conv_bn_relu(c_out, wide, 1),
            nn.Conv2d(wide, c_out, 1),  # linear: predicts (possibly negative) teacher features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class CrossmodalAmplifier(nn.Module):
    def __init__(self, helper_channels: list[int], target_channels: list[int], expansion: int = 2):
        super().__init__()
        self.projections = nn.ModuleList(
            AmplifierProjection(c_in, c_out, expansion)
            for c_in, c_out in zip(helper_channels, target_channels, strict=True)
        )
        # One pair of mixing logits per scale, equal at start (a = 0.5).
        self.mix_logits = nn.Parameter(torch.zeros(len(target_channels), 2))

    def forward(self, helper: list[torch.Tensor]) -> list[torch.Tensor]:
        return [proj(f) for proj, f in zip(self.projections, helper, strict=True)]

    def mix(self, scale: int, decoded: torch.Tensor, amplified: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.mix_logits[scale], dim=0)
        return a[0] * decoded + a[1] * amplified
