"""Throughput benchmark: the model alone vs the whole pipeline through Redis, and queue scaling.

    .venv/bin/python bench/throughput.py [--frames 96] [--batch 8]

In one run, on one machine:
1. model only: `Inspector.inspect()` (preprocess + inference) on in-memory frames, batch 1, 8, 32;
2. pipeline: frames pre-loaded on the stream, one `crd work` process with the same model and batch
   size, throughput from its first read to its last result; ratio to (1) at that batch size;
3. latency: the producer paced at ~70% of the pipeline's capacity, capture -> result p50/p99;
4. wire: bytes per frame (payload) and per result; worker peak RSS;
5. queue scaling: 1, 2, 4, 8 worker processes with a labelled fixed-latency stand-in model
   (`--stand-in-latency-ms`), small frames, throughput vs n x one worker's ideal.
Uses REDIS_URL, else an embedded Valkey. Writes BENCHMARKS.md (section "throughput") and
bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine, write_section
from crd_model.data.mvtec3d import list_samples, read_rgb, read_xyz
from crd_model.demo import DEMO_CATEGORY, ensure_demo_model
from crd_model.inspector import Inspector
from crd_model.stream import WIRE_VERSION, make_frame, pack_frame
from crd_model.stream.embedded import redis_server_url
from crd_model.stream.redis_streams import F_FRAME_ID, F_PAYLOAD, F_VERSION, connect, ensure_group
from crd_model.stream.results import tail_results
from crd_model.stream.settings import Settings


def model_only(inspector: Inspector, rgbs: list, xyzs: list, batch: int, repeats: int = 3) -> float:
    """Median frames/s of inspect() over `repeats` passes through all frames."""
    inspector.inspect(rgbs[:batch], xyzs[:batch])  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(rgbs), batch):
            inspector.inspect(rgbs[i : i + batch], xyzs[i : i + batch])
        rates.append(len(rgbs) / (time.perf_counter() - t))
    return float(np.median(rates))


def _settings(url: str, line: str) -> Settings:
    s = Settings(line=line)
    return s.model_copy(update={"redis": s.redis.model_copy(update={"url": url})})


def _payloads(rgbs: list, xyzs: list, line: str, n: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        fid = f"bench:{i}"
        frame = make_frame(
            rgbs[i % len(rgbs)],
            xyzs[i % len(xyzs)],
            frame_id=fid,
            line=line,
            camera="bench",
            seq=i,
            category=DEMO_CATEGORY,
        )
        out.append((fid, pack_frame(frame)))
    return out


def _fill(r, key: str, payloads: list[tuple[str, bytes]], captured_now: bool = True) -> None:
    pipe = r.pipeline(transaction=False)
    for fid, payload in payloads:
        pipe.xadd(key, {F_FRAME_ID: fid.encode(), F_VERSION: str(WIRE_VERSION).encode(), F_PAYLOAD: payload})
    pipe.execute()


def _spawn_worker(url: str, line: str, consumer: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, REDIS_URL=url, CRD_LINE=line, PYTHONUNBUFFERED="1")
    env.pop("CRD_REDIS__URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "crd_model.cli", "work", "--consumer", consumer, "--plain-logs", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_consumers(r, key: str, group: str, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(r.xinfo_consumers(key, group)) >= n:
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{n} workers did not join within {timeout}s")


def _collect(r, key: str, n: int, timeout: float = 600) -> list:
    return [res for _, res in tail_results(r, key, start="0", count=n, timeout_s=timeout)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()


def _open_line(url: str, prefix: str) -> tuple[Settings, object, str, str]:
    line = f"{prefix}{int(time.time() * 1000)}"
    s = _settings(url, line)
    r = connect(s.redis)
    fkey, rkey = s.streams.key(line, "frames"), s.streams.key(line, "results")
    ensure_group(r, fkey, s.streams.group)
    return s, r, fkey, rkey


def _close_line(s: Settings, r) -> None:
    for kind in ("frames", "results", "dead"):
        r.delete(s.streams.key(s.line, kind))


def _model_worker(url: str, s: Settings, r, ckpt: Path, batch: int) -> subprocess.Popen:
    proc = _spawn_worker(
        url, s.line, "w0", "--model", f"{DEMO_CATEGORY}={ckpt}", "--max-batch", str(batch), "--max-wait-ms", "20"
    )
    _wait_consumers(r, s.streams.key(s.line, "frames"), s.streams.group, 1)
    return proc


def pipeline_run(url: str, ckpt: Path, payloads_fn, n: int, batch: int) -> dict:
    """Pre-load n frames, then one worker drains them; rate from first start to last finish."""
    s, r, fkey, rkey = _open_line(url, "bench")
    payloads = payloads_fn(s.line, n)
    proc = _model_worker(url, s, r, ckpt, batch)
    _fill(r, fkey, payloads)
    results = _collect(r, rkey, n)
    _stop([proc])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = min(x.timings.started_at for x in results)
    end = max(x.timings.finished_at for x in results)
    sizes = [len(p) for _, p in payloads]
    result_sizes = [len(f[F_PAYLOAD]) for _, f in r.xrange(rkey)]
    _close_line(s, r)
    return {
        "frames": len(results),
        "errors": sum(1 for x in results if x.verdict == "error"),
        "fps": len(results) / (end - start),
        "frame_bytes_median": int(np.median(sizes)),
        "result_bytes_median": int(np.median(result_sizes)),
        "worker_peak_rss_mb": usage.ru_maxrss / 1024.0,  # Linux: KiB; the max over finished children
    }


def latency_run(url: str, ckpt: Path, payloads_fn, n: int, batch: int, fps: float) -> dict:
    s, r, fkey, rkey = _open_line(url, "lat")
    payloads = payloads_fn(s.line, n)
    proc = _model_worker(url, s, r, ckpt, batch)
    # Paced like a camera; frames are re-stamped at send time so latency starts at "capture".
    from crd_model.stream import Frame, unpack_frame

    t0 = time.monotonic()
    for i, (fid, payload) in enumerate(payloads):
        wait = t0 + i / fps - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        frame: Frame = unpack_frame(payload).model_copy(update={"captured_at": time.time()})
        r.xadd(fkey, {F_FRAME_ID: fid.encode(), F_VERSION: b"1", F_PAYLOAD: pack_frame(frame)})
    results = _collect(r, rkey, n)
    _stop([proc])
    lat = [(x.timings.finished_at - x.timings.captured_at) * 1000 for x in results]
    _close_line(s, r)
    return {
        "fps_offered": fps,
        "frames": len(results),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


def scaling_run(url: str, workers: int, latency_ms: float, batch: int, per_worker_frames: int) -> dict:
    s, r, fkey, rkey = _open_line(url, f"scale{workers}x")
    line = s.line
    procs = [
        _spawn_worker(
            url,
            line,
            f"w{i}",
            "--stand-in-latency-ms",
            str(latency_ms),
            "--max-batch",
            str(batch),
            "--max-wait-ms",
            "0",
            "--stand-in-category",
            DEMO_CATEGORY,
        )
        for i in range(workers)
    ]
    _wait_consumers(r, fkey, s.streams.group, workers)
    rgb = np.zeros((32, 32, 3), np.uint8)
    xyz = np.zeros((32, 32, 3), np.float32)
    n = per_worker_frames * workers
    _fill(r, fkey, _payloads([rgb], [xyz], line, n))
    results = _collect(r, rkey, n)
    _stop(procs)
    start = min(x.timings.started_at for x in results)
    end = max(x.timings.finished_at for x in results)
    ideal = workers * batch / (latency_ms / 1000.0)
    fps = len(results) / (end - start)
    _close_line(s, r)
    return {
        "workers": workers,
        "frames": len(results),
        "fps": fps,
        "ideal_fps": ideal,
        "efficiency": fps / ideal,
        "model_ids": sorted({x.model_id for x in results if x.model_id}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--stand-in-latency-ms", type=float, default=100.0)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="rewrite the table from bench/results/throughput.json")
    a = ap.parse_args()
    path = ROOT / "bench" / "results" / "throughput.json"
    if a.render_only:
        out = json.loads(path.read_text())
        out["model_only_fps"] = {int(k): v for k, v in out["model_only_fps"].items()}  # JSON keys are strings
        a.frames, a.batch, a.stand_in_latency_ms = out["args"]["frames"], out["args"]["batch"], out["args"]["stand_in"]
        write_section("throughput", render(out, a))
        return 0

    _, ckpt = ensure_demo_model(ROOT / "runs" / "demo")
    data = ROOT / "runs" / "demo" / "data"
    samples = list_samples(data, DEMO_CATEGORY, "test")
    rgbs = [read_rgb(s.rgb_path) for s in samples]
    xyzs = [read_xyz(s.xyz_path) for s in samples]
    rgbs = (rgbs * (a.frames // len(rgbs) + 1))[: a.frames]
    xyzs = (xyzs * (a.frames // len(xyzs) + 1))[: a.frames]
    inspector = Inspector(ckpt)
    out: dict = {
        "machine": machine(),
        "device": str(inspector.device),
        "model_id": inspector.model_id,
        "image_size": inspector.config.image_size,
        "args": {"frames": a.frames, "batch": a.batch, "stand_in": a.stand_in_latency_ms},
    }
    out["model_only_fps"] = {b: model_only(inspector, rgbs, xyzs, b) for b in (1, 8, 32)}
    print("model only:", out["model_only_fps"], flush=True)
    del inspector

    with redis_server_url() as url:

        def payloads_fn(line: str, n: int) -> list[tuple[str, bytes]]:
            return _payloads(rgbs, xyzs, line, n)

        pipe = pipeline_run(url, ckpt, payloads_fn, a.frames, a.batch)
        pipe["ratio_to_model_only"] = pipe["fps"] / out["model_only_fps"][a.batch]
        out["pipeline"] = pipe
        print("pipeline:", pipe, flush=True)
        out["latency"] = latency_run(url, ckpt, payloads_fn, a.frames, a.batch, fps=0.7 * pipe["fps"])
        print("latency:", out["latency"], flush=True)
        out["scaling"] = [
            scaling_run(url, w, a.stand_in_latency_ms, a.batch, per_worker_frames=24 * a.batch) for w in (1, 2, 4, 8)
        ]
        for row in out["scaling"]:
            print("scaling:", row, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    text = render(out, a)
    print(text)
    if not a.no_write:
        write_section("throughput", text)
    return 0


def render(out: dict, a: argparse.Namespace) -> str:
    m, p, lat = out["model_only_fps"], out["pipeline"], out["latency"]
    lines = [
        "## Throughput (`bench/throughput.py`)",
        "",
        f"Command: `.venv/bin/python bench/throughput.py --frames {a.frames} --batch {a.batch}`. "
        f"Machine: {out['machine']}; model device: {out['device']}. Model: `{out['model_id']}` "
        f"(CRD, efficientnet_lite0 teacher, {out['image_size']} px), synthetic 200x200 frames "
        "(PNG RGB + float32/zlib xyz). Medians of 3 passes for the model alone; one pass through Redis.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| model only, `Inspector.inspect()`, batch 1 | {m[1]:.1f} frames/s |",
        f"| model only, batch 8 | {m[8]:.1f} frames/s |",
        f"| model only, batch 32 | {m[32]:.1f} frames/s |",
        f"| pipeline (stream -> worker -> results), batch {a.batch} | {p['fps']:.1f} frames/s |",
        f"| pipeline / model only at batch {a.batch} | **{p['ratio_to_model_only']:.2f}** (target >= 0.9) |",
        f"| latency capture -> result at {lat['fps_offered']:.1f} frames/s offered | "
        f"p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms |",
        f"| bytes per frame on the wire (median) | {p['frame_bytes_median']:,} |",
        f"| bytes per result (median; png8 map <= 256 px, regions) | {p['result_bytes_median']:,} |",
        f"| worker peak RSS | {p['worker_peak_rss_mb']:.0f} MiB |",
        "",
        f"Queue scaling: `crd work --stand-in-latency-ms {a.stand_in_latency_ms:g}` (a labelled fixed-latency "
        f"stand-in, not the model: model_id `stand-in-sleep-{a.stand_in_latency_ms:g}ms`), batch {a.batch}, "
        "32x32 frames, so only the queueing is measured.",
        "",
        "| workers | frames/s | vs linear (n x 1 worker measured) | vs ideal (n x batch / latency) |",
        "|---|---|---|---|",
    ]
    one = out["scaling"][0]["fps"]
    for row in out["scaling"]:
        lines.append(
            f"| {row['workers']} | {row['fps']:.1f} | {row['fps'] / (row['workers'] * one):.2f} | "
            f"{row['efficiency']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
