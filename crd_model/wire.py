"""Wire format of crd-inspect: pydantic models for every message and their msgpack encoding.

Camera PCs (no torch) encode `Frame`s; GPU workers decode them and encode `Result`s that PLC bridges and
dashboards, possibly written in Go, C# or Node, decode. docs/wire-format.md is the language-neutral spec.

Decoding is strict and bounded: the message size is checked before parsing, msgpack runs with per-type length
limits and no extension types, the version is checked first, every model forbids unknown keys, and image /
point-map payloads are checked against their declared shapes (and the `Limits`) before anything is inflated.
No pickle anywhere. Every failure is a `WireError` with a machine-readable `code`.

This module must stay importable without torch or scipy: only numpy, pillow, msgpack, pydantic and zlib.
"""

from __future__ import annotations

import io
import math
import re
import struct
import time
import zlib
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

import msgpack
import numpy as np
from PIL import Image
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    StrictBool,
    StrictBytes,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.types import AllowInfNan, Strict
from pydantic_core import PydanticCustomError

__all__ = [
    "DEFAULT_LIMITS",
    "WIRE_VERSION",
    "AnomalyMap",
    "ErrorInfo",
    "Frame",
    "Limits",
    "PointMap",
    "RGBImage",
    "Region",
    "Result",
    "Timings",
    "WireError",
    "decode_map",
    "decode_rgb",
    "decode_xyz",
    "encode_map",
    "encode_rgb",
    "encode_xyz",
    "frame_arrays",
    "make_frame",
    "pack_frame",
    "pack_result",
    "peek_frame_id",
    "unpack_frame",
    "unpack_result",
]

WIRE_VERSION = 1

INT64_MAX = 2**63 - 1  # every integer on the wire fits a signed 64-bit int (Go int64, C# long)
MAX_ERROR_CODE_CHARS = 64
MAX_ERROR_MESSAGE_CHARS = 1024
_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")  # used with fullmatch: `$` would let a trailing "\n" through
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pillow modes accepted before conversion to RGB; anything else (16-bit, CMYK, 1-bit...) is refused unread.
_RGB_MODES = {"png": frozenset({"RGB", "RGBA", "L", "LA", "P"}), "jpeg": frozenset({"RGB", "L"})}
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG"}
_XYZ_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_FLOAT16_MAX = 65504.0


class WireError(ValueError):
    """A message or payload that cannot be encoded/decoded; `code` is machine-readable, str(e) is for humans.

    Codes: too_large, bad_msgpack, unsupported_version, bad_type, invalid, bad_rgb, bad_xyz, bad_map,
    shape_mismatch.
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


def _check_dims(h: int, w: int, limits: Limits) -> None:
    problem = _dims_problem(h, w, limits)
    if problem is not None:
        raise WireError(*problem)


def _is_ident(v: str, max_len: int) -> bool:
    return 0 < len(v) <= max_len and _ID_RE.fullmatch(v) is not None


def _ident(v: str, info: ValidationInfo) -> str:
    max_len = _limits(info).max_id_len
    if not _is_ident(v, max_len):
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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
        if not _is_ident(key, limits.max_id_len):
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


# ---------------------------------------------------------------------------------------------------- codecs


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, read by hand so nothing (not even Pillow's parser) runs first."""
    if len(data) < 24 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def _open_image(data: bytes, fmt: Literal["png", "jpeg"], h: int, w: int, modes: frozenset[str],
                target: Literal["RGB", "L"], code: str) -> np.ndarray:  # fmt: skip
    """Decode a PNG/JPEG after checking its header size and mode against the declared ones (no global state)."""
    if fmt == "png":
        size = _png_size(data)
        if size is None:
            raise WireError(code, "not a PNG (bad signature or no IHDR)")
        if size != (w, h):
            raise WireError(code, f"PNG header says {size[1]}x{size[0]} but the shape declares {h}x{w}")
    try:
        # formats=[...]: only that one plugin may parse these untrusted bytes.
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]]) as im:
            if im.size != (w, h):  # checked BEFORE load(): a bomb is refused without being inflated
                raise WireError(code, f"{fmt} header says {im.size[1]}x{im.size[0]} but the shape declares {h}x{w}")
            if im.mode not in modes:
                raise WireError(code, f"{fmt} mode {im.mode!r} not accepted (want one of {sorted(modes)})")
            im.load()
            arr = np.asarray(im if im.mode == target else im.convert(target))
    except WireError:
        raise
    except Image.DecompressionBombError as e:
        raise WireError("too_large", f"{fmt}: {e}") from None
    except Exception as e:  # any parser failure on untrusted bytes is a bad payload, never a crash
        raise WireError(code, f"cannot decode {fmt}: {type(e).__name__}: {str(e)[:200]}") from None
    return arr


def encode_rgb(rgb: np.ndarray, encoding: Literal["png", "jpeg", "raw"] = "png", jpeg_quality: int = 95
               ) -> RGBImage:  # fmt: skip
    """Encode a uint8 (H, W, 3) image; PNG at compress_level 1 (camera PCs are small: speed over size)."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise WireError("bad_rgb", f"rgb must be a uint8 (H, W, 3) array, got {getattr(rgb, 'dtype', type(rgb))} "
                                   f"{getattr(rgb, 'shape', '')}")  # fmt: skip
    h, w, _ = rgb.shape
    arr = np.ascontiguousarray(rgb)
    if encoding == "raw":
        data = arr.tobytes()
    elif encoding in ("png", "jpeg"):
        buf = io.BytesIO()
        img = Image.fromarray(arr)
        if encoding == "png":
            img.save(buf, format="PNG", compress_level=1)
        else:
            # 4:4:4: chroma subsampling would smear small colour defects, the very thing being inspected.
            img.save(buf, format="JPEG", quality=int(jpeg_quality), subsampling=0)
        data = buf.getvalue()
    else:
        raise WireError("bad_rgb", f"unknown rgb encoding {encoding!r}")
    return RGBImage(encoding=encoding, shape=(h, w, 3), data=data)


def decode_rgb(img: RGBImage, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode to a writable uint8 (H, W, 3) array; the payload must match the declared shape exactly."""
    h, w, c = img.shape
    _check_dims(h, w, limits)
    if c != 3:
        raise WireError("bad_rgb", f"rgb shape must be (H, W, 3), got {img.shape}")
    if img.encoding == "raw":
        if len(img.data) != h * w * 3:
            raise WireError("bad_rgb", f"raw rgb has {len(img.data)} bytes, shape {h}x{w}x3 needs {h * w * 3}")
        return np.frombuffer(img.data, dtype=np.uint8).reshape(h, w, 3).copy()
    if img.encoding not in _RGB_MODES:
        raise WireError("bad_rgb", f"unknown rgb encoding {img.encoding!r}")
    arr = _open_image(img.data, img.encoding, h, w, _RGB_MODES[img.encoding], "RGB", "bad_rgb")
    if arr.shape != (h, w, 3) or arr.dtype != np.uint8:
        raise WireError("bad_rgb", f"decoded {arr.dtype} {arr.shape}, expected uint8 {(h, w, 3)}")
    return np.array(arr, copy=True)


def encode_xyz(xyz: np.ndarray, dtype: Literal["float32", "float16"] = "float32",
               compression: Literal["none", "zlib"] = "zlib", level: int = 1) -> PointMap:  # fmt: skip
    """Encode a float (H, W, 3) point map (metres; missing = 0,0,0) as little-endian floats, optionally zlib'd.

    float16 steps are ~0.5 mm at 0.5-1 m: fine for many stations, check against your defect depths.
    """
    if not isinstance(xyz, np.ndarray) or xyz.ndim != 3 or xyz.shape[2] != 3 or xyz.dtype.kind != "f":
        raise WireError("bad_xyz", f"xyz must be a float (H, W, 3) array, got {getattr(xyz, 'dtype', type(xyz))} "
                                   f"{getattr(xyz, 'shape', '')}")  # fmt: skip
    if dtype not in _XYZ_DTYPES:
        raise WireError("bad_xyz", f"unknown xyz dtype {dtype!r}")
    h, w, _ = xyz.shape
    raw = np.ascontiguousarray(xyz, dtype=_XYZ_DTYPES[dtype]).tobytes()
    if compression == "zlib":
        data = zlib.compress(raw, level)
    elif compression == "none":
        data = raw
    else:
        raise WireError("bad_xyz", f"unknown xyz compression {compression!r}")
    return PointMap(dtype=dtype, compression=compression, shape=(h, w, 3), data=data)


def _inflate_exact(data: bytes, expected: int, code: str) -> bytes:
    """zlib-inflate to exactly `expected` bytes, never producing more than expected + 1 (bomb-proof)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, expected + 1)
    except zlib.error as e:
        raise WireError(code, f"bad zlib stream: {e}") from None
    if len(out) > expected:
        raise WireError(code, f"zlib stream inflates beyond the declared {expected} bytes")
    if len(out) < expected:
        raise WireError(code, f"zlib stream inflates to {len(out)} bytes, the shape needs {expected}")
    if not d.eof:
        raise WireError(code, "zlib stream is truncated (no end of stream)")
    if d.unused_data or d.unconsumed_tail:
        raise WireError(code, "trailing bytes after the zlib stream")
    return out


def decode_xyz(pm: PointMap, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode to a writable float32 (H, W, 3) array. Non-finite values are passed through (the model cleans)."""
    h, w, c = pm.shape
    _check_dims(h, w, limits)
    if c != 3:
        raise WireError("bad_xyz", f"xyz shape must be (H, W, 3), got {pm.shape}")
    if pm.dtype not in _XYZ_DTYPES:
        raise WireError("bad_xyz", f"unknown xyz dtype {pm.dtype!r}")
    dt = _XYZ_DTYPES[pm.dtype]
    expected = h * w * 3 * dt.itemsize
    if pm.compression == "none":
        if len(pm.data) != expected:
            raise WireError("bad_xyz", f"xyz has {len(pm.data)} bytes, shape {h}x{w}x3 {pm.dtype} needs {expected}")
        raw = pm.data
    elif pm.compression == "zlib":
        raw = _inflate_exact(pm.data, expected, "bad_xyz")
    else:
        raise WireError("bad_xyz", f"unknown xyz compression {pm.compression!r}")
    return np.frombuffer(raw, dtype=dt).reshape(h, w, 3).astype(np.float32)  # astype copies: writable


def encode_map(amap: np.ndarray, max_side: int = 256, encoding: Literal["png8", "float16"] = "png8", *,
               image_shape: tuple[int, int] | None = None) -> AnomalyMap:  # fmt: skip
    """Encode a float (H, W) anomaly map, bilinearly downscaled so its longer side is <= max_side.

    `image_shape` defaults to amap's (H, W): pass the original image's when the map is at model resolution.
    png8 stores uint8 pixels with scale (lo, hi) = (min, max); float16 stores little-endian halfs (clipped).
    """
    a = np.asarray(amap, dtype=np.float32)
    if a.ndim != 2 or a.size == 0:
        raise WireError("bad_map", f"anomaly map must be a non-empty (H, W) array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise WireError("bad_map", "anomaly map has non-finite values")
    if max_side < 1:
        raise WireError("bad_map", f"max_side must be >= 1, got {max_side}")
    h0, w0 = a.shape
    if max(h0, w0) > max_side:
        s = max_side / max(h0, w0)
        size = (max(1, min(max_side, round(w0 * s))), max(1, min(max_side, round(h0 * s))))
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize(size, Image.Resampling.BILINEAR),
                       dtype=np.float32)  # fmt: skip
    h, w = a.shape
    if encoding == "png8":
        lo, hi = float(a.min()), float(a.max())
        if not hi > lo:  # flat map: any hi > lo decodes every pixel 0 back to lo
            hi = lo + max(1.0, abs(lo))
        px = np.rint((a.astype(np.float64) - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG", compress_level=3)
        data, scale = buf.getvalue(), (lo, hi)
    elif encoding == "float16":
        data = a.clip(-_FLOAT16_MAX, _FLOAT16_MAX).astype("<f2").tobytes()
        scale = (0.0, 1.0)
    else:
        raise WireError("bad_map", f"unknown map encoding {encoding!r}")
    return AnomalyMap(encoding=encoding, shape=(h, w), image_shape=image_shape or (h0, w0), scale=scale, data=data)


def decode_map(am: AnomalyMap, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode to a float32 (h, w) array of scores (the encoded resolution; image_shape tells the original)."""
    h, w = am.shape
    _check_dims(h, w, limits)
    _check_dims(*am.image_shape, limits)
    if am.encoding == "float16":
        if len(am.data) != h * w * 2:
            raise WireError("bad_map", f"float16 map has {len(am.data)} bytes, shape {h}x{w} needs {h * w * 2}")
        return np.frombuffer(am.data, dtype="<f2").reshape(h, w).astype(np.float32)
    if am.encoding != "png8":
        raise WireError("bad_map", f"unknown map encoding {am.encoding!r}")
    px = _open_image(am.data, "png", h, w, frozenset({"L"}), "L", "bad_map")
    if px.shape != (h, w) or px.dtype != np.uint8:
        raise WireError("bad_map", f"decoded {px.dtype} {px.shape}, expected uint8 {(h, w)}")
    lo, hi = am.scale
    return (lo + px.astype(np.float32) * np.float32((hi - lo) / 255.0)).astype(np.float32)


# -------------------------------------------------------------------------------------------------- messages

M = TypeVar("M", Frame, Result)


def _pack(model: BaseModel, limits: Limits) -> bytes:
    # Plain dict: bytes -> msgpack bin, tuples -> arrays, None -> nil; field order puts v and type first.
    data: bytes = msgpack.packb(model.model_dump(mode="python"), use_bin_type=True)
    if len(data) > limits.max_message_bytes:
        raise WireError("too_large", f"message is {len(data)} bytes; limit {limits.max_message_bytes}")
    return data


def pack_frame(frame: Frame, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """msgpack bytes of a Frame (refused here already if a consumer with `limits` would refuse its size)."""
    return _pack(frame, limits)


def pack_result(result: Result, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """msgpack bytes of a Result."""
    return _pack(result, limits)


def _no_ext(code: int, data: bytes) -> Any:
    raise WireError("bad_msgpack", f"msgpack extension type {code} is not allowed")


def _unpack_limits(limits: Limits) -> dict[str, int]:
    # Strings are ids, meta values and error messages; arrays are shapes, scales and regions.
    return {
        "max_bin_len": limits.max_message_bytes,
        "max_str_len": max(limits.max_meta_value_bytes, 4 * MAX_ERROR_MESSAGE_CHARS, 4 * limits.max_id_len),
        "max_array_len": max(2 * limits.max_regions, 16),  # headroom: pydantic then names the field
        "max_map_len": max(2 * limits.max_meta_entries, 64),
        "max_ext_len": 0,  # no extension types at all, the timestamp one (-1) included
    }


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _unpack(data: bytes, kind: Literal["frame", "result"], model: type[M], limits: Limits) -> M:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError("bad_msgpack", f"expected bytes, got {type(data).__name__}")
    n = memoryview(data).nbytes
    if n > limits.max_message_bytes:  # before parsing: nothing is allocated for an oversized message
        raise WireError("too_large", f"message is {n} bytes; limit {limits.max_message_bytes}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext,
                              **_unpack_limits(limits))  # fmt: skip
    except WireError:
        raise
    except Exception as e:  # msgpack raises ValueError subclasses, TypeError, ...: all mean "not our msgpack"
        msg = str(e)[:200]
        if "exceeds max_ext_len" in msg:
            raise WireError("bad_msgpack", "msgpack extension types are not allowed") from None
        if "exceeds max_" in msg:
            raise WireError("too_large", f"msgpack: {msg}") from None
        raise WireError("bad_msgpack", f"not valid msgpack: {type(e).__name__}: {msg}") from None
    if not isinstance(obj, dict):
        raise WireError("invalid", f"top level must be a msgpack map, got {type(obj).__name__}")
    v = obj.get("v")  # version first: nothing else about a message of another version can be trusted
    if not isinstance(v, int) or isinstance(v, bool):
        raise WireError("invalid", f"missing or non-integer version field 'v' (got {_short(v)})")
    if v != WIRE_VERSION:
        raise WireError("unsupported_version", f"wire version {v} is not supported; this decoder supports "
                                               f"version {WIRE_VERSION}")  # fmt: skip
    t = obj.get("type")
    if t != kind:
        raise WireError("bad_type", f"expected a {kind!r} message, got type {_short(t)}")
    try:
        return model.model_validate(obj, context={"limits": limits})
    except ValidationError as e:
        errs = e.errors(include_url=False, include_input=False)
        chosen = next((x for x in errs if x["type"] == "too_large"), errs[0])
        loc = ".".join(str(p) for p in chosen["loc"]) or "<message>"
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        code = "too_large" if chosen["type"] == "too_large" else "invalid"
        raise WireError(code, f"invalid {kind}: {loc}: {chosen['msg'][:200]}{more}") from None


def unpack_frame(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Parse and validate a Frame; payload bytes are checked when decoded (frame_arrays/decode_*)."""
    return _unpack(data, "frame", Frame, limits)


def unpack_result(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Result:
    """Parse and validate a Result."""
    return _unpack(data, "result", Result, limits)


def _valid_id(v: Any) -> str | None:
    return v if isinstance(v, str) and _is_ident(v, DEFAULT_LIMITS.max_id_len) else None


_FRAME_ID_KEY = msgpack.packb("frame_id")


def peek_frame_id(data: bytes) -> str | None:
    """Best-effort frame id of a (possibly broken) frame payload, to address an error result; never raises.

    Walks the top-level map key by key, so a payload truncated or corrupted after its frame_id (which
    pack_frame writes third) still yields it; falls back to scanning the bytes for a "frame_id" key.
    Only ids that would pass validation are returned.
    """
    try:
        buf = bytes(data[: DEFAULT_LIMITS.max_message_bytes])
    except Exception:
        return None
    try:
        unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=False,
            ext_hook=_no_ext,
            max_buffer_size=len(buf) + 1,
            **{k: v for k, v in _unpack_limits(DEFAULT_LIMITS).items() if k != "max_ext_len"},
        )
        unpacker.feed(buf)
        for _ in range(min(unpacker.read_map_header(), 1024)):
            key = unpacker.unpack()
            if key == "frame_id":
                return _valid_id(unpacker.unpack())
            unpacker.skip()
    except Exception:
        pass
    try:
        pos = buf.find(_FRAME_ID_KEY)
        while pos >= 0:
            try:
                one = msgpack.Unpacker(raw=False, max_buffer_size=1024)
                one.feed(buf[pos + len(_FRAME_ID_KEY) : pos + len(_FRAME_ID_KEY) + 512])
                value = one.unpack()
            except Exception:
                value = None
            if (found := _valid_id(value)) is not None:
                return found
            pos = buf.find(_FRAME_ID_KEY, pos + 1)
    except Exception:
        pass
    return None


# ------------------------------------------------------------------------------------------------ convenience


def make_frame(rgb: np.ndarray, xyz: np.ndarray, *, frame_id: str, line: str, camera: str, seq: int,
               category: str, captured_at: float | None = None, rgb_encoding: Literal["png", "jpeg", "raw"] = "png",
               xyz_dtype: Literal["float32", "float16"] = "float32",
               xyz_compression: Literal["none", "zlib"] = "zlib",
               meta: Mapping[str, str | int | float | bool] | None = None) -> Frame:  # fmt: skip
    """Encode arrays into a validated Frame (captured_at defaults to now)."""
    if getattr(rgb, "shape", (0, 0))[:2] != getattr(xyz, "shape", (-1, -1))[:2]:
        raise WireError("shape_mismatch", f"rgb {getattr(rgb, 'shape', None)} and xyz {getattr(xyz, 'shape', None)} "
                                          "differ in H, W")  # fmt: skip
    ts = time.time() if captured_at is None else captured_at
    if not math.isfinite(ts):
        raise WireError("invalid", "captured_at must be finite")
    return Frame(frame_id=frame_id, line=line, camera=camera, seq=seq, captured_at=ts, category=category,
                 rgb=encode_rgb(rgb, rgb_encoding), xyz=encode_xyz(xyz, xyz_dtype, xyz_compression),
                 meta=dict(meta or {}))  # fmt: skip


def frame_arrays(frame: Frame, limits: Limits = DEFAULT_LIMITS) -> tuple[np.ndarray, np.ndarray]:
    """Decode a frame's (rgb uint8 (H,W,3), xyz float32 (H,W,3)); H, W must agree ("shape_mismatch")."""
    if frame.rgb.shape[:2] != frame.xyz.shape[:2]:  # before decoding anything
        raise WireError("shape_mismatch", f"rgb is {frame.rgb.shape[0]}x{frame.rgb.shape[1]}, "
                                          f"xyz is {frame.xyz.shape[0]}x{frame.xyz.shape[1]}")  # fmt: skip
    return decode_rgb(frame.rgb, limits), decode_xyz(frame.xyz, limits)
