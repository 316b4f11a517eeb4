"""Which images' 3D input a change to the preprocessing touches (not a test).

    .venv/bin/python bench/preprocess_diff.py --against REV --data DIR [--size 256] [--categories disc lid]
        [--like-gpu]

Runs this checkout's `points_to_3d_input` and git revision REV's (both at their defaults) on every
image of each category's train, validation and test splits, and prints per category how many images'
3D input differ at all. A category with none needs no retraining to judge the change. --like-gpu
takes a GPU's code paths on this CPU in both (`launch_bound`; a revision before it has only its CPU
paths).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import crd_model.preprocessing as this
from bench.preprocess_profile import preprocessing_at, take_gpu_paths
from crd_model.data.mvtec3d import list_samples, read_xyz


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", required=True, metavar="REV")
    ap.add_argument("--data", required=True)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--categories", nargs="+", required=True)
    ap.add_argument("--like-gpu", action="store_true")
    a = ap.parse_args()
    old = preprocessing_at(a.against)
    if a.like_gpu:
        take_gpu_paths(this, old)
    for category in a.categories:
        changed = total = 0
        for split in ("train", "validation", "test"):
            samples = list_samples(Path(a.data), category, split)
            for i in range(0, len(samples), 16):
                xyzs = [torch.from_numpy(read_xyz(s.xyz_path)) for s in samples[i : i + 16]]
                with torch.inference_mode():
                    ours, _ = this.points_to_3d_input(this.resize_points(xyzs, a.size))
                    theirs, _ = old.points_to_3d_input(old.resize_points(xyzs, a.size))
                changed += int((ours != theirs).flatten(1).any(dim=1).sum())
                total += len(xyzs)
        print(f"{category}: 3D input changed in {changed} of {total} images", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
