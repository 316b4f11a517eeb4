"""`crd demo`: synthetic data -> small CRD model (trained once, then reused) -> verdicts.

Everything lands in `runs/demo/` so a second run starts in seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

DEMO_CATEGORY = "disc"


def ensure_demo_model(workdir: Path, epochs: int = 20, image_size: int = 192) -> tuple[Path, Path]:
    """Synthetic data and a trained checkpoint under `workdir`, made only if missing."""
    from crd_model.config import CRDConfig
    from crd_model.data.synth import generate_dataset
    from crd_model.train import TrainOptions, train_category

    data = workdir / "data"
    ckpt = workdir / f"model-{DEMO_CATEGORY}"
    if not (data / DEMO_CATEGORY / "test").is_dir():
        print(f"generating synthetic data in {data} ...", flush=True)
        generate_dataset(data, categories=[DEMO_CATEGORY], seed=0)
    if not (ckpt / "config.json").is_file():
        print(f"training a CRD model ({epochs} epochs, {image_size} px) -> {ckpt}; reused on later runs",
              flush=True)
        train_category(data, DEMO_CATEGORY, ckpt, CRDConfig(image_size=image_size), TrainOptions(epochs=epochs))
    else:
        print(f"reusing {ckpt}", flush=True)
    return data, ckpt


def run_offline_demo(workdir: Path) -> dict:
    from crd_model.predict import predict

    data, ckpt = ensure_demo_model(workdir)
    t = time.perf_counter()
    out = predict(ckpt, workdir / "predictions", data_root=data, category=DEMO_CATEGORY, split="test")
    seconds = time.perf_counter() - t
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    flagged = np.array([r["verdict"] == "anomalous" for r in rows])
    bad = np.array([r.get("defect_type") != "good" for r in rows])
    summary = {
        "images": len(rows),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(rows) / seconds, 2),
        "anomalous_caught": f"{int((flagged & bad).sum())}/{int(bad.sum())}",
        "good_rejected": f"{int((flagged & ~bad).sum())}/{int((~bad).sum())}",
        "predictions": str(out),
    }
    for r in rows[:: max(1, len(rows) // 8)]:
        print(f"  {r['path']:<32} score {r['score']:8.3f}  {r['verdict']}")
    return summary
