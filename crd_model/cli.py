"""The `crd` command. Model subcommands import torch lazily, so `crd synth` (and, later, the
producer commands) run on a camera PC's torch-free install."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def _number(kind: Callable[[str], Any], *, at_least: float | None = None, above: float | None = None,
            at_most: float | None = None) -> Callable[[str], Any]:  # fmt: skip
    """An argparse type that also checks bounds, so `--count 0` is a usage error (exit 2), not a surprise."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"must be >= {at_least:g}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be > {above:g}, got {text}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be <= {at_most:g}, got {text}")
        return value

    return parse


_COUNT = _number(int, at_least=1)
_SECONDS = _number(float, above=0)
_FRACTION = _number(float, at_least=0, at_most=1)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        dest="architecture",
        default="crd",
        choices=["crd", "rgb", "3d", "fused"],
        help="crd (the paper's) or a baseline: rgb-only RD, 3d-only RD, fused (early-fusion RD)",
    )
    p.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="timm CNN used as frozen teacher (default efficientnet_lite0, offline ImageNet weights)",
    )
    p.add_argument(
        "--teacher-weights",
        default=None,
        help="state-dict file (.safetensors or .pth) for the teacher, e.g. wide_resnet50_2's",
    )
    p.add_argument("--image-size", type=int, default=256, help="a multiple of 32, >= 64")
    p.add_argument(
        "--modality-3d",
        dest="representation_3d",
        default="normals",
        choices=["normals", "depth", "normals_height"],
        help="the 3D input: surface normals (default), the height above the plane, or the normals' x and y with "
        "the height in place of their z (an option: docs/model.md)",
    )
    p.add_argument(
        "--plane",
        default="ransac",
        choices=["ransac", "corners", "none"],
        help="background-plane removal of the xyz images",
    )
    p.add_argument(
        "--scoring",
        default="whitened",
        choices=["whitened", "cosine"],
        help="each scale's map: the students' error whitened at calibration (default), or the paper's 1 - cos",
    )
    p.add_argument(
        "--loss",
        default="position",
        choices=["position", "hard", "global", "magnitude"],
        help="the students' loss: the mean of 1 - cos per position (default, the paper's), that plus the mean of "
        "each scale's hardest tenth (an option), or the experiments in docs/model.md",
    )
    p.add_argument(
        "--teacher-input-weight",
        type=_number(float, at_least=0),
        default=0.0,
        help="append the input, averaged to the shallowest scale and times this weight, to the teacher's features "
        "there (0, the default: off; 20 sharpens the maps, docs/model.md)",
    )


def cmd_synth(a: argparse.Namespace) -> int:
    from crd_model.data.synth import generate_dataset

    summary = generate_dataset(
        Path(a.out),
        categories=a.categories,
        seed=a.seed,
        n_train=a.n_train,
        n_validation=a.n_validation,
        n_test_good=a.n_test_good,
        n_test_per_defect=a.n_test_per_defect,
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from crd_model.config import CRDConfig
    from crd_model.stream.logs import configure_logging
    from crd_model.train import TrainOptions, train_category

    configure_logging()
    config = CRDConfig(
        architecture=a.architecture,
        backbone=a.backbone,
        image_size=a.image_size,
        representation_3d=a.representation_3d,
        plane=a.plane,
        scoring=a.scoring,
        teacher_input_weight=a.teacher_input_weight,
    )
    options = TrainOptions(
        epochs=a.epochs,
        batch_size=a.batch_size,
        learning_rate=a.lr,
        seed=a.seed,
        false_reject_rate=a.false_reject_rate,
        device=a.device,
        teacher_weights=a.teacher_weights,
        loss=a.loss,
    )
    meta = train_category(a.data, a.category, a.out, config, options)
    assert meta.calibration is not None and meta.training is not None
    t, cal = meta.training, meta.calibration
    print(
        f"saved {a.out}  model_id={meta.model_id}  threshold={cal.threshold:.4f}  "
        f"({t.seconds:.0f}s in all, {t.seconds_per_epoch:.2f}s per epoch on {t.device}{', bf16' if t.bf16 else ''})"
    )
    for w in cal.warnings:
        print(f"  warning: {w}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from crd_model.evaluate import evaluate, format_report

    report = evaluate(a.checkpoint, a.data, a.category, device=a.device, target_detection=a.target_detection)
    print(format_report(report))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    from crd_model.recalibrate import recalibrate
    from crd_model.stream.logs import configure_logging

    configure_logging()
    options = {"out": a.out, "device": a.device, "batch_size": a.batch_size, "scoring": a.scoring}
    meta = recalibrate(a.checkpoint, a.folder, a.false_reject_rate, **options)
    cal = meta.calibration
    assert cal is not None and cal.source is not None and cal.false_reject_rate_interval is not None
    lo, hi = cal.false_reject_rate_interval
    print(
        f"calibrated {a.out or a.checkpoint}  model_id={meta.model_id}  threshold "
        f"{cal.source.previous_threshold:.4f} -> {cal.threshold:.4f}\n"
        f"  {cal.source.n_images} good images: statistics from {cal.n_statistics}, threshold from {cal.n_threshold}; "
        f"requested false-reject rate {cal.false_reject_rate:g}, expected {cal.expected_false_reject_rate:.3f} "
        f"(90 % of calibration sets {lo:.3f}-{hi:.3f})"
    )
    for w in cal.warnings:
        print(f"  warning: {w}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from crd_model.predict import predict

    if a.folder is None and (a.data is None or a.category is None):
        print("crd predict: give --folder, or --data and --category", file=sys.stderr)
        return 2
    path = predict(
        a.checkpoint,
        a.out,
        data_root=a.data,
        category=a.category,
        split=a.split,
        folder=a.folder,
        device=a.device,
        overlays=not a.no_overlays,
    )
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        v = json.loads(line)["verdict"]
        counts[v] = counts.get(v, 0) + 1
    print(f"wrote {path} ({sum(counts.values())} images: {counts})")
    return 0


# Command-line flags that override a setting: argparse dest -> settings path. Each goes through the
# same pydantic validation as the environment (Settings.with_overrides), so `--fps 0` or `--max-batch 0`
# is refused with the flag's name, exactly like CRD_PRODUCER__FPS=0.
_SERVICE_FLAGS: dict[str, tuple[str, ...]] = {
    "line": ("line",),
    "redis_url": ("redis", "url"),
    "metrics_port": ("observability", "http_port"),
}
_PRODUCE_FLAGS = {
    "fps": ("producer", "fps"),
    "max_outstanding": ("producer", "max_outstanding"),
    "backpressure": ("producer", "backpressure"),
    "rgb_encoding": ("producer", "rgb_encoding"),
    "xyz_dtype": ("producer", "xyz_dtype"),
    "xyz_compression": ("producer", "xyz_compression"),
    "downscale": ("producer", "downscale_max_side"),
}
_WORK_FLAGS = {
    "max_batch": ("worker", "max_batch"),
    "max_wait_ms": ("worker", "max_wait_ms"),
    "claim_idle_ms": ("worker", "claim_idle_ms"),
    "device": ("worker", "device"),
    "consumer": ("worker", "consumer"),
    "decode_threads": ("worker", "decode_threads"),
    "decode_processes": ("worker", "decode_processes"),
    "processes_per_device": ("worker", "processes_per_device"),
}
_PLC_FLAGS = {
    "protocol": ("plc", "protocol"),
    "lines": ("plc", "lines"),
    "group": ("plc", "group"),
    "consumer": ("plc", "consumer"),
    "error_is_reject": ("plc", "error_is_reject"),
    "buffer_depth": ("plc", "buffer_depth"),
    "ack_timeout_s": ("plc", "ack_timeout_s"),
    "modbus_host": ("plc", "modbus", "host"),
    "modbus_port": ("plc", "modbus", "port"),
    "modbus_device_id": ("plc", "modbus", "device_id"),
}
_DASHBOARD_FLAGS = {
    "lines": ("dashboard", "lines"),
    "host": ("dashboard", "host"),
    "port": ("dashboard", "port"),
}


def _settings(
    a: argparse.Namespace,
    flags: Mapping[str, tuple[str, ...]] | None = None,
    extra: Mapping[tuple[str, ...], tuple[str, Any]] | None = None,
):
    """Settings from the environment (CRD_*), then the command line on top, all validated.

    Raises SettingsError (a ValueError: `crd <cmd>: error: ...`, exit 2) naming the flag or variable.
    """
    from crd_model.stream.logs import configure_logging
    from crd_model.stream.settings import Settings

    overrides: dict[tuple[str, ...], tuple[str, Any]] = {}
    for dest, path in {**_SERVICE_FLAGS, **(flags or {})}.items():
        value = getattr(a, dest, None)
        if value is not None:
            overrides[path] = ("--" + dest.replace("_", "-"), value)
    overrides.update(extra or {})
    s = Settings.load(overrides)
    configure_logging(
        json_logs=s.observability.log_json and not getattr(a, "plain_logs", False), level=s.observability.log_level
    )
    return s


def _named(s, name: str):
    """Settings whose Redis connections carry a client name (CLIENT LIST), unless one is configured."""
    if s.redis.client_name:
        return s
    clean = "".join(c if c.isalnum() or c in "._:-" else "_" for c in name)[:64]
    return s.model_copy(update={"redis": s.redis.model_copy(update={"client_name": clean})})


def cmd_produce(a: argparse.Namespace) -> int:
    from producers.producer import Producer
    from producers.sources import ReplaySource, SyntheticSource, WatchFolderSource

    s = _named(_settings(a, _PRODUCE_FLAGS), f"crd-produce:{a.camera}")
    producer = Producer(s, camera=a.camera)
    producer.install_signal_handlers()
    if a.source == "replay":
        if not (a.data and a.category):
            raise ValueError("--source replay needs --data and --category")
        source = ReplaySource(Path(a.data), a.category, a.split, loop=a.loop)
    elif a.source == "synthetic":
        source = SyntheticSource(a.category or "disc", seed=a.seed, anomaly_rate=a.anomaly_rate)
    else:
        if not (a.folder and a.category):
            raise ValueError("--source watch needs --folder and --category")
        source = WatchFolderSource(
            Path(a.folder), a.category, stop=producer.stopping.is_set, on_idle=producer.health.beat
        )
    sent = producer.run(source, max_frames=a.count)
    print(f"sent {sent} frames to {producer.frames_key}", file=sys.stderr)
    return 0


def _parse_models(pairs: list[str]) -> dict[str, Path]:
    models = {}
    for pair in pairs or []:
        category, sep, path = pair.partition("=")
        if not sep or not category or not path:
            raise ValueError(f"--model takes CATEGORY=CHECKPOINT_DIR, got {pair!r}")
        models[category] = Path(path)
    return models


def cmd_work(a: argparse.Namespace) -> int:
    from workers.models import ModelRegistry, NullModelInspector, StandInInspector
    from workers.worker import Worker

    models = _parse_models(a.model)
    shadows = _parse_models(a.shadow_model)
    extra: dict[tuple[str, ...], tuple[str, Any]] = {}
    if models:
        extra[("worker", "models")] = ("--model", models)
    if shadows:
        extra[("worker", "shadow_models")] = ("--shadow-model", shadows)
    if a.models_file:
        extra[("worker", "models_file")] = ("--models-file", Path(a.models_file))
    if a.lines:
        extra[("worker", "lines")] = ("--lines", [x for x in a.lines.split(",") if x])
    if a.time_stages:
        extra[("worker", "time_stages")] = ("--time-stages", True)
    if a.batch_buckets:
        extra[("worker", "batch_buckets")] = ("--batch-buckets", [x for x in a.batch_buckets.split(",") if x])
    if a.devices:
        extra[("worker", "devices")] = ("--devices", [x for x in a.devices.split(",") if x])
    s = _settings(a, _WORK_FLAGS, extra)
    s = _named(s, f"crd-work:{s.worker.consumer}")
    if s.worker.devices or s.worker.processes_per_device > 1:
        from crd_model.inspector import default_device
        from workers.supervisor import resolve_devices, supervise

        own = [s.worker.device or str(default_device())]
        devices = resolve_devices(s.worker.devices or own, s.worker.processes_per_device)
        if len(devices) > 1:
            return supervise(s, devices, a.argv[1:])
        s = s.model_copy(update={"worker": s.worker.model_copy(update={"device": devices[0]})})
    w = s.worker

    def load(models: dict, shadow_models: dict) -> ModelRegistry:
        return ModelRegistry.load(
            models, w.device, w.bf16, w.compile, max_batch=w.max_batch, shadow_models=shadow_models,
            buckets=w.batch_buckets or None,
        )  # fmt: skip

    loader = None
    if a.stand_in_latency_ms is not None:
        categories = list(w.models) or [a.stand_in_category]
        registry = ModelRegistry({c: StandInInspector(a.stand_in_latency_ms) for c in categories})
    elif w.models_file is not None:  # the models file is the source of truth, and is watched
        from workers.rollout import ModelsFile

        spec = ModelsFile(w.models_file).read()
        registry, loader = load(spec.models, spec.shadow_models), load
    else:
        if not w.models:
            raise ValueError(
                "no models: pass --model CATEGORY=CHECKPOINT_DIR or --models-file (or set CRD_WORKER__MODELS)"
            )
        registry = load(w.models, w.shadow_models)
    if a.null_model:
        registry = ModelRegistry({c: NullModelInspector(registry.get(c)) for c in registry.categories})
    worker = Worker(s, registry, loader=loader)
    worker.install_signal_handlers()
    worker.run(max_frames=a.max_frames, idle_exit_s=a.idle_exit_s)
    return 0


def cmd_results(a: argparse.Namespace) -> int:
    from crd_model.stream.redis_streams import connect
    from crd_model.stream.results import format_result, tail_results

    s = _settings(a)
    r = connect(s.redis)
    key = s.streams.key(s.line, "results")
    print(f"# {key}  (frame id, verdict, score/threshold, capture->result latency)", flush=True)
    for _, result in tail_results(r, key, start="0" if a.from_start else "$", count=a.count, timeout_s=a.timeout_s):
        print(format_result(result), flush=True)
    return 0


def cmd_shadow_report(a: argparse.Namespace) -> int:
    from crd_model.stream.redis_streams import connect
    from crd_model.stream.shadow_report import compare, format_report, read_results

    s = _settings(a)
    results = read_results(connect(s.redis), s.streams.key(s.line, "results"), start=a.since, count=a.count)
    report = compare(results, s.line)
    print(format_report(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report.as_dict(), indent=2))
    return 0


def cmd_plc(a: argparse.Namespace) -> int:
    from consumers.plc.bridge import PlcBridge

    extra: dict[tuple[str, ...], tuple[str, Any]] = {}
    if a.opcua_endpoint is not None and a.protocol in ("opcua-client", "opcua-server"):
        section = "opcua_client" if a.protocol == "opcua-client" else "opcua_server"
        extra[("plc", section, "endpoint")] = ("--opcua-endpoint", a.opcua_endpoint)
    s = _settings(a, _PLC_FLAGS, extra)
    bridge = PlcBridge(s)
    bridge.install_signal_handlers()
    bridge.run(max_results=a.max_results)
    return 0


def cmd_dashboard(a: argparse.Namespace) -> int:
    from consumers.dashboard.service import Dashboard

    s = _settings(a, _DASHBOARD_FLAGS)
    dashboard = Dashboard(s)
    dashboard.install_signal_handlers()
    dashboard.run()
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from crd_model.demo import run_stream_demo
    from crd_model.stream.logs import configure_logging

    configure_logging(level="WARNING")
    summary = run_stream_demo(Path(a.workdir), frames=a.frames, fps=a.fps)
    print("\nsummary:\n" + json.dumps(summary, indent=2))
    return 0


def _add_service_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--line", default=None, help="line id (default: CRD_LINE or line1)")
    p.add_argument("--redis-url", default=None, help="default: CRD_REDIS__URL, REDIS_URL, redis://127.0.0.1:6379/0")
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics, /healthz, /readyz (0-65535)")
    p.add_argument("--plain-logs", action="store_true", help="key=value logs instead of JSON")


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags: `--batch 8` must be an error, not a silent `--batch-buckets 8`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="crd", description=__doc__.split("\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)  # subcommands' parsers are _Parsers too

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
    p.add_argument("--epochs", type=_COUNT, default=200)
    p.add_argument("--batch-size", type=_COUNT, default=16)
    p.add_argument("--lr", type=_number(float, above=0), default=0.005)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--false-reject-rate",
        type=_FRACTION,
        default=0.01,
        help="share of good parts the threshold may reject (held-out validation images set it)",
    )
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="I-AUROC, P-AUROC, AUPRO on <data>/<category>/test")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--out", default=None, help="write the full report as JSON")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--target-detection",
        type=_FRACTION,
        default=0.95,
        help="also report the threshold this detection rate needs on the test split, and its false-reject rate",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "calibrate", help="new statistics and threshold for a checkpoint from a folder of good parts (no retraining)"
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--folder", required=True, help="good parts: rgb/*.png + xyz/*.tiff pairs (as predict --folder)")
    p.add_argument(
        "--false-reject-rate",
        type=_FRACTION,
        default=None,
        help="share of good parts the threshold may reject (default: the checkpoint's own)",
    )
    p.add_argument("--out", default=None, help="write the recalibrated checkpoint here (default: in place)")
    p.add_argument("--batch-size", type=_COUNT, default=16)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--scoring",
        default=None,
        choices=["whitened", "cosine"],
        help="switch how the checkpoint scores (default: keep its own); the weights and model id stay",
    )
    p.set_defaults(func=cmd_calibrate)

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
    p = sub.add_parser("produce", help="camera producer: push frames onto a line's stream")
    _add_service_args(p)
    p.add_argument("--camera", default="cam1")
    p.add_argument("--source", default="synthetic", choices=["replay", "synthetic", "watch"])
    p.add_argument("--data", default=None, help="replay: MVTec 3D-AD root")
    p.add_argument("--category", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--loop", action="store_true", help="replay: start over at the end")
    p.add_argument("--folder", default=None, help="watch: folder with rgb/ and xyz/ subfolders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anomaly-rate", type=_FRACTION, default=0.2)
    p.add_argument("--fps", type=float, default=None, help="frames per second, > 0 (default: CRD_PRODUCER__FPS or 10)")
    p.add_argument("--count", type=_COUNT, default=None, help="stop after this many frames")
    p.add_argument("--max-outstanding", type=int, default=None)
    p.add_argument("--backpressure", default=None, choices=["block", "slow"])
    p.add_argument("--rgb-encoding", default=None, choices=["png", "jpeg", "raw"])
    p.add_argument("--xyz-dtype", default=None, choices=["float32", "float16"])
    p.add_argument(
        "--xyz-compression", default=None, choices=["zlib", "none"],
        help="none: more bytes on the wire, no deflate here and no inflate in the worker",
    )  # fmt: skip
    p.add_argument(
        "--downscale", type=int, default=None, metavar="PIXELS",
        help="shrink frames to this longer side before sending (fewer bytes; maps then cover the smaller image)",
    )  # fmt: skip
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("work", help="batched inference worker for a line")
    _add_service_args(p)
    p.add_argument("--model", action="append", default=[], metavar="CATEGORY=CHECKPOINT_DIR")
    p.add_argument("--consumer", default=None, help="consumer name (default host-pid)")
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--max-wait-ms", type=int, default=None)
    p.add_argument(
        "--batch-buckets", default=None, help="comma-separated batch shapes run on CUDA (default: powers of two)"
    )
    p.add_argument("--claim-idle-ms", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--max-frames", type=_COUNT, default=None)
    p.add_argument("--idle-exit-s", type=_SECONDS, default=None, help="exit after this long without frames")
    p.add_argument(
        "--stand-in-latency-ms",
        type=_number(float, at_least=0),
        default=None,
        help="benchmarks only: a labelled fixed-latency stand-in instead of a model",
    )
    p.add_argument("--stand-in-category", default="disc")
    p.add_argument(
        "--null-model", action="store_true",
        help="benchmarks only: the checkpoints' data path with a model that costs nothing (labelled null-model)",
    )  # fmt: skip
    p.add_argument("--lines", default=None, help="comma-separated lines to serve together (default: --line)")
    p.add_argument(
        "--devices", default=None,
        help="one worker process per device: 'all' (every GPU) or e.g. cuda:0,cuda:1 (a supervisor starts them)",
    )  # fmt: skip
    p.add_argument(
        "--processes-per-device", type=int, default=None,
        help="worker processes per device (each its own consumer and device loop) under a supervisor; default 1",
    )  # fmt: skip
    p.add_argument(
        "--shadow-model", action="append", default=[], metavar="CATEGORY=CHECKPOINT_DIR",
        help="a candidate model scoring every frame beside the live one (results carry its score)",
    )  # fmt: skip
    p.add_argument(
        "--models-file", default=None,
        help='JSON {"models": {...}, "shadow_models": {...}}, watched: a change (or SIGHUP) swaps models live',
    )  # fmt: skip
    p.add_argument("--decode-threads", type=int, default=None, help="pool for decoding and result encoding")
    p.add_argument(
        "--decode-processes", type=int, default=None,
        help="decode and build results in this many processes (0: threads; default: processes on a GPU)",
    )  # fmt: skip
    p.add_argument("--time-stages", action="store_true", help="synchronise the device to time each stage")
    p.set_defaults(func=cmd_work)

    p = sub.add_parser("results", help="tail a line's results live")
    _add_service_args(p)
    p.add_argument("--from-start", action="store_true")
    p.add_argument("--count", type=_COUNT, default=None)
    p.add_argument("--timeout-s", type=_SECONDS, default=None)
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("shadow-report", help="compare a candidate model run in shadow mode with the live one")
    _add_service_args(p)
    p.add_argument("--since", default="-", help="first results-stream entry id to read (default: the oldest)")
    p.add_argument("--count", type=_COUNT, default=None, help="at most this many results")
    p.add_argument("--json", default=None, help="also write the report as JSON")
    p.set_defaults(func=cmd_shadow_report)

    p = sub.add_parser("plc", help="PLC bridge: a line's results to a PLC (OPC UA server/client, Modbus TCP)")
    _add_service_args(p)
    p.add_argument("--protocol", default=None, choices=["modbus", "opcua-client", "opcua-server"])
    p.add_argument("--lines", nargs="+", default=None, help="bridge several lines (default: --line)")
    p.add_argument("--group", default=None, help="the bridge's consumer group (default plc-bridge)")
    p.add_argument("--consumer", default=None, help="consumer name, stable across restarts (default bridge)")
    p.add_argument(
        "--error-is-reject",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="an error verdict rejects the part (default: yes, fail-safe)",
    )
    p.add_argument("--buffer-depth", type=int, default=None)
    p.add_argument("--ack-timeout-s", type=float, default=None)
    p.add_argument("--modbus-host", default=None)
    p.add_argument("--modbus-port", type=int, default=None)
    p.add_argument("--modbus-device-id", type=int, default=None)
    p.add_argument("--opcua-endpoint", default=None, help="opcua-client: the PLC's server; opcua-server: ours")
    p.add_argument("--max-results", type=_COUNT, default=None, help="stop after this many confirmed results")
    p.set_defaults(func=cmd_plc)

    p = sub.add_parser("dashboard", help="live line dashboard (web, read-only)")
    _add_service_args(p)
    p.add_argument("--lines", nargs="+", default=None, help="lines to show (default: --line)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port of the page (default 8080)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("demo", help="synthetic data -> small model -> verdicts, end to end")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--frames", type=_COUNT, default=None, help="default: the whole synthetic test split (60)")
    p.add_argument("--fps", type=_number(float, above=0), default=5.0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the supervisor of `crd work --devices` hands it on to its children
    try:
        return int(args.func(args) or 0)
    except ValidationError as exc:  # e.g. a model configuration from flags (--image-size 100)
        from crd_model.stream.settings import describe_errors

        print(f"crd {args.command}: error: {describe_errors(exc, lambda loc: '.'.join(loc))}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:  # SettingsError, CheckpointError, WireError, ...
        print(f"crd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
