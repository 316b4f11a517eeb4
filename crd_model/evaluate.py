"""`crd eval`: I-AUROC, P-AUROC and AUPRO@30%/@1% on a test split, overall and per defect type.

Evaluation runs at the model's resolution (the paper's protocol): ground truth is resized with
nearest neighbour to `image_size`, binarised > 0. AUPRO is exact (every distinct score is a
threshold, 8-connected regions), as MVTec's reference implementation computes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from crd_model.dataset import LoadedSplit, load_split
from crd_model.inspector import Inspector
from crd_model.metrics import summarise

METRICS = ("i_auroc", "p_auroc", "aupro_30", "aupro_01")


def score_split(inspector: Inspector, split: LoadedSplit, batch_size: int = 16) -> tuple[np.ndarray, list[np.ndarray]]:
    scores: list[float] = []
    maps: list[np.ndarray] = []
    for i in range(0, len(split.frames), batch_size):
        for r in inspector.infer(split.frames[i : i + batch_size]):
            scores.append(r.score)
            maps.append(r.model_map)
    return np.asarray(scores), maps


def metric_row(labels: np.ndarray, scores: np.ndarray, gts: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> dict:
    # summarise() builds the (expensive, exact) PRO curve once for both FPR limits.
    return {"n": len(labels), "n_anomalous": int(labels.sum()), **summarise(labels, scores, gts, maps)}


def evaluate_loaded(
    inspector: Inspector,
    test: LoadedSplit,
    groups: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 16,
) -> dict:
    """Metrics overall, per defect type (its images + all good ones), and per named group of types."""
    assert test.gt is not None
    scores, maps = score_split(inspector, test, batch_size)
    labels = test.labels
    types = np.array([s.defect_type for s in test.samples])
    good = types == "good"

    def subset(mask: np.ndarray) -> dict:
        idx = np.flatnonzero(mask)
        return metric_row(labels[idx], scores[idx], [test.gt[i] for i in idx], [maps[i] for i in idx])

    report: dict = {
        "model_id": inspector.model_id,
        "threshold": inspector.threshold,
        "overall": subset(np.ones(len(labels), dtype=bool)),
        "per_defect": {t: subset(good | (types == t)) for t in sorted(set(types) - {"good"})},
    }
    if groups:
        report["per_group"] = {
            g: subset(good | np.isin(types, list(ts))) for g, ts in groups.items() if np.isin(types, list(ts)).any()
        }
    predicted = scores >= inspector.threshold
    report["verdicts"] = {
        "false_reject_rate": float(predicted[good].mean()) if good.any() else float("nan"),
        "detection_rate": float(predicted[~good].mean()) if (~good).any() else float("nan"),
    }
    return report


def evaluate(
    checkpoint: str | Path,
    data_root: str | Path,
    category: str,
    device: str | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 16,
) -> dict:
    inspector = Inspector(checkpoint, device)
    test = load_split(data_root, category, "test", inspector.config, device=inspector.device)
    report = evaluate_loaded(inspector, test, groups, batch_size)
    report["category"] = category
    return report


def format_report(report: dict) -> str:
    head = f"{'subset':<16}{'n':>5}{'I-AUROC':>10}{'P-AUROC':>10}{'AUPRO@30%':>11}{'AUPRO@1%':>10}"
    lines = [head, "-" * len(head)]

    def row(name: str, r: dict) -> str:
        vals = "".join(f"{r[m]:>{w}.3f}" for m, w in zip(METRICS, (10, 10, 11, 10), strict=True))
        return f"{name:<16}{r['n']:>5}{vals}"

    lines.append(row("overall", report["overall"]))
    for name, r in report["per_defect"].items():
        lines.append(row(name, r))
    for name, r in report.get("per_group", {}).items():
        lines.append(row(f"[{name}]", r))
    v = report["verdicts"]
    lines.append(
        f"threshold {report['threshold']:.4f}: false-reject rate {v['false_reject_rate']:.3f}, "
        f"detection rate {v['detection_rate']:.3f}"
    )
    return "\n".join(lines)
