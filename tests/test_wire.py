"""Wire format: round trips of every model and codec, exact error codes for hostile input, find_regions."""

from __future__ import annotations

import copy
import io
import resource
import struct
import subprocess
import sys
import time
import zlib
from typing import Any

import msgpack
import numpy as np
import pytest
from PIL import Image

from crd_model.stream import (
    DEFAULT_LIMITS,
    WIRE_VERSION,
    AnomalyMap,
    ErrorInfo,
    Frame,
    Limits,
    PointMap,
    Region,
    Result,
    RGBImage,
    Timings,
    WireError,
    codecs,
    decode_map,
    decode_rgb,
    decode_xyz,
    encode_map,
    encode_rgb,
    encode_xyz,
    frame_arrays,
    make_frame,
    pack_frame,
    pack_result,
    peek_frame_id,
    quantised_map,
    unpack_frame,
    unpack_result,
)
from workers.regions import find_regions

H, W = 24, 32


def _arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    xyz = rng.normal(0, 0.1, (H, W, 3)).astype(np.float32) + np.float32([0, 0, 0.6])
    xyz[:3, :5] = 0  # missing points
    return rgb, xyz


def _frame(**kw: Any) -> Frame:
    rgb, xyz = _arrays()
    args: dict[str, Any] = {"frame_id": "f-000001", "line": "line1", "camera": "cam0", "seq": 7, "category": "disc"}
    args.update(kw)
    return make_frame(rgb, xyz, captured_at=1_700_000_000.25, **args)


def _result(**kw: Any) -> Result:
    args: dict[str, Any] = {
        "frame_id": "f-000001",
        "line": "line1",
        "camera": "cam0",
        "seq": 7,
        "category": "disc",
        "verdict": "anomalous",
        "score": 0.83,
        "threshold": 0.5,
        "anomaly_map": encode_map(np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)),
        "regions": [Region(x=1, y=2, w=3, h=4, area=10, peak=0.9)],
        "model_id": "disc-crd-0123456789ab",
        "model_version": "0.1.0",
        "timings": Timings(captured_at=1.0, enqueued_at=1.5, started_at=2.0, finished_at=2.25),
        "worker": "gpu-0:1234",
        "deliveries": 2,
    }
    args.update(kw)
    return Result(**args)


def _as_dict(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, raw=False)


def _repack(d: Any) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def _code(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(WireError) as ei:
        fn(*args, **kw)
    assert str(ei.value)  # always a human message too
    return ei.value.code


def _png(w: int, h: int, bit_depth: int, colour_type: int, rows: bytes | None, *, row_bytes: int = 0) -> bytes:
    """A hand-made PNG; rows=None streams h all-zero rows of row_bytes (+ filter byte) into a tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    if rows is None:
        c = zlib.compressobj(9)
        block = bytes(row_bytes + 1) * 1000
        idat = b"".join(c.compress(block) for _ in range(h // 1000)) + c.flush()
    else:
        idat = zlib.compress(rows)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("rgb_encoding", ["png", "raw", "jpeg"])
@pytest.mark.parametrize("xyz_dtype", ["float32", "float16"])
@pytest.mark.parametrize("xyz_compression", ["zlib", "none"])
def test_frame_round_trip(rgb_encoding: str, xyz_dtype: str, xyz_compression: str) -> None:
    rgb, xyz = _arrays()
    if rgb_encoding == "jpeg":  # smooth content: JPEG is judged on what it is meant for
        yy, xx = np.mgrid[0:H, 0:W]
        rgb = np.stack([xx * 7, yy * 9, (xx + yy) * 4], axis=-1).astype(np.uint8)
    meta = {"exposure_us": 1200, "gain": 1.5, "flash": True, "operator": "ana"}
    f = make_frame(rgb, xyz, frame_id="f-1", line="L1", camera="cam.0", seq=3, category="disc",
                   captured_at=1.5, rgb_encoding=rgb_encoding, xyz_dtype=xyz_dtype,
                   xyz_compression=xyz_compression, meta=meta)  # type: ignore[arg-type]  # fmt: skip
    data = pack_frame(f)
    g = unpack_frame(data)
    assert g == f and g.meta == meta and type(g.meta["flash"]) is bool and type(g.meta["exposure_us"]) is int
    assert (g.v, g.type, g.seq, g.captured_at) == (WIRE_VERSION, "frame", 3, 1.5)
    r2, x2 = frame_arrays(g)
    assert r2.dtype == np.uint8 and r2.shape == (H, W, 3) and r2.flags.writeable
    assert x2.dtype == np.float32 and x2.shape == (H, W, 3) and x2.flags.writeable
    if rgb_encoding == "jpeg":
        assert np.abs(r2.astype(int) - rgb).mean() < 2.0
    else:
        assert np.array_equal(r2, rgb)
    if xyz_dtype == "float32":
        assert np.array_equal(x2, xyz)
    else:
        np.testing.assert_allclose(x2, xyz, rtol=1e-3, atol=1e-4)
    assert (x2[:3, :5] == 0).all()  # missing points survive exactly


def test_synthetic_frame_round_trip() -> None:
    from crd_model.data.synth import render_sample

    rgb, xyz, _ = render_sample("disc", "good", np.random.default_rng(0))
    f = make_frame(rgb, xyz, frame_id="s-0", line="L1", camera="c0", seq=0, category="disc")
    r2, x2 = frame_arrays(unpack_frame(pack_frame(f)))
    assert np.array_equal(r2, rgb) and np.array_equal(x2, xyz)
    assert f.captured_at > 1.6e9  # defaults to now


def test_wire_dict_layout() -> None:
    """What other languages see: v and type first, bytes as bin, tuples as arrays, no ext types."""
    data = pack_frame(_frame())
    assert data[0] & 0xF0 == 0x80  # fixmap
    raw = msgpack.unpackb(data, raw=True)
    assert list(raw)[:3] == [b"v", b"type", b"frame_id"]
    d = _as_dict(data)
    assert d["v"] == 1 and d["type"] == "frame" and isinstance(d["rgb"]["data"], bytes)
    assert d["rgb"]["shape"] == [H, W, 3] and d["xyz"]["shape"] == [H, W, 3]
    assert set(d) == {"v", "type", "frame_id", "line", "camera", "seq", "captured_at", "category", "rgb", "xyz",
                      "meta"}  # fmt: skip


def test_result_round_trip() -> None:
    r = _result()
    g = unpack_result(pack_result(r))
    assert g == r and g.type == "result" and g.regions[0].area == 10
    err = Result(frame_id="f-2", line="L1", camera="", category="", verdict="error", worker="w",
                 error=ErrorInfo(code="bad_rgb", message="nope"))  # fmt: skip
    g = unpack_result(pack_result(err))
    assert g == err and g.seq is None and g.anomaly_map is None and g.timings == Timings() and g.deliveries == 1


def test_result_error_verdict_consistency() -> None:
    with pytest.raises(ValueError):
        _result(verdict="error")  # no error info
    with pytest.raises(ValueError):
        _result(error=ErrorInfo(code="x", message="y"))  # error info on a non-error verdict
    d = _as_dict(pack_result(_result()))
    d["verdict"] = "error"
    assert _code(unpack_result, _repack(d)) == "invalid"


def test_error_info_and_wire_error_helpers() -> None:
    e = WireError("bad_rgb", "x" * 5000)
    info = e.info()
    assert info.code == "bad_rgb" and len(info.message) == 1024
    assert ErrorInfo.make("weird code\n", "m").code == "weird_code_"
    e2 = copy.deepcopy(e)  # same __reduce__ path that carries it across process pools
    assert (e2.code, str(e2)) == ("bad_rgb", "x" * 5000)
    assert isinstance(e, ValueError)


def test_limits_frozen_and_defaults() -> None:
    assert DEFAULT_LIMITS.max_message_bytes == 64 * 1024 * 1024 and DEFAULT_LIMITS.max_regions == 64
    with pytest.raises(ValueError):
        DEFAULT_LIMITS.max_pixels = 1  # type: ignore[misc]
    with pytest.raises(ValueError):
        Limits(max_pixels=0)


def test_the_verdict_rule_is_the_documented_one() -> None:
    """docs/wire-format.md: anomalous iff score >= threshold, equality anomalous (the worker, its
    shadow scoring and the offline Inspector all take it from is_anomalous)."""
    from crd_model.stream.messages import is_anomalous

    assert is_anomalous(6.5, 6.5) and is_anomalous(6.5000001, 6.5) and is_anomalous(-1.0, -2.0)
    assert not is_anomalous(6.4999999, 6.5) and not is_anomalous(float("nan"), 6.5)


def test_map_png8_downscale_and_scale() -> None:
    yy, xx = np.mgrid[0:300, 0:500].astype(np.float32)
    amap = 0.2 + xx / 499 * 3.0 + yy / 299 * 0.5  # 0.2 .. 3.7
    am = encode_map(amap, max_side=256)
    assert am.encoding == "png8" and am.shape == (154, 256) and am.image_shape == (300, 500)
    lo, hi = am.scale
    assert 0.19 < lo < 0.25 and 3.65 < hi < 3.71
    back = decode_map(unpack_result(pack_result(_result(anomaly_map=am))).anomaly_map)  # type: ignore[arg-type]
    assert back.dtype == np.float32 and back.shape == (154, 256)
    ref = np.asarray(Image.fromarray(amap).resize((256, 154), Image.Resampling.BILINEAR))
    assert np.abs(back - ref).max() <= (hi - lo) / 255 * 0.51 + 1e-5  # quantisation only
    assert back.min() == pytest.approx(lo) and back.max() == pytest.approx(hi)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (57, 91), (200, 200)])
def test_map_png8_is_a_plain_png_of_exactly_its_pixels(shape: tuple[int, int]) -> None:
    """Workers write the map's PNG themselves (one fixed filter): any decoder must read the exact pixels,
    rough ones included (every byte value, differences wrapping modulo 256)."""
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    am = quantised_map(pixels, shape, (0.0, 1.0))
    with Image.open(io.BytesIO(am.data), formats=["PNG"]) as im:
        assert im.mode == "L" and im.size == (shape[1], shape[0])
        assert np.array_equal(np.asarray(im), pixels)


@pytest.mark.skipif(codecs._spng_decode is None, reason="imagecodecs (libspng) is not installed")
@pytest.mark.parametrize("level", [0, 1, 9])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (200, 200), (31, 800)])
def test_rgb_pngs_decode_the_same_through_libspng_as_through_pillow(shape, level, monkeypatch) -> None:
    rgb = np.random.default_rng(level).integers(0, 256, (*shape, 3), dtype=np.uint8)
    rgb[: shape[0] // 2] //= 16  # smooth and rough rows: the encoder picks different row filters
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=level)
    img = RGBImage(encoding="png", shape=(*shape, 3), data=buf.getvalue())
    calls = []
    monkeypatch.setattr(codecs, "_spng_decode", lambda data, real=codecs._spng_decode: calls.append(1) or real(data))
    fast = decode_rgb(img)
    assert calls, "8-bit RGB PNGs go through libspng"
    monkeypatch.setattr(codecs, "_spng_decode", None)
    assert np.array_equal(fast, rgb) and np.array_equal(fast, decode_rgb(img))
    assert fast.flags.writeable
    cut = img.model_copy(update={"data": img.data[: len(img.data) * 2 // 3]})
    with pytest.raises(WireError, match="cannot decode png") as refused:
        decode_rgb(cut)  # Pillow, and (below) libspng: a truncated image is a bad payload
    monkeypatch.undo()
    with pytest.raises(WireError, match="cannot decode png") as refused_fast:
        decode_rgb(cut)
    assert refused.value.code == refused_fast.value.code == "bad_rgb"


def test_map_png8_flat_and_small() -> None:
    am = encode_map(np.full((10, 20), 0.3, np.float32))
    assert am.shape == (10, 20) and am.scale[1] > am.scale[0]
    np.testing.assert_allclose(decode_map(am), 0.3, atol=1e-6)


def test_map_float16() -> None:
    rng = np.random.default_rng(1)
    amap = rng.random((40, 1000)).astype(np.float32)
    am = encode_map(amap, max_side=100, encoding="float16", image_shape=(80, 2000))
    assert am.shape == (4, 100) and am.image_shape == (80, 2000) and len(am.data) == 4 * 100 * 2
    back = decode_map(am)
    ref = np.asarray(Image.fromarray(amap).resize((100, 4), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(back, ref, rtol=1e-3, atol=1e-3)
    am = encode_map(amap[:8, :8] * 1e6, encoding="float16")  # beyond float16: clipped, not inf
    assert np.isfinite(decode_map(am)).all()


def test_map_errors() -> None:
    am = encode_map(np.ones((8, 8), np.float32) * np.arange(8, dtype=np.float32))
    assert _code(decode_map, am.model_copy(update={"shape": (8, 9)})) == "bad_map"
    assert _code(decode_map, am.model_copy(update={"data": am.data[:-24]})) == "bad_map"
    rgb_png = encode_rgb(np.zeros((8, 8, 3), np.uint8)).data
    assert _code(decode_map, am.model_copy(update={"data": rgb_png})) == "bad_map"  # mode RGB, not L
    f16 = encode_map(np.zeros((8, 8), np.float32), encoding="float16")
    assert _code(decode_map, f16.model_copy(update={"data": f16.data + b"\0\0"})) == "bad_map"
    assert _code(encode_map, np.array([[np.nan, 1.0]])) == "bad_map"
    with pytest.raises(ValueError):
        AnomalyMap(encoding="png8", shape=(1, 1), image_shape=(1, 1), scale=(2.0, 1.0), data=b"")


# ------------------------------------------------------------------------------------------- message errors


def test_oversized_message() -> None:
    small = Limits(max_message_bytes=1000)
    data = pack_frame(_frame())
    assert len(data) > 1000
    assert _code(unpack_frame, data, small) == "too_large"
    assert _code(unpack_frame, b"\xc1" * 2000, small) == "too_large"  # size is checked before parsing
    assert _code(pack_frame, _frame(), small) == "too_large"


@pytest.mark.parametrize("data", [b"", b"\xc1", b"hello world", b"\x81\xa1v", b"\xdb\xff\xff\xff\xff"])
def test_garbage_bytes(data: bytes) -> None:
    assert _code(unpack_frame, data) == "bad_msgpack"
    assert _code(unpack_result, data) == "bad_msgpack"


def test_trailing_bytes() -> None:
    assert _code(unpack_frame, pack_frame(_frame()) + b"\x00") == "bad_msgpack"


def test_ext_types_rejected() -> None:
    d = _as_dict(pack_frame(_frame()))
    d["meta"] = {"x": msgpack.ExtType(5, b"abc")}
    assert _code(unpack_frame, _repack(d)) == "bad_msgpack"
    d["meta"] = {"t": msgpack.Timestamp(1, 0)}
    assert _code(unpack_frame, _repack(d)) == "bad_msgpack"
    assert _code(unpack_frame, _repack(msgpack.ExtType(1, b""))) == "bad_msgpack"


@pytest.mark.parametrize("top", [[1, 2], "frame", 1, None])
def test_non_map_top_level(top: Any) -> None:
    assert _code(unpack_frame, _repack(top)) == "invalid"


def test_non_string_map_key() -> None:
    assert _code(unpack_frame, _repack({1: 2})) == "bad_msgpack"


def test_versions() -> None:
    d = _as_dict(pack_frame(_frame()))
    d["v"] = 2
    with pytest.raises(WireError) as ei:
        unpack_frame(_repack(d))
    assert ei.value.code == "unsupported_version" and "2" in str(ei.value) and "1" in str(ei.value)
    # The version wins over everything else: a v2 message of unknown shape still says "unsupported_version".
    assert _code(unpack_result, _repack({"v": 2, "whatever": [1]})) == "unsupported_version"
    for bad_v in ("1", True, 1.0, None):
        d["v"] = bad_v
        assert _code(unpack_frame, _repack(d)) == "invalid"
    del d["v"]
    assert _code(unpack_frame, _repack(d)) == "invalid"


def test_type_confusion() -> None:
    assert _code(unpack_frame, pack_result(_result())) == "bad_type"
    assert _code(unpack_result, pack_frame(_frame())) == "bad_type"
    d = _as_dict(pack_frame(_frame()))
    del d["type"]
    assert _code(unpack_frame, _repack(d)) == "bad_type"


def test_missing_field() -> None:
    d = _as_dict(pack_frame(_frame()))
    del d["camera"]
    with pytest.raises(WireError) as ei:
        unpack_frame(_repack(d))
    assert ei.value.code == "invalid" and "camera" in str(ei.value)
    d = _as_dict(pack_frame(_frame()))
    del d["rgb"]["data"]
    with pytest.raises(WireError) as ei:
        unpack_frame(_repack(d))
    assert ei.value.code == "invalid" and "rgb.data" in str(ei.value)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("seq",), "7"),
        (("seq",), 7.0),
        (("seq",), -1),
        (("seq",), True),
        (("captured_at",), "now"),
        (("captured_at",), float("nan")),
        (("rgb", "data"), "not bytes"),
        (("rgb", "encoding"), "gif"),
        (("rgb", "shape"), [H, W]),
        (("rgb", "shape"), [H, W, 4]),
        (("rgb", "shape"), ["24", W, 3]),
        (("xyz", "dtype"), "float64"),
        (("meta",), [1, 2]),
        (("meta",), {"k": None}),
        (("meta",), {"k": [1]}),
        (("extra_field",), 1),
    ],
)
def test_wrong_type_field(path: tuple[str, ...], value: Any) -> None:
    d = _as_dict(pack_frame(_frame()))
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(WireError) as ei:
        unpack_frame(_repack(d))
    assert ei.value.code == "invalid" and path[0] in str(ei.value)


@pytest.mark.parametrize("bad_id", ["a b", "a{b}", "id\n", "", "é", "x/y", "a" * 129, "*"])
def test_bad_identifier(bad_id: str) -> None:
    for field in ("frame_id", "line", "camera", "category"):
        d = _as_dict(pack_frame(_frame()))
        d[field] = bad_id
        with pytest.raises(WireError) as ei:
            unpack_frame(_repack(d))
        assert ei.value.code == "invalid" and field in str(ei.value)
    with pytest.raises(ValueError):
        _frame(frame_id=bad_id)


def test_identifier_limits_and_result_empty_ids() -> None:
    d = _as_dict(pack_frame(_frame(frame_id="a" * 128)))
    assert unpack_frame(_repack(d)).frame_id == "a" * 128
    assert _code(unpack_frame, _repack(d), Limits(max_id_len=64)) == "invalid"
    assert _result(camera="", category="").camera == ""
    with pytest.raises(ValueError):
        _result(frame_id="")


def test_meta_too_large() -> None:
    d = _as_dict(pack_frame(_frame()))
    d["meta"] = {f"k{i}": i for i in range(65)}
    assert _code(unpack_frame, _repack(d)) == "too_large"
    d["meta"] = {f"k{i}": i for i in range(1000)}  # beyond the msgpack map bound itself
    assert _code(unpack_frame, _repack(d)) == "too_large"
    d["meta"] = {"note": "x" * 4097}
    assert _code(unpack_frame, _repack(d)) == "too_large"
    d["meta"] = {"note": "x" * 4096, "big": 2**63 - 1, "neg": -(2**63)}
    assert unpack_frame(_repack(d)).meta["note"] == "x" * 4096
    d["meta"] = {"bad key": 1}
    assert _code(unpack_frame, _repack(d)) == "invalid"
    with pytest.raises(ValueError):
        _frame(meta={f"k{i}": i for i in range(65)})


def test_too_many_regions() -> None:
    d = _as_dict(pack_result(_result()))
    d["regions"] = [d["regions"][0]] * 65
    assert _code(unpack_result, _repack(d)) == "too_large"
    d["regions"] = d["regions"][:64]
    assert len(unpack_result(_repack(d)).regions) == 64
    d["regions"] = [{"x": 0, "y": 0, "w": 1, "h": 1, "area": 2, "peak": 1.0}]  # area > bbox
    assert _code(unpack_result, _repack(d)) == "invalid"


def test_declared_shape_over_limits() -> None:
    d = _as_dict(pack_frame(_frame()))
    d["rgb"]["shape"] = [9000, 10, 3]
    assert _code(unpack_frame, _repack(d)) == "too_large"
    d = _as_dict(pack_frame(_frame()))
    d["xyz"]["shape"] = [8000, 8000, 3]  # each side fine, pixels not
    assert _code(unpack_frame, _repack(d)) == "too_large"
    assert _code(unpack_frame, pack_frame(_frame()), Limits(max_pixels=H * W - 1)) == "too_large"


# ------------------------------------------------------------------------------------------- payload errors


def test_png_size_differs_from_declared() -> None:
    img = encode_rgb(_arrays()[0])
    assert _code(decode_rgb, img.model_copy(update={"shape": (H, W + 1, 3)})) == "bad_rgb"
    d = _as_dict(pack_frame(_frame()))
    d["rgb"]["shape"] = d["xyz"]["shape"] = [W, H, 3]  # transposed, consistently
    assert _code(frame_arrays, unpack_frame(_repack(d))) == "bad_rgb"
    jpg = encode_rgb(_arrays()[0], "jpeg")
    assert _code(decode_rgb, jpg.model_copy(update={"shape": (H + 1, W, 3)})) == "bad_rgb"


def test_rgb_payload_garbage() -> None:
    img = encode_rgb(_arrays()[0])
    assert _code(decode_rgb, img.model_copy(update={"data": img.data[: len(img.data) // 2]})) == "bad_rgb"
    assert _code(decode_rgb, img.model_copy(update={"data": b"GIF89a" + bytes(100)})) == "bad_rgb"
    jpg = encode_rgb(_arrays()[0], "jpeg")
    assert _code(decode_rgb, jpg.model_copy(update={"encoding": "png"})) == "bad_rgb"  # format must match
    assert _code(decode_rgb, img.model_copy(update={"encoding": "jpeg"})) == "bad_rgb"
    # 16-bit grey PNG (Pillow mode I;16): refused by mode before decoding
    png16 = _png(2, 1, 16, 0, b"\0" + bytes(4))
    assert _code(decode_rgb, RGBImage(encoding="png", shape=(1, 2, 3), data=png16)) == "bad_rgb"


def test_grey_and_palette_png_convert_to_rgb() -> None:
    for mode in ("L", "P", "RGBA"):
        buf = io.BytesIO()
        Image.new(mode, (5, 4), 7).save(buf, format="PNG")
        arr = decode_rgb(RGBImage(encoding="png", shape=(4, 5, 3), data=buf.getvalue()))
        assert arr.shape == (4, 5, 3) and arr.dtype == np.uint8


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A ~50 KB PNG holding a real 20000 x 20000 image (1-bit grey; 1.2 GB once converted to RGB)."""
    return _png(20000, 20000, 1, 0, None, row_bytes=2500)


def test_decompression_bomb_refused_without_decoding(bomb_png: bytes) -> None:
    assert len(bomb_png) < 200_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    # Declared honestly: refused on the declared shape.
    honest = RGBImage.model_construct(encoding="png", shape=(20000, 20000, 3), data=bomb_png)
    assert _code(decode_rgb, honest) == "too_large"
    # Declared small: refused on the header, before Pillow reads any pixel.
    liar = RGBImage(encoding="png", shape=(100, 100, 3), data=bomb_png)
    assert _code(decode_rgb, liar) == "bad_rgb"
    # Through a whole message too.
    d = _as_dict(pack_frame(_frame()))
    d["rgb"] = {"encoding": "png", "shape": [20000, 20000, 3], "data": bomb_png}
    assert _code(unpack_frame, _repack(d)) == "too_large"
    d["rgb"]["shape"] = [H, W, 3]
    assert _code(frame_arrays, unpack_frame(_repack(d))) == "bad_rgb"
    am = AnomalyMap(encoding="png8", shape=(10, 10), image_shape=(10, 10), data=bomb_png)
    assert _code(decode_map, am) == "bad_map"
    assert time.perf_counter() - t0 < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # < 50 MB more peak RSS


def test_raw_rgb_wrong_byte_count() -> None:
    img = encode_rgb(_arrays()[0], "raw")
    assert _code(decode_rgb, img.model_copy(update={"data": img.data[:-1]})) == "bad_rgb"
    assert _code(decode_rgb, img.model_copy(update={"data": img.data + b"\0"})) == "bad_rgb"


@pytest.fixture(params=["isal", "zlib"])
def inflater(request, monkeypatch):
    """Both inflaters a worker may have: ISA-L's (the model extra) and the standard library's."""
    import crd_model.stream.codecs as codecs

    if request.param == "isal":
        isal_zlib = pytest.importorskip("isal.isal_zlib")
        monkeypatch.setattr(codecs, "_INFLATE", isal_zlib)
    else:
        monkeypatch.setattr(codecs, "_INFLATE", zlib)
    return request.param


def test_workers_inflate_with_isal_where_installed() -> None:
    import crd_model.stream.codecs as codecs

    isal_zlib = pytest.importorskip("isal.isal_zlib")  # in the model extra: CI has it
    assert codecs._INFLATE is isal_zlib


def test_zlib_xyz_bounded(inflater) -> None:
    pm = encode_xyz(_arrays()[1])
    np.testing.assert_array_equal(decode_xyz(pm), _arrays()[1])
    # ~1000:1 bomb: inflates far beyond the declared shape, refused after expected + 1 bytes.
    bomb = zlib.compress(bytes(16 * 1024 * 1024), 9)
    assert _code(decode_xyz, pm.model_copy(update={"data": bomb})) == "bad_xyz"
    raw = _arrays()[1].tobytes()
    assert _code(decode_xyz, pm.model_copy(update={"data": zlib.compress(raw + b"\0")})) == "bad_xyz"  # +1 byte
    assert _code(decode_xyz, pm.model_copy(update={"data": zlib.compress(raw[:-4])})) == "bad_xyz"  # short
    assert _code(decode_xyz, pm.model_copy(update={"data": pm.data[:-2]})) == "bad_xyz"  # truncated stream
    assert _code(decode_xyz, pm.model_copy(update={"data": pm.data + b"junk"})) == "bad_xyz"  # trailing
    assert _code(decode_xyz, pm.model_copy(update={"data": b"not zlib at all"})) == "bad_xyz"
    flat = encode_xyz(_arrays()[1], compression="none")
    assert _code(decode_xyz, flat.model_copy(update={"data": flat.data[:-1]})) == "bad_xyz"
    assert _code(decode_xyz, PointMap.model_construct(dtype="float32", compression="none", shape=(9000, 1, 3),
                                                      data=b"")) == "too_large"  # fmt: skip


def test_shape_mismatch() -> None:
    rgb, xyz = _arrays()
    assert _code(make_frame, rgb, xyz[:, :-1], frame_id="a", line="b", camera="c", seq=0, category="d") == (
        "shape_mismatch"
    )
    f = _frame()
    f2 = f.model_copy(update={"xyz": encode_xyz(xyz[:-1])})
    assert _code(frame_arrays, f2) == "shape_mismatch"


def test_encode_rejects_bad_arrays() -> None:
    assert _code(encode_rgb, np.zeros((4, 4, 3), np.float32)) == "bad_rgb"
    assert _code(encode_rgb, np.zeros((4, 4), np.uint8)) == "bad_rgb"
    assert _code(encode_xyz, np.zeros((4, 4, 3), np.int32)) == "bad_xyz"


# -------------------------------------------------------------------------------------------- peek_frame_id


def test_peek_frame_id() -> None:
    data = pack_frame(_frame(frame_id="f-42"))
    assert peek_frame_id(data) == "f-42"
    for cut in (40, 100, len(data) // 2, len(data) - 1):
        assert peek_frame_id(data[:cut]) == "f-42"
    assert peek_frame_id(data[:20]) is None  # cut inside the id
    assert peek_frame_id(b"") is None and peek_frame_id(b"\xc1garbage") is None
    # Key order of another encoder, and an id hiding after a corrupt entry: the byte scan finds it.
    d = _as_dict(data)
    reordered = {"meta": {}, "rgb": d["rgb"], "frame_id": "f-43"}
    assert peek_frame_id(_repack(reordered)) == "f-43"
    assert peek_frame_id(b"\x8f\xc1\xc1" + _repack({"frame_id": "f-44"})[1:]) == "f-44"
    # Never an id that would not validate (it ends up in Redis keys and logs).
    assert peek_frame_id(_repack({"frame_id": "bad id\n"})) is None
    assert peek_frame_id(_repack({"frame_id": 12})) is None
    assert peek_frame_id(None) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------- imports


def test_wire_import_is_light() -> None:
    code = (
        "import sys, crd_model.stream, workers.regions\n"
        "heavy = sorted(m for m in ('torch', 'scipy', 'torchvision', 'timm') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------------------------- regions


def _blobs() -> np.ndarray:
    a = np.zeros((12, 14), np.float32)
    a[1:4, 1:4] = 0.6  # 3x3 square ...
    a[4, 4] = 0.9  # ... plus a pixel touching it only diagonally: one 8-connected region of 10 px
    a[7:9, 5:10] = 0.7  # 2x5 bar, 10 px
    a[8, 9] = 0.75
    a[10, 0] = 0.95  # a lone hot pixel
    a[0, 13] = 0.4  # below threshold
    return a


def test_find_regions_blobs() -> None:
    regs = find_regions(_blobs(), 0.5, min_area=2)
    assert [(r.x, r.y, r.w, r.h, r.area) for r in regs] == [(1, 1, 4, 4, 10), (5, 7, 5, 2, 10)]
    assert [r.peak for r in regs] == pytest.approx([0.9, 0.75])
    regs = find_regions(_blobs(), 0.5, min_area=1)
    assert [(r.x, r.y, r.area) for r in regs] == [(0, 10, 1), (1, 1, 10), (5, 7, 10)]  # peak descending
    assert len(find_regions(_blobs(), 0.5, min_area=1, max_regions=2)) == 2
    assert find_regions(_blobs(), 0.5, min_area=11) == []
    assert find_regions(_blobs(), 0.99) == []
    assert find_regions(_blobs(), 0.3, min_area=1)[-1].area == 1  # the 0.4 pixel joins in


def test_find_regions_threshold_inclusive_and_nan() -> None:
    a = np.zeros((5, 5))
    a[2, 2] = 0.5
    a[0, 0] = np.nan
    regs = find_regions(a, 0.5, min_area=1)
    assert [(r.x, r.y, r.w, r.h, r.area, r.peak) for r in regs] == [(2, 2, 1, 1, 1, 0.5)]


def test_regions_fit_result() -> None:
    regs = find_regions(_blobs(), 0.5, min_area=1)
    r = _result(regions=regs)
    assert unpack_result(pack_result(r)).regions == regs


# ------------------------------------------------------------------------------ hostile input (issue 8)


@pytest.mark.parametrize(
    ("bit_depth", "colour_type", "samples"),
    [(16, 2, 3), (16, 6, 4), (16, 4, 2), (16, 0, 1), (1, 0, 1), (2, 0, 1), (4, 0, 1)],
    ids=["rgb16", "rgba16", "la16", "grey16", "grey1", "grey2", "grey4"],
)
def test_png_bit_depth_other_than_8_refused_unread(bit_depth: int, colour_type: int, samples: int) -> None:
    """16-bit PNGs were decoded to their high byte by Pillow; now the IHDR refuses them before any pixel."""
    row_bytes = (2 * samples * bit_depth + 7) // 8
    honest = _png(2, 1, bit_depth, colour_type, b"\0" + bytes([0x12, 0x34] * row_bytes)[:row_bytes])
    garbage_pixels = honest.replace(honest[33 : honest.index(b"IEND") - 4], b"\0\0\0\x04IDATjunk\0\0\0\0")
    for data in (honest, garbage_pixels):  # same verdict whatever follows the header: refused unread
        with pytest.raises(WireError) as ei:
            decode_rgb(RGBImage(encoding="png", shape=(1, 2, 3), data=data))
        assert ei.value.code == "bad_rgb" and f"{bit_depth}-bit" in str(ei.value)


def test_png_alpha_and_small_palettes_accepted_alpha_ignored() -> None:
    """8-bit RGBA / grey+alpha and palettes (1-8 bit indices, transparency or not): alpha is ignored."""
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = [[10, 20, 30]]
    rgba[0, 0] = [200, 100, 50, 0]  # fully transparent: its colour is used as it is
    for mode, arr in (("RGBA", rgba), ("LA", rgba[..., [0, 3]])):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr), mode).save(buf, format="PNG")
        assert buf.getvalue()[24] == 8
        out = decode_rgb(RGBImage(encoding="png", shape=(2, 3, 3), data=buf.getvalue()))
        assert out[0, 0].tolist() == ([200, 100, 50] if mode == "RGBA" else [200] * 3)
    pal = Image.new("P", (3, 2), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10])
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=1)
    assert buf.getvalue()[24] == 1  # Pillow writes a 2-colour palette with 1-bit indices
    assert decode_rgb(RGBImage(encoding="png", shape=(2, 3, 3), data=buf.getvalue()))[1, 2].tolist() == [200, 10, 10]


def test_map_png_must_be_8bit_grey() -> None:
    for png in (_png(2, 1, 16, 0, b"\0" + bytes(4)), _png(2, 1, 8, 2, b"\0" + bytes(6))):
        am = AnomalyMap(encoding="png8", shape=(1, 2), image_shape=(1, 2), scale=(0.0, 1.0), data=png)
        assert _code(decode_map, am) == "bad_map"
    ok = AnomalyMap(encoding="png8", shape=(1, 2), image_shape=(1, 2), data=_png(2, 1, 8, 0, b"\0\0\xff"))
    assert decode_map(ok).tolist() == [[0.0, 1.0]]


def test_byte_string_and_duplicate_map_keys_are_bad_msgpack() -> None:
    d = _as_dict(pack_frame(_frame()))
    assert _code(unpack_frame, _repack({b"v": 1, b"type": "frame"})) == "bad_msgpack"
    d["meta"] = {b"k": 1}  # nested: a bin key deep inside is as bad
    assert _code(unpack_frame, _repack(d)) == "bad_msgpack"
    d["meta"] = {}
    d["rgb"] = {**d["rgb"], b"encoding": "png"}
    assert _code(unpack_frame, _repack(d)) == "bad_msgpack"
    # The same key twice: other decoders disagree on which one wins, so nobody gets to choose.
    packed = pack_frame(_frame())
    assert packed[0] == 0x8B
    twice = b"\x8c" + packed[1:] + msgpack.packb("frame_id") + msgpack.packb("other-id")
    with pytest.raises(WireError) as ei:
        unpack_frame(twice)
    assert ei.value.code == "bad_msgpack" and "frame_id" in str(ei.value)
    assert _code(unpack_result, b"\x82\xa1v\x01\xa1v\x01") == "bad_msgpack"


def test_nil_equals_absent_for_fields_with_a_default() -> None:
    d = _as_dict(pack_frame(_frame(meta={"k": 1})))
    d["meta"] = None
    assert unpack_frame(_repack(d)).meta == {}
    del d["meta"]
    assert unpack_frame(_repack(d)).meta == {}
    r = _as_dict(pack_result(_result()))
    for key in ("meta", "regions", "timings", "deliveries", "seq", "anomaly_map", "model_id"):
        r[key] = None
    r["anomaly_map"] = None
    g = unpack_result(_repack(r))
    assert (g.meta, g.regions, g.timings, g.deliveries, g.seq) == ({}, [], Timings(), 1, None)
    # Never for the version and the type, and never for a required field.
    for key, code in (("v", "invalid"), ("type", "bad_type"), ("frame_id", "invalid"), ("rgb", "invalid")):
        d = _as_dict(pack_frame(_frame()))
        d[key] = None
        assert _code(unpack_frame, _repack(d)) == code


def test_xyz_out_of_range_refused_with_its_own_code() -> None:
    rgb, xyz = _arrays()
    absurd = xyz * np.float32(1e30)  # finite, as the sample: overflowed the model's maths
    with pytest.raises(WireError) as ei:
        frame_arrays(unpack_frame(pack_frame(make_frame(rgb, absurd, frame_id="f", line="L", camera="c", seq=0,
                                                        category="disc"))))  # fmt: skip
    assert ei.value.code == "xyz_out_of_range" and "1e+04" not in str(ei.value) and "10000 m" in str(ei.value)
    edge = xyz.copy()
    edge[5, 6] = [1e4, -1e4, 0.6]  # the bound itself is fine
    edge[7, 8] = [np.nan, np.inf, -np.inf]  # non-finite = missing, passes
    assert np.array_equal(decode_xyz(encode_xyz(edge)), edge, equal_nan=True)
    edge[9, 10, 2] = -10000.5
    with pytest.raises(WireError) as ei:
        decode_xyz(encode_xyz(edge, compression="none"))
    assert ei.value.code == "xyz_out_of_range" and "row 9, col 10" in str(ei.value)
    assert _code(decode_xyz, encode_xyz(xyz * 100), Limits(max_xyz_abs_m=10)) == "xyz_out_of_range"
    half = encode_xyz(np.full((4, 4, 3), 2e4, np.float32), dtype="float16")  # finite in float16 too
    assert _code(decode_xyz, half) == "xyz_out_of_range"
    # Beyond float16's range the value is inf on the wire, i.e. missing.
    with np.errstate(over="ignore"):
        beyond_half = encode_xyz(np.full((2, 2, 3), 1e6, np.float32), dtype="float16")
    assert np.isinf(decode_xyz(beyond_half)).all()


def test_peek_frame_id_time_is_bounded() -> None:
    """A 32 MiB payload made of "frame_id" keys with no valid id took 6.6 s; the scan is now bounded."""
    key = msgpack.packb("frame_id")
    hostile = [(key + b"\xc1") * (32 * 1024 * 1024 // 10), (key + msgpack.packb("bad id")) * (32 * 1024 * 1024 // 16)]
    for data in hostile:
        t0 = time.perf_counter()
        assert peek_frame_id(data) is None
        assert time.perf_counter() - t0 < 0.5
    # The walk still finds an id written after a big field; the byte scan only looks at the first 64 KiB.
    late = {"v": 1, "type": "frame", "rgb": {"data": bytes(200_000)}, "frame_id": "f-late"}
    assert peek_frame_id(_repack(late)) == "f-late"
    broken_early = b"\x8f\xc1" + bytes(1000) + key + msgpack.packb("f-early")
    broken_late = b"\x8f\xc1" + bytes(70 * 1024) + key + msgpack.packb("f-late")
    assert peek_frame_id(broken_early) == "f-early" and peek_frame_id(broken_late) is None
    assert peek_frame_id(pack_frame(_frame(frame_id="f-x"))) == "f-x"
