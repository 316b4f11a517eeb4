"""Redis memory per line, measured on a local 3-master Redis Cluster: what the retention policy costs.

    .venv/bin/python bench/cluster_memory.py [--frames 32] [--result-bytes 12278] [--results 1000]

One line per master. Each line gets, through the service's own code paths:
1. frames: `Producer.send()` of synthetic-camera frames (PNG rgb, zlib float32 xyz, as in production),
   read by a consumer group and left pending (what the frames stream holds under backpressure);
   the producer's state hash comes with them;
2. results: the publish-and-ack script (`Publisher`), `--results` of them, each payload
   `--result-bytes` long (default: the median measured by bench/throughput.py with the real model,
   a png8 map of <= 256 px plus regions; Redis stores bytes as they are, so only the size matters),
   and with them the frame ids in the dedup set (`<prefix>:{line}:published`);
3. dead letters: the same script with `MAXLEN ~ 100`, each carrying its whole frame, as they do.
Then `MEMORY USAGE <key> SAMPLES 0` per key and `INFO memory` per master before and after, and the
memory per line under the retention policies of docs/deploy.md ("Retention").
Needs redis-server + redis-cli on the PATH. Prints a report; writes bench/results/cluster_memory.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, machine
from crd_model.stream.local_cluster import LocalCluster, line_in_slot
from crd_model.stream.logs import configure_logging
from crd_model.stream.redis_streams import connect, ensure_group
from crd_model.stream.settings import RedisSettings, Settings, StreamSettings
from producers.producer import Producer
from producers.sources import SourceFrame, SyntheticSource
from workers.publish import Outcome, Publisher

MiB = 1024 * 1024


def used_memory(cluster: LocalCluster) -> dict[int, int]:
    return {n.port: int(cluster.client(n).info("memory")["used_memory"]) for n in cluster.nodes}


def fill_line(
    settings: Settings, frames: list[SourceFrame], n_results: int, result_bytes: int, n_dead: int
) -> dict[str, int]:
    """Frames left pending, results with their dedup entries, dead letters trimmed by MAXLEN ~."""
    r = connect(settings.redis)
    s = settings.streams
    frames_key = s.key(settings.line, "frames")
    ensure_group(r, frames_key, s.group)
    producer = Producer(settings, camera="cam1", r=r)
    payload_sizes = []
    for sf in frames:
        producer.send(sf)
    for _, fields in r.xrange(frames_key):
        payload_sizes.append(len(fields[b"payload"]))
    original = r.xrange(frames_key, count=1)[0][1][b"payload"]
    # Deliver everything to a worker that has not acknowledged yet: each frame also has a PEL entry.
    r.xreadgroup(s.group, "w1", {frames_key: ">"}, count=len(frames))
    # Results and dead letters: claim-free stand-ins for acknowledged frames. The script publishes an
    # entry only while its frame is pending for the worker, so re-add one pending entry per batch.
    publisher = Publisher(r, s, settings.line, s.group, "w1")
    result = b"r" * result_bytes
    batch = 50
    done_results = done_dead = 0
    while done_results < n_results or done_dead < n_dead:
        n = min(batch, max(n_results - done_results, n_dead - done_dead))
        ids = [r.xadd(frames_key, {b"frame_id": b"filler", b"payload": b""}).decode() for _ in range(n)]
        r.xreadgroup(s.group, "w1", {frames_key: ">"}, count=n)
        outcomes = []
        for i, entry_id in enumerate(ids):
            dead = done_dead + i < n_dead
            outcomes.append(
                Outcome(
                    entry_id,
                    f"cam1:{producer.boot}:{len(frames) + done_results + i}",  # ids as producers make them
                    "error" if dead else "ok",
                    result,
                    dead_reason="bad_rgb" if dead else "",
                    dead_message="measured" if dead else "",
                    original_payload=original if dead else b"",
                )
            )
        publisher.publish(outcomes)
        r.xdel(frames_key, *ids)  # acknowledged and trimmed, as the workers' MINID trimming would
        done_results += n
        done_dead += n
    return {
        "frame_payload_bytes_median": sorted(payload_sizes)[len(payload_sizes) // 2],
        "dead_payload_bytes": len(original),
    }


def measure(args: argparse.Namespace) -> dict:
    source = iter(SyntheticSource("disc", seed=7, anomaly_rate=0.2))
    frames = [next(source) for _ in range(args.frames)]
    report: dict = {"machine": machine(), "frames_per_line": args.frames, "result_bytes": args.result_bytes}
    with tempfile.TemporaryDirectory() as tmp, LocalCluster(Path(tmp), masters=3) as cluster:
        report["server"] = cluster.client(cluster.nodes[0]).info("server")["redis_version"]
        before = used_memory(cluster)
        streams = StreamSettings(results_maxlen=1000, dead_maxlen=100)
        lines = []
        for i, node in enumerate(cluster.nodes):
            line = line_in_slot(sorted(node.slots)[len(node.slots) // 2], f"mem{i}")
            s = Settings(line=line)
            s = s.model_copy(
                update={
                    "redis": RedisSettings(url=cluster.url, cluster=True),
                    "streams": streams,
                    "producer": s.producer.model_copy(update={"fps": 1000.0}),
                }
            )
            sizes = fill_line(s, frames, args.results, args.result_bytes, args.dead)
            r = connect(s.redis)
            per_stream = {}
            for kind in ("frames", "results", "dead"):
                key = streams.key(line, kind)
                usage = int(r.memory_usage(key, samples=0))
                length = int(r.xlen(key))
                per_stream[kind] = {"entries": length, "bytes": usage, "bytes_per_entry": round(usage / length)}
            published = streams.key(line, "published")
            usage, members = int(r.memory_usage(published, samples=0)), int(r.zcard(published))
            per_stream["published"] = {"entries": members, "bytes": usage, "bytes_per_entry": round(usage / members)}
            sizes["producer_state_bytes"] = int(r.memory_usage(streams.producer_key(line, "cam1"), samples=0))
            lines.append({"line": line, "port": node.port, **sizes, "streams": per_stream})
        time.sleep(0.2)
        after = used_memory(cluster)
        report["lines"] = lines
        report["used_memory_delta_per_master"] = {str(p): after[p] - before[p] for p in after}
    return report


FPS = 15
# Frames a line's stream holds at most: the unfinished ones (lag + pending), which producers keep
# under CRD_PRODUCER__MAX_OUTSTANDING, plus those acknowledged since the workers' last MINID trim
# (fps x CRD_STREAMS__FRAMES_TRIM_EVERY_S). For the base: 200 + 15 fps x 5 s.
FRAMES_HELD = 200 + FPS * 5
# Frame ids in the dedup set: fps x CRD_STREAMS__DEDUP_WINDOW_S (900 s).
DEDUP_HELD = FPS * 900
# (name, results held, DEAD_MAXLEN). Results (docs/deploy.md, "Retention"): without a consumer group
# on the results stream, MAXLEN ~ RESULTS_MAXLEN; with one (the PLC bridge of the base), everything
# newer than RESULTS_RETAIN_S (3600 s x fps), and at most RESULTS_HARD_MAXLEN while a group lags.
POLICIES = (
    ("no group on results, code defaults (RESULTS_MAXLEN 10 000, DEAD_MAXLEN 1 000)", 10_000, 1_000),
    ("no group on results, deploy/k8s values (RESULTS_MAXLEN 20 000, DEAD_MAXLEN 200)", 20_000, 200),
    ("a PLC bridge group, steady (RESULTS_RETAIN_S 3600 s at 15 fps, DEAD_MAXLEN 200)", 3600 * FPS, 200),
    ("a PLC bridge group lagging: the bound (RESULTS_HARD_MAXLEN 100 000, DEAD_MAXLEN 200)", 100_000, 200),
)


def per_entry(report: dict, kind: str) -> float:
    """Measured bytes per entry of a key kind, averaged over the lines."""
    return sum(x["streams"][kind]["bytes_per_entry"] for x in report["lines"]) / len(report["lines"])


def retention(report: dict) -> list[dict]:
    frame, result, dead, dedup = (per_entry(report, k) for k in ("frames", "results", "dead", "published"))
    return [
        {
            "policy": name,
            "frames": (FRAMES_HELD, FRAMES_HELD * frame),
            "results": (results, results * result),
            "dead": (dead_n, dead_n * dead),
            "published": (DEDUP_HELD, DEDUP_HELD * dedup),
            "total": FRAMES_HELD * frame + results * result + dead_n * dead + DEDUP_HELD * dedup,
        }
        for name, results, dead_n in POLICIES
    ]


def render(report: dict) -> str:
    out = [f"server: Redis {report['server']}, 3 masters; {report['machine']}", ""]
    out.append("| line (master) | key | entries | MEMORY USAGE | bytes per entry | payload bytes |")
    out.append("|---|---|---|---|---|---|")
    for x in report["lines"]:
        payloads = {"frames": x["frame_payload_bytes_median"], "results": report["result_bytes"]}
        payloads |= {"dead": x["dead_payload_bytes"], "published": len("cam1:1795714912295:1234")}
        for kind, st in x["streams"].items():
            out.append(
                f"| {x['line']} (:{x['port']}) | {kind} | {st['entries']} | {st['bytes'] / MiB:.2f} MiB "
                f"| {st['bytes_per_entry']:,} | {payloads[kind]:,} |"
            )
    deltas = ", ".join(f"{v / MiB:.1f} MiB" for v in report["used_memory_delta_per_master"].values())
    most_dead = max(x["streams"]["dead"]["entries"] for x in report["lines"])
    state = max(x["producer_state_bytes"] for x in report["lines"])
    out += [
        "",
        f"INFO memory used_memory grew by {deltas} on the three masters (one line each).",
        f"MAXLEN ~ 100 kept at most {most_dead} dead letters; a producer's state hash: {state} bytes.",
        "",
        f"Per line at {FPS} fps: {FRAMES_HELD} frames held, {DEDUP_HELD:,} frame ids in the dedup set.",
        "",
        "| retention | frames | results | dead letters | dedup set | per line |",
        "|---|---|---|---|---|---|",
    ]
    rows = retention(report)
    for row in rows:
        cells = [f"{n:,} x {b / n / 1024:.1f} KiB = {b / MiB:,.0f} MiB" for n, b in (row[k] for k in
                 ("frames", "results", "dead"))]  # fmt: skip
        dedup_n, dedup_b = row["published"]
        cells.append(f"{dedup_n:,} x {dedup_b / dedup_n:.0f} B = {dedup_b / MiB:,.1f} MiB")
        out.append(f"| {row['policy']} | {' | '.join(cells)} | **{row['total'] / MiB:,.0f} MiB** |")
    bound = rows[-1]["total"]
    out.append(
        f"\nLines per master with maxmemory 8 GiB (deploy/redis/redis.conf), sized for the bound: "
        f"{math.floor(8 * 1024 * MiB / bound)} ({bound / MiB:,.0f} MiB each)."
    )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=32, help="synthetic frames per line, left pending")
    ap.add_argument("--result-bytes", type=int, default=12_278, help="result payload size (bench/throughput.py)")
    ap.add_argument("--results", type=int, default=1_000, help="results published per line")
    ap.add_argument("--dead", type=int, default=110, help="dead letters per line, MAXLEN ~ 100")
    args = ap.parse_args()
    configure_logging(level="WARNING")
    report = measure(args)
    report["retention"] = retention(report)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "cluster_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))


if __name__ == "__main__":
    main()
