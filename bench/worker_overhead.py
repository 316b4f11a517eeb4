"""What the worker process itself costs per frame, with and without keeping freed memory (not a test).

    .venv/bin/python bench/worker_overhead.py [--frames 2048] [--side 200] [--rounds 3] [--decode-processes 2]
        [--data DIR]

A `crd work` process with a stand-in model of zero latency (no preprocessing, no model: what is left is
reading, unpacking, the slab copies, decoding in the pool, the result round trip and publishing) drains
a pre-filled stream of the demo's frames, alternately with `CRD_WORKER__KEEP_FREED_MEMORY` on and off,
`--rounds` times each. Reports frames/s, CPU ms per frame (worker process alone, and with its pool)
and minor page faults per frame; medians per setting and their ratio (on, over off), measured in one run
on one machine. Writes bench/results/worker_overhead.json; the figures are quoted in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine, repeated
from bench.throughput import drain_run, enlarge
from crd_model.data.mvtec3d import list_samples, read_rgb, read_xyz
from crd_model.demo import DEMO_CATEGORY, ensure_demo_model
from crd_model.stream.embedded import redis_server_url


def drain(url: str, rgbs: list, xyzs: list, n: int, args: list[str], keep: bool) -> dict:
    os.environ["CRD_WORKER__KEEP_FREED_MEMORY"] = "true" if keep else "false"  # the worker inherits it
    run = drain_run(url, args, rgbs, xyzs, n)
    faults, main_faults = run["worker_minor_faults_per_frame"], run["worker_main_process_minor_faults_per_frame"]
    return {
        "keep_freed_memory": keep,
        "frames": run["frames"],
        "errors": run["errors"],
        "fps": run["fps"],
        "main_cpu_ms_per_frame": run["worker_main_process_cpu_ms_per_frame"],
        "worker_cpu_ms_per_frame": run["worker_cpu_ms_per_frame"],
        "main_faults_per_frame": main_faults,
        "pool_faults_per_frame": faults - main_faults,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=2048)
    ap.add_argument("--side", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--decode-processes", type=int, default=2)
    ap.add_argument("--data", default=None, help=f"holds {DEMO_CATEGORY}/test (default: the demo's)")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "worker_overhead.json"))
    a = ap.parse_args()

    data = Path(a.data) if a.data else ensure_demo_model(ROOT / "runs" / "demo")[0]
    base = [(read_rgb(s.rgb_path), read_xyz(s.xyz_path)) for s in list_samples(data, DEMO_CATEGORY, "test")]
    pairs = [enlarge(rgb, xyz, a.side) for rgb, xyz in base]
    chosen = repeated(pairs, a.frames)
    rgbs, xyzs = [p[0] for p in chosen], [p[1] for p in chosen]
    args = ["--stand-in-latency-ms", "0", "--stand-in-category", DEMO_CATEGORY, "--max-batch", str(a.batch),
            "--decode-processes", str(a.decode_processes)]  # fmt: skip
    runs = []
    with redis_server_url() as url:
        for _ in range(a.rounds):
            for keep in (True, False):
                runs.append(drain(url, rgbs, xyzs, a.frames, args, keep))
                print(json.dumps(runs[-1]), flush=True)
    os.environ.pop("CRD_WORKER__KEEP_FREED_MEMORY", None)
    measures = ["fps", "main_cpu_ms_per_frame", "worker_cpu_ms_per_frame", "main_faults_per_frame",
                "pool_faults_per_frame"]  # fmt: skip
    medians = {
        str(keep): {m: statistics.median(r[m] for r in runs if r["keep_freed_memory"] == keep) for m in measures}
        for keep in (True, False)
    }
    ratios = {m: medians["True"][m] / medians["False"][m] for m in measures if medians["False"][m]}
    out = {"machine": machine(), "args": vars(a), "runs": runs, "medians": medians, "ratio_on_over_off": ratios}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"\nMachine: {out['machine']}; {a.frames} frames of {a.side}x{a.side}, batch {a.batch}, "
          f"{a.decode_processes} decode processes, stand-in model; medians of {a.rounds} runs each.\n")  # fmt: skip
    print("| keep_freed_memory | frames/s | main process CPU ms/frame | worker CPU ms/frame | "
          "faults/frame, main | faults/frame, pool |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for keep in ("True", "False"):
        m = medians[keep]
        cells = [f"{m['fps']:.0f}", f"{m['main_cpu_ms_per_frame']:.2f}", f"{m['worker_cpu_ms_per_frame']:.2f}",
                 f"{m['main_faults_per_frame']:.0f}", f"{m['pool_faults_per_frame']:.0f}"]  # fmt: skip
        print(f"| {'on' if keep == 'True' else 'off'} | " + " | ".join(cells) + " |")
    print("| on / off | " + " | ".join(f"{ratios[m]:.2f}" for m in measures) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
