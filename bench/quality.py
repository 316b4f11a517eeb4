"""Quality benchmark: where CRD wins and loses on the synthetic categories, over several seeds.

    .venv/bin/python bench/quality.py [--seeds 0 1 2] [--categories disc tile] [--epochs 30] [--image-size 192]
                                      [--models crd rgb 3d fused] [--config KEY=VALUE ...] [--train KEY=VALUE ...]

Generates the benchmark's synthetic data set (generator seed `--data-seed`, `--n-train` train (default 100),
`--n-validation` validation and `--n-test-good` good test images per category, `--n-test-per-defect` per
defect type, images `--size-scale` times the generator's size) unless it exists, then
per category and training seed trains the model with the default teacher, calibrates it (held-out,
`--false-reject-rate`), evaluates it on the test split and measures

- the usual metrics overall and per defect visibility (RGB only, 3D only, both: the generator's types);
- what each branch contributes (each branch's standardised map alone, blurred, max) and each feature
  scale (that scale's maps of both branches, (1 - cos) or whitened as the model scores, standardised per
  branch and scale on the calibration's statistics images, summed, blurred, max): I-AUROC overall / per
  visibility, AUPRO@30%;
- verdicts on good parts calibration never saw (the test split's good images): false-reject and
  detection rates at the stored threshold, and for contrast with thresholds calibrated on only the
  first 20 validation images, held out and the pre-split way (statistics and threshold from the same
  images, one float step above the highest score).

Writes the tables to BENCHMARKS.md (section `--section`, default "quality") unless `--no-write`, and
the raw numbers to `--json` (default bench/results/quality.json).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine, write_section
from crd_model.config import CRDConfig

MODELS = ("crd", "rgb", "3d", "fused")
GROUPS = ("rgb", "3d", "both")
GROUP_LABELS = {"rgb": "RGB only", "3d": "3D only", "both": "both"}
SMALL_VALIDATION = 20  # the generator's default validation size: what a plant might start with


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = _value(value)
    return out


def visibility_groups() -> dict[str, list[str]]:
    from crd_model.data.synth import DEFECT_VISIBILITY

    groups: dict[str, list[str]] = {g: [] for g in GROUPS}
    for defect, vis in DEFECT_VISIBILITY.items():
        if vis in groups:
            groups[vis].append(defect)
    return groups


def ensure_data(data: Path, categories: Sequence[str], a: argparse.Namespace) -> None:
    from crd_model.data.synth import generate_dataset

    spec = {"seed": a.data_seed, "n_train": a.n_train, "n_validation": a.n_validation, "n_test_good": a.n_test_good,
            "n_test_per_defect": a.n_test_per_defect}  # fmt: skip
    if a.size_scale != 1.0:  # the generator's default stays out of the marker: older data stays valid
        spec["size_scale"] = a.size_scale
    marker = data / "bench-data.json"
    have = json.loads(marker.read_text()) if marker.exists() else {}
    missing = [c for c in categories if have.get(c) != spec or not (data / c / "test").is_dir()]
    if not missing:
        return
    t = time.perf_counter()
    generate_dataset(data, categories=missing, **spec)
    have.update(dict.fromkeys(missing, spec))
    marker.write_text(json.dumps(have, indent=2))
    print(f"generated {missing} in {time.perf_counter() - t:.1f}s -> {data}", flush=True)


# ------------------------------------------------------------------------------------ diagnostics


def _raw_scale_maps(
    inspector, split, batch_size: int = 16, per_scale=None, turn=None, turn_back=None
) -> dict[str, list[np.ndarray]]:
    """branch -> per-scale raw maps (or `per_scale`'s, see `CRDModel.scale_maps`), each (N, S, S) float32,
    for every image of `split`; `turn` transforms each batch's ModelInput and `turn_back` each map
    (test-time augmentation)."""
    out: dict[str, list[list[np.ndarray]]] = {}
    for i in range(0, len(split.frames), batch_size):
        x = inspector.stack(split.frames[i : i + batch_size])
        maps = inspector.scale_maps(x if turn is None else turn(x), per_scale)
        for name, scales in maps.items():
            slot = out.setdefault(name, [[] for _ in scales])
            for k, m in enumerate(scales):
                slot[k].append((m if turn_back is None else turn_back(m)).cpu().numpy())
    return {name: [np.concatenate(c) for c in scales] for name, scales in out.items()}


def _branch_sum(scales: list[np.ndarray]) -> np.ndarray:
    total = scales[0]
    for m in scales[1:]:
        total = total + m  # the order of CRDModel.branch_maps
    return total


def _blur_max(maps: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from crd_model.anomaly_map import gaussian_blur, image_scores

    with torch.inference_mode():
        blurred = gaussian_blur(torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)), sigma)
        return blurred.numpy(), image_scores(blurred).numpy()


def _stats(maps: np.ndarray) -> tuple[float, float]:
    x = maps.astype(np.float64)
    return float(x.mean()), max(float(x.std(ddof=1)), 1e-8)


def _fused(raw: dict[str, np.ndarray], stats: dict[str, tuple[float, float]], idx: np.ndarray) -> np.ndarray:
    return sum((raw[b][idx] - np.float32(m)) / np.float32(s) for b, (m, s) in stats.items())


def _rates(scores: np.ndarray, good: np.ndarray, threshold: float) -> dict[str, float | int]:
    rejected = scores >= threshold
    return {"false_rejects": int(rejected[good].sum()), "n_good": int(good.sum()),
            "detections": int(rejected[~good].sum()), "n_anomalous": int((~good).sum())}  # fmt: skip


def diagnose(ckpt: Path, data: Path, category: str, groups: dict[str, list[str]]) -> dict:
    """Branch and scale contributions, and verdicts under smaller / pre-split calibrations (see module doc)."""
    from crd_model.calibration import false_reject_bound, split_for_calibration, threshold_rank
    from crd_model.dataset import load_split
    from crd_model.inspector import Inspector
    from crd_model.metrics import aupro, image_auroc, threshold_at_false_reject_rate

    inspector = Inspector(ckpt, "cpu")
    cfg, cal = inspector.config, inspector.meta.calibration
    sigma = cfg.effective_blur_sigma
    test = load_split(data, category, "test", cfg)
    val = load_split(data, category, "validation", cfg)
    t_scales, v_scales = _raw_scale_maps(inspector, test), _raw_scale_maps(inspector, val)
    labels, gts = test.labels, test.gt
    types = np.array([s.defect_type for s in test.samples])
    good = types == "good"
    val_dir = data / category / "validation"
    names = [str(s.rgb_path.relative_to(val_dir)) for s in val.samples]
    stats_idx = (
        np.array([names.index(n) for n in cal.source.statistics_images]) if cal.source else np.arange(len(names))
    )

    def evaluate_maps(maps: np.ndarray) -> dict:
        blurred, scores = _blur_max(maps, sigma)
        row = {"i_auroc": image_auroc(labels, scores), "aupro_30": aupro(gts, blurred, 0.3)}
        for g, ts in groups.items():
            sel = good | np.isin(types, ts)
            if np.isin(types, ts).any():
                row[f"i_auroc_{g}"] = image_auroc(labels[sel], scores[sel])
        return row

    variants: dict[str, dict] = {}
    branch_stats = cal.statistics()
    for b, scales in t_scales.items():
        m, s = branch_stats[b]
        variants[f"branch:{b}"] = evaluate_maps((_branch_sum(scales) - np.float32(m)) / np.float32(s))
    n_scales = len(next(iter(t_scales.values())))
    for k in range(n_scales):
        fused = 0.0
        for b in t_scales:
            m, s = _stats(v_scales[b][k][stats_idx])
            fused = fused + (t_scales[b][k] - np.float32(m)) / np.float32(s)
        variants[f"scale:{k}"] = evaluate_maps(fused)

    # Verdicts when calibrated on fewer images (the first SMALL_VALIDATION), held out or the pre-split way.
    t_raw = {b: _branch_sum(s) for b, s in t_scales.items()}
    v_raw = {b: _branch_sum(s) for b, s in v_scales.items()}
    every_test = np.arange(len(labels))
    rate = cal.false_reject_rate
    small = np.arange(min(SMALL_VALIDATION, len(val.frames)))
    calibrations = {}
    s_i, t_i = (small[np.array(x)] for x in split_for_calibration(len(small)))
    held = {b: _stats(v_raw[b][s_i]) for b in v_raw}
    _, v_scores = _blur_max(_fused(v_raw, held, t_i), sigma)
    rank = threshold_rank(len(v_scores), rate)
    thr = float(np.nextafter(np.sort(v_scores)[rank - 1], np.float32(np.inf)))
    _, t_scores = _blur_max(_fused(t_raw, held, every_test), sigma)
    calibrations[f"held-out, first {len(small)} validation images"] = {
        "threshold": thr, "n_threshold": len(t_i),
        "expected_false_reject_rate": false_reject_bound(len(t_i), rank).expected, **_rates(t_scores, good, thr),
    }  # fmt: skip
    same = {b: _stats(v_raw[b][small]) for b in v_raw}
    _, v_scores = _blur_max(_fused(v_raw, same, small), sigma)
    thr = threshold_at_false_reject_rate(v_scores, rate)
    _, t_scores = _blur_max(_fused(t_raw, same, every_test), sigma)
    calibrations[f"same images, first {len(small)} validation images (before)"] = {
        "threshold": thr, "n_threshold": len(small), "expected_false_reject_rate": None, **_rates(t_scores, good, thr),
    }  # fmt: skip
    return {"variants": variants, "calibrations": calibrations, "n_scales": n_scales}


# ------------------------------------------------------------------------------------------- main


def run_one(data: Path, out: Path, category: str, model: str, seed: int, a: argparse.Namespace, groups) -> dict:
    from crd_model.checkpoint import read_meta
    from crd_model.evaluate import evaluate
    from crd_model.train import TrainOptions, train_category

    ckpt = out / category / f"{model}-seed{seed}"
    config = CRDConfig.model_validate({"architecture": model, "image_size": a.image_size, **_pairs(a.config)})
    options = TrainOptions(epochs=a.epochs, seed=seed, progress=False, false_reject_rate=a.false_reject_rate,
                           **_pairs(a.train))  # fmt: skip
    meta = None
    if a.reuse and (ckpt / "config.json").exists():
        meta = read_meta(ckpt)
        same = meta.config == config and meta.training and meta.training.epochs == a.epochs
        meta = meta if same else None
    if meta is None:
        meta = train_category(data, category, ckpt, config, options)
    report = evaluate(ckpt, data, category, groups=groups)
    assert meta.training is not None and meta.calibration is not None
    report["training"] = meta.training.model_dump()
    # the error moments (whitening matrices, ~29,000 numbers) stay in the checkpoint's config.json
    report["calibration_record"] = meta.calibration.model_dump(exclude={"source", "error_moments"})
    report["diagnostics"] = diagnose(ckpt, data, category, groups)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT / "runs" / "bench-data-v2"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-quality"))
    ap.add_argument("--categories", nargs="*", default=None, help="default: the five synthetic categories")
    ap.add_argument("--models", nargs="*", default=["crd"], choices=list(MODELS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="training seeds")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--image-size", type=int, default=192)
    ap.add_argument("--data-seed", type=int, default=0, help="generator seed of the synthetic data")
    ap.add_argument("--n-train", type=int, default=100)
    ap.add_argument("--n-validation", type=int, default=100)
    ap.add_argument("--n-test-good", type=int, default=60)
    ap.add_argument("--n-test-per-defect", type=int, default=8)
    ap.add_argument("--size-scale", type=float, default=1.0, help="image size of the synthetic data, x (~200 px)")
    ap.add_argument("--false-reject-rate", type=float, default=0.01)
    ap.add_argument("--config", nargs="*", default=[], help="CRDConfig overrides, KEY=VALUE (JSON values)")
    ap.add_argument("--train", nargs="*", default=[], help="TrainOptions overrides, KEY=VALUE (JSON values)")
    ap.add_argument("--reuse", action="store_true", help="keep checkpoints already trained with the same settings")
    ap.add_argument("--section", default=None, help="BENCHMARKS.md section to (re)write (default: quality)")
    ap.add_argument("--title", default=None, help="heading of the section (default: Quality on synthetic data)")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "quality.json"), help="raw results file")
    ap.add_argument("--render", default=None, metavar="JSON", help="only re-render the tables of a saved results file")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine saved runs of the same settings (e.g. other seeds) into --json and render it (only "
                         "--categories, if given); where two runs hold the same category, model and seed, the later "
                         "file wins")  # fmt: skip
    a = ap.parse_args()
    if a.merge:
        payload = merge_runs([Path(f) for f in a.merge], a.categories)
        payload["command"] = "bench/quality.py " + shlex.join(sys.argv[1:])
        _place(payload, a)
        Path(a.json).write_text(json.dumps(payload, indent=2, default=float))
        return _publish(payload, a)
    if a.render:  # the numbers of a saved run, tables re-rendered (e.g. after a change to render())
        payload = json.loads(Path(a.render).read_text())
        placed = "".join(f" --{k} {shlex.quote(v)}" for k, v in (("section", a.section), ("title", a.title)) if v)
        payload["rendered_by"] = f"bench/quality.py --render {a.render}{placed}"
        _place(payload, a)  # --section / --title place a saved run (e.g. one run with --no-write)
        return _publish(payload, a)
    a.section, a.title = a.section or DEFAULT_SECTION, a.title or DEFAULT_TITLE

    from crd_model.data.synth import SYNTH_CATEGORIES
    from crd_model.stream.logs import configure_logging

    configure_logging(level="WARNING")
    categories = a.categories or list(SYNTH_CATEGORIES)
    data, out = Path(a.data), Path(a.out)
    ensure_data(data, categories, a)
    groups = visibility_groups()
    results: dict[str, dict[str, dict[str, dict]]] = {}
    started = time.perf_counter()
    for category in categories:
        for model in a.models:
            for seed in a.seeds:
                r = run_one(data, out, category, model, seed, a, groups)
                results.setdefault(category, {}).setdefault(model, {})[str(seed)] = r
                o, v, t = r["overall"], r["verdicts"], r["training"]
                print(
                    f"{category:>8} {model:>5} seed {seed}: I-AUROC {o['i_auroc']:.3f} P-AUROC {o['p_auroc']:.3f} "
                    f"AUPRO@30% {o['aupro_30']:.3f}  FRR {v['false_rejects']}/{v['n_good']} "
                    f"det {v['detections']}/{v['n_anomalous']}  ({t['seconds']:.0f}s, "
                    f"{t['seconds_per_epoch']:.1f}s/epoch)",
                    flush=True,
                )
    command = "bench/quality.py " + shlex.join(sys.argv[1:])
    payload = {"machine": machine(), "command": command, "args": vars(a), "results": results,
               "wall_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    out_json = Path(a.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(payload, indent=2, default=float))
    return _publish(payload, a)


DEFAULT_SECTION, DEFAULT_TITLE = "quality", "Quality on synthetic data"


def _place(payload: dict, a: argparse.Namespace) -> None:
    """The BENCHMARKS.md section and title of a saved payload: the command line's, else its own."""
    payload["args"]["section"] = a.section or payload["args"]["section"] or DEFAULT_SECTION
    payload["args"]["title"] = a.title or payload["args"]["title"] or DEFAULT_TITLE


def _publish(payload: dict, a: argparse.Namespace) -> int:
    """Print the payload's tables and, unless --no-write, write them into their BENCHMARKS.md section."""
    table = render(payload)
    print(table)
    if not a.no_write:
        write_section(payload["args"]["section"], table)
    return 0


# Settings that decide what a run measures: runs merged into one table must agree on all of them.
MEASUREMENT_ARGS = ("image_size", "epochs", "data_seed", "n_train", "n_validation", "n_test_good",
                    "n_test_per_defect", "size_scale", "false_reject_rate", "config", "train")  # fmt: skip


def merge_runs(files: Sequence[Path], categories: Sequence[str] | None = None) -> dict:
    """One payload from several saved runs of the same settings (say seed 0 from one run, seeds 1-2 from
    another); a (category, model, seed) in a later file replaces the same one from an earlier file.
    `categories`: only these, in this order (default: all, in the order first seen)."""
    payloads = [json.loads(f.read_text()) for f in files]
    first = payloads[0]["args"]
    for f, p in zip(files, payloads, strict=True):
        differing = [k for k in MEASUREMENT_ARGS if p["args"].get(k) != first.get(k)]
        if differing:
            raise SystemExit(f"{f} was run with other settings than {files[0]}: {', '.join(differing)}")
    results: dict[str, dict[str, dict[str, dict]]] = {}
    source: dict[str, str] = {}
    for f, p in zip(files, payloads, strict=True):
        for category, models in p["results"].items():
            for model, seeds in models.items():
                for seed, report in seeds.items():
                    results.setdefault(category, {}).setdefault(model, {})[seed] = report
                    source[f"{category}/{model}/seed {seed}"] = str(f)
    if categories:
        missing = [c for c in categories if c not in results]
        if missing:
            raise SystemExit(f"no run holds {', '.join(missing)}")
        results = {c: results[c] for c in categories}
        source = {k: v for k, v in source.items() if k.split("/")[0] in categories}
    machines = sorted({p["machine"] for p in payloads})
    return {
        "machine": "; ".join(machines),
        "args": dict(first),
        "results": results,
        "wall_seconds": sum(p["wall_seconds"] for p in payloads),
        "merged_from": [{"file": str(f), "command": p["command"]} for f, p in zip(files, payloads, strict=True)],
        "sources": source,
    }


# ------------------------------------------------------------------------------------------ render


def _finite(vals: Sequence[float]) -> list[float]:
    return [float(v) for v in vals if v is not None and v == v]


def ms(vals: Sequence[float], digits: int = 3) -> str:
    """mean ± sample std (or the value alone for one)."""
    v = _finite(vals)
    if not v:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}"


def _seed_means(results: dict, model: str, categories: list[str], seeds: list[str], get) -> list[float]:
    """Per seed, the mean over categories of get(report); one value per seed."""
    out = []
    for s in seeds:
        vals = _finite([get(results[c][model][s]) for c in categories if s in results[c][model]])
        if vals:
            out.append(float(np.mean(vals)))
    return out


def _ci(k: int, n: int) -> str:
    from crd_model.metrics import clopper_pearson

    lo, hi = clopper_pearson(k, n)
    return f"{k}/{n} = {k / n:.3f} ({lo:.3f}-{hi:.3f})" if n else "n/a"


def _short(name: str) -> str:
    """ "scale:0" -> "scale 1" (1-based, shallow first), "branch:rgb" -> "branch rgb"."""
    kind, _, rest = name.partition(":")
    return f"scale {int(rest) + 1}" if kind == "scale" else name.replace(":", " ")


def _commands(payload: dict) -> str:
    """The command(s) that produced a payload's numbers."""
    if "merged_from" not in payload:
        return f"Command: `.venv/bin/python {payload['command']}`."
    runs = "; ".join(f"`.venv/bin/python {m['command']}`" for m in payload["merged_from"])
    merged = f"`.venv/bin/python {payload['command']}`"
    return f"Runs {runs}, merged by {merged} (a later run's seed replaces an earlier one's)."


def render(payload: dict) -> str:
    results, a = payload["results"], payload["args"]
    categories = list(results)
    models = list(next(iter(results.values())))
    seeds = sorted({s for c in results.values() for m in c.values() for s in m}, key=int)
    n_seeds = len(seeds)
    lines = [
        f"## {a['title']} (`bench/quality.py`)",
        "",
        _commands(payload) + " Teacher efficientnet_lite0 (ImageNet, offline), "
        f"{a['image_size']} px, {a['epochs']} epochs, training seeds {', '.join(seeds)}; synthetic data of generator "
        f"seed {a['data_seed']} ({a.get('n_train', 100)} train, {a['n_validation']} validation, "
        f"{a['n_test_good']} good + "
        f"{a.get('n_test_per_defect', 8)} per defect type in test, per category"
        + (f", images x{a['size_scale']:g} the generator's size" if a.get("size_scale", 1.0) != 1.0 else "")
        + f"); held-out calibration for a false-reject rate of {a['false_reject_rate']:g}."
        + (f" Overrides: config {a['config']}, training {a['train']}." if a["config"] or a["train"] else "")
        + (
            f" Tables re-rendered from the saved numbers by `{payload['rendered_by']}`."
            if "rendered_by" in payload
            else ""
        )
        + f" Machine: {payload['machine']}; {payload['wall_seconds'] / 60:.0f} min in all. Numbers are mean ± std "
        f"over the {n_seeds} training seeds (the mean row: per seed, the mean over categories; then mean ± std).",
        "",
        "### Per category (I-AUROC / P-AUROC / AUPRO@30%)",
        "",
        "| category | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    keys = ("i_auroc", "p_auroc", "aupro_30")
    for c in categories:
        cells = []
        for m in models:
            runs = list(results[c][m].values())
            cells.append(" / ".join(ms([r["overall"][k] for r in runs]) for k in keys))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    means = []
    for m in models:
        parts = [ms(_seed_means(results, m, categories, seeds, lambda r, k=k: r["overall"][k])) for k in keys]
        means.append(" / ".join(parts))
    lines.append("| **mean** | " + " | ".join(f"**{x}**" for x in means) + " |")
    worst = []
    for m in models:
        per_cat = [np.mean(_finite([r["overall"]["i_auroc"] for r in results[c][m].values()])) for c in categories]
        worst.append(f"{min(per_cat):.3f} ({categories[int(np.argmin(per_cat))]})")
    lines.append("| lowest category I-AUROC | " + " | ".join(worst) + " |")

    crd = "crd" if "crd" in models else models[0]
    lines += [
        "",
        f"### Where `{crd}` wins and loses: branches and feature scales (I-AUROC; AUPRO@30%)",
        "",
        "Each branch's standardised map alone, and each feature scale alone (both branches' maps at that "
        "scale, standardised per branch and scale), blurred and maxed as the model does; the fused map is the "
        "model's output. Columns by defect visibility: that visibility's test images plus all good ones.",
        "",
        "| scoring | overall I-AUROC | RGB-only defects | 3D-only defects | both | AUPRO@30% |",
        "|---|---|---|---|---|---|",
    ]

    def variant_row(label: str, get) -> str:
        cells = []
        for key in ("i_auroc", "i_auroc_rgb", "i_auroc_3d", "i_auroc_both", "aupro_30"):
            cells.append(ms(_seed_means(results, crd, categories, seeds, lambda r, key=key: get(r, key))))
        return f"| {label} | " + " | ".join(cells) + " |"

    def fused_get(r: dict, key: str) -> float:
        if key in ("i_auroc", "aupro_30"):
            return r["overall"][key]
        g = r.get("per_group", {}).get(key.removeprefix("i_auroc_"))
        return g["i_auroc"] if g else float("nan")

    lines.append(variant_row("fused (the model)", fused_get))
    first = next(iter(results[categories[0]][crd].values()))["diagnostics"]
    for name in first["variants"]:
        label = name.replace("branch:", "branch ").replace("scale:", "scale ")
        if name.startswith("scale:"):
            label = f"scale {int(name.split(':')[1]) + 1} of {first['n_scales']} (shallow first)"
        lines.append(variant_row(label, lambda r, key, name=name: r["diagnostics"]["variants"][name].get(key)))
    lines += ["", "Per category, I-AUROC (mean over seeds):", ""]
    names = ["fused", *first["variants"]]
    lines.append("| category | " + " | ".join(_short(n) for n in names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for c in categories:
        runs = list(results[c][crd].values())
        cells = [f"{np.mean(_finite([r['overall']['i_auroc'] for r in runs])):.3f}"]
        for n in first["variants"]:
            cells.append(f"{np.mean(_finite([r['diagnostics']['variants'][n]['i_auroc'] for r in runs])):.3f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")

    lines += [
        "",
        f"### Verdicts on good parts calibration never saw (`{crd}`, test split)",
        "",
        f"False rejects among the test split's good images and defective images caught, at the threshold set for "
        f"a false-reject rate of {a['false_reject_rate']:g}; pooled over categories and seeds (the seeds share "
        "the test images), exact 95 % intervals. Rows: the stored threshold (held-out calibration on the whole "
        "validation split), and thresholds from only the first 20 validation images, held out and the way "
        "calibration worked before (statistics and threshold from the same images).",
        "",
        "| calibration | threshold images | expected false-reject rate | false rejects (unseen good) "
        "| defects caught |",
        "|---|---|---|---|---|",
    ]
    runs = [r for c in categories for r in results[c][crd].values()]
    fr = sum(r["verdicts"]["false_rejects"] for r in runs)
    ng = sum(r["verdicts"]["n_good"] for r in runs)
    de = sum(r["verdicts"]["detections"] for r in runs)
    na = sum(r["verdicts"]["n_anomalous"] for r in runs)
    rec = runs[0]["calibration_record"]
    exp = ms([r["calibration_record"]["expected_false_reject_rate"] for r in runs])
    lines.append(f"| held-out, whole validation split (stored) | {rec['n_threshold']} | {exp} | {_ci(fr, ng)} "
                 f"| {_ci(de, na)} |")  # fmt: skip
    for name in runs[0]["diagnostics"]["calibrations"]:
        rows = [r["diagnostics"]["calibrations"][name] for r in runs]
        k = sum(x["false_rejects"] for x in rows)
        n = sum(x["n_good"] for x in rows)
        d = sum(x["detections"] for x in rows)
        nb = sum(x["n_anomalous"] for x in rows)
        exp_small = (
            ms([x["expected_false_reject_rate"] for x in rows])
            if rows[0]["expected_false_reject_rate"]
            else "not stated"
        )
        lines.append(f"| {name} | {rows[0]['n_threshold']} | {exp_small} | {_ci(k, n)} | {_ci(d, nb)} |")
    at = [r["at_target_detection"] for r in runs if "at_target_detection" in r]
    if at:
        target = at[0]["target_detection_rate"]
        k, n = sum(x["false_rejects"] for x in at), sum(x["n_good"] for x in at)
        d, nb = sum(x["detections"] for x in at), sum(x["n_anomalous"] for x in at)
        lines.append(f"| for a detection rate >= {target:g}, set on the test split itself (`crd eval`'s "
                     f"`--target-detection`; an oracle) | - | - | {_ci(k, n)} | {_ci(d, nb)} |")  # fmt: skip
    lines += ["", "Per category at the stored threshold (false rejects; defects caught; summed over seeds):", ""]
    lines.append("| category | false rejects | defects caught | mean threshold | false rejects at 95 % detection |")
    lines.append("|---|---|---|---|---|")
    for c in categories:
        rs = list(results[c][crd].values())
        k = sum(r["verdicts"]["false_rejects"] for r in rs)
        n = sum(r["verdicts"]["n_good"] for r in rs)
        d = sum(r["verdicts"]["detections"] for r in rs)
        nb = sum(r["verdicts"]["n_anomalous"] for r in rs)
        thr = np.mean([r["threshold"] for r in rs])
        at = [r["at_target_detection"] for r in rs if "at_target_detection" in r]
        oracle = _ci(sum(x["false_rejects"] for x in at), sum(x["n_good"] for x in at)) if at else "n/a"
        lines.append(f"| {c} | {_ci(k, n)} | {_ci(d, nb)} | {thr:.2f} | {oracle} |")

    lines += ["", "### Cost", "", "| model | trainable parameters | train + calibration (s) | s per epoch |",
              "|---|---|---|---|"]  # fmt: skip
    for m in models:
        rs = [r for c in categories for r in results[c][m].values()]
        params = rs[0]["training"]["trainable_parameters"]
        secs = ms([r["training"]["seconds"] for r in rs], 0)
        per = ms([r["training"]["seconds_per_epoch"] for r in rs], 1)
        lines.append(f"| {m} | {params:,} | {secs} | {per} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
