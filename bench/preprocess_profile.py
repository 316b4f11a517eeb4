"""Where the device-side preprocessing spends its time (not a test).

    .venv/bin/python bench/preprocess_profile.py --data DIR [--side 200] [--size 256] [--batches 64 128]
        [--against REV]

Preprocesses batches of the synthetic test split (category --category, resized to --side) for a model
of --size px, as the worker does (tensors already on the device), and reports per batch size:
frames/s, host (CPU) time per batch, the number of operators launched and of host synchronisations
(flood-fill and hole-filling rounds, bounding boxes), and the operators that cost the most host and
device time (torch.profiler).
--reach forces one way of flood filling (crd_model/preprocessing.py `_reach`). --like-gpu takes a
GPU's code paths on a CPU (whole batches, flood fill by runs, one gather per batch), so the operator
count there is the one a GPU launches (its times are not a GPU's). Writes
bench/results/preprocess_profile.json.

--against REV also loads crd_model/preprocessing.py as it was at git revision REV and times the two
alternately in this process (--rounds rounds each; medians of CPU time per frame and their ratio), so
a change is judged on one machine at one moment: this VM's speed drifts by a third between runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine, repeated
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
    ap.add_argument("--against", metavar="REV", help="also time the preprocessing of git revision REV")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--category", default="disc", help="frames of this category's test split")
    ap.add_argument("--reach", choices=["auto", "pixels", "runs"], default="auto",
                    help="flood fill one pixel or one run per round (auto: pixels on a CPU, else runs)")  # fmt: skip
    ap.add_argument("--like-gpu", action="store_true",
                    help="on a CPU, a GPU's code paths (preprocessing.launch_bound): its operator count")  # fmt: skip
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "preprocess_profile.json"))
    a = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import crd_model.preprocessing as P

    if a.like_gpu:
        take_gpu_paths(P)
    if a.reach != "auto":
        P._reach = {"pixels": P._reach_by_pixels, "runs": P._reach_by_runs}[a.reach]
    samples = list_samples(Path(a.data), a.category, "test")[:16]
    pairs = [enlarge(read_rgb(s.rgb_path), read_xyz(s.xyz_path), a.side) for s in samples]
    prep = Preprocessor(CRDConfig(image_size=a.size), device)
    cuda = device.type == "cuda"
    rows = []
    for b in a.batches:
        chosen = repeated(pairs, b)
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
        syncs = count_syncs(P, run)
        device_key = "self_device_time_total" if cuda else "self_cpu_time_total"

        def top(key: str, ev=ev) -> list:
            best = sorted(ev, key=lambda e: getattr(e, key, 0.0), reverse=True)[:12]
            return [{"op": e.key, "calls": e.count, "ms": getattr(e, key, 0.0) / 1000} for e in best]

        row = {"batch": b, "fps": b / wall, "wall_ms_per_batch": 1000 * wall, "host_cpu_ms_per_batch": 1000 * host,
               "aten_ops_per_batch": ops, "host_syncs_per_batch": syncs, "top_host": top("self_cpu_time_total"),
               "top_device": top(device_key)}  # fmt: skip
        if a.against:
            row["against"] = compare(a.against, prep, rgbs, xyzs, a.rounds, cuda)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("top")}), flush=True)
        rows.append(row)
    out = {"machine": machine(), "device": str(device), "side": a.side, "size": a.size, "category": a.category,
           "reach": a.reach, "like_gpu": a.like_gpu, "rows": rows}  # fmt: skip
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    for row in rows:
        print(f"\nbatch {row['batch']}: {row['fps']:.0f} frames/s, host {row['host_cpu_ms_per_batch']:.1f} ms, "
              f"{row['aten_ops_per_batch']} ops, {row['host_syncs_per_batch']} syncs; top device: "
              + ", ".join(f"{t['op']} {t['ms']:.1f} ms" for t in row["top_device"][:6]))  # fmt: skip
    return 0


def take_gpu_paths(*modules) -> None:
    """These preprocessing modules take a GPU's code paths on any device (`launch_bound`), so a CPU counts
    the operators a GPU launches (its times are not a GPU's)."""
    for module in modules:
        module.launch_bound = lambda device: True


def count_syncs(module, run) -> int:
    """How often one `run()` reads a value back from the device (each a host synchronisation on a GPU):
    calls of the module's `_any` (is a flood fill or hole filling done?) and `_bounding_box` (where is
    work left?)."""
    calls = [0]
    originals = {name: getattr(module, name) for name in ("_any", "_bounding_box")}

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(module, name, counted(fn))
    try:
        run()
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
    return calls[0]


def preprocessing_at(rev: str):
    """crd_model/preprocessing.py as it was at git revision `rev`, as a module."""
    source = subprocess.run(
        ["git", "show", f"{rev}:crd_model/preprocessing.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
        f.write(source)
        f.flush()
        spec = importlib.util.spec_from_file_location("preprocessing_at_rev", f.name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def compare(rev: str, prep: Preprocessor, rgbs: list, xyzs: list, rounds: int, cuda: bool) -> dict:
    """CPU ms per frame of this checkout's preprocessing and of `rev`'s, timed alternately."""
    old = preprocessing_at(rev).Preprocessor(prep.config, prep.device)
    times: dict[str, list[float]] = {"this": [], rev: []}
    for fn in (prep, old):  # warm both
        fn(rgbs, xyzs)
    for _ in range(rounds):
        for name, fn in (("this", prep), (rev, old)):
            t = time.process_time()
            fn(rgbs, xyzs)
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.process_time() - t)
    ms = {name: 1000 * statistics.median(v) / len(rgbs) for name, v in times.items()}
    out = {"rev": rev, "cpu_ms_per_frame": ms["this"], "rev_cpu_ms_per_frame": ms[rev], "ratio": ms["this"] / ms[rev]}
    print(f"against {rev}: {ms['this']:.2f} vs {ms[rev]:.2f} CPU ms per frame, ratio {out['ratio']:.2f}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
