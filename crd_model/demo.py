"""`crd demo`: the whole product on one machine, end to end.

Synthetic data -> a small CRD model (trained once, then reused from `runs/demo/`) -> a producer
replaying the synthetic test split as a line camera -> Redis Streams (REDIS_URL, else an embedded
Valkey server) -> a worker process -> the results stream, tailed live, then a summary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import redis

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
        print(
            f"training a CRD model ({epochs} epochs, {image_size} px, a few minutes on 2 CPU cores) -> {ckpt}; "
            "reused on later runs",
            flush=True,
        )
        train_category(
            data, DEMO_CATEGORY, ckpt, CRDConfig(image_size=image_size), TrainOptions(epochs=epochs, progress=True)
        )
    else:
        print(f"reusing model {ckpt}", flush=True)
    return data, ckpt


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_stream_demo(workdir: Path, frames: int | None = None, fps: float = 5.0, timeout_s: float = 300.0) -> dict:
    from PIL import Image

    from crd_model.data.mvtec3d import read_rgb
    from crd_model.overlay import overlay
    from crd_model.stream import decode_map
    from crd_model.stream.embedded import redis_server_url
    from crd_model.stream.redis_streams import connect
    from crd_model.stream.results import format_result, latency_ms, tail_results
    from crd_model.stream.settings import Settings
    from producers.producer import Producer
    from producers.sources import ReplaySource

    data, ckpt = ensure_demo_model(workdir)
    source = ReplaySource(data, DEMO_CATEGORY, "test")
    n = frames or len(source.samples)
    line = f"demo-{int(time.time())}"
    with redis_server_url() as url:
        print(f"redis: {url}   line: {line}", flush=True)
        env = dict(os.environ, REDIS_URL=url, CRD_LINE=line, PYTHONUNBUFFERED="1")
        env.pop("CRD_REDIS__URL", None)
        log_path = workdir / "worker.log"
        with open(log_path, "w") as log_file:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "crd_model.cli",
                    "work",
                    "--model",
                    f"{DEMO_CATEGORY}={ckpt}",
                    "--max-wait-ms",
                    "30",
                ],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            settings = Settings(line=line)
            settings = settings.model_copy(
                update={
                    "redis": settings.redis.model_copy(update={"url": url}),
                    "producer": settings.producer.model_copy(update={"fps": fps}),
                }
            )
            r = connect(settings.redis)
            frames_key = settings.streams.key(line, "frames")
            _wait_for_worker(r, frames_key, settings.streams.group, worker, log_path)
            producer = Producer(settings, camera="demo-cam", r=r)
            thread = threading.Thread(
                target=producer.run, args=(source,), kwargs={"max_frames": n}, name="producer", daemon=True
            )
            t0 = time.time()
            thread.start()
            results = []
            print(f"\nstreaming {n} frames at {fps:g} fps: producer -> {frames_key} -> worker -> results\n", flush=True)
            for _, res in tail_results(
                r, settings.streams.key(line, "results"), start="0", count=n, timeout_s=timeout_s
            ):
                print("  " + format_result(res), flush=True)
                results.append(res)
            wall = time.time() - t0
            thread.join(timeout=5)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()

    ok = [x for x in results if not isinstance(x, Exception)]
    verdicts = {v: sum(1 for x in ok if x.verdict == v) for v in ("ok", "anomalous", "error")}
    lat = [v for v in (latency_ms(x) for x in ok) if v is not None]
    # The producer put each image's defect type into the frame's meta; results echo it back.
    bad = [x for x in ok if x.meta.get("defect_type", "good") != "good"]
    good = [x for x in ok if x.meta.get("defect_type", "good") == "good"]
    out_dir = workdir / "overlays"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for x in sorted(ok, key=lambda x: -(x.score or 0))[:4]:
        if x.anomaly_map is None or "path" not in x.meta:
            continue
        rgb = read_rgb(data / DEMO_CATEGORY / str(x.meta["path"]))
        amap = np.asarray(Image.fromarray(decode_map(x.anomaly_map)).resize(rgb.shape[1::-1], Image.BILINEAR))
        Image.fromarray(overlay(rgb, amap, x.threshold or 0.0)).save(out_dir / f"{x.frame_id.replace(':', '_')}.png")
        written += 1
    span = (max(x.timings.finished_at for x in ok) - min(x.timings.captured_at for x in ok)) if ok else 0.0
    return {
        "frames_sent": producer.sent,
        "results": len(results),
        "verdicts": verdicts,
        "throughput_fps": round(len(ok) / span, 2) if span > 0 else None,
        "latency_ms_p50": round(_percentile(lat, 50), 1),
        "latency_ms_p99": round(_percentile(lat, 99), 1),
        "anomalous_caught": f"{sum(1 for x in bad if x.verdict == 'anomalous')}/{len(bad)}",
        "good_passed": f"{sum(1 for x in good if x.verdict == 'ok')}/{len(good)}",
        "wall_seconds": round(wall, 1),
        "overlays": f"{written} PNGs in {out_dir}",
        "worker_log": str(workdir / "worker.log"),
    }


def _wait_for_worker(
    r: redis.Redis, frames_key: str, group: str, worker: subprocess.Popen, log_path: Path, timeout_s: float = 120.0
) -> None:
    """Until the worker has joined the consumer group (its models are loaded)."""
    from crd_model.stream.redis_streams import ensure_group

    ensure_group(r, frames_key, group)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            tail = log_path.read_text()[-2000:]
            raise RuntimeError(f"worker exited with {worker.returncode}; see {log_path}:\n{tail}")
        if r.xinfo_consumers(frames_key, group):
            return
        time.sleep(0.2)
    raise RuntimeError(f"worker did not start within {timeout_s:.0f}s; see {log_path}")
