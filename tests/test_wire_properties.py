"""Property-based tests (hypothesis) of the wire decoder: whatever the bytes, a Frame or a documented WireError."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from crd_model.stream import (
    Frame,
    WireError,
    decode_map,
    encode_map,
    frame_arrays,
    make_frame,
    pack_frame,
    peek_frame_id,
    unpack_frame,
    unpack_result,
)
from crd_model.stream.messages import is_ident
from crd_model.stream.packing import unpack_frame_views

DOC = Path(__file__).resolve().parents[1] / "docs" / "wire-format.md"

# Bounded for a slow 2-core CI machine: no deadline (timings vary), a fixed number of examples.
BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _documented_codes() -> dict[str, str]:
    """code -> fault kind ("frame" or "infrastructure"), from the table in section 6 of docs/wire-format.md."""
    text = DOC.read_text()
    section = text[text.index("## 6. Error codes") : text.index("## 7.")]
    rows = re.findall(r"^\| `([a-z_]+)` \| (frame|infrastructure) \|", section, flags=re.MULTILINE)
    return dict(rows)


CODES = _documented_codes()
# What the wire decoder itself may raise (the rest are the workers' codes).
DECODER_CODES = {
    "too_large",
    "bad_msgpack",
    "unsupported_version",
    "bad_type",
    "invalid",
    "bad_rgb",
    "bad_xyz",
    "xyz_out_of_range",
    "shape_mismatch",
}


def test_decoder_codes_are_documented_frame_faults() -> None:
    assert set(CODES) >= DECODER_CODES, sorted(DECODER_CODES - set(CODES))
    assert {CODES[c] for c in DECODER_CODES} == {"frame"}


def _unpack_both_ways(data: bytes) -> Frame:
    """`unpack_frame`, after checking that the worker's `unpack_frame_views` gives the same frame (its
    payloads as views of `data`) or raises the same error, code and message."""
    try:
        whole: Frame | WireError = unpack_frame(data)
    except WireError as exc:
        whole = exc
    try:
        viewed: Frame | WireError = unpack_frame_views(data)
    except WireError as exc:
        viewed = exc
    if isinstance(whole, WireError):
        assert isinstance(viewed, WireError), viewed
        assert (viewed.code, str(viewed)) == (whole.code, str(whole))
        raise whole
    assert isinstance(viewed, Frame), viewed
    if isinstance(viewed.rgb.data, memoryview):  # the walk followed the layout: no payload copied
        assert viewed.rgb.data.obj is data and viewed.xyz.data.obj is data
    as_bytes = {p: getattr(viewed, p).model_copy(update={"data": bytes(getattr(viewed, p).data)})
                for p in ("rgb", "xyz")}  # fmt: skip
    assert viewed.model_copy(update=as_bytes) == whole
    return whole


def _decode(data: bytes) -> tuple[Frame, np.ndarray, np.ndarray] | WireError:
    """The whole decoder path of a worker: msgpack + validation + payloads. Anything but WireError escapes."""
    try:
        frame = _unpack_both_ways(data)
        rgb, xyz = frame_arrays(frame)
    except WireError as exc:
        assert exc.code in DECODER_CODES, exc.code
        assert str(exc)
        return exc
    assert rgb.dtype == np.uint8 and rgb.shape == (*frame.rgb.shape[:2], 3)
    assert xyz.dtype == np.float32 and xyz.shape == (*frame.xyz.shape[:2], 3)
    return frame, rgb, xyz


def _peek_is_safe(data: bytes) -> None:
    found = peek_frame_id(data)
    assert found is None or is_ident(found, 128)


# ------------------------------------------------------------------------------------------------ any bytes


@BOUNDED
@given(st.binary(max_size=2048))
def test_any_bytes_give_a_frame_or_a_documented_error(data: bytes) -> None:
    _decode(data)
    _peek_is_safe(data)
    try:
        unpack_result(data)
    except WireError as exc:
        assert exc.code in DECODER_CODES


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=10) | st.binary(max_size=4) | st.integers(), children, max_size=4)
    ),
    max_leaves=20,
)


@BOUNDED
@given(msgpack_values)
def test_any_msgpack_value_gives_a_frame_or_a_documented_error(value: Any) -> None:
    try:
        data = msgpack.packb(value, use_bin_type=True, strict_types=False)
    except (OverflowError, ValueError, TypeError):  # e.g. an int beyond msgpack's 64 bits
        assume(False)
    _decode(data)
    _peek_is_safe(data)


# ----------------------------------------------------------------------------------------- valid round trips

idents = st.from_regex(r"[A-Za-z0-9._:-]{1,24}", fullmatch=True)
meta_values = (
    st.text(max_size=30)
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
)


@st.composite
def frames(draw: st.DrawFn) -> tuple[Frame, np.ndarray, np.ndarray]:
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    xyz = rng.uniform(-5, 5, (h, w, 3)).astype(np.float32)
    xyz[rng.random((h, w)) < 0.2] = 0  # missing points
    frame = make_frame(
        rgb,
        xyz,
        frame_id=draw(idents),
        line=draw(idents),
        camera=draw(idents),
        seq=draw(st.integers(0, 2**63 - 1)),
        category=draw(idents),
        captured_at=draw(st.floats(0, 4e9)),
        rgb_encoding=draw(st.sampled_from(["png", "raw"])),
        xyz_dtype=draw(st.sampled_from(["float32", "float16"])),
        xyz_compression=draw(st.sampled_from(["zlib", "none"])),
        meta=draw(st.dictionaries(idents, meta_values, max_size=5)),
    )
    return frame, rgb, xyz


@BOUNDED
@given(frames())
def test_valid_frames_round_trip(case: tuple[Frame, np.ndarray, np.ndarray]) -> None:
    frame, rgb, xyz = case
    data = pack_frame(frame)
    decoded = _decode(data)
    assert not isinstance(decoded, WireError), decoded
    back, rgb2, xyz2 = decoded
    assert back == frame
    assert np.array_equal(rgb2, rgb)
    if frame.xyz.dtype == "float32":
        assert np.array_equal(xyz2, xyz)
    else:
        np.testing.assert_allclose(xyz2, xyz, rtol=1e-3, atol=1e-3)
    assert peek_frame_id(data) == frame.frame_id
    for cut in (len(data) // 2, len(data) - 1):  # truncated after the id: still addressable
        assert peek_frame_id(data[:cut]) == frame.frame_id
    viewed = unpack_frame_views(data)  # what a worker reads: the payloads in place
    assert isinstance(viewed.rgb.data, memoryview) and isinstance(viewed.xyz.data, memoryview)


@BOUNDED
@given(frames(), st.randoms(use_true_random=False))
def test_payloads_are_read_in_place_whatever_the_key_order(case: tuple[Frame, Any, Any], rnd: Any) -> None:
    """Another producer may write the keys in any order, the payload bins before or after the rest."""

    def shuffled(m: dict[str, Any]) -> dict[str, Any]:
        items = list(m.items())
        rnd.shuffle(items)
        return dict(items)

    d = msgpack.unpackb(pack_frame(case[0]), raw=False)
    data = msgpack.packb(shuffled({k: shuffled(v) if k in ("rgb", "xyz") else v for k, v in d.items()}))
    viewed = unpack_frame_views(data)
    assert viewed.rgb.data.obj is data and viewed.xyz.data.obj is data
    assert not isinstance(_decode(data), WireError)


# -------------------------------------------------------------------------------------- mutated valid frames

_BASE = pack_frame(
    make_frame(
        np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3),
        np.linspace(-1, 1, 4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3),
        frame_id="f-1",
        line="L1",
        camera="c0",
        seq=5,
        category="disc",
        captured_at=1_700_000_000.5,
        meta={"exp": 1200},
    )
)

mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
        st.integers(0, len(_BASE) - 1),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=6,
)


def _mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, byte in ops:
        pos %= max(1, len(buf))
        if op == "flip" and buf:
            buf[pos] ^= 1 << (byte % 8)
        elif op == "set" and buf:
            buf[pos] = byte
        elif op == "insert":
            buf.insert(pos, byte)
        elif op == "delete" and buf:
            del buf[pos]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


@BOUNDED
@given(mutations)
def test_mutated_valid_payloads_never_crash(ops: list[tuple[str, int, int]]) -> None:
    data = _mutate(_BASE, ops)
    _decode(data)
    _peek_is_safe(data)


@pytest.mark.parametrize("part", ["rgb", "xyz"])
@pytest.mark.parametrize("value", ["text", 7, None, [1], {"data": b"x"}, msgpack.ExtType(1, b"")])
def test_a_payload_that_is_not_a_bin_is_refused_the_same_both_ways(part: str, value: Any) -> None:
    d = msgpack.unpackb(_BASE, raw=False)
    d[part]["data"] = value
    with pytest.raises(WireError) as refused:
        _unpack_both_ways(msgpack.packb(d, use_bin_type=True))
    assert refused.value.code in {"invalid", "bad_msgpack"}


@st.composite
def field_replacements(draw: st.DrawFn) -> dict[str, Any]:
    """The base frame as a dict with one field (top level or inside rgb/xyz) replaced by any msgpack value."""
    d = msgpack.unpackb(_BASE, raw=False)
    target = draw(st.sampled_from([d, d["rgb"], d["xyz"], d["meta"]]))
    key = draw(st.sampled_from([*target, "extra"]))
    target[key] = draw(msgpack_values)
    return d


@BOUNDED
@given(field_replacements())
def test_any_field_replaced_gives_a_frame_or_a_documented_error(d: dict[str, Any]) -> None:
    try:
        data = msgpack.packb(d, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        assume(False)
    _decode(data)


@BOUNDED
@given(st.sampled_from(["rgb", "xyz"]), mutations)
def test_mutated_image_and_point_payloads_never_crash(which: str, ops: list[tuple[str, int, int]]) -> None:
    """Flip bytes inside the PNG / zlib blobs themselves, where a generic mutation rarely lands."""
    d = msgpack.unpackb(_BASE, raw=False)
    d[which]["data"] = _mutate(d[which]["data"], ops)
    result = _decode(msgpack.packb(d, use_bin_type=True))
    if isinstance(result, WireError):
        assert result.code in {"bad_rgb", "bad_xyz", "xyz_out_of_range", "too_large"}


_MAP = encode_map(np.linspace(-2, 3, 9 * 11, dtype=np.float32).reshape(9, 11))


@BOUNDED
@given(st.sampled_from(["png8", "float16"]), mutations)
def test_mutated_anomaly_maps_decode_or_give_bad_map(encoding: str, ops: list[tuple[str, int, int]]) -> None:
    """What a results consumer decodes: a map, or `bad_map` / `too_large`, never another exception."""
    am = _MAP if encoding == "png8" else encode_map(np.ones((9, 11), np.float32), encoding="float16")
    broken = am.model_copy(update={"data": _mutate(am.data, ops)})
    try:
        out = decode_map(broken)
    except WireError as exc:
        assert exc.code in {"bad_map", "too_large"}, exc.code
    else:
        assert out.shape == am.shape and out.dtype == np.float32
