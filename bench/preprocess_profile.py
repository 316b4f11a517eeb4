"""Where the device-side preprocessing spends its time (not a test).

    .venv/bin/python bench/preprocess_profile.py --data DIR [--side 200] [--size 256] [--batches 64 128]

Preprocesses batches of the synthetic test split (category disc, resized to --side) for a model of
--size px, as the worker does (tensors already on the device), and reports per batch size: frames/s,
host (CPU) time per batch, the number of operators launched, and the operators that cost the most
host and device time (torch.profiler). Writes bench/results/preprocess_profile.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine
from bench.throughput import enlarge
from crd_model.config import CRDConfig
from crd_model.data.mvtec3d import list_samples, read_rgb, read_xyz
from crd_model.preprocessing import Preprocessor


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--side", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "preprocess_profile.json"))
    a = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    samples = list_samples(Path(a.data), "disc", "test")[:16]
    pairs = [enlarge(read_rgb(s.rgb_path), read_xyz(s.xyz_path), a.side) for s in samples]
    prep = Preprocessor(CRDConfig(image_size=a.size), device)
    cuda = device.type == "cuda"
    rows = []
    for b in a.batches:
        chosen = (pairs * (b // len(pairs) + 1))[:b]
        rgbs = [torch.from_numpy(r).to(device) for r, _ in chosen]
        xyzs = [torch.from_numpy(x).to(device) for _, x in chosen]

        def run(rgbs=rgbs, xyzs=xyzs) -> None:
            prep(rgbs, xyzs)
            if cuda:
                torch.cuda.synchronize()

        run()  # warm: kernels, allocator
        times = []
        for _ in range(5):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        wall = sorted(times)[len(times) // 2]
        c = time.process_time()
        run()
        host = time.process_time() - c
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            run()
        ev = prof.key_averages()
        ops = sum(e.count for e in ev if e.key.startswith("aten::"))
        device_key = "self_device_time_total" if cuda else "self_cpu_time_total"

        def top(key: str, ev=ev) -> list:
            best = sorted(ev, key=lambda e: getattr(e, key, 0.0), reverse=True)[:12]
            return [{"op": e.key, "calls": e.count, "ms": getattr(e, key, 0.0) / 1000} for e in best]

        row = {"batch": b, "fps": b / wall, "wall_ms_per_batch": 1000 * wall, "host_cpu_ms_per_batch": 1000 * host,
               "aten_ops_per_batch": ops, "top_host": top("self_cpu_time_total"),
               "top_device": top(device_key)}  # fmt: skip
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("top")}), flush=True)
        rows.append(row)
    out = {"machine": machine(), "device": str(device), "side": a.side, "size": a.size, "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    for row in rows:
        print(f"\nbatch {row['batch']}: {row['fps']:.0f} frames/s, host {row['host_cpu_ms_per_batch']:.1f} ms, "
              f"{row['aten_ops_per_batch']} ops; top device: "
              + ", ".join(f"{t['op']} {t['ms']:.1f} ms" for t in row["top_device"][:6]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
