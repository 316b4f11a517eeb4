"""Where each test image's score comes from: the distance of its map's peak to the object's silhouette.

    .venv/bin/python bench/peak_location.py --checkpoint runs/tune/fine3d-256-e200/block-fine/3d-seed0 \
        --data runs/fine-data --category block-fine

The image score is the blurred map's maximum. For each test image (good, and per defect type) this
reports where that maximum sits: its signed distance to the silhouette of the 3D foreground at the
model's size (negative = outside the object), as the share of images peaking within 4 px of it,
and whether a defective image's peak lies on its ground-truth defect (within 4 px). A good part whose peak sits on
the rim says the rim, not the surface, sets the scores that good parts reach. It also reports, per
type, the median share of each branch in the score at the peak (its standardised map, blurred).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RIM_PX = 4


def peaks(ckpt: Path, data: Path, category: str) -> dict[str, dict[str, float]]:
    from scipy import ndimage

    from bench.scoring_variants import signed_distance_to_silhouette
    from crd_model.anomaly_map import gaussian_blur
    from crd_model.dataset import load_split
    from crd_model.inspector import Inspector

    inspector = Inspector(ckpt, "cpu")
    if not inspector.config.uses_3d:
        raise SystemExit(f"{ckpt}: the silhouette comes from the 3D input; this model has no 3D branch")
    test = load_split(data, category, "test", inspector.config)
    head = inspector.model.anomaly_map_generator
    rows: dict[str, list[tuple[float, bool]]] = {}
    at_peak: dict[str, dict[str, list[float]]] = {}
    for i in range(0, len(test.frames), 16):
        frames = test.frames[i : i + 16]
        raw = inspector.branch_maps(inspector.stack(frames))
        fused = head(raw)  # the model's map and score, from the same branch maps
        # Each branch's share of the score: its standardised map, blurred as the model blurs the sum.
        shares = {
            b: gaussian_blur((raw[b] - head.mean[j]) / head.std[j], head.sigma).numpy()
            for j, b in enumerate(head.branches)
        }
        for k, (m, score) in enumerate(zip(fused.anomaly_map.numpy(), fused.pred_score.tolist(), strict=True)):
            n = i + k
            y, x = np.unravel_index(int(np.argmax(m)), m.shape)
            signed = signed_distance_to_silhouette(test.frames[n])
            # On the defect: within RIM_PX of its ground truth (a 3-6 px defect's blurred peak may sit beside it).
            near = ndimage.distance_transform_edt(~test.gt[n]) if test.gt is not None and test.gt[n].any() else None
            on_defect = bool(near is not None and near[y, x] <= RIM_PX)
            assert abs(float(m.max()) - score) <= 1e-5 * max(1.0, abs(score))  # the score is this peak
            rows.setdefault(test.samples[n].defect_type, []).append((float(signed[y, x]), on_defect))
            for b, m_b in shares.items():
                at_peak.setdefault(test.samples[n].defect_type, {}).setdefault(b, []).append(float(m_b[k, y, x]))
    out = {}
    for kind, vals in sorted(rows.items()):
        d = np.array([v[0] for v in vals])
        out[kind] = {
            "n": len(vals),
            "share_peaking_near_rim": float((np.abs(d) <= RIM_PX).mean()),
            "share_peaking_outside": float((d < 0).mean()),
            "median_distance_px": float(np.median(d)),
            "share_peaking_on_defect": float(np.mean([v[1] for v in vals])) if kind != "good" else 0.0,
            "median_branch_share_at_peak": {b: float(np.median(v)) for b, v in at_peak[kind].items()},
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from crd_model.stream.logs import configure_logging

    configure_logging(level="WARNING")
    result = peaks(Path(a.checkpoint), Path(a.data), a.category)
    for kind, r in result.items():
        print(f"{a.category:>10} {kind:<14} n={r['n']:>3}  peak within {RIM_PX} px of the silhouette "
              f"{r['share_peaking_near_rim']:.2f}  outside {r['share_peaking_outside']:.2f}  "
              f"median distance {r['median_distance_px']:+.1f} px  "
              f"on the defect {r['share_peaking_on_defect']:.2f}  at the peak "
              + ", ".join(f"{b} {v:.1f}" for b, v in r["median_branch_share_at_peak"].items()))  # fmt: skip
    if a.json:
        command = "bench/peak_location.py " + " ".join(sys.argv[1:])
        Path(a.json).write_text(json.dumps({"command": command, "args": vars(a), "results": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
