"""What a frame costs on the wire and in Redis, for each producer option (not a test).

    .venv/bin/python bench/wire.py [--frames 48]

For the demo's 200x200 frames and the same frames at 800x800 (the MVTec 3D-AD size), per option
(default PNG + float32 + zlib; float16 xyz; xyz without zlib; `--downscale` 512 and 256; JPEG RGB):
the payload's median size, the producer's CPU to encode one frame, the worker's CPU to decode it (RGB
and point map, one thread), and, for `--frames` frames XADDed to a fresh stream, the server's memory
per entry (MEMORY USAGE) and CPU per XADD (INFO cpu). Uses REDIS_URL, else an embedded Valkey. Writes
BENCHMARKS.md (section "wire") and bench/results/wire.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine, write_section
from bench.throughput import enlarge
from crd_model.data.mvtec3d import list_samples, read_rgb, read_xyz
from crd_model.demo import DEMO_CATEGORY, ensure_demo_model
from crd_model.stream import frame_arrays, make_frame, pack_frame, unpack_frame
from crd_model.stream.embedded import redis_server_url
from crd_model.stream.redis_streams import F_FRAME_ID, F_PAYLOAD, connect
from crd_model.stream.settings import RedisSettings
from producers.producer import downscale

OPTIONS = {
    "png + float32 (default)": {},
    "png + float16": {"xyz_dtype": "float16"},
    "png + float32, xyz not deflated": {"xyz_compression": "none"},
    "png + float16, xyz not deflated": {"xyz_dtype": "float16", "xyz_compression": "none"},
    "--downscale 512": {"downscale": 512},
    "--downscale 256": {"downscale": 256},
    "--downscale 256 + float16": {"downscale": 256, "xyz_dtype": "float16"},
    "jpeg + float32": {"rgb_encoding": "jpeg"},
}


def measure(r, pairs: list, option: dict, n: int) -> dict:
    sizes, cpu = [], 0.0
    payloads = []
    for i in range(n):
        rgb, xyz = pairs[i % len(pairs)]
        t = time.process_time()
        meta: dict = {}
        if "downscale" in option:
            rgb, xyz, meta = downscale(rgb, xyz, meta, option["downscale"])
        frame = make_frame(rgb, xyz, frame_id=f"w:{i}", line="wire", camera="c", seq=i, category=DEMO_CATEGORY,
                           rgb_encoding=option.get("rgb_encoding", "png"),
                           xyz_dtype=option.get("xyz_dtype", "float32"),
                           xyz_compression=option.get("xyz_compression", "zlib"), meta=meta)  # fmt: skip
        payload = pack_frame(frame)
        cpu += time.process_time() - t
        sizes.append(len(payload))
        payloads.append(payload)
    t = time.process_time()
    for p in payloads:
        frame_arrays(unpack_frame(p))
    decode_cpu = time.process_time() - t
    key = f"bench-wire:{time.time_ns()}"
    info0 = r.info("cpu")
    for i, p in enumerate(payloads):
        r.xadd(key, {F_FRAME_ID: f"w:{i}".encode(), F_PAYLOAD: p})
    info1 = r.info("cpu")
    memory = r.memory_usage(key, samples=0) or 0
    r.delete(key)
    server_cpu = sum(float(info1[k]) - float(info0[k]) for k in ("used_cpu_sys", "used_cpu_user"))
    return {
        "payload_bytes_median": int(np.median(sizes)),
        "producer_encode_ms": 1000 * cpu / n,
        "worker_decode_ms": 1000 * decode_cpu / n,
        "redis_bytes_per_entry": memory / n,
        "redis_cpu_ms_per_xadd": 1000 * server_cpu / n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    data, _ = ensure_demo_model(ROOT / "runs" / "demo")
    base = [(read_rgb(s.rgb_path), read_xyz(s.xyz_path)) for s in list_samples(data, DEMO_CATEGORY, "test")]
    out: dict = {"machine": machine(), "frames": a.frames, "sizes": {}}
    with redis_server_url() as url:
        r = connect(RedisSettings(url=url))
        out["server"] = f"{r.info('server').get('server_name', 'redis')} {r.info('server')['redis_version']}"
        for side in (200, 800):
            pairs = [enlarge(rgb, xyz, side) for rgb, xyz in base]
            out["sizes"][str(side)] = {name: measure(r, pairs, opt, a.frames) for name, opt in OPTIONS.items()}
            print(side, json.dumps(out["sizes"][str(side)], indent=1), flush=True)
    path = ROOT / "bench" / "results" / "wire.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    lines = [
        "## Bytes on the wire (`bench/wire.py`)",
        "",
        f"Machine: {out['machine']}; server {out['server']}; {a.frames} frames per option, demo frames "
        "(200x200) and the same frames enlarged to 800x800. Medians of the payload sizes; Redis memory is "
        "MEMORY USAGE of the stream over its entries.",
        "",
        "| frame | option | payload bytes | vs default | producer encode ms | worker decode ms | Redis bytes/entry "
        "| Redis CPU ms/XADD |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side, rows in out["sizes"].items():
        ref = rows["png + float32 (default)"]["payload_bytes_median"]
        for name, v in rows.items():
            lines.append(
                f"| {side}x{side} | {name} | {v['payload_bytes_median']:,} | {v['payload_bytes_median'] / ref:.2f} | "
                f"{v['producer_encode_ms']:.1f} | {v['worker_decode_ms']:.1f} | {v['redis_bytes_per_entry']:,.0f} | "
                f"{v['redis_cpu_ms_per_xadd']:.3f} |"
            )
    text = "\n".join(lines)
    print(text)
    if not a.no_write:
        write_section("wire", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
