"""docs/wire-format.md against the reference implementation: its examples decode, its tables match the models."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from pydantic import BaseModel

from crd_model.stream import (
    AnomalyMap,
    ErrorInfo,
    Frame,
    Limits,
    PointMap,
    Region,
    Result,
    RGBImage,
    Timings,
    frame_arrays,
    make_frame,
    pack_frame,
    pack_result,
    unpack_frame,
    unpack_result,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "wire-format.md").read_text()


def _section(title_start: str, next_title_start: str) -> str:
    return DOC[DOC.index(title_start) : DOC.index(next_title_start)]


def _fenced_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL)


def _example_frame_bytes() -> bytes:
    dump = _fenced_blocks(_section("## 7. Worked example", "## 8."))[0]
    out = bytearray()
    for line in dump.strip().splitlines():
        hex_part = line[6:54]  # "0000  " offset, then 16 bytes as "xx " (the ASCII column follows)
        out += bytes.fromhex(hex_part)
        assert int(line[:4], 16) == len(out) - len(bytes.fromhex(hex_part))  # offsets are consistent
    return bytes(out)


def _stated_bytes(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\b(\d+) bytes\b", text)]


def test_section7_frame_example_decodes_as_described() -> None:
    data = _example_frame_bytes()
    section = _section("## 7. Worked example", "## 8.")
    assert _stated_bytes(section.split("```")[0])[-1] == len(data) == 217
    frame = unpack_frame(data)
    assert (frame.frame_id, frame.line, frame.camera, frame.seq, frame.category) == ("f-1", "L1", "c0", 5, "disc")
    assert frame.captured_at == 1700000000.5 and frame.meta == {"exp": 1200}
    rgb, xyz = frame_arrays(frame)
    assert rgb.tolist() == [[[255, 0, 0], [0, 128, 255]]]
    np.testing.assert_array_equal(xyz, np.float32([[[0.001, -0.002, 0.6], [0, 0, 0]]]))
    # The reference encoder writes exactly these bytes.
    assert pack_frame(frame) == data
    rebuilt = make_frame(rgb, xyz, frame_id="f-1", line="L1", camera="c0", seq=5, category="disc",
                         captured_at=1700000000.5, rgb_encoding="raw", xyz_compression="none",
                         meta={"exp": 1200})  # fmt: skip
    assert pack_frame(rebuilt) == data


def _jsonish(text: str) -> Any:
    return json.loads(text.replace("nil", "null"))


def test_section7_result_example_decodes_and_echoes_the_frame_meta() -> None:
    section = _section("## 7. Worked example", "## 8.")
    blocks = _fenced_blocks(section)
    assert len(blocks) == 2
    value = _jsonish(blocks[1])
    data = msgpack.packb(value, use_bin_type=True)
    result = unpack_result(data)
    assert result.meta == unpack_frame(_example_frame_bytes()).meta  # the frame's meta, echoed
    assert result.verdict == "ok" and result.score is not None and result.score < result.threshold  # type: ignore[operator]
    assert result.timings.enqueued_at is not None
    stated = _stated_bytes(section[section.index("A Result for the same frame") :])[0]
    assert len(pack_result(result)) == len(data) == stated
    # Written in the reference encoder's key order; fields added within v1 (`shadow`) are left out unset.
    assert list(value) == [k for k in Result.model_fields if k in value]
    assert set(Result.model_fields) - set(value) == {"shadow"}


def test_section8_decoding_sketch_agrees_with_the_reference_decoder() -> None:
    code = _fenced_blocks(_section("## 8. Decoding sketch", "\nAnomaly map (png8)"))[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "wire-format.md#8", "exec"), namespace)
    decode_frame = namespace["decode_frame"]
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    xyz = rng.normal(0, 1, (6, 7, 3)).astype(np.float32)
    for rgb_encoding in ("png", "raw", "jpeg"):
        for dtype in ("float32", "float16"):
            frame = make_frame(rgb, xyz, frame_id="f", line="L", camera="c", seq=0, category="disc",
                               rgb_encoding=rgb_encoding, xyz_dtype=dtype)  # type: ignore[arg-type]  # fmt: skip
            data = pack_frame(frame)
            _, rgb_sketch, xyz_sketch = decode_frame(data)
            rgb_ref, xyz_ref = frame_arrays(unpack_frame(data))
            assert np.array_equal(rgb_sketch, rgb_ref) and np.array_equal(xyz_sketch, xyz_ref)
    assert decode_frame(_example_frame_bytes())[0]["frame_id"] == "f-1"
    # The sketch refuses what the reference refuses: a 16-bit PNG, a point map out of range.
    d = msgpack.unpackb(pack_frame(make_frame(rgb, xyz, frame_id="f", line="L", camera="c", seq=0,
                                              category="disc")), raw=False)  # fmt: skip
    d["rgb"]["data"] = _png16(7, 6)
    with pytest.raises(ValueError, match="bad_rgb"):
        decode_frame(msgpack.packb(d, use_bin_type=True))
    far = make_frame(rgb, xyz * 1e30, frame_id="f", line="L", camera="c", seq=0, category="disc")
    with pytest.raises(ValueError, match="xyz_out_of_range"):
        decode_frame(pack_frame(far))


def _png16(w: int, h: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    rows = (b"\0" + bytes(w * 6)) * h
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _table_keys(title: str) -> set[str]:
    """Backticked names in the first column of the first table after `title`."""
    lines = DOC[DOC.index(title) :].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    keys: set[str] = set()
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        keys |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return keys


@pytest.mark.parametrize(
    ("title", "model"),
    [
        ("**RGBImage** (map)", RGBImage),
        ("**PointMap** (map)", PointMap),
        ("**AnomalyMap** (map)", AnomalyMap),
        ("**Region** (map)", Region),
        ("### 3.2 Frame", Frame),
        ("### 3.3 Result", Result),
    ],
)
def test_field_tables_list_exactly_the_model_fields(title: str, model: type[BaseModel]) -> None:
    assert _table_keys(title) == set(model.model_fields)


def test_prose_objects_and_limits_match_the_models() -> None:
    timings = DOC[DOC.index("**Timings** (map)") : DOC.index("**ErrorInfo** (map)")]
    assert set(re.findall(r"`([a-z_]+_at)`", timings)) == set(Timings.model_fields)
    error_info = DOC[DOC.index("**ErrorInfo** (map)") :].split("\n\n")[0]
    assert {"code", "message"} <= set(re.findall(r"`([a-z_]+)`", error_info)) and set(ErrorInfo.model_fields) == {
        "code",
        "message",
    }
    assert _table_keys("## 5. Limits") == set(Limits.model_fields)
    limits = _section("## 5. Limits", "## 6.")
    for name, default in Limits().model_dump().items():
        row = next(line for line in limits.splitlines() if f"`{name}`" in line)
        shown = row.split("|")[2].strip().split()[0]  # "64 MiB", "40,000,000", "10,000 (metres)"
        number = float(shown.replace(",", "")) * (2**20 if "MiB" in row.split("|")[2] else 1)
        assert number == default, (name, shown, default)


def test_entry_field_tables_match_what_the_workers_write() -> None:
    from workers.publish import PUBLISH_AND_ACK

    for title in ("**results entry**", "**dead-letter entry**"):
        for field in _table_keys(title):
            assert f"'{field}'" in PUBLISH_AND_ACK, (title, field)
    assert _table_keys("**frames entry**") == {"frame_id", "v", "payload"}


def test_every_error_code_in_the_code_is_documented() -> None:
    """Every code string raised anywhere (decoder, worker, preprocessing) is in the table of section 6."""
    section = _section("## 6. Error codes", "## 7.")
    documented = dict(re.findall(r"^\| `([a-z_]+)` \| (frame|infrastructure) \|", section, flags=re.MULTILINE))
    raised: set[str] = set()
    pattern = re.compile(r"(?:WireError|FrameError|ErrorInfo\.make)\(\s*\"([a-z_]+)\"")
    lua_reason = re.compile(r"'reason', '([a-z_]+)'")  # dead-letter reasons set inside the publish script
    for folder in ("crd_model", "workers", "producers"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            raised |= set(pattern.findall(text)) | set(lua_reason.findall(text))
    assert {"bad_rgb", "unknown_category", "max_deliveries", "internal"} <= raised  # the scan works
    assert raised <= set(documented), sorted(raised - set(documented))
    assert documented["max_deliveries"] == documented["internal"] == "infrastructure"


def test_names_an_integrator_needs_are_in_the_doc() -> None:
    from crd_model.stream.settings import StreamSettings

    defaults = StreamSettings()
    retention = [n for n in StreamSettings.model_fields if any(k in n for k in ("maxlen", "retain", "dedup", "trim"))]
    assert len(retention) >= 3
    for name in retention:  # every retention setting there is, with its default (section 1.3)
        default = getattr(defaults, name)
        assert f"CRD_STREAMS__{name.upper()}" in DOC, name
        assert f"{default:,.0f}" in DOC or f"{default:g}" in DOC, (name, default)
    for needle in (
        f"`{defaults.group}`",
        "CRD_STREAMS__GROUP",
        "CRD_STREAMS__PREFIX",
        "XACK",
        "at least once",
        "not in frame order",
        "score >= threshold",
        "8-connected",
    ):
        assert needle in DOC, needle
