"""Model configuration and checkpoint metadata (pydantic; no torch).

Configuration is data, separate from code: `create_model(config)` builds the network from it,
and a checkpoint stores it as JSON next to the safetensors weights.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Architecture = Literal["crd", "rgb", "3d", "fused"]
Representation3D = Literal["normals", "depth"]
PlaneMethod = Literal["ransac", "corners", "none"]

CHECKPOINT_FORMAT_VERSION = 1


class CRDConfig(BaseModel):
    """Everything needed to rebuild a network and its preprocessing bit for bit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Architecture = "crd"
    backbone: str = "efficientnet_lite0"
    # timm feature stages used as the reverse-distillation scales (strides 4, 8, 16 for the
    # usual CNNs, as RD4AD uses layer1..layer3 of a ResNet).
    feature_indices: tuple[int, ...] = (1, 2, 3)
    image_size: int = 256
    representation_3d: Representation3D = "normals"
    plane: PlaneMethod = "ransac"
    plane_distance: float = Field(0.005, gt=0, description="metres; points closer to the plane are background")
    bottleneck_blocks: int = Field(3, ge=1, le=8)
    decoder_blocks: int = Field(1, ge=0, le=8)
    amplifier_expansion: int = Field(2, ge=1, le=8)
    # Gaussian blur of the fused map, in pixels at 256 px; scaled with image_size.
    blur_sigma: float = Field(4.0, ge=0)

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v < 64 or v % 32:
            raise ValueError(f"image_size must be a multiple of 32 and >= 64, got {v}")
        return v

    @property
    def branches(self) -> tuple[str, ...]:
        """Names of the anomaly-map branches the architecture produces."""
        return {"crd": ("rgb", "3d"), "rgb": ("rgb",), "3d": ("3d",), "fused": ("fused",)}[self.architecture]

    @property
    def uses_rgb(self) -> bool:
        return self.architecture != "3d"

    @property
    def uses_3d(self) -> bool:
        return self.architecture != "rgb"

    @property
    def effective_blur_sigma(self) -> float:
        return self.blur_sigma * self.image_size / 256.0


class BranchStats(BaseModel):
    """Mean and std of one branch's raw anomaly map over all pixels of normal validation images."""

    model_config = ConfigDict(extra="forbid")

    mean: float
    std: float = Field(gt=0)


class Calibration(BaseModel):
    """What turns raw maps into a verdict: map standardisation and the image threshold."""

    model_config = ConfigDict(extra="forbid")

    branch_stats: dict[str, BranchStats]
    threshold: float
    false_reject_rate: float = Field(ge=0, le=1)
    n_validation: int = Field(ge=1)
    validation_score_max: float
    validation_score_median: float

    def statistics(self) -> dict[str, tuple[float, float]]:
        """Per-branch (mean, std), as the model's scoring head takes them."""
        return {k: (s.mean, s.std) for k, s in self.branch_stats.items()}


class TrainingInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    category: str
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    n_train: int
    seconds: float
    final_loss: dict[str, float] = {}
    trainable_parameters: int
    created_at: str
    crd_inspect_version: str
    torch_version: str


class CheckpointMeta(BaseModel):
    """config.json of a checkpoint directory."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = CHECKPOINT_FORMAT_VERSION
    model_id: str
    config: CRDConfig
    calibration: Calibration | None = None
    training: TrainingInfo | None = None

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != CHECKPOINT_FORMAT_VERSION:
            raise ValueError(
                f"unsupported checkpoint format_version {v} (this build reads {CHECKPOINT_FORMAT_VERSION})"
            )
        return v
