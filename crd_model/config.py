"""Model configuration and checkpoint metadata (pydantic; no torch).

Configuration is data, separate from code: `create_model(config)` builds the network from it,
and a checkpoint stores it as JSON next to the safetensors weights.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Architecture = Literal["crd", "rgb", "3d", "fused"]
Representation3D = Literal["normals", "depth", "normals_height"]
PlaneMethod = Literal["ransac", "corners", "none"]
Scoring = Literal["cosine", "whitened"]

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
    # Hysteresis: the object grows from the points above plane_distance through the connected points above
    # this height (metres), so a body near plane_distance thick does not fall apart into specks. None: no
    # growth (checkpoints written before it existed; see LEGACY_DEFAULTS).
    plane_grow_distance: float | None = Field(0.0025, gt=0)
    # Gaussian sigma of the point-map smoothing before normals, in pixels at 256 px (scaled with image_size).
    smoothing_3d: float = Field(1.5, ge=0)
    # The 3D input is computed at this multiple of image_size, then averaged over the object down to it.
    oversample_3d: int = Field(1, ge=1, le=4)
    # The input itself (ImageNet-normalised, averaged over each cell of the shallowest scale) appended to the
    # teacher's shallowest features with this weight, so the students must also reproduce the part's colour
    # (RGB) or surface direction (3D) there; 0: off (docs/model.md, "The input as teacher channels").
    teacher_input_weight: float = Field(0.0, ge=0)
    bottleneck_blocks: int = Field(3, ge=1, le=8)
    decoder_blocks: int = Field(1, ge=0, le=8)
    amplifier_expansion: int = Field(2, ge=1, le=8)
    # Gaussian blur of the fused map, in pixels at 256 px; scaled with image_size.
    blur_sigma: float = Field(4.0, ge=0)
    # Each scale's map: "cosine" = 1 - cos(teacher, student) per position (the paper's); "whitened" = the
    # students' unit error whitened with its mean and covariance measured at calibration (a Mahalanobis
    # distance; docs/model.md, "Whitened errors"). Checkpoints written before it existed score "cosine".
    scoring: Scoring = "whitened"

    @model_validator(mode="after")
    def _grow_below_the_threshold(self) -> CRDConfig:
        if self.plane_grow_distance is not None and self.plane_grow_distance >= self.plane_distance:
            raise ValueError(
                f"plane_grow_distance ({self.plane_grow_distance}) must be below plane_distance ({self.plane_distance})"
            )
        return self

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


class ScaleErrorMoments(BaseModel):
    """The students' unit error at one feature scale over every position of the statistics images
    (`scoring="whitened"`): its mean per channel, and the inverse square root of its covariance (shrunk
    towards a multiple of the identity), row-major C x C, as the model applies it."""

    model_config = ConfigDict(extra="forbid")

    mean: list[float]
    whitener: list[float]

    @model_validator(mode="after")
    def _square(self) -> ScaleErrorMoments:
        if not self.mean or len(self.whitener) != len(self.mean) ** 2:
            raise ValueError("a whitener needs C x C values for C channel means")
        return self


def moment_pairs(moments: dict[str, list[ScaleErrorMoments]]) -> dict[str, list[tuple[list[float], list[float]]]]:
    """Per-branch, per-scale (mean, whitener), as `ErrorWhitening.set_moments` takes them."""
    return {k: [(m.mean, m.whitener) for m in scales] for k, scales in moments.items()}


class CalibrationSource(BaseModel):
    """Where and when a calibration was measured (a checkpoint can be recalibrated without retraining)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["validation", "folder"]  # a training run's validation split, or `crd calibrate --folder`
    path: str  # the split or folder that held the good parts
    n_images: int = Field(ge=1)
    calibrated_at: str  # ISO 8601, UTC
    crd_inspect_version: str
    device: str | None = None  # scores were computed on this device type (cpu, cuda): verdicts repeat there
    previous_threshold: float | None = None  # the threshold this calibration replaced (recalibration)
    batch_size: int | None = None  # threshold images were scored in batches of this size, in this order
    statistics_images: list[str] = []  # paths (relative to `path`) the branch statistics came from
    threshold_images: list[str] = []  # the held-out images whose scores set the threshold ...
    threshold_scores: list[float] = []  # ... and those scores, as inference computes them


class Calibration(BaseModel):
    """What turns raw maps into a verdict: map standardisation and the image threshold.

    The first six fields are those of every checkpoint; the rest came with held-out calibration
    (statistics and threshold from disjoint images, the order-statistic uncertainty) and are optional,
    so config.json files written before them still load.
    """

    model_config = ConfigDict(extra="forbid")

    branch_stats: dict[str, BranchStats]
    threshold: float
    false_reject_rate: float = Field(ge=0, le=1)  # the requested rate
    n_validation: int = Field(ge=1)  # good images calibration read (statistics + threshold)
    validation_score_max: float  # over the threshold images' scores
    validation_score_median: float
    # --- held-out calibration (absent in older checkpoints) ---
    method: Literal["held-out", "same-images"] | None = None  # None: written before the split existed
    n_statistics: int | None = Field(None, ge=1)  # images the branch mean/std came from
    n_threshold: int | None = Field(None, ge=1)  # other images whose scores set the threshold
    threshold_rank: int | None = Field(None, ge=1)  # the threshold sits just above this order statistic
    expected_false_reject_rate: float | None = Field(None, ge=0, le=1)  # on unseen good parts, (n+1-k)/(n+1)
    false_reject_rate_interval: tuple[float, float] | None = None  # 90 % of calibration sets land in here
    score_tolerance: float | None = Field(None, ge=0)  # guard above the order statistic (score repeatability)
    score_repeat_error: float | None = Field(None, ge=0)  # largest score change measured at another batch size
    warnings: list[str] = []
    source: CalibrationSource | None = None
    # --- whitened scoring: per branch, per scale (shallow first); None for scoring="cosine" ---
    error_moments: dict[str, list[ScaleErrorMoments]] | None = None

    def statistics(self) -> dict[str, tuple[float, float]]:
        """Per-branch (mean, std), as the model's scoring head takes them."""
        return {k: (s.mean, s.std) for k, s in self.branch_stats.items()}

    def moments(self) -> dict[str, list[tuple[list[float], list[float]]]] | None:
        """Per-branch, per-scale (mean, whitener) of the students' error, as the model takes them."""
        return None if self.error_moments is None else moment_pairs(self.error_moments)


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
    # Optional (absent in older checkpoints): where training ran and how long the epochs took.
    device: str | None = None
    bf16: bool | None = None
    loss: str | None = None
    augment: str | None = None
    shift: int | None = None
    gain: float | None = None
    noise: float | None = None
    seconds_per_epoch: float | None = None
    fit_seconds: float | None = None


# Settings added after checkpoints were first written whose new default changes what a model sees: a
# config.json without them gets the value that reproduces how that checkpoint was trained.
LEGACY_DEFAULTS: dict[str, object] = {"plane_grow_distance": None, "scoring": "cosine"}


class CheckpointMeta(BaseModel):
    """config.json of a checkpoint directory."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = CHECKPOINT_FORMAT_VERSION
    model_id: str
    config: CRDConfig
    calibration: Calibration | None = None
    training: TrainingInfo | None = None

    @model_validator(mode="before")
    @classmethod
    def _as_trained(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            return {**data, "config": {**LEGACY_DEFAULTS, **data["config"]}}
        return data

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != CHECKPOINT_FORMAT_VERSION:
            raise ValueError(
                f"unsupported checkpoint format_version {v} (this build reads {CHECKPOINT_FORMAT_VERSION})"
            )
        return v
