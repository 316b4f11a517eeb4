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
from crd_model.metrics import clopper_pearson, summarise, threshold_for_detection_rate

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
    target_detection: float = 0.95,
) -> dict:
    """Metrics overall, per defect type (its images + all good ones), and per named group of types; each
    with how many of its defective parts the stored threshold catches (where a threshold loses)."""
    assert test.gt is not None
    scores, maps = score_split(inspector, test, batch_size)
    labels = test.labels
    types = np.array([s.defect_type for s in test.samples])
    good = types == "good"
    caught = (scores >= inspector.threshold) & ~good  # as verdict_rates counts them

    def subset(mask: np.ndarray) -> dict:
        idx = np.flatnonzero(mask)
        row = metric_row(labels[idx], scores[idx], [test.gt[i] for i in idx], [maps[i] for i in idx])
        return {**row, "caught": int(caught[idx].sum())}

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
    report["verdicts"] = verdict_rates(scores, good, inspector.threshold)
    if (~good).any():
        target = threshold_for_detection_rate(scores[~good], target_detection)
        report["at_target_detection"] = {"target_detection_rate": target_detection, "threshold": target,
                                         **verdict_rates(scores, good, target)}  # fmt: skip
    cal = inspector.meta.calibration if inspector.meta is not None else None
    if cal is not None:
        report["calibration"] = {
            "false_reject_rate": cal.false_reject_rate,
            "method": cal.method,
            "n_statistics": cal.n_statistics,
            "n_threshold": cal.n_threshold,
            "expected_false_reject_rate": cal.expected_false_reject_rate,
            "false_reject_rate_interval": cal.false_reject_rate_interval,
            "warnings": cal.warnings,
        }
    return report


def verdict_rates(scores: np.ndarray, good: np.ndarray, threshold: float) -> dict:
    """False-reject and detection rates at `threshold` (score >= threshold rejects), with counts and exact
    95 % intervals: a test split of 20 good parts measures a false-reject rate only to about +-15 %."""
    rejected = scores >= threshold
    n_good, n_bad = int(good.sum()), int((~good).sum())
    false_rejects, detections = int(rejected[good].sum()), int(rejected[~good].sum())
    return {
        "false_reject_rate": false_rejects / n_good if n_good else float("nan"),
        "detection_rate": detections / n_bad if n_bad else float("nan"),
        "false_rejects": false_rejects,
        "n_good": n_good,
        "detections": detections,
        "n_anomalous": n_bad,
        "false_reject_rate_ci95": clopper_pearson(false_rejects, n_good),
        "detection_rate_ci95": clopper_pearson(detections, n_bad),
    }


def evaluate(
    checkpoint: str | Path,
    data_root: str | Path,
    category: str,
    device: str | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 16,
    target_detection: float = 0.95,
) -> dict:
    inspector = Inspector(checkpoint, device)
    test = load_split(data_root, category, "test", inspector.config, device=inspector.device)
    report = evaluate_loaded(inspector, test, groups, batch_size, target_detection)
    report["category"] = category
    return report


def format_report(report: dict) -> str:
    head = f"{'subset':<16}{'n':>5}{'I-AUROC':>10}{'P-AUROC':>10}{'AUPRO@30%':>11}{'AUPRO@1%':>10}{'caught':>9}"
    lines = [head, "-" * len(head)]

    def row(name: str, r: dict) -> str:
        vals = "".join(f"{r[m]:>{w}.3f}" for m, w in zip(METRICS, (10, 10, 11, 10), strict=True))
        return f"{name:<16}{r['n']:>5}{vals}{str(r['caught']) + '/' + str(r['n_anomalous']):>9}"

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
    lines.append(f"  (stored threshold) {_rates(v)}")
    cal = report.get("calibration")
    if cal and cal.get("expected_false_reject_rate") is not None:
        lo, hi = cal["false_reject_rate_interval"]
        lines.append(
            f"  calibrated for a false-reject rate of {cal['false_reject_rate']:g} on {cal['n_threshold']} held-out "
            f"good images (statistics from {cal['n_statistics']} others): "
            f"expected {cal['expected_false_reject_rate']:.3f}, "
            f"90 % of calibration sets {lo:.3f}-{hi:.3f}"
        )
    for w in (cal or {}).get("warnings", []):
        lines.append(f"  warning: {w}")
    t = report.get("at_target_detection")
    if t:
        lines.append(
            f"threshold {t['threshold']:.4f} for a detection rate >= {t['target_detection_rate']:g}: "
            f"false-reject rate {t['false_reject_rate']:.3f}, detection rate {t['detection_rate']:.3f}"
        )
        lines.append(f"  (target detection) {_rates(t)}")
    return "\n".join(lines)


def _rates(v: dict) -> str:
    (flo, fhi), (dlo, dhi) = v["false_reject_rate_ci95"], v["detection_rate_ci95"]
    return (
        f"{v['false_rejects']}/{v['n_good']} good parts rejected (95 % CI {flo:.3f}-{fhi:.3f}), "
        f"{v['detections']}/{v['n_anomalous']} defective parts caught (95 % CI {dlo:.3f}-{dhi:.3f})"
    )
