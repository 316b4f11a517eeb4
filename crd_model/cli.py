"""The `crd` command. Model subcommands import torch lazily, so `crd synth` (and, later, the
producer commands) run on a camera PC's torch-free install."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", dest="architecture", default="crd", choices=["crd", "rgb", "3d", "fused"],
                   help="crd (the paper's) or a baseline: rgb-only RD, 3d-only RD, fused (early-fusion RD)")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="timm CNN used as frozen teacher (default efficientnet_lite0, offline ImageNet weights)")
    p.add_argument("--teacher-weights", default=None,
                   help="state-dict file (.safetensors or .pth) for the teacher, e.g. wide_resnet50_2's")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--modality-3d", dest="representation_3d", default="normals", choices=["normals", "depth"])
    p.add_argument("--plane", default="ransac", choices=["ransac", "corners", "none"],
                   help="background-plane removal of the xyz images")


def cmd_synth(a: argparse.Namespace) -> int:
    from crd_model.data.synth import generate_dataset

    summary = generate_dataset(
        Path(a.out), categories=a.categories, seed=a.seed, n_train=a.n_train, n_validation=a.n_validation,
        n_test_good=a.n_test_good, n_test_per_defect=a.n_test_per_defect,
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from crd_model.config import CRDConfig
    from crd_model.logs import configure_logging
    from crd_model.train import TrainOptions, train_category

    configure_logging()
    config = CRDConfig(
        architecture=a.architecture, backbone=a.backbone, image_size=a.image_size,
        representation_3d=a.representation_3d, plane=a.plane,
    )
    options = TrainOptions(
        epochs=a.epochs, batch_size=a.batch_size, learning_rate=a.lr, seed=a.seed,
        false_reject_rate=a.false_reject_rate, device=a.device, teacher_weights=a.teacher_weights,
    )
    meta = train_category(a.data, a.category, a.out, config, options)
    assert meta.calibration is not None
    print(f"saved {a.out}  model_id={meta.model_id}  threshold={meta.calibration.threshold:.4f}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from crd_model.evaluate import evaluate, format_report

    report = evaluate(a.checkpoint, a.data, a.category, device=a.device)
    print(format_report(report))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from crd_model.predict import predict

    if a.folder is None and (a.data is None or a.category is None):
        print("crd predict: give --folder, or --data and --category", file=sys.stderr)
        return 2
    path = predict(a.checkpoint, a.out, data_root=a.data, category=a.category, split=a.split,
                   folder=a.folder, device=a.device, overlays=not a.no_overlays)
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        v = json.loads(line)["verdict"]
        counts[v] = counts.get(v, 0) + 1
    print(f"wrote {path} ({sum(counts.values())} images: {counts})")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from crd_model.demo import run_offline_demo
    from crd_model.logs import configure_logging

    configure_logging()
    summary = run_offline_demo(Path(a.workdir))
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crd", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate synthetic data in the MVTec 3D-AD layout")
    p.add_argument("--out", required=True)
    p.add_argument("--categories", nargs="*", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--n-validation", type=int, default=20)
    p.add_argument("--n-test-good", type=int, default=20)
    p.add_argument("--n-test-per-defect", type=int, default=8)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train a model on <data>/<category>/train and calibrate it")
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--out", required=True, help="checkpoint directory")
    _add_model_args(p)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--false-reject-rate", type=float, default=0.01,
                   help="share of validation normals allowed above the image threshold")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="I-AUROC, P-AUROC, AUPRO on <data>/<category>/test")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--out", default=None, help="write the full report as JSON")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="scores, verdicts, anomaly maps and overlays")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--category", default=None)
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--folder", default=None, help="a folder of rgb/*.png + xyz/*.tiff pairs (no gt needed)")
    p.add_argument("--out", required=True)
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("demo", help="synthetic data -> small model -> verdicts, end to end")
    p.add_argument("--workdir", default="runs/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as exc:
        print(f"crd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
