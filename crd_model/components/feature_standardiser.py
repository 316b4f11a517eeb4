"""Per-channel standardisation of the teacher's features, per modality (EfficientAD's normalisation).

Raw CNN features are mostly positive and a few channels carry most of their length, so the cosine the
students are trained on is dominated by those channels and by the common offset. Standardising each
channel with its mean and std over the training images' features weighs every channel alike. The
moments are fitted once, before training, and travel with the weights (persistent buffers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

Features = list[torch.Tensor]

# A channel whose std is below this share of the scale's median std is nearly constant on the training
# images: dividing by its own std would turn float noise (or a rare activation) into a huge value.
STD_FLOOR_OF_MEDIAN = 0.01


class FeatureStandardiser(nn.Module):
    """(f - mean) / std per channel, per modality and scale; the identity until `fit` has run."""

    def __init__(self, widths: Mapping[str, list[int]]):
        super().__init__()
        self.widths = {m: list(w) for m, w in widths.items()}
        for m, ws in self.widths.items():
            for k, c in enumerate(ws):
                self.register_buffer(self._name(m, k, "mean"), torch.zeros(1, c, 1, 1))
                self.register_buffer(self._name(m, k, "std"), torch.ones(1, c, 1, 1))
        self._bypass = False

    @staticmethod
    def _name(modality: str, k: int, what: str) -> str:
        return f"{what}_{modality}_{k}"

    def moments(self, modality: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, self._name(modality, k, "mean")), getattr(self, self._name(modality, k, "std"))

    def forward(self, feats: Mapping[str, Features]) -> dict[str, Features]:
        if self._bypass:
            return dict(feats)
        out = {}
        for m, fs in feats.items():
            out[m] = []
            for k, f in enumerate(fs):
                mean, std = self.moments(m, k)
                out[m].append((f - mean.to(f.dtype)) / std.to(f.dtype))
        return out

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """The raw features inside the block (what `fit` measures)."""
        before, self._bypass = self._bypass, True
        try:
            yield
        finally:
            self._bypass = before

    @torch.no_grad()
    def fit(self, batches: Iterable[Mapping[str, Features]]) -> None:
        """Set the moments from raw feature batches (every position of every image counts alike)."""
        sums: dict[tuple[str, int], list[torch.Tensor]] = {}
        for feats in batches:
            for m, fs in feats.items():
                for k, f in enumerate(fs):
                    x = f.double().transpose(0, 1).flatten(1)  # (C, B*H*W)
                    s, ss, count = sums.get((m, k), (0.0, 0.0, 0))
                    sums[(m, k)] = [s + x.sum(1), ss + (x * x).sum(1), count + x.shape[1]]
        if not sums:
            raise ValueError("no features to fit the teacher's feature moments on")
        for (m, k), (s, ss, n) in sums.items():
            mean = s / n
            std = (ss / n - mean * mean).clamp_min(0).sqrt()
            std = std.clamp_min(STD_FLOOR_OF_MEDIAN * float(std.median()) + 1e-12)
            mean_buf, std_buf = self.moments(m, k)
            mean_buf.copy_(mean.view_as(mean_buf).to(mean_buf))
            std_buf.copy_(std.view_as(std_buf).to(std_buf))
