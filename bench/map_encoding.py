"""What encoding a result's anomaly map costs: the workers' PNG writer against Pillow's (not a test).

    .venv/bin/python bench/map_encoding.py [--sides 200 256] [--maps 200] [--rounds 7]

Smooth maps like the model's (Gaussian-blurred noise, one raised patch), quantised to 8 bits, encoded
by the shipped `quantised_map` (one fixed PNG filter, ISA-L deflate where installed) and by Pillow's
PNG encoder at compress level 1 (what workers used before). Also a whole result (`build_outcome`, an
"ok" frame: timings, validation, the map, msgpack) with each. Reports CPU ms per map and bytes; medians
of `--rounds`, both encoders alternating in one run. Writes bench/results/map_encoding.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine
from crd_model.stream import codecs, make_frame
from workers.processing import Item, WireMap, build_outcome


def pillow_png(pixels: np.ndarray) -> bytes:
    """The encoder before: Pillow, compress level 1 (its adaptive per-row filters)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def smooth_maps(side: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(side)
    out = []
    for _ in range(n):
        v = gaussian_filter(rng.normal(0, 1, (side, side)), side / 50) * 10
        v[side // 3 : side // 2, side // 2 : side // 2 + side // 8] += 6  # a defect-like patch
        out.append(np.rint((v - v.min()) * (255 / (v.max() - v.min()))).astype(np.uint8))
    return out


def items_for(maps: list[np.ndarray]) -> list[Item]:
    side = maps[0].shape[0]
    frame = make_frame(np.zeros((side, side, 3), np.uint8), np.zeros((side, side, 3), np.float32), frame_id="b",
                       line="L", camera="c", seq=0, category="disc")  # fmt: skip
    items = []
    for px in maps:
        it = Item("L", "1-1", b"", 1, "b", time.time(), frame=frame)
        it.wire_map = WireMap(None, px, 0.0, 10.0, (side, side))
        it.score, it.threshold, it.model_id = 1.0, 5.0, "bench"
        items.append(it)
    return items


def cpu_ms(fn, items: list) -> float:
    t = time.thread_time()
    for x in items:
        fn(x)
    return 1000 * (time.thread_time() - t) / len(items)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[200, 256])
    ap.add_argument("--maps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "map_encoding.json"))
    a = ap.parse_args()
    writers = {"shipped": codecs._grey_png, "pillow level 1": pillow_png}
    rows = []
    for side in a.sides:
        maps = smooth_maps(side, a.maps)
        items = items_for(maps)
        times: dict[str, dict[str, list[float]]] = {w: {"map": [], "result": []} for w in writers}
        for _ in range(a.rounds):
            for name, writer in writers.items():
                times[name]["map"].append(cpu_ms(writer, maps))
                with mock.patch.object(codecs, "_grey_png", writer):
                    times[name]["result"].append(cpu_ms(lambda it: build_outcome(it, "bench", 16), items))
        for name, writer in writers.items():
            rows.append({"side": side, "encoder": name, "map_cpu_ms": statistics.median(times[name]["map"]),
                         "result_cpu_ms": statistics.median(times[name]["result"]),
                         "map_bytes": int(np.median([len(writer(m)) for m in maps]))})  # fmt: skip
    out = {"machine": machine(), "args": vars(a), "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"Machine: {out['machine']}; {a.maps} maps per size, medians of {a.rounds} rounds.\n")
    print("| map side | encoder | CPU ms per map | CPU ms per result (ok frame) | map bytes |")
    print("|---|---|---|---|---|")
    for r in rows:
        ms = f"{r['map_cpu_ms']:.3f}", f"{r['result_cpu_ms']:.3f}"
        cells = [str(r["side"]), r["encoder"], *ms, f"{r['map_bytes']:,}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
