"""Quality benchmark: CRD vs its three baselines on the synthetic categories.

    .venv/bin/python bench/quality.py [--epochs N] [--categories a b] [--models crd rgb 3d fused]

Generates the default synthetic data set (seed 0) unless it exists, trains every model on every
category with the default teacher, evaluates on the test split and writes a table to
BENCHMARKS.md (section "quality") and the raw numbers to bench/results/quality.json.
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
from crd_model.config import CRDConfig
from crd_model.data.synth import DEFECT_VISIBILITY, SYNTH_CATEGORIES, generate_dataset
from crd_model.evaluate import evaluate
from crd_model.train import TrainOptions, train_category

MODELS = ("crd", "rgb", "3d", "fused")
GROUPS = ("rgb", "3d", "both")


def visibility_groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for defect, vis in DEFECT_VISIBILITY.items():
        if vis in groups:
            groups[vis].append(defect)
    return groups


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "runs" / "bench-data"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-quality"))
    ap.add_argument("--categories", nargs="*", default=list(SYNTH_CATEGORIES))
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--image-size", type=int, default=192)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "quality.json"), help="raw results file")
    a = ap.parse_args()

    data = Path(a.data)
    if not all((data / c / "test").is_dir() for c in a.categories):
        t = time.perf_counter()
        generate_dataset(data, categories=a.categories, seed=0)
        print(f"generated synthetic data in {time.perf_counter() - t:.1f}s -> {data}")
    groups = visibility_groups()
    results: dict[str, dict[str, dict]] = {}
    for category in a.categories:
        for model in a.models:
            ckpt = Path(a.out) / category / model
            config = CRDConfig(architecture=model, image_size=a.image_size)
            options = TrainOptions(epochs=a.epochs, seed=a.seed, progress=False)
            meta = train_category(data, category, ckpt, config, options)
            report = evaluate(ckpt, data, category, groups=groups)
            assert meta.training is not None
            report["train_seconds"] = meta.training.seconds
            report["trainable_parameters"] = meta.training.trainable_parameters
            results.setdefault(category, {})[model] = report
            o = report["overall"]
            print(
                f"{category:>10} {model:>6}: I-AUROC {o['i_auroc']:.3f} P-AUROC {o['p_auroc']:.3f} "
                f"AUPRO@30% {o['aupro_30']:.3f}  ({meta.training.seconds:.0f}s)",
                flush=True,
            )

    out_json = Path(a.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(
        json.dumps({"machine": machine(), "epochs": a.epochs, "image_size": a.image_size, "results": results}, indent=2)
    )
    table = render(results, a.models, a.categories, a.epochs, a.image_size)
    print(table)
    if not a.no_write:
        write_section("quality", table)
    return 0


def _mean(vals: list[float]) -> float:
    vals = [v for v in vals if v == v]
    return float(np.mean(vals)) if vals else float("nan")


def render(results: dict, models: list[str], categories: list[str], epochs: int, image_size: int) -> str:
    lines = [
        "## Quality on synthetic data (`bench/quality.py`)",
        "",
        f"Command: `.venv/bin/python bench/quality.py --epochs {epochs}`; teacher efficientnet_lite0 "
        f"(ImageNet, offline), {image_size} px, {epochs} epochs, seed 42, default synthetic data "
        "(seed 0). Machine: " + machine() + ". Times are wall-clock and grow when other processes share "
        "the cores.",
        "",
        "### Per category (I-AUROC / P-AUROC / AUPRO@30%)",
        "",
        "| category | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for c in categories:
        cells = []
        for m in models:
            o = results[c][m]["overall"]
            cells.append(f"{o['i_auroc']:.3f} / {o['p_auroc']:.3f} / {o['aupro_30']:.3f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    means = []
    for m in models:
        vals = [results[c][m]["overall"] for c in categories]
        means.append(" / ".join(f"{_mean([v[k] for v in vals]):.3f}" for k in ("i_auroc", "p_auroc", "aupro_30")))
    lines.append("| **mean** | " + " | ".join(f"**{x}**" for x in means) + " |")
    lines += [
        "",
        "### By defect visibility, mean over categories (I-AUROC / AUPRO@30%)",
        "",
        "Each row: the test images whose defects show only in that modality, plus all good images.",
        "",
        "| defects visible in | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for g in GROUPS:
        cells = []
        for m in models:
            rows = [results[c][m].get("per_group", {}).get(g) for c in categories]
            rows = [r for r in rows if r]
            if not rows:
                cells.append("n/a")
                continue
            cells.append(f"{_mean([r['i_auroc'] for r in rows]):.3f} / {_mean([r['aupro_30'] for r in rows]):.3f}")
        label = {"rgb": "RGB only", "3d": "3D only", "both": "both"}[g]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Cost",
        "",
        "| model | trainable parameters | mean train + calibration time (s) |",
        "|---|---|---|",
    ]
    for m in models:
        params = results[categories[0]][m]["trainable_parameters"]
        secs = _mean([results[c][m]["train_seconds"] for c in categories])
        lines.append(f"| {m} | {params:,} | {secs:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
