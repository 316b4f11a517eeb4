"""Student decoder: the teacher's mirror, from the bottleneck code back to every scale."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from crd_model.components.blocks import BasicBlock, UpsampleBlock


class DecoderStage(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_blocks: int):
        super().__init__()
        self.up = UpsampleBlock(c_in, c_out)
        self.blocks = nn.Sequential(*[BasicBlock(c_out, c_out) for _ in range(n_blocks)])
        self.head = nn.Conv2d(c_out, c_out, 1)  # linear output, comparable to any teacher

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.head(self.blocks(self.up(x, size)))


class StudentDecoder(nn.Module):
    """Decodes deepest scale first. `mix(k, decoded)` may replace a stage's output before it
    feeds the next stage: that is where the Crossmodal Amplifier joins."""

    def __init__(self, code_channels: int, widths: list[int], n_blocks: int = 1):
        super().__init__()
        stages = []
        c_in = code_channels
        for c_out in reversed(widths):
            stages.append(DecoderStage(c_in, c_out, n_blocks))
            c_in = c_out
        self.stages = nn.ModuleList(stages)

    def forward(
        self,
        code: torch.Tensor,
        sizes: list[tuple[int, int]],
        mix: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Returns (raw decoder outputs, mixed outputs), both ordered shallow -> deep like `sizes`."""
        n = len(sizes)
        raw: list[torch.Tensor] = [torch.empty(0)] * n
        mixed: list[torch.Tensor] = [torch.empty(0)] * n
        x = code
        for stage, k in zip(self.stages, reversed(range(n)), strict=True):
            out = stage(x, sizes[k])
            raw[k] = out
            x = mix(k, out) if mix is not None else out
            mixed[k] = x
        return raw, mixed
