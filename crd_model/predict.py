"""`crd predict`: scores, verdicts, full-resolution anomaly maps and overlays for a set of pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from crd_model.data.mvtec3d import Sample, list_pairs, list_samples, read_rgb, read_xyz
from crd_model.inspector import Inspector
from crd_model.overlay import overlay


def predict(
    checkpoint: str | Path,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    category: str | None = None,
    split: str = "test",
    folder: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 8,
    overlays: bool = True,
) -> Path:
    """Either `data_root` + `category` (+ `split`) of an MVTec 3D-AD layout, or a `folder` of pairs."""
    if folder is not None:
        samples = list_pairs(Path(folder))
    elif data_root is not None and category is not None:
        samples = list_samples(Path(data_root), category, split)
    else:
        raise ValueError("give either a folder of rgb/xyz pairs, or a data root and a category")
    if not samples:
        raise ValueError("no rgb/xyz pairs found")
    inspector = Inspector(checkpoint, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines_path = out / "predictions.jsonl"
    with open(lines_path, "w") as lines:
        for i in range(0, len(samples), batch_size):
            chunk: list[Sample] = samples[i : i + batch_size]
            rgbs = [read_rgb(s.rgb_path) for s in chunk]
            xyzs = [read_xyz(s.xyz_path) for s in chunk]
            for s, rgb, result in zip(chunk, rgbs, inspector.inspect(rgbs, xyzs), strict=True):
                rel = Path(s.relpath)
                map_path = out / "maps" / rel.with_suffix(".tiff")
                map_path.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(map_path, result.anomaly_map.astype(np.float32))
                record = {
                    "path": s.relpath,
                    "score": round(result.score, 6),
                    "verdict": result.verdict,
                    "threshold": round(result.threshold, 6),
                    "model_id": inspector.model_id,
                    "map": str(map_path.relative_to(out)),
                }
                if s.defect_type:
                    record["defect_type"] = s.defect_type
                if overlays:
                    ov_path = out / "overlays" / rel
                    ov_path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(overlay(rgb, result.anomaly_map, result.threshold)).save(ov_path)
                    record["overlay"] = str(ov_path.relative_to(out))
                lines.write(json.dumps(record) + "\n")
    return lines_path
