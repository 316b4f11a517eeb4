"""Throughput benchmark: where a worker's time goes, from stream bytes to published results.

    .venv/bin/python bench/throughput.py [--frames 96] [--batch 8] [--sizes 200 800] [--checkpoint DIR]

In one run, on one machine, for each frame size (the demo's 200x200 frames, and the same frames
enlarged to 800x800, the MVTec 3D-AD size), all at the same batch size:
1. in process: the model alone (prepared tensors already on the device), `Inspector.infer()` on
   prepared frames, and `Inspector.inspect()` (preprocessing + model) on decoded frames;
2. a `crd work` process on a pre-filled stream, twice: with a model that costs nothing
   (`--null-model`: read, decode, preprocess, post-process, encode, publish) and with the model:
   frames/s, the worker's CPU per frame, the per-stage CPU and wall ms per frame (from its
   /metrics), its peak RSS, Redis server CPU per frame, bytes per frame and per result;
3. latency capture -> result (p50/p99) with a paced producer at 50 % and 90 % of the measured rate
   (before the optional runs below, so a time-boxed run on a lent GPU keeps it);
4. optionally (`--scaling`) queueing with 1, 2, 4, 8 stand-in workers, and (`--processes-per-device N`)
   the pipeline again with N worker processes sharing the device under a supervisor;
5. optionally (`--profile-worker DIR`) py-spy stacks of the worker process during the pipeline run
   (`bench/stack_summary.py` sums them up).
Uses REDIS_URL, else an embedded Valkey. Writes BENCHMARKS.md (section "throughput") and
bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine, repeated, write_section
from crd_model.data.mvtec3d import list_samples, read_rgb, read_xyz
from crd_model.demo import DEMO_CATEGORY, ensure_demo_model
from crd_model.inputs import PreparedFrame
from crd_model.inspector import Inspector
from crd_model.preprocessing import ModelInput
from crd_model.stream import WIRE_VERSION, make_frame, pack_frame
from crd_model.stream.embedded import redis_server_url
from crd_model.stream.redis_streams import F_FRAME_ID, F_PAYLOAD, F_VERSION, connect, ensure_group
from crd_model.stream.results import tail_results
from crd_model.stream.settings import Settings
from workers.worker import STAGES

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- frames ---------------------------------------------------------------------------------------------------


def enlarge(rgb: np.ndarray, xyz: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The same scene at side x side: bilinear RGB, nearest-neighbour xyz (missing points stay missing)."""
    if rgb.shape[:2] == (side, side):
        return rgb, xyz
    big = np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR))
    h, w = xyz.shape[:2]
    rows = np.minimum(((np.arange(side) + 0.5) * (h / side)).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(side) + 0.5) * (w / side)).astype(np.intp), w - 1)
    return big, xyz[rows[:, None], cols[None, :]]


class FrameMaker:
    """Frames of the bench's images, each image encoded once: a 2,048-frame run at 800x800 would
    otherwise spend minutes in PNG encoding before the first frame is sent."""

    def __init__(self, rgbs: list, xyzs: list, line: str, xyz_dtype: str = "float32"):
        self.line = line
        self.n_images = len(rgbs)
        tags = dict(frame_id="x", line=line, camera="bench", seq=0, category=DEMO_CATEGORY, xyz_dtype=xyz_dtype)
        self._encoded = [make_frame(rgb, xyz, **tags) for rgb, xyz in zip(rgbs, xyzs, strict=True)]

    def packed(self, i: int, frame_id: str) -> bytes:
        """Frame i (image i mod the images), captured now."""
        frame = self._encoded[i % self.n_images].model_copy(update={"frame_id": frame_id, "seq": i,
                                                                    "captured_at": time.time()})  # fmt: skip
        return pack_frame(frame)


def payloads(maker: FrameMaker, n: int) -> list[tuple[str, bytes]]:
    return [(f"bench:{i}", maker.packed(i, f"bench:{i}")) for i in range(n)]


# -- in process -------------------------------------------------------------------------------------------------


def rate(fn, n_frames: int, repeats: int = 3) -> float:
    """Median frames/s of `fn` (one pass over n_frames) after one warm-up pass."""
    fn()
    rates = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rates.append(n_frames / (time.perf_counter() - t))
    return float(np.median(rates))


def agreement(fast: Inspector, reference: Inspector, rgbs: list, xyzs: list, batch: int) -> dict:
    """The serving path (bf16, compiled, padded) against fp32 eager on the same frames: score error
    relative to the threshold, and verdicts that differ."""
    a, b = [], []
    for i in range(0, len(rgbs), batch):
        a += [x.score for x in fast.inspect(rgbs[i : i + batch], xyzs[i : i + batch])]
        b += [x.score for x in reference.inspect(rgbs[i : i + batch], xyzs[i : i + batch])]
    a, b, t = np.asarray(a), np.asarray(b), reference.threshold
    return {"frames": len(a), "max_abs_score_error_over_threshold": float(np.max(np.abs(a - b)) / t),
            "verdicts_differing": int(np.sum((a > t) != (b > t)))}  # fmt: skip


def in_process(inspector: Inspector, rgbs: list, xyzs: list, batch: int) -> dict:
    n = len(rgbs)
    chunks = [range(i, min(n, i + batch)) for i in range(0, n, batch)]
    prepared = []
    for c in chunks:
        inputs = inspector.preprocess([torch.from_numpy(rgbs[i]) for i in c], [torch.from_numpy(xyzs[i]) for i in c])
        prepared.append(inputs)

    def model_alone() -> None:
        for inputs in prepared:
            inspector.forward(inputs)

    host = [
        ModelInput(None if p.rgb is None else p.rgb.cpu(), None if p.x3d is None else p.x3d.cpu()) for p in prepared
    ]
    frames_prepared = []
    for p, c in zip(host, chunks, strict=True):
        for k, i in enumerate(c):
            frames_prepared.append(
                PreparedFrame(
                    None if p.rgb is None else p.rgb[k].numpy(), None if p.x3d is None else p.x3d[k].numpy(),
                    rgbs[i].shape[:2],
                )
            )  # fmt: skip

    def infer_prepared() -> None:
        for i in range(0, n, batch):
            inspector.infer(frames_prepared[i : i + batch])

    def inspect() -> None:
        for c in chunks:
            inspector.inspect([rgbs[i] for i in c], [xyzs[i] for i in c])

    return {
        "model_alone_fps": rate(model_alone, n),
        "infer_prepared_fps": rate(infer_prepared, n),
        "inspect_fps": rate(inspect, n),
    }


# -- a worker process -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    def __init__(self, url: str, line: str, *args: str, code: Path = ROOT):
        """`crd work` from the source tree `code` (another revision's checkout, for an A/B)."""
        self.port = free_port()
        env = dict(os.environ, REDIS_URL=url, CRD_LINE=line, PYTHONUNBUFFERED="1")
        env.pop("CRD_REDIS__URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crd_model.cli", "work", "--consumer", "bench", "--plain-logs",
             "--metrics-port", str(self.port), *args],
            env=env, cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("worker not ready within 300 s")

    def processes(self) -> list[int]:
        """The worker and its descendants (its decode processes and their fork server)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        tree, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree

    def _stat_sum(self, fields_at: tuple[int, ...], main_only: bool) -> int:
        total = 0
        for pid in [self.proc.pid] if main_only else self.processes():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(fields[i]) for i in fields_at)
        return total

    def cpu_seconds(self, main_only: bool = False) -> float:
        """CPU of the worker and of its live descendants (utime + stime, all threads); with `main_only`,
        of the worker process alone (its device loop, readers, batcher and publisher)."""
        return self._stat_sum((11, 12), main_only) / CLK_TCK

    def minor_faults(self, main_only: bool = False) -> int:
        """Pages faulted in (minor faults) by the worker and its live descendants, or by the worker alone."""
        return self._stat_sum((7,), main_only)

    def peak_rss_mb(self) -> float:
        """Peak RSS of the worker plus its descendants' (shared pages counted in each)."""
        total = 0.0
        for pid in self.processes():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += next((int(x.split()[1]) / 1024.0 for x in status.splitlines() if x.startswith("VmHWM:")), 0.0)
        return total

    def _metric_samples(self) -> list:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return [sample for fam in text_string_to_metric_families(text) for sample in fam.samples]

    def stages(self) -> dict[str, dict[str, float]]:
        seconds: dict[tuple[str, str], float] = {}
        frames: dict[str, float] = {}
        for sample in self._metric_samples():
            # Summed: under a supervisor each worker process reports its own (labelled `worker`).
            if sample.name == "crd_worker_stage_seconds_total":
                key = (sample.labels["stage"], sample.labels["clock"])
                seconds[key] = seconds.get(key, 0.0) + sample.value
            elif sample.name == "crd_worker_stage_frames_total":
                frames[sample.labels["stage"]] = frames.get(sample.labels["stage"], 0.0) + sample.value
        return {
            st: {clock: 1000 * seconds.get((st, clock), 0.0) / frames[st] for clock in ("cpu", "wall")}
            for st in STAGES
            if frames.get(st)
        }

    def batches(self) -> dict[str, float]:
        """Batches run so far: how many, their mean size in frames and mean device seconds."""
        sums: dict[str, float] = {}
        for sample in self._metric_samples():
            if sample.name.startswith(("crd_worker_batch_size_", "crd_worker_inference_seconds_")):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
        n = sums.get("crd_worker_batch_size_count", 0.0)
        return {"batches": n, "mean_frames": sums.get("crd_worker_batch_size_sum", 0.0) / max(n, 1.0),
                "mean_device_s": sums.get("crd_worker_inference_seconds_sum", 0.0)
                / max(sums.get("crd_worker_inference_seconds_count", 0.0), 1.0)}  # fmt: skip

    def gc_pauses(self) -> dict[str, float]:
        """The worker process's garbage collections so far: full ones (generation 2) and their seconds,
        and collections of any generation longer than 25 ms (crd_worker_gc_pause_seconds)."""
        out = {"full": 0.0, "full_seconds": 0.0, "over_25ms": 0.0}
        for sample in self._metric_samples():
            if not sample.name.startswith("crd_worker_gc_pause_seconds"):
                continue
            full = sample.labels.get("generation") == "2"
            if sample.name.endswith("_count"):
                out["full"] += sample.value if full else 0.0
                out["over_25ms"] += sample.value
            elif sample.name.endswith("_sum") and full:
                out["full_seconds"] += sample.value
            elif sample.name.endswith("_bucket") and sample.labels.get("le") == "0.025":
                out["over_25ms"] -= sample.value
        return out

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def redis_cpu(r) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def open_line(url: str, prefix: str):
    line = f"{prefix}{int(time.time() * 1000)}"
    s = Settings(line=line)
    s = s.model_copy(update={"redis": s.redis.model_copy(update={"url": url})})
    r = connect(s.redis)
    ensure_group(r, s.streams.key(line, "frames"), s.streams.group)
    return s, r


def close_line(s: Settings, r) -> None:
    r.delete(*(s.streams.key(s.line, kind) for kind in ("frames", "results", "dead")))


def fill(r, key: str, items: list[tuple[str, bytes]]) -> None:
    pipe = r.pipeline(transaction=False)
    for fid, payload in items:
        pipe.xadd(key, {F_FRAME_ID: fid.encode(), F_VERSION: str(WIRE_VERSION).encode(), F_PAYLOAD: payload})
    pipe.execute()


def drain_run(url: str, worker_args: list[str], rgbs: list, xyzs: list, n: int, profile: Path | None = None,
              code: Path = ROOT) -> dict:  # fmt: skip
    """n frames pre-loaded, one worker (run from the source tree `code`) drains them; rate from its first
    read to its last result. With `profile`, py-spy samples the worker process meanwhile (GIL-holding
    stacks, raw format)."""
    s, r = open_line(url, "bench")
    items = payloads(FrameMaker(rgbs, xyzs, s.line), n)
    worker = WorkerProcess(url, s.line, *worker_args, code=code)
    spy = sample_stacks(worker.proc.pid, profile) if profile is not None else None
    cpu0, main0, rcpu0 = worker.cpu_seconds(), worker.cpu_seconds(main_only=True), redis_cpu(r)
    faults0, main_faults0 = worker.minor_faults(), worker.minor_faults(main_only=True)
    fill(r, s.streams.key(s.line, "frames"), items)
    results = [x for _, x in tail_results(r, s.streams.key(s.line, "results"), start="0", count=n, timeout_s=600)]
    cpu1, main1, rcpu1 = worker.cpu_seconds(), worker.cpu_seconds(main_only=True), redis_cpu(r)
    faults1, main_faults1 = worker.minor_faults(), worker.minor_faults(main_only=True)
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
        spy.wait(timeout=60)
    stages, rss, gc = worker.stages(), worker.peak_rss_mb(), worker.gc_pauses()
    result_sizes = [len(f[F_PAYLOAD]) for _, f in r.xrange(s.streams.key(s.line, "results"))]
    worker.stop()
    close_line(s, r)
    start = min(x.timings.started_at for x in results)
    end = max(x.timings.finished_at for x in results)
    return {
        "frames": len(results),
        "errors": sum(1 for x in results if x.verdict == "error"),
        "fps": len(results) / (end - start),
        "worker_cpu_ms_per_frame": 1000 * (cpu1 - cpu0) / len(results),
        "worker_main_process_cpu_ms_per_frame": 1000 * (main1 - main0) / len(results),
        "redis_cpu_ms_per_frame": 1000 * (rcpu1 - rcpu0) / len(results),
        "worker_minor_faults_per_frame": (faults1 - faults0) / len(results),
        "worker_main_process_minor_faults_per_frame": (main_faults1 - main_faults0) / len(results),
        "stages_ms_per_frame": stages,
        "worker_gc": gc,
        "worker_peak_rss_mb": rss,
        "frame_bytes_median": int(np.median([len(p) for _, p in items])),
        "result_bytes_median": int(np.median(result_sizes)),
    }


def sample_stacks(pid: int, out: Path) -> subprocess.Popen | None:
    """py-spy sampling process `pid` (its threads' stacks while they hold the GIL) into `out`; None,
    with a note, where py-spy is not installed (it is not a dependency: `pip install py-spy`)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        print(f"py-spy not found: no profile written to {out}", flush=True)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "100", "--gil", "--threads", "--nonblocking",
         "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1.0)  # attached before the frames arrive
    return spy


def latency_run(url: str, worker_args: list[str], rgbs: list, xyzs: list, n: int, fps: float) -> dict:
    """A producer paced at `fps`; every frame stamped at send time, so latency starts at capture."""
    s, r = open_line(url, "lat")
    worker = WorkerProcess(url, s.line, *worker_args)
    key = s.streams.key(s.line, "frames")
    maker = FrameMaker(rgbs, xyzs, s.line)
    sent: list[float] = []

    def produce() -> None:
        t0 = time.monotonic()
        for i in range(n):
            wait = t0 + i / fps - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            fid = f"lat:{i}"
            r.xadd(key, {F_FRAME_ID: fid.encode(), F_VERSION: b"1", F_PAYLOAD: maker.packed(i, fid)})
        sent.append(time.monotonic() - t0)

    thread = threading.Thread(target=produce)
    thread.start()
    results = [x for _, x in tail_results(r, s.streams.key(s.line, "results"), start="0", count=n, timeout_s=600)]
    thread.join()
    batches, stages = worker.batches(), worker.stages()
    worker.stop()
    close_line(s, r)
    t = [x.timings for x in results]
    lat = np.array([(x.finished_at - x.captured_at) * 1000 for x in t])
    # Where a frame waited: in the stream before the worker read it, or in the worker (batching, stages).
    queued = np.array([(x.started_at - x.captured_at) * 1000 for x in t])
    inside = np.array([(x.finished_at - x.started_at) * 1000 for x in t])
    # One producer thread may not keep up with a fast GPU: the rate it reached is what was offered.
    out = {"fps_asked": fps, "fps_offered": n / sent[0], "frames": len(results), "batches": batches,
           "stages_ms_per_frame": stages}  # fmt: skip
    for name, ms in (("", lat), ("before_read_", queued), ("in_worker_", inside)):
        out[f"{name}p50_ms"], out[f"{name}p99_ms"] = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    return out


def scaling_run(url: str, workers: int, latency_ms: float, batch: int, per_worker_frames: int) -> dict:
    s, r = open_line(url, f"scale{workers}x")
    procs = [
        WorkerProcess(
            url,
            s.line,
            "--stand-in-latency-ms",
            str(latency_ms),
            "--max-batch",
            str(batch),
            "--max-wait-ms",
            "0",
            "--stand-in-category",
            DEMO_CATEGORY,
        )
        for _ in range(workers)
    ]
    n = per_worker_frames * workers
    blank = FrameMaker([np.zeros((32, 32, 3), np.uint8)], [np.zeros((32, 32, 3), np.float32)], s.line)
    fill(r, s.streams.key(s.line, "frames"), payloads(blank, n))
    results = [x for _, x in tail_results(r, s.streams.key(s.line, "results"), start="0", count=n, timeout_s=600)]
    for p in procs:
        p.stop()
    close_line(s, r)
    fps = len(results) / (max(x.timings.finished_at for x in results) - min(x.timings.started_at for x in results))
    ideal = workers * batch / (latency_ms / 1000.0)
    return {"workers": workers, "frames": len(results), "fps": fps, "ideal_fps": ideal, "efficiency": fps / ideal}


# -- main ------------------------------------------------------------------------------------------------------


STARTED = time.monotonic()


def report(side: int, what: str, value: object, out: dict, path: str) -> None:
    """One step's figures as they come, with the seconds since start, and everything so far to `path`:
    a time-boxed run (a lent GPU) keeps what it measured."""
    print(f"{side} {what}: {value}  [{time.monotonic() - STARTED:.0f} s]", flush=True)
    save(out, path)


def save(out: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 800])
    ap.add_argument("--checkpoint", default=None, help="default: the demo model (trained if missing)")
    ap.add_argument("--data", default=None, help="with --checkpoint: holds disc/test (default: the demo's)")
    ap.add_argument("--decode-threads", type=int, default=2)
    ap.add_argument("--decode-processes", type=int, default=None, help="the worker's (default: its own default)")
    ap.add_argument("--also-threads", action="store_true", help="also run the pipeline with threads decoding")
    ap.add_argument("--processes-per-device", type=int, nargs="*", default=[], metavar="N",
                    help="also the pipeline with N worker processes on the device")  # fmt: skip
    ap.add_argument("--buckets", default=None, help="batch shapes, e.g. 64 (default: powers of two up to --batch)")
    ap.add_argument("--max-wait-ms", type=int, default=20)
    ap.add_argument("--latency-loads", type=float, nargs="+", default=[0.5, 0.9], help="shares of the capacity")
    ap.add_argument("--scaling", action="store_true", help="also measure queueing with 1-8 stand-in workers")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--profile-worker", metavar="DIR",
                    help="py-spy the worker during each pipeline run: DIR/pyspy-pipeline-<side>.txt")  # fmt: skip
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "throughput.json"))
    a = ap.parse_args()

    if a.checkpoint and a.data:
        data, ckpt = Path(a.data), Path(a.checkpoint)
    else:
        data, ckpt = ensure_demo_model(ROOT / "runs" / "demo")
        ckpt = Path(a.checkpoint) if a.checkpoint else ckpt
    samples = list_samples(data, DEMO_CATEGORY, "test")
    base = [(read_rgb(s.rgb_path), read_xyz(s.xyz_path)) for s in samples]
    buckets = [int(x) for x in a.buckets.split(",")] if a.buckets else None
    t0 = time.perf_counter()
    inspector = Inspector(ckpt, max_batch=a.batch, buckets=buckets)
    inspector.warmup()
    warmup_s = time.perf_counter() - t0
    print(f"inspector ready in {warmup_s:.1f} s on {inspector.device}", flush=True)
    out: dict = {
        "machine": machine(),
        "device": str(inspector.device),
        "model_id": inspector.model_id,
        "image_size": inspector.config.image_size,
        "args": {
            "frames": a.frames,
            "batch": a.batch,
            "decode_threads": a.decode_threads,
            "decode_processes": a.decode_processes,
            "buckets": list(inspector.buckets),
            "max_wait_ms": a.max_wait_ms,
        },
        "bf16": inspector._bf16,
        "compiled": inspector._compiled,
        "warmup_s": warmup_s,
        "sizes": {},
    }
    common = ["--model", f"{DEMO_CATEGORY}={ckpt}", "--max-batch", str(a.batch), "--max-wait-ms", str(a.max_wait_ms),
              "--decode-threads", str(a.decode_threads)]  # fmt: skip
    if buckets:
        common += ["--batch-buckets", a.buckets]
    if a.decode_processes is not None:
        common += ["--decode-processes", str(a.decode_processes)]
    with redis_server_url() as url:
        for side in a.sizes:
            pairs = [enlarge(rgb, xyz, side) for rgb, xyz in base]
            chosen = repeated(pairs, a.frames)
            rgbs, xyzs = [p[0] for p in chosen], [p[1] for p in chosen]
            row: dict = {"in_process": in_process(inspector, rgbs, xyzs, a.batch)}
            out["sizes"][str(side)] = row
            if inspector._bf16 or inspector._compiled:
                reference = Inspector(ckpt, inspector.device, bf16=False, compile=False, buckets=())
                n = min(len(rgbs), 256)  # distinct frames repeat; a few batches say it
                row["in_process"]["fast_vs_fp32"] = agreement(inspector, reference, rgbs[:n], xyzs[:n], a.batch)
                del reference
            report(side, "in process", row["in_process"], out, a.json)
            row["data_path"] = drain_run(url, [*common, "--null-model"], rgbs, xyzs, a.frames)
            report(side, "data path", row["data_path"], out, a.json)
            profile = Path(a.profile_worker) / f"pyspy-pipeline-{side}.txt" if a.profile_worker else None
            row["pipeline"] = drain_run(url, common, rgbs, xyzs, a.frames, profile)
            report(side, "pipeline", row["pipeline"], out, a.json)
            row["latency"] = [
                latency_run(url, common, rgbs, xyzs, a.frames, share * row["pipeline"]["fps"])
                for share in a.latency_loads
            ]
            report(side, "latency", row["latency"], out, a.json)
            if a.also_threads:
                row["pipeline_threads"] = drain_run(url, [*common, "--decode-processes", "0"], rgbs, xyzs, a.frames)
                report(side, "pipeline, threads decoding", row["pipeline_threads"], out, a.json)
            for n in a.processes_per_device:
                # A supervisor and n workers: CPU counts them all, stages are summed over the workers (the
                # supervisor's /metrics carries theirs), and "main process" is the supervisor's.
                run = drain_run(url, [*common, "--processes-per-device", str(n)], rgbs, xyzs, a.frames)
                row.setdefault("pipeline_per_device", {})[str(n)] = run
                report(side, f"pipeline, {n} worker processes on the device", run, out, a.json)
        if a.scaling:
            out["scaling"] = [scaling_run(url, w, 100.0, a.batch, 24 * a.batch) for w in (1, 2, 4, 8)]
    save(out, a.json)
    text = render(out)
    print(text)
    if not a.no_write:
        write_section("throughput", text)
    return 0


def _main(run: dict) -> str:
    main = run.get("worker_main_process_cpu_ms_per_frame")
    return "" if main is None else f" ({main:.2f})"


def _split(x: dict) -> str:
    """p99 before the worker read the frame / inside the worker (runs before 2026-11-28 lack it)."""
    if "in_worker_p99_ms" not in x:
        return ""
    text = f"; p99 {x['before_read_p99_ms']:.0f} ms in the stream, {x['in_worker_p99_ms']:.0f} in the worker"
    b = x.get("batches", {})
    if b.get("batches"):
        text += f"; batches of {b['mean_frames']:.1f} frames, {1000 * b['mean_device_s']:.0f} ms each"
    return text


def _processes(n: int | None) -> str:
    return "the worker's default (processes on a GPU, none on a CPU)" if n is None else str(n)


def render(out: dict) -> str:
    b = out["args"]["batch"]
    lines = [
        "## Throughput (`bench/throughput.py`)",
        "",
        f"Machine: {out['machine']}; device `{out['device']}`; model `{out['model_id']}` at "
        f"{out['image_size']} px; batch {b}; {out['args']['frames']} frames per run, "
        f"{out['args']['decode_threads']} decode threads, decode processes "
        f"{_processes(out['args'].get('decode_processes'))}. One run; rates are medians of 3 passes in process.",
        f"Model path: {'bf16' if out.get('bf16') else 'fp32'}, {'compiled' if out.get('compiled') else 'eager'}, "
        f"batch shapes {out['args'].get('buckets') or 'unpadded'}, "
        f"ready after {out.get('warmup_s', float('nan')):.0f} s "
        f"of warm-up; worker `max_wait_ms` {out['args'].get('max_wait_ms', 20)}.",
        "",
        "| frame size | model alone | `infer()` on prepared | `inspect()` | data path alone (null model) | "
        "pipeline through Redis | pipeline / `inspect()` | pipeline / model alone |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side, row in out["sizes"].items():
        ip, dp, pp = row["in_process"], row["data_path"], row["pipeline"]
        lines.append(
            f"| {side}x{side} | {ip['model_alone_fps']:.1f} | {ip['infer_prepared_fps']:.1f} | "
            f"{ip['inspect_fps']:.1f} | {dp['fps']:.1f} | {pp['fps']:.1f} | "
            f"**{pp['fps'] / ip['inspect_fps']:.2f}** | {pp['fps'] / ip['model_alone_fps']:.2f} |"
        )
    lines += ["", "frames/s."]
    for side, row in out["sizes"].items():
        if "pipeline_threads" in row:
            pp, pt = row["pipeline"]["fps"], row["pipeline_threads"]["fps"]
            lines.append(f"{side}x{side}: the pipeline with threads decoding (`--decode-processes 0`) "
                         f"{pt:.1f} frames/s; processes / threads {pp / pt:.2f}.")  # fmt: skip
    for side, row in out["sizes"].items():
        one = row["pipeline"]["fps"]
        for n, run in row.get("pipeline_per_device", {}).items():
            lines.append(f"{side}x{side}: {n} worker processes on the device (`--processes-per-device {n}`) "
                         f"{run['fps']:.1f} frames/s, {run['fps'] / one:.2f}x one process, "
                         f"{run['fps'] / row['in_process']['model_alone_fps']:.2f} of the model alone; "
                         f"{run['worker_cpu_ms_per_frame']:.2f} ms of CPU per frame in all.")  # fmt: skip
    lines += ["", "Per frame, per stage, in the worker (ms; CPU = the stage's own thread time, in whichever process "
              "ran it):", ""]  # fmt: skip
    sides = list(out["sizes"])
    head = "| stage | " + " | ".join(f"{s} CPU | {s} wall" for s in sides) + " |"
    lines += [head, "|---|" + "---|---|" * len(sides)]
    for st in STAGES:
        cells = []
        for side in sides:
            v = out["sizes"][side]["pipeline"]["stages_ms_per_frame"].get(st)
            cells.append(f"{v['cpu']:.2f} | {v['wall']:.2f}" if v else "- | -")
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Worker CPU counts the worker's decode processes too (the worker process alone in brackets); peak "
        "RSS adds up each process's own peak.",
        "",
        "| frame size | worker CPU/frame, null model | worker CPU/frame, model | Redis CPU/frame | bytes/frame | "
        "bytes/result | worker peak RSS | latency p50/p99 (load offered) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side, row in out["sizes"].items():
        dp, pp = row["data_path"], row["pipeline"]
        latency = "; ".join(
            f"at {100 * x['fps_asked'] / pp['fps']:.0f} %: {x['p50_ms']:.0f} / {x['p99_ms']:.0f} ms "
            f"({x['fps_offered']:.1f}/s{_split(x)})"
            for x in row["latency"]
        )
        lines.append(
            f"| {side}x{side} | **{dp['worker_cpu_ms_per_frame']:.2f} ms**{_main(dp)} | "
            f"{pp['worker_cpu_ms_per_frame']:.2f} ms{_main(pp)} | "
            f"{pp['redis_cpu_ms_per_frame']:.3f} ms | {pp['frame_bytes_median']:,} | {pp['result_bytes_median']:,} | "
            f"{pp['worker_peak_rss_mb']:.0f} MiB | {latency} |"
        )
    lines += ["", "Latency target (p99 at 50 % load <= `max_wait_ms` + 2 x one batch's model time), and the serving "
              "path's scores against fp32 eager on the same frames:", "",
              "| frame size | p99 at 50 % | bound | fast path: max score error / threshold | verdicts differing |",
              "|---|---|---|---|---|"]  # fmt: skip
    for side, row in out["sizes"].items():
        ip, l50 = row["in_process"], row["latency"][0]
        bound = out["args"].get("max_wait_ms", 20) + 2000 * b / ip["model_alone_fps"]
        agree = ip.get("fast_vs_fp32")
        cells = "- (fp32 eager) | -"
        if agree:
            err = agree["max_abs_score_error_over_threshold"]
            cells = f"{err:.4f} | {agree['verdicts_differing']} of {agree['frames']}"
        lines.append(f"| {side}x{side} | {l50['p99_ms']:.0f} ms | {bound:.0f} ms | {cells} |")
    if "scaling" in out:
        lines += ["", "Queueing with a labelled 100 ms stand-in model (no compute), pre-filled stream:", "",
                  "| workers | frames/s | ideal | efficiency |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {x['workers']} | {x['fps']:.1f} | {x['ideal_fps']:.1f} | {x['efficiency']:.2f} |"
                  for x in out["scaling"]]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
