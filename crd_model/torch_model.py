"""Crossmodal Reverse Distillation as a pure nn.Module, plus the baselines built from its parts.

Architectures (`CRDConfig.architecture`):
- "crd":   two branches, RGB and 3D, each with a Crossmodal Filter and a Crossmodal Amplifier fed by
           the other modality (the paper's model).
- "rgb":   reverse distillation on RGB alone.
- "3d":    reverse distillation on the 3D representation alone.
- "fused": one reverse distillation on early-fused teacher features (per-scale concatenation of the
           two modalities, each L2-normalised over channels so neither dominates the cosine).
All module shapes come from the teacher's `feature_info`, so any timm CNN serves as teacher.

In eval mode the model owns its scoring: `model(rgb, x3d)` returns the fused anomaly map and the image
scores (`InferenceBatch`) in one graph; in training mode it returns each branch's outputs for the loss.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crd_model.anomaly_map import AnomalyMapGenerator, ErrorWhitening, InferenceBatch, scale_anomaly_maps
from crd_model.backbones import Teacher
from crd_model.components.bottleneck import OneClassBottleneck
from crd_model.components.crossmodal_amplifier import CrossmodalAmplifier
from crd_model.components.crossmodal_filter import CrossmodalFilter
from crd_model.components.decoder import StudentDecoder
from crd_model.config import CRDConfig
from crd_model.loss import distillation_loss

Features = list[torch.Tensor]


@dataclass
class BranchOutput:
    target: Features  # the frozen teacher's features the branch must reconstruct
    decoded: Features  # raw student decoder output per scale
    mixed: Features  # decoder output after the amplifier mix (== decoded without amplifier)
    filtered: Features | None = None
    amplified: Features | None = None

    def loss_terms(self, kind: str = "position") -> dict[str, torch.Tensor]:
        terms = {"decoder": distillation_loss(self.decoded, self.target, kind)}
        if self.filtered is not None:
            terms["filter"] = distillation_loss(self.filtered, self.target, kind)
        if self.amplified is not None:
            terms["amplifier"] = distillation_loss(self.amplified, self.target, kind)
            terms["output"] = distillation_loss(self.mixed, self.target, kind)
        return terms


class RDBranch(nn.Module):
    """One reverse-distillation branch; with `helper_widths` it becomes a CRD branch."""

    def __init__(
        self,
        widths: list[int],
        reductions: list[int],
        helper_widths: list[int] | None = None,
        bottleneck_blocks: int = 3,
        decoder_blocks: int = 1,
        amplifier_expansion: int = 2,
    ):
        super().__init__()
        crossmodal = helper_widths is not None
        self.filter = CrossmodalFilter(helper_widths, widths, reductions) if crossmodal else None
        self.amplifier = CrossmodalAmplifier(helper_widths, widths, amplifier_expansion) if crossmodal else None
        in_channels = [2 * w for w in widths] if crossmodal else list(widths)
        self.bottleneck = OneClassBottleneck(in_channels, widths, bottleneck_blocks)
        self.decoder = StudentDecoder(self.bottleneck.out_channels, widths, decoder_blocks)

    def forward(self, target: Features, helper: Features | None = None) -> BranchOutput:
        filtered = amplified = None
        inputs = target
        if self.filter is not None:
            assert helper is not None, "a crossmodal branch needs the helper modality"
            filtered = self.filter(helper)
            inputs = [torch.cat([t, f], dim=1) for t, f in zip(target, filtered, strict=True)]
        code = self.bottleneck(inputs)
        mix = None
        if self.amplifier is not None:
            amplified = self.amplifier(helper)
            amp = self.amplifier

            def mix(k: int, decoded: torch.Tensor) -> torch.Tensor:
                return amp.mix(k, decoded, amplified[k])

        sizes = [tuple(t.shape[-2:]) for t in target]
        decoded, mixed = self.decoder(code, sizes, mix)
        return BranchOutput(target, decoded, mixed, filtered, amplified)


class CRDModel(nn.Module):
    def __init__(self, config: CRDConfig, teacher_weights: str | bool | None = True):
        super().__init__()
        self.config = config
        # One frozen teacher serves both modalities: the paper's two teachers hold identical
        # ImageNet weights, and one module lets us encode RGB and 3D in a single batch.
        self.teacher = Teacher(config.backbone, config.feature_indices, teacher_weights, config.teacher_input_weight)
        widths, reductions = self.teacher.channels, self.teacher.reductions
        kw = dict(
            bottleneck_blocks=config.bottleneck_blocks,
            decoder_blocks=config.decoder_blocks,
            amplifier_expansion=config.amplifier_expansion,
        )
        arch = config.architecture
        if arch == "crd":
            branches = {
                "rgb": RDBranch(widths, reductions, helper_widths=widths, **kw),
                "3d": RDBranch(widths, reductions, helper_widths=widths, **kw),
            }
        elif arch == "fused":
            branches = {"fused": RDBranch([2 * w for w in widths], reductions, **kw)}
        else:
            branches = {arch: RDBranch(widths, reductions, **kw)}
        self.branches = nn.ModuleDict(branches)
        # The student's error per channel, whitened with calibration's moments (config.scoring).
        self.error_whitening = (
            ErrorWhitening({name: [2 * w for w in widths] if name == "fused" else widths for name in branches})
            if config.scoring == "whitened"
            else None
        )
        self.anomaly_map_generator = AnomalyMapGenerator(config.branches, config.effective_blur_sigma)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.branches.parameters())

    def encode(self, rgb: torch.Tensor | None, x3d: torch.Tensor | None) -> dict[str, Features]:
        """Teacher features per modality; both modalities go through the teacher as one batch."""
        inputs = {k: v for k, v in (("rgb", rgb), ("3d", x3d)) if v is not None}
        batch = torch.cat(list(inputs.values()), dim=0)
        feats = self.teacher(batch)
        n = next(iter(inputs.values())).shape[0]
        return {k: [f[i * n : (i + 1) * n] for f in feats] for i, k in enumerate(inputs)}

    def run_branch(
        self, feats: dict[str, Features], name: str, targets: dict[str, Features] | None = None
    ) -> BranchOutput:
        """Forward of one branch. CRD branches get their own modality first, the other as helper.
        `targets`: the teacher features the branch must reconstruct, when they are not its inputs'
        (training on corrupted inputs: `TrainOptions.noise`)."""
        if name == "fused":
            output = self.branches["fused"](self._fused(feats))
            target = None if targets is None else self._fused(targets)
        else:
            helper = feats["3d" if name == "rgb" else "rgb"] if self.config.architecture == "crd" else None
            output = self.branches[name](feats[name], helper)
            target = None if targets is None else targets[name]
        if target is not None:
            output.target = target
        return output

    @staticmethod
    def _fused(feats: dict[str, Features]) -> Features:
        return [
            torch.cat([F.normalize(r, dim=1), F.normalize(d, dim=1)], dim=1)
            for r, d in zip(feats["rgb"], feats["3d"], strict=True)
        ]

    def run_branches(self, feats: dict[str, Features]) -> dict[str, BranchOutput]:
        return {name: self.run_branch(feats, name) for name in self.branches}

    def branch_maps(self, rgb: torch.Tensor | None, x3d: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Raw (unstandardised) anomaly map per branch, (B, H, W) at the input resolution: the sum over
        scales, shallow first, of `scale_maps`."""
        return {name: functools.reduce(operator.add, maps) for name, maps in self.scale_maps(rgb, x3d).items()}

    def scale_maps(
        self, rgb: torch.Tensor | None, x3d: torch.Tensor | None, per_scale=None
    ) -> dict[str, list[torch.Tensor]]:
        """Each branch's per-scale maps, (B, H, W) at the input resolution, shallow scale first: (1 - cos)
        or, with `scoring="whitened"`, the whitened error. `per_scale(teacher, student, size)` computes
        another per-scale quantity instead (calibration's error sums, bench/scoring_variants.py)."""
        size = tuple((rgb if rgb is not None else x3d).shape[-2:])
        outputs = self.run_branches(self.encode(rgb, x3d))
        if per_scale is not None:
            return {name: per_scale(o.target, o.mixed, size) for name, o in outputs.items()}
        if self.error_whitening is not None:
            return {name: self.error_whitening.scale_maps(name, o.target, o.mixed, size) for name, o in outputs.items()}
        return {name: scale_anomaly_maps(o.target, o.mixed, size) for name, o in outputs.items()}

    def set_calibration(
        self,
        stats: dict[str, tuple[float, float]],
        error_moments: dict[str, list[tuple[list[float], list[float]]]] | None = None,
    ) -> None:
        """Per-branch (mean, std) that standardise the raw maps before they are fused and, for
        `scoring="whitened"`, the per-scale (mean, whitener) of the students' error they are measured with."""
        if self.error_whitening is not None and error_moments is not None:
            self.error_whitening.set_moments(error_moments)
        self.anomaly_map_generator.set_statistics(stats)

    def forward(self, rgb: torch.Tensor | None, x3d: torch.Tensor | None) -> InferenceBatch | dict[str, BranchOutput]:
        """Eval mode: fused anomaly maps and image scores. Training mode: every branch's outputs."""
        if self.training:
            return self.run_branches(self.encode(rgb, x3d))
        return self.anomaly_map_generator(self.branch_maps(rgb, x3d))


def create_model(config: CRDConfig | None = None, teacher_weights: str | bool | None = True, **overrides) -> CRDModel:
    """timm-style factory: `create_model(architecture="rgb", backbone="wide_resnet50_2", ...)`."""
    config = (config or CRDConfig()).model_copy(update=overrides) if overrides else (config or CRDConfig())
    if overrides:
        config = CRDConfig.model_validate(config.model_dump())
    return CRDModel(config, teacher_weights)
