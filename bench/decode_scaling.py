"""Frame decoding across cores: threads against processes (not a test).

    .venv/bin/python bench/decode_scaling.py --data DIR [--frames 512] [--side 200] [--workers 1 2 4 8 12]

The worker decodes each frame (msgpack unpack, PNG RGB, zlib point map, range checks) in a pool. Which
pool scales with cores is a measurement, not a belief: this decodes the same payloads with a thread
pool and with a process pool of each size. Processes are measured twice: sending the arrays back
(pickled through a pipe, what a plain process pool costs) and sending nothing back (the bound a
shared-memory handoff could reach). Payloads are the synthetic test split under --data (category disc),
resized to --side. Prints a table; writes bench/results/decode_scaling.json.

First, in one thread: CPU ms per point map decoded with each zlib inflater a worker may have (ISA-L's,
from the model extra, and the standard library's), and CPU ms per RGB image decoded with each PNG
decoder (libspng through imagecodecs, from the model extra, and Pillow's), timed alternately, and
their ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine
from bench.throughput import FrameMaker, enlarge
from crd_model.data.mvtec3d import list_samples, read_rgb, read_xyz
from crd_model.stream.codecs import decode_rgb, decode_xyz
from crd_model.stream.packing import unpack_frame


def decode(payload: bytes) -> tuple[np.ndarray, np.ndarray]:
    frame = unpack_frame(payload)
    return decode_rgb(frame.rgb), decode_xyz(frame.xyz)


def decode_discard(payload: bytes) -> int:
    rgb, xyz = decode(payload)
    return rgb.nbytes + xyz.nbytes


def _alternating(attr: str, variants: dict, items: list, decode, rounds: int) -> dict[str, float]:
    """CPU ms per item of `decode`, with `codecs.<attr>` set to each variant in turn (one thread, the
    variants alternating `rounds` times); medians per variant, and the second over the first."""
    import crd_model.stream.codecs as codecs

    chosen = getattr(codecs, attr)
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(rounds):
            for name, variant in variants.items():
                setattr(codecs, attr, variant)
                t = time.process_time()
                for item in items:
                    decode(item)
                times[name].append(1000 * (time.process_time() - t) / len(items))
    finally:
        setattr(codecs, attr, chosen)
    out = {f"{name}_ms": float(np.median(v)) for name, v in times.items()}
    if len(variants) == 2:
        first, second = variants
        out[f"{second}_over_{first}"] = out[f"{second}_ms"] / out[f"{first}_ms"]
    return out


def compare_inflaters(payloads: list[bytes], rounds: int = 5) -> dict[str, float]:
    """CPU ms per point map decoded (decode_xyz) with each inflater a worker may have, alternately."""
    import zlib

    inflaters = {"zlib": zlib}
    try:
        from isal import isal_zlib

        inflaters["isal"] = isal_zlib
    except ImportError:
        pass
    return _alternating("_INFLATE", inflaters, [unpack_frame(p).xyz for p in payloads[:64]], decode_xyz, rounds)


def compare_png_decoders(payloads: list[bytes], rounds: int = 5) -> dict[str, float]:
    """CPU ms per RGB image decoded (decode_rgb) with Pillow and with libspng (where installed), alternately."""
    import crd_model.stream.codecs as codecs

    decoders = {"pillow": None} | ({"libspng": codecs._spng_decode} if codecs._spng_decode is not None else {})
    return _alternating("_spng_decode", decoders, [unpack_frame(p).rgb for p in payloads[:64]], decode_rgb, rounds)


def rate(pool, fn, payloads: list[bytes]) -> float:
    list(pool.map(fn, payloads[:32]))  # warm: imports, first allocations
    t = time.perf_counter()
    list(pool.map(fn, payloads, chunksize=1))
    return len(payloads) / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--side", type=int, default=200)
    ap.add_argument("--xyz-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 12])
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "decode_scaling.json"))
    a = ap.parse_args()

    samples = list_samples(Path(a.data), "disc", "test")[:16]
    images = [enlarge(read_rgb(s.rgb_path), read_xyz(s.xyz_path), a.side) for s in samples]
    maker = FrameMaker([rgb for rgb, _ in images], [xyz for _, xyz in images], "L", xyz_dtype=a.xyz_dtype)
    payloads = [maker.packed(i, f"d:{i}") for i in range(a.frames)]
    inflate = compare_inflaters(payloads)
    print(json.dumps({"decode_xyz_cpu_ms_per_frame": inflate}), flush=True)
    png = compare_png_decoders(payloads)
    print(json.dumps({"decode_rgb_cpu_ms_per_frame": png}), flush=True)
    rows = []
    for k in a.workers:
        row = {"workers": k}
        with ThreadPoolExecutor(k) as pool:
            row["threads_fps"] = rate(pool, decode, payloads)
        with ProcessPoolExecutor(k, mp_context=mp.get_context("fork")) as pool:
            row["processes_fps"] = rate(pool, decode, payloads)
            row["processes_no_return_fps"] = rate(pool, decode_discard, payloads)
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {"machine": machine(), "side": a.side, "xyz_dtype": a.xyz_dtype, "frames": a.frames,
           "payload_bytes_median": int(np.median([len(p) for p in payloads])), "inflaters": inflate,
           "png_decoders": png, "rows": rows}  # fmt: skip
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"\nMachine: {out['machine']}; {a.side}x{a.side} frames, xyz {a.xyz_dtype}, "
          f"{out['payload_bytes_median']:,} B each; frames/s decoded\n")  # fmt: skip
    print("| pool size | threads | processes (arrays back by pipe) | processes (nothing back) |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['workers']} | {r['threads_fps']:.0f} | {r['processes_fps']:.0f} | "
            f"{r['processes_no_return_fps']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
