"""What the worker process itself costs per frame: a setting on against off, or this source tree
against another git revision (not a test).

    .venv/bin/python bench/worker_overhead.py [--frames 2048] [--side 200] [--rounds 3] [--decode-processes 2]
        [--data DIR] [--toggle keep-freed-memory|freeze-startup-objects] [--against REV]

A `crd work` process with a stand-in model of zero latency (no preprocessing, no model: what is left is
reading, unpacking, the slab copies, decoding in the pool, the result round trip and publishing) drains
a pre-filled stream of the demo's frames, `--rounds` times per variant, the variants alternating. The
variants: the `--toggle` setting (`CRD_WORKER__KEEP_FREED_MEMORY` or `..._FREEZE_STARTUP_OBJECTS`)
on and off; with `--against REV`, the worker of this source tree and the worker of REV (checked out in
a temporary git worktree; both with the settings' defaults). Reports frames/s, CPU ms per frame (worker
process alone, and with its pool), the `unpack` stage's CPU, minor page faults per frame and the worker
process's garbage collections (full ones, their total ms, and pauses over 25 ms; none where REV
predates the metric); medians per variant and their ratio (the first over the second),
measured in one run on one machine. Writes bench/results/worker_overhead[-against-REV].json; the figures
are quoted in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine, repeated
from bench.throughput import drain_run, enlarge
from crd_model.data.mvtec3d import list_samples, read_rgb, read_xyz
from crd_model.demo import DEMO_CATEGORY, ensure_demo_model
from crd_model.stream.embedded import redis_server_url

MEASURES = ["fps", "main_cpu_ms_per_frame", "worker_cpu_ms_per_frame", "unpack_cpu_ms_per_frame",
            "main_faults_per_frame", "pool_faults_per_frame", "gc_full", "gc_full_ms", "gc_over_25ms"]  # fmt: skip
TOGGLES = {"keep-freed-memory": "CRD_WORKER__KEEP_FREED_MEMORY",
           "freeze-startup-objects": "CRD_WORKER__FREEZE_STARTUP_OBJECTS"}  # fmt: skip


def drain(url: str, rgbs: list, xyzs: list, n: int, args: list[str], variant: str, env: dict, code: Path) -> dict:
    os.environ.update(env)  # the worker inherits it
    run = drain_run(url, args, rgbs, xyzs, n, code=code)
    faults, main_faults = run["worker_minor_faults_per_frame"], run["worker_main_process_minor_faults_per_frame"]
    return {
        "variant": variant,
        "frames": run["frames"],
        "errors": run["errors"],
        "fps": run["fps"],
        "main_cpu_ms_per_frame": run["worker_main_process_cpu_ms_per_frame"],
        "worker_cpu_ms_per_frame": run["worker_cpu_ms_per_frame"],
        "unpack_cpu_ms_per_frame": run["stages_ms_per_frame"]["unpack"]["cpu"],
        "main_faults_per_frame": main_faults,
        "pool_faults_per_frame": faults - main_faults,
        "gc_full": run["worker_gc"]["full"],
        "gc_full_ms": 1000 * run["worker_gc"]["full_seconds"],
        "gc_over_25ms": run["worker_gc"]["over_25ms"],
    }


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """REV's source tree in a temporary git worktree (its `crd work` runs from there)."""
    with tempfile.TemporaryDirectory(prefix="crd-against-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)  # fmt: skip
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=2048)
    ap.add_argument("--side", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--decode-processes", type=int, default=2)
    ap.add_argument("--data", default=None, help=f"holds {DEMO_CATEGORY}/test (default: the demo's)")
    ap.add_argument("--toggle", choices=sorted(TOGGLES), default="keep-freed-memory")
    ap.add_argument("--against", default=None, metavar="REV", help="compare with the worker of git revision REV")
    ap.add_argument("--json", default=None, help="default: bench/results/worker_overhead[-against-REV].json")
    a = ap.parse_args()

    data = Path(a.data) if a.data else ensure_demo_model(ROOT / "runs" / "demo")[0]
    base = [(read_rgb(s.rgb_path), read_xyz(s.xyz_path)) for s in list_samples(data, DEMO_CATEGORY, "test")]
    pairs = [enlarge(rgb, xyz, a.side) for rgb, xyz in base]
    chosen = repeated(pairs, a.frames)
    rgbs, xyzs = [p[0] for p in chosen], [p[1] for p in chosen]
    args = ["--stand-in-latency-ms", "0", "--stand-in-category", DEMO_CATEGORY, "--max-batch", str(a.batch),
            "--decode-processes", str(a.decode_processes)]  # fmt: skip
    suffix = f"-against-{a.against}" if a.against else ("" if a.toggle == "keep-freed-memory" else f"-{a.toggle}")
    out_json = Path(a.json) if a.json else ROOT / "bench" / "results" / f"worker_overhead{suffix}.json"
    runs = []
    with contextlib.ExitStack() as stack:
        if a.against:
            other = stack.enter_context(checkout(a.against))
            variants = [("this tree", {}, ROOT), (a.against, {}, other)]
        else:
            var = TOGGLES[a.toggle]
            variants = [(f"{a.toggle} {v}", {var: str(v == "on").lower()}, ROOT) for v in ("on", "off")]
        url = stack.enter_context(redis_server_url())
        for _ in range(a.rounds):
            for name, env, code in variants:
                runs.append(drain(url, rgbs, xyzs, a.frames, args, name, env, code))
                print(json.dumps(runs[-1]), flush=True)
    for var in TOGGLES.values():
        os.environ.pop(var, None)
    names = [v[0] for v in variants]
    medians = {v: {m: statistics.median(r[m] for r in runs if r["variant"] == v) for m in MEASURES} for v in names}
    ratios = {m: medians[names[0]][m] / medians[names[1]][m] for m in MEASURES if medians[names[1]][m]}
    out = {"machine": machine(), "args": vars(a), "runs": runs, "medians": medians,
           f"ratio {names[0]} over {names[1]}": ratios}  # fmt: skip
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(out, indent=2))
    print(f"\nMachine: {out['machine']}; {a.frames} frames of {a.side}x{a.side}, batch {a.batch}, "
          f"{a.decode_processes} decode processes, stand-in model; medians of {a.rounds} runs each.\n")  # fmt: skip
    print("| variant | frames/s | main process CPU ms/frame | worker CPU ms/frame | unpack CPU ms/frame | "
          "faults/frame, main | faults/frame, pool | full collections | their ms | pauses > 25 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        m = medians[name]
        cells = [f"{m['fps']:.0f}", f"{m['main_cpu_ms_per_frame']:.2f}", f"{m['worker_cpu_ms_per_frame']:.2f}",
                 f"{m['unpack_cpu_ms_per_frame']:.3f}", f"{m['main_faults_per_frame']:.0f}",
                 f"{m['pool_faults_per_frame']:.0f}", f"{m['gc_full']:.0f}", f"{m['gc_full_ms']:.0f}",
                 f"{m['gc_over_25ms']:.0f}"]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"| {names[0]} / {names[1]} | " + " | ".join(f"{ratios.get(m, float('nan')):.2f}" for m in MEASURES) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
