"""Packing: `Frame` and `Result` to and from msgpack bytes, bounded and strict, plus frame helpers.

The message size is checked before parsing, msgpack runs with per-type length limits and no extension
types, the version is checked first, then the pydantic model validates. No pickle anywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import msgpack
import numpy as np
from pydantic import BaseModel, ValidationError

from crd_model.stream.codecs import decode_rgb, decode_xyz, encode_rgb, encode_xyz
from crd_model.stream.messages import (
    DEFAULT_LIMITS,
    MAX_ERROR_MESSAGE_CHARS,
    WIRE_VERSION,
    Frame,
    Limits,
    Result,
    WireError,
    is_ident,
)

M = TypeVar("M", Frame, Result)


# Fields added within v1 are left out while unset, so consumers written before they existed (which
# refuse unknown keys) still decode every message that does not use them (wire-format.md, section 4).
_ADDED_IN_V1 = frozenset({"shadow"})


def _pack(model: BaseModel, limits: Limits) -> bytes:
    # Plain dict: bytes -> msgpack bin, tuples -> arrays, None -> nil; field order puts v and type first.
    unset = {name for name in _ADDED_IN_V1 if getattr(model, name, 0) is None}
    data: bytes = msgpack.packb(model.model_dump(mode="python", exclude=unset or None), use_bin_type=True)
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


def _string_keyed_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Every msgpack map: keys must be str (a bin key decodes to bytes) and unique.

    A duplicate key is refused rather than resolved: decoders in other languages disagree on which copy
    wins, and a message that means different things to different readers is an attack, not a message.
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise WireError("bad_msgpack", f"map key {_short(key)} is not a msgpack str")
        if key in out:
            raise WireError("bad_msgpack", f"map key {_short(key)} appears twice")
        out[key] = value
    return out


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
                              object_pairs_hook=_string_keyed_map, **_unpack_limits(limits))  # fmt: skip
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


class _NotPlain(Exception):
    """The walk met something other than a plain, complete Frame layout: leave the message to msgpack."""


# msgpack's first bytes, by family: fixed-size scalars (-> bytes after the type byte), and for strings,
# bins, arrays and maps the bytes of their length field, plus the range of their "fix" forms.
_SCALARS = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2,
            0xD2: 4, 0xD3: 8}  # fmt: skip
_STR, _FIXSTR = {0xD9: 1, 0xDA: 2, 0xDB: 4}, range(0xA0, 0xC0)
_BIN = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_ARRAY, _FIXARRAY = {0xDC: 2, 0xDD: 4}, range(0x90, 0xA0)
_MAP, _FIXMAP = {0xDE: 2, 0xDF: 4}, range(0x80, 0x90)
_WALK_MAX_ITEMS = 4096  # an array or map longer than this is left to msgpack (and its limits)
_WALK_MAX_DEPTH = 4  # a frame nests three deep (frame -> rgb -> shape)


def _header(buf: memoryview, pos: int, sized: dict[int, int], fix: range = range(0)) -> tuple[int, int] | None:
    """(length or count, position after the header) if the object at `pos` is of this family, else None."""
    if pos >= len(buf):
        raise _NotPlain
    b = buf[pos]
    if b in fix:
        return b - fix.start, pos + 1
    if b not in sized:
        return None
    end = pos + 1 + sized[b]
    if end > len(buf):
        raise _NotPlain
    return int.from_bytes(buf[pos + 1 : end], "big"), end


def _skip(buf: memoryview, pos: int, depth: int) -> int:
    """Position after the msgpack object at `pos`: only headers are read, never a string's or bin's bytes."""
    if pos >= len(buf) or depth > _WALK_MAX_DEPTH:
        raise _NotPlain
    b = buf[pos]
    if b <= 0x7F or b >= 0xE0:  # fixints
        end = pos + 1
    elif b in _SCALARS:
        end = pos + 1 + _SCALARS[b]
    elif (h := _header(buf, pos, _STR, _FIXSTR) or _header(buf, pos, _BIN)) is not None:
        end = h[1] + h[0]
    elif (h := _header(buf, pos, _ARRAY, _FIXARRAY) or _header(buf, pos, _MAP, _FIXMAP)) is not None:
        count, end = h
        if count > _WALK_MAX_ITEMS:
            raise _NotPlain
        for _ in range(count * (2 if b in _MAP or b in _FIXMAP else 1)):
            end = _skip(buf, end, depth + 1)
    else:  # ext types (msgpack's own pass refuses them) and the never-used 0xc1
        raise _NotPlain
    if end > len(buf):
        raise _NotPlain
    return end


def _map_entries(buf: memoryview, pos: int, depth: int) -> tuple[dict[str, int], int]:
    """A map's str keys -> the positions of their values, and the position after the map. A duplicate or
    non-str key ends the walk (msgpack's own pass refuses them)."""
    h = _header(buf, pos, _MAP, _FIXMAP)
    if h is None or h[0] > _WALK_MAX_ITEMS:
        raise _NotPlain
    count, pos = h
    entries: dict[str, int] = {}
    for _ in range(count):
        k = _header(buf, pos, _STR, _FIXSTR)
        if k is None or k[1] + k[0] > len(buf):
            raise _NotPlain
        try:
            key = bytes(buf[k[1] : k[1] + k[0]]).decode("utf-8")
        except UnicodeDecodeError:
            raise _NotPlain from None
        if key in entries:
            raise _NotPlain
        entries[key] = pos = k[1] + k[0]
        pos = _skip(buf, pos, depth + 1)
    return entries, pos


def _payload_spans(buf: memoryview) -> dict[str, tuple[int, int, int]]:
    """{"rgb"/"xyz": (bin object start, its bytes' start, end)} of each `data` bin, when the message is one
    complete map whose `rgb` and `xyz` maps hold a msgpack bin under `data`; raises _NotPlain otherwise."""
    entries, end = _map_entries(buf, 0, 0)
    if end != len(buf):
        raise _NotPlain
    spans = {}
    for part in ("rgb", "xyz"):
        if part not in entries:
            raise _NotPlain
        value = _map_entries(buf, entries[part], 1)[0].get("data")
        h = _header(buf, value, _BIN) if value is not None else None
        if h is None:
            raise _NotPlain
        spans[part] = (value, h[1], h[1] + h[0])
    return spans


def unpack_frame_views(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """`unpack_frame`, but the frame's `rgb.data` and `xyz.data` are read-only memoryviews into `data`, not
    copies: a worker reading hundreds of frames a second saves copying each frame's payloads once more.

    Every check is the same, on the same bytes: the two payload bins are found by walking the message's
    headers, each is cut out (an empty bin in its place) and the rest goes through `unpack_frame`. A
    message whose layout the walk does not follow is unpacked whole, so its error is `unpack_frame`'s.
    """
    if not isinstance(data, bytes):
        return unpack_frame(data, limits)
    if len(data) > limits.max_message_bytes:  # unpack_frame's own first check, on the whole message
        return unpack_frame(data, limits)
    buf = memoryview(data)
    try:
        spans = _payload_spans(buf)
    except _NotPlain:
        return unpack_frame(data, limits)
    pieces, last = [], 0
    for start, _, end in sorted(spans.values()):
        pieces += [buf[last:start], b"\xc4\x00"]
        last = end
    pieces.append(buf[last:])
    frame = unpack_frame(b"".join(pieces), limits)
    views = {part: getattr(frame, part).model_copy(update={"data": buf[begin:end]})
             for part, (_, begin, end) in spans.items()}  # fmt: skip
    return frame.model_copy(update=views)


def unpack_result(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Result:
    """Parse and validate a Result."""
    return _unpack(data, "result", Result, limits)


def _valid_id(v: Any) -> str | None:
    return v if isinstance(v, str) and is_ident(v, DEFAULT_LIMITS.max_id_len) else None


_FRAME_ID_KEY = msgpack.packb("frame_id")
# peek_frame_id's bounds: its cost must not grow with what an attacker puts in a payload.
PEEK_MAX_KEYS = 64  # top-level keys walked (a frame has 11)
PEEK_SCAN_BYTES = 64 * 1024  # the byte scan looks only this far into the payload


def peek_frame_id(data: bytes) -> str | None:
    """Best-effort frame id of a (possibly broken) frame payload, to address an error result; never raises.

    Walks the top-level map key by key (values are skipped, not decoded), so a payload truncated or
    corrupted after its frame_id (which pack_frame writes third) still yields it; falls back to scanning
    the first PEEK_SCAN_BYTES bytes for a "frame_id" key. Bounded: a few milliseconds whatever the payload
    (docs/wire-format.md section 1). Only ids that would pass validation are returned.
    """
    try:
        buf = memoryview(data)[: DEFAULT_LIMITS.max_message_bytes]
    except Exception:
        return None
    try:
        unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=False,
            ext_hook=_no_ext,
            max_buffer_size=max(1, buf.nbytes),
            **{k: v for k, v in _unpack_limits(DEFAULT_LIMITS).items() if k != "max_ext_len"},
        )
        unpacker.feed(buf)
        for _ in range(min(unpacker.read_map_header(), PEEK_MAX_KEYS)):
            key = unpacker.unpack()
            if key == "frame_id":
                return _valid_id(unpacker.unpack())
            unpacker.skip()
    except Exception:
        pass
    try:
        head = bytes(buf[:PEEK_SCAN_BYTES])
        pos = head.find(_FRAME_ID_KEY)
        while pos >= 0:
            value_at = pos + len(_FRAME_ID_KEY)
            try:
                one = msgpack.Unpacker(raw=False, max_buffer_size=1024)
                one.feed(head[value_at : value_at + 512])
                value = one.unpack()
            except Exception:
                value = None
            if (found := _valid_id(value)) is not None:
                return found
            pos = head.find(_FRAME_ID_KEY, pos + 1)
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
