"""Payload codecs: RGB images (PNG, JPEG, raw), point maps (float32/float16, zlib) and anomaly maps.

Every decoder checks the declared shape against `Limits` and the payload's own header before it inflates
anything (PNG bombs and zlib bombs are refused unread), and raises `WireError` with a machine-readable code.
Only numpy, Pillow and zlib (where installed, ISA-L's zlib-compatible deflate and libspng for 8-bit RGB
PNGs): importable without torch or scipy.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Literal

import numpy as np
from PIL import Image

from crd_model.stream.messages import DEFAULT_LIMITS, AnomalyMap, Limits, PointMap, RGBImage, WireError, check_dims

try:  # ISA-L (the `model` extra, which workers install): the same zlib streams, inflated 1.5x faster
    from isal import isal_zlib as _INFLATE
except ImportError:  # a camera PC's base install: the standard library's
    _INFLATE = zlib
_DEFLATE = _INFLATE  # ISA-L deflates a worker's anomaly maps about 4x faster than zlib at level 1
try:  # libspng (imagecodecs, in the `model` extra): 8-bit RGB PNGs, what cameras send, decoded in about
    # half Pillow's time at 800 x 800 (bench/decode_scaling.py); like Pillow it refuses a truncated
    # image and ignores a chunk's CRC. Other PNGs (grey, palette, alpha) still go through Pillow.
    from imagecodecs import spng_decode as _spng_decode
except ImportError:  # a camera PC's base install
    _spng_decode = None
_RGB = 2  # PNG colour type of 8-bit RGB

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR = b"\x00\x00\x00\x0dIHDR"  # length 13, then the chunk type
# PNG colour types (IHDR byte 25) accepted per payload. Samples must be 8-bit: Pillow would cut a 16-bit
# PNG to its high byte without a word. Palette indices may be 1, 2, 4 or 8 bits (the colours are 8-bit
# either way; Pillow itself writes small palettes with fewer bits).
_PALETTE = 3
_PALETTE_BIT_DEPTHS = frozenset({1, 2, 4, 8})
_PNG_COLOUR_TYPES = {0: "grey", 2: "RGB", 3: "palette", 4: "grey+alpha", 6: "RGBA"}
_RGB_PNG_COLOUR_TYPES = frozenset({0, 2, 3, 4, 6})
_MAP_PNG_COLOUR_TYPES = frozenset({0})
# Pillow modes accepted before conversion (a second line of defence behind the IHDR check for PNG).
_RGB_MODES = {"png": frozenset({"RGB", "RGBA", "L", "LA", "P"}), "jpeg": frozenset({"RGB", "L"})}
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG"}
_XYZ_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_FLOAT16_MAX = 65504.0
_RANGE_CHUNK = 1 << 20  # values per step of the xyz range check: bounded temporaries on large frames


def _png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR, read by hand so no parser runs first."""
    if len(data) < 26 or data[:8] != _PNG_SIGNATURE or data[8:16] != _IHDR:
        return None
    w, h, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
    return w, h, bit_depth, colour_type


def _check_png_header(data: bytes, h: int, w: int, colour_types: frozenset[int], code: str) -> int:
    """Refuse a PNG whose IHDR disagrees with the declared shape or is not 8-bit of an accepted type;
    its colour type."""
    header = _png_header(data)
    if header is None:
        raise WireError(code, "not a PNG (bad signature or no IHDR)")
    png_w, png_h, bit_depth, colour_type = header
    if (png_w, png_h) != (w, h):
        raise WireError(code, f"PNG header says {png_h}x{png_w} but the shape declares {h}x{w}")
    kind = _PNG_COLOUR_TYPES.get(colour_type, f"colour type {colour_type}")
    if colour_type not in colour_types:
        allowed = ", ".join(_PNG_COLOUR_TYPES[c] for c in sorted(colour_types))
        raise WireError(code, f"PNG is {kind}; accepted: {allowed}")
    if bit_depth != 8 and not (colour_type == _PALETTE and bit_depth in _PALETTE_BIT_DEPTHS):
        raise WireError(code, f"PNG is {bit_depth}-bit {kind}; only 8 bits per sample are accepted")
    return colour_type


def _open_image(data: bytes, fmt: Literal["png", "jpeg"], h: int, w: int, modes: frozenset[str],
                target: Literal["RGB", "L"], code: str, png_colour_types: frozenset[int]) -> np.ndarray:  # fmt: skip
    """Decode a PNG/JPEG after checking its header size and mode against the declared ones (no global state)."""
    if fmt == "png":
        colour_type = _check_png_header(data, h, w, png_colour_types, code)
        if colour_type == _RGB and target == "RGB" and _spng_decode is not None:
            try:
                return _spng_decode(data)
            except Exception as e:  # any parser failure on untrusted bytes is a bad payload, never a crash
                raise _undecodable(code, fmt, e) from None
    try:
        # formats=[...]: only that one plugin may parse these untrusted bytes.
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]]) as im:
            if im.size != (w, h):  # checked BEFORE load(): a bomb is refused without being inflated
                raise WireError(code, f"{fmt} header says {im.size[1]}x{im.size[0]} but the shape declares {h}x{w}")
            if im.mode not in modes:
                raise WireError(code, f"{fmt} mode {im.mode!r} not accepted (want one of {sorted(modes)})")
            im.load()
            # Alpha (RGBA, LA, palette transparency) is ignored: the colour channels are used as they are.
            arr = np.asarray(im if im.mode == target else im.convert(target))
    except WireError:
        raise
    except Image.DecompressionBombError as e:
        raise WireError("too_large", f"{fmt}: {e}") from None
    except Exception as e:  # any parser failure on untrusted bytes is a bad payload, never a crash
        raise _undecodable(code, fmt, e) from None
    return arr


def _undecodable(code: str, fmt: str, e: Exception) -> WireError:
    return WireError(code, f"cannot decode {fmt}: {type(e).__name__}: {str(e)[:200]}")


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
    check_dims(h, w, limits)
    if c != 3:
        raise WireError("bad_rgb", f"rgb shape must be (H, W, 3), got {img.shape}")
    if img.encoding == "raw":
        if len(img.data) != h * w * 3:
            raise WireError("bad_rgb", f"raw rgb has {len(img.data)} bytes, shape {h}x{w}x3 needs {h * w * 3}")
        return np.frombuffer(img.data, dtype=np.uint8).reshape(h, w, 3).copy()
    if img.encoding not in _RGB_MODES:
        raise WireError("bad_rgb", f"unknown rgb encoding {img.encoding!r}")
    arr = _open_image(img.data, img.encoding, h, w, _RGB_MODES[img.encoding], "RGB", "bad_rgb", _RGB_PNG_COLOUR_TYPES)
    if arr.shape != (h, w, 3) or arr.dtype != np.uint8:
        raise WireError("bad_rgb", f"decoded {arr.dtype} {arr.shape}, expected uint8 {(h, w, 3)}")
    return arr if arr.flags.writeable and arr.flags.owndata else arr.copy()  # Pillow's arrays are read-only


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
    d = _INFLATE.decompressobj()
    try:
        out = d.decompress(data, expected + 1)
    except _INFLATE.error as e:
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


def _check_xyz_range(xyz: np.ndarray, max_abs: float) -> None:
    """Refuse a finite coordinate beyond +-max_abs metres; non-finite values mean "missing" and pass."""
    flat = xyz.reshape(-1)
    for start in range(0, flat.size, _RANGE_CHUNK):
        chunk = flat[start : start + _RANGE_CHUNK]
        lo, hi = chunk.min(), chunk.max()
        if -max_abs <= lo and hi <= max_abs:  # the usual case: two reductions, no temporaries (False on NaN)
            continue
        magnitude = np.abs(chunk)
        bad = (magnitude > max_abs) & (magnitude != np.inf)  # NaN compares False
        if bad.any():
            i = start + int(np.argmax(bad))
            row, col = divmod(i // 3, xyz.shape[1])
            raise WireError("xyz_out_of_range", f"xyz value {float(flat[i]):.6g} m at pixel (row {row}, col {col}) "
                                                f"is beyond +-{max_abs:g} m")  # fmt: skip


def decode_xyz(pm: PointMap, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode to a writable float32 (H, W, 3) array.

    Non-finite values pass (they mean "missing", like 0,0,0; the model cleans them); a finite value beyond
    `limits.max_xyz_abs_m` metres is refused ("xyz_out_of_range").
    """
    h, w, c = pm.shape
    check_dims(h, w, limits)
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
    xyz = np.frombuffer(raw, dtype=dt).reshape(h, w, 3).astype(np.float32)  # astype copies: writable
    _check_xyz_range(xyz, limits.max_xyz_abs_m)
    return xyz


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
    if encoding == "png8":
        lo, hi = float(a.min()), float(a.max())
        if not hi > lo:  # flat map: any hi > lo decodes every pixel 0 back to lo
            hi = lo + max(1.0, abs(lo))
        px = np.rint((a.astype(np.float64) - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)
        return quantised_map(px, image_shape or (h0, w0), (lo, hi))
    if encoding == "float16":
        return quantised_map(a.clip(-_FLOAT16_MAX, _FLOAT16_MAX).astype("<f2"), image_shape or (h0, w0))
    raise WireError("bad_map", f"unknown map encoding {encoding!r}")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _grey_png(pixels: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of `pixels`, every row filtered "Up" (its difference from the row above).

    Workers encode a map per result, and a general encoder's adaptive filtering (five trial filters
    per row) cost most of it: an anomaly map is smooth, so one fixed filter compresses it as well,
    and the row differences are one numpy pass (0.1 ms for 200 x 200 against Pillow's 0.8 ms at
    level 1, and smaller). Any PNG decoder reads it.
    """
    h, w = pixels.shape
    rows = np.empty((h, w + 1), np.uint8)
    rows[:, 0] = 2  # PNG filter type "Up"; above the first row are zeros, so it is stored as it is
    rows[0, 1:] = pixels[0]
    np.subtract(pixels[1:], pixels[:-1], out=rows[1:, 1:])  # modulo 256, as the filter defines it
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit grey, deflate, adaptive, no interlace
    idat = _DEFLATE.compress(rows.tobytes(), 1)
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def quantised_map(
    pixels: np.ndarray, image_shape: tuple[int, int], scale: tuple[float, float] = (0.0, 1.0)
) -> AnomalyMap:
    """An `AnomalyMap` from pixels already at wire resolution and quantised: uint8 -> "png8" with
    `scale` = (lo, hi), float16 -> "float16" (workers quantise on the device and only encode here)."""
    h, w = pixels.shape
    if pixels.dtype == np.uint8:
        return AnomalyMap(encoding="png8", shape=(h, w), image_shape=image_shape, scale=scale, data=_grey_png(pixels))
    if pixels.dtype == np.float16:
        data = np.ascontiguousarray(pixels, dtype="<f2").tobytes()
        return AnomalyMap(encoding="float16", shape=(h, w), image_shape=image_shape, scale=(0.0, 1.0), data=data)
    raise WireError("bad_map", f"quantised map pixels must be uint8 or float16, got {pixels.dtype}")


def decode_map(am: AnomalyMap, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode to a float32 (h, w) array of scores (the encoded resolution; image_shape tells the original)."""
    h, w = am.shape
    check_dims(h, w, limits)
    check_dims(*am.image_shape, limits)
    if am.encoding == "float16":
        if len(am.data) != h * w * 2:
            raise WireError("bad_map", f"float16 map has {len(am.data)} bytes, shape {h}x{w} needs {h * w * 2}")
        return np.frombuffer(am.data, dtype="<f2").reshape(h, w).astype(np.float32)
    if am.encoding != "png8":
        raise WireError("bad_map", f"unknown map encoding {am.encoding!r}")
    px = _open_image(am.data, "png", h, w, frozenset({"L"}), "L", "bad_map", _MAP_PNG_COLOUR_TYPES)
    if px.shape != (h, w) or px.dtype != np.uint8:
        raise WireError("bad_map", f"decoded {px.dtype} {px.shape}, expected uint8 {(h, w)}")
    lo, hi = am.scale
    return (lo + px.astype(np.float32) * np.float32((hi - lo) / 255.0)).astype(np.float32)
