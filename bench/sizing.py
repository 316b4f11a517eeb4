"""GPU sizing: frames/s of the model per teacher, image size, batch and precision (not a test).

    .venv/bin/python bench/sizing.py [--teachers efficientnet_lite0 wide_resnet50_2] [--sizes 256 384]
        [--batches 32 128] [--modes fp32 bf16 bf16+compile] [--compile-only efficientnet_lite0@256]

The model alone, through the serving path (`Inspector.forward`: memory format, autocast, padded batch
shapes, compiled graph when asked), on tensors already on the device: the ceiling a worker's pipeline
is measured against, and the figure docs/deploy.md sizes GPUs with. Teacher weights are random here:
speed does not depend on their values, and only the default teacher's weights ship offline. Each
figure is the median of 5 timed passes of `--iters` batches after warm-up. Writes BENCHMARKS.md
(section "sizing") and bench/results/sizing.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine, write_section
from crd_model.inspector import Inspector
from crd_model.preprocessing import ModelInput
from crd_model.torch_model import create_model


def measure(teacher: str, size: int, batch: int, mode: str, iters: int) -> dict:
    model = create_model(backbone=teacher, image_size=size, teacher_weights=None)
    bf16, compiled = mode.startswith("bf16"), mode.endswith("+compile")
    inspector = Inspector.from_model(model, bf16=bf16, compile=compiled, buckets=(batch,), max_batch=batch)
    device = inspector.device
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    shape = (batch, 3, size, size)
    inputs = ModelInput(torch.rand(shape, device=device), torch.rand(shape, device=device))
    inspector.forward(inputs)
    sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(2):
        inspector.forward(inputs)
    rates = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            inspector.forward(inputs)
        sync(device)
        rates.append(iters * batch / (time.perf_counter() - t))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del inspector, model
    return {"teacher": teacher, "size": size, "batch": batch, "mode": mode, "fps": float(np.median(rates)),
            "first_batch_s": first_s, "peak_gib": peak}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teachers", nargs="+", default=["efficientnet_lite0", "wide_resnet50_2"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 384])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--modes", nargs="+", default=["fp32", "bf16", "bf16+compile"],
                    choices=["fp32", "bf16", "bf16+compile", "fp32+compile"])  # fmt: skip
    ap.add_argument("--compile-only", nargs="*", default=None, metavar="TEACHER@SIZE",
                    help="compile only these (compiling every combination takes minutes each)")  # fmt: skip
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--render", nargs="+", default=None, metavar="JSON",
                    help="measure nothing: merge the rows of these result files and write the section")  # fmt: skip
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "sizing.json"))
    a = ap.parse_args()

    if a.render:
        parts = [json.loads(Path(f).read_text()) for f in a.render]
        text = render({"machine": parts[0]["machine"], "rows": [r for p in parts for r in p["rows"]]})
        print(text)
        if not a.no_write:
            write_section("sizing", text)
        return 0
    rows = []
    # Modes outermost, compiled last: a time-boxed run keeps every eager figure.
    for mode in a.modes:
        for teacher in a.teachers:
            for size in a.sizes:
                if "compile" in mode and a.compile_only is not None and f"{teacher}@{size}" not in a.compile_only:
                    continue
                for batch in a.batches:
                    row = measure(teacher, size, batch, mode, a.iters)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(a.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    out = {"machine": machine(), "rows": rows}
    text = render(out)
    print(text)
    if not a.no_write:
        write_section("sizing", text)
    return 0


def render(out: dict) -> str:
    lines = [
        "## GPU sizing: the model alone (`bench/sizing.py`)",
        "",
        f"Machine: {out['machine']}. Frames/s of `Inspector.forward` (both branches, fused map and score) on "
        "tensors already on the device; median of 5 passes. First batch = load-to-first-result time, "
        "compilation included where compiled.",
        "",
        "| teacher | image size | batch | mode | frames/s | first batch | peak GPU memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['teacher']} | {r['size']} | {r['batch']} | {r['mode']} | {r['fps']:,.0f} | "
            f"{r['first_batch_s']:.1f} s | {r['peak_gib']:.1f} GiB |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
