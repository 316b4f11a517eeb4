"""Wire messages: the pydantic models of every message on the streams, their limits and `WireError`.

Decoding is strict: every model forbids unknown keys, identifiers have a restricted charset, numbers are
finite and fit a signed 64-bit integer, and every size is checked against `Limits` before anything is
inflated. docs/wire-format.md is the language-neutral spec of the same messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    StrictBool,
    StrictBytes,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.types import AllowInfNan, Strict
from pydantic_core import PydanticCustomError

WIRE_VERSION = 1

INT64_MAX = 2**63 - 1  # every integer on the wire fits a signed 64-bit int (Go int64, C# long)
MAX_ERROR_CODE_CHARS = 64
MAX_ERROR_MESSAGE_CHARS = 1024
_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")  # used with fullmatch: `$` would let a trailing "\n" through


class WireError(ValueError):
    """A message or payload that cannot be encoded/decoded; `code` is machine-readable, str(e) is for humans.

    Codes (docs/wire-format.md section 6): too_large, bad_msgpack, unsupported_version, bad_type, invalid,
    bad_rgb, bad_xyz, xyz_out_of_range, bad_map, shape_mismatch.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)  # args == (code, message): pickles across processes
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"WireError({self.code!r}, {self.message!r})"

    def info(self) -> ErrorInfo:
        """This error as the `ErrorInfo` of an error `Result`."""
        return ErrorInfo.make(self.code, self.message)


class Limits(BaseModel):
    """Bounds applied when decoding; every decode function takes one (default `DEFAULT_LIMITS`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_message_bytes: PositiveInt = 64 * 1024 * 1024
    max_image_side: PositiveInt = 8192
    max_pixels: PositiveInt = 40_000_000
    max_meta_entries: PositiveInt = 64
    max_meta_value_bytes: PositiveInt = 4096
    max_id_len: PositiveInt = 128
    max_regions: PositiveInt = 64
    # Point-map coordinates are metres from the camera: a finite value beyond this is a broken camera or
    # encoder (it would overflow the model's float32 maths), refused as "xyz_out_of_range".
    max_xyz_abs_m: PositiveFloat = 1e4


DEFAULT_LIMITS = Limits()


# ----------------------------------------------------------------------------------------------- validation


def _limits(info: ValidationInfo) -> Limits:
    # unpack_* pass their Limits as validation context; direct construction gets the defaults.
    ctx = info.context
    if isinstance(ctx, Mapping):
        lim = ctx.get("limits")
        if isinstance(lim, Limits):
            return lim
    return DEFAULT_LIMITS


def _too_large(message: str) -> PydanticCustomError:
    # Custom error type survives ValidationError, so unpack_* can report code "too_large", not "invalid".
    return PydanticCustomError("too_large", message)


def _dims_problem(h: int, w: int, limits: Limits) -> tuple[str, str] | None:
    if h < 1 or w < 1:
        return "invalid", f"image size {h}x{w} must be at least 1x1"
    if h > limits.max_image_side or w > limits.max_image_side:
        return "too_large", f"image size {h}x{w} exceeds max_image_side {limits.max_image_side}"
    if h * w > limits.max_pixels:
        return "too_large", f"image size {h}x{w} exceeds max_pixels {limits.max_pixels}"
    return None


def _validate_dims(h: int, w: int, info: ValidationInfo) -> None:
    problem = _dims_problem(h, w, _limits(info))
    if problem is not None:
        if problem[0] == "too_large":
            raise _too_large(problem[1])
        raise ValueError(problem[1])


def check_dims(h: int, w: int, limits: Limits) -> None:
    problem = _dims_problem(h, w, limits)
    if problem is not None:
        raise WireError(*problem)


def is_anomalous(score: float, threshold: float) -> bool:
    """The verdict rule (docs/wire-format.md): anomalous iff `score >= threshold` (equality is anomalous)."""
    return score >= threshold


def is_ident(v: str, max_len: int) -> bool:
    return 0 < len(v) <= max_len and _ID_RE.fullmatch(v) is not None


def _ident(v: str, info: ValidationInfo) -> str:
    max_len = _limits(info).max_id_len
    if not is_ident(v, max_len):
        raise ValueError(f"must be 1-{max_len} characters from [A-Za-z0-9._:-]")
    return v


def _ident_or_empty(v: str, info: ValidationInfo) -> str:
    return v if v == "" else _ident(v, info)


# Identifiers end up in Redis key names and log lines: a restricted charset, no braces, no whitespace.
Ident = Annotated[StrictStr, AfterValidator(_ident)]
IdentOrEmpty = Annotated[StrictStr, AfterValidator(_ident_or_empty)]
# Strict types: msgpack gives exact types, so "1" for an int or a str for bytes is a producer bug, not input
# to coerce. Floats accept ints (a Go/JS encoder may write 1700000000 as an int) but never NaN/inf.
Float = Annotated[float, Strict(), AllowInfNan(False)]
UInt = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]
MetaValue = StrictStr | StrictBool | StrictInt | Float


# Keys a message must carry itself: nil or absent there is "invalid"/"bad_type", never a default.
_NEVER_DEFAULTED = frozenset({"v", "type"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _nil_means_absent(cls, data: Any) -> Any:
        # docs/wire-format.md section 2: an optional field may be nil or absent, with the same meaning, so a
        # nil in a field that has a default (meta, regions, timings, deliveries, scale) takes the default.
        if isinstance(data, dict) and any(value is None for value in data.values()):
            fields = cls.model_fields
            defaulted = {k for k, f in fields.items() if not f.is_required() and k not in _NEVER_DEFAULTED}
            data = {key: value for key, value in data.items() if not (value is None and key in defaulted)}
        return data


def _check_hw3(v: tuple[int, int, int], info: ValidationInfo, what: str) -> tuple[int, int, int]:
    if v[2] != 3:
        raise ValueError(f"{what} shape must be (H, W, 3)")
    _validate_dims(v[0], v[1], info)
    return v


class RGBImage(_Model):
    """An RGB image: PNG or JPEG bytes, or raw row-major uint8 H*W*3 bytes."""

    encoding: Literal["png", "jpeg", "raw"]
    shape: tuple[StrictInt, StrictInt, StrictInt]  # (H, W, 3)
    data: StrictBytes

    @field_validator("shape")
    @classmethod
    def _check_shape(cls, v: tuple[int, int, int], info: ValidationInfo) -> tuple[int, int, int]:
        return _check_hw3(v, info, "rgb")


class PointMap(_Model):
    """An organised point cloud: x, y, z in metres per pixel, little-endian floats; missing points are 0,0,0."""

    dtype: Literal["float32", "float16"]
    compression: Literal["none", "zlib"]
    shape: tuple[StrictInt, StrictInt, StrictInt]  # (H, W, 3)
    data: StrictBytes

    @field_validator("shape")
    @classmethod
    def _check_shape(cls, v: tuple[int, int, int], info: ValidationInfo) -> tuple[int, int, int]:
        return _check_hw3(v, info, "xyz")


def _validate_meta(v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    limits = _limits(info)
    if len(v) > limits.max_meta_entries:
        raise _too_large(f"meta has {len(v)} entries; limit {limits.max_meta_entries}")
    for key, value in v.items():
        if not is_ident(key, limits.max_id_len):
            raise ValueError(f"meta key {key[:40]!r} must be 1-{limits.max_id_len} characters from [A-Za-z0-9._:-]")
        if isinstance(value, str) and len(value.encode()) > limits.max_meta_value_bytes:
            raise _too_large(f"meta[{key!r}] is over {limits.max_meta_value_bytes} bytes")
        if isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise ValueError(f"meta[{key!r}] does not fit a signed 64-bit integer")
    return v


class _Message(_Model):
    """Checks shared by the top-level messages (their fields are declared in each, to fix the key order)."""

    @field_validator("v", check_fields=False)
    @classmethod
    def _check_v(cls, v: int) -> int:
        if v != WIRE_VERSION:
            raise ValueError(f"wire version {v} is not supported (this code speaks v{WIRE_VERSION})")
        return v

    @field_validator("meta", check_fields=False)
    @classmethod
    def _check_meta(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _validate_meta(v, info)


class Frame(_Message):
    """One paired RGB + xyz capture pushed by a camera producer."""

    v: StrictInt = WIRE_VERSION
    type: Literal["frame"] = "frame"
    frame_id: Ident
    line: Ident
    camera: Ident
    seq: UInt
    captured_at: Float = Field(ge=0)  # unix seconds
    category: Ident  # the recipe / model to inspect against
    rgb: RGBImage
    xyz: PointMap
    meta: dict[StrictStr, MetaValue] = Field(default_factory=dict)


class AnomalyMap(_Model):
    """A (possibly downscaled) anomaly map; `image_shape` is the original image it covers."""

    encoding: Literal["png8", "float16"]
    shape: tuple[StrictInt, StrictInt]  # (h, w) of the encoded map
    image_shape: tuple[StrictInt, StrictInt]  # (H, W) of the original image
    scale: tuple[Float, Float] = (0.0, 1.0)  # png8: value = lo + pixel / 255 * (hi - lo); float16: unused
    data: StrictBytes

    @field_validator("shape", "image_shape")
    @classmethod
    def _check_shape(cls, v: tuple[int, int], info: ValidationInfo) -> tuple[int, int]:
        _validate_dims(v[0], v[1], info)
        return v

    @field_validator("scale")
    @classmethod
    def _check_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] <= v[1]:
            raise ValueError("scale must be (lo, hi) with lo <= hi")
        return v


class Region(_Model):
    """A connected anomalous region: bounding box in ORIGINAL image pixels, area in pixels, peak score."""

    x: UInt
    y: UInt
    w: Annotated[StrictInt, Field(ge=1, le=INT64_MAX)]
    h: Annotated[StrictInt, Field(ge=1, le=INT64_MAX)]
    area: Annotated[StrictInt, Field(ge=1, le=INT64_MAX)]
    peak: Float

    @model_validator(mode="after")
    def _check_area(self) -> Region:
        if self.area > self.w * self.h:
            raise ValueError("area is larger than the bounding box")
        return self


class Timings(_Model):
    """Pipeline timestamps, unix seconds (float64); absent ones are nil."""

    captured_at: Float | None = None
    enqueued_at: Float | None = None
    started_at: Float | None = None
    finished_at: Float | None = None


class ErrorInfo(_Model):
    """Why a frame got verdict "error": a machine-readable code and a bounded human message."""

    code: Annotated[StrictStr, Field(min_length=1, max_length=MAX_ERROR_CODE_CHARS, pattern=r"^[A-Za-z0-9._:-]+$")]
    message: Annotated[StrictStr, Field(max_length=MAX_ERROR_MESSAGE_CHARS)]

    @classmethod
    def make(cls, code: str, message: str) -> ErrorInfo:
        """Build one from arbitrary text: the code is sanitised and the message truncated instead of refused."""
        code = re.sub(r"[^A-Za-z0-9._:-]", "_", code)[:MAX_ERROR_CODE_CHARS] or "error"
        if len(message) > MAX_ERROR_MESSAGE_CHARS:
            message = message[: MAX_ERROR_MESSAGE_CHARS - 3] + "..."
        return cls(code=code, message=message)


class Shadow(_Model):
    """A candidate model's opinion of the frame in shadow mode: for comparison, never the verdict."""

    model_id: Ident
    score: Float
    threshold: Float
    verdict: Literal["ok", "anomalous"]


class Result(_Message):
    """The inspection result of one frame, published by a worker."""

    v: StrictInt = WIRE_VERSION
    type: Literal["result"] = "result"
    frame_id: Ident
    line: Ident
    camera: IdentOrEmpty  # "" when the frame could not be decoded
    seq: UInt | None = None
    category: IdentOrEmpty  # "" when the frame could not be decoded
    verdict: Literal["ok", "anomalous", "error"]
    score: Float | None = None
    threshold: Float | None = None
    anomaly_map: AnomalyMap | None = None
    regions: list[Region] = Field(default_factory=list)
    model_id: Ident | None = None
    model_version: Ident | None = None
    timings: Timings = Field(default_factory=Timings)
    error: ErrorInfo | None = None
    worker: Ident
    deliveries: Annotated[StrictInt, Field(ge=1, le=INT64_MAX)] = 1
    meta: dict[StrictStr, MetaValue] = Field(default_factory=dict)  # the frame's meta, echoed back
    shadow: Shadow | None = None  # a candidate model's score, when a worker runs one in shadow mode

    @field_validator("regions")
    @classmethod
    def _check_regions(cls, v: list[Region], info: ValidationInfo) -> list[Region]:
        limit = _limits(info).max_regions
        if len(v) > limit:
            raise _too_large(f"{len(v)} regions; limit {limit}")
        return v

    @model_validator(mode="after")
    def _check_error(self) -> Result:
        if (self.verdict == "error") != (self.error is not None):
            raise ValueError('verdict "error" requires error, and error requires verdict "error"')
        return self
