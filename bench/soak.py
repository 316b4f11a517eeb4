"""Soak: a bounded run at a fixed rate with faults injected now and then (not a test).

    .venv/bin/python bench/soak.py [--minutes 10] [--fps 8] [--fault-every-s 30]

The harness of bench/faults.py (own server with AOF, producers that log what was confirmed, workers
with a labelled 5 ms stand-in model), run for `--minutes` with one random fault every
`--fault-every-s`. Every 10 s it samples each process's resident memory (VmRSS) and, from the
results, capture -> result latency. Reports resident-memory growth of the processes that lived
through the whole run, latency p50/p99 of the first and the last minute, and lost/doubled frames.
Writes BENCHMARKS.md (section "soak") and bench/results/soak.json unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.faults import FAULTS, ROOT, Harness, ok


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class Soak(Harness):
    def _run(self) -> dict:
        from crd_model.stream import unpack_result

        t0 = self.start_all()
        end = t0 + 60 * self.a.minutes
        next_fault = time.time() + self.a.fault_every_s
        memory: dict[str, list[tuple[float, float]]] = {}
        while time.time() < end:
            time.sleep(10)
            for name, proc in [*self.workers.items(), *self.producers.items()]:
                mb = rss_mb(proc.pid)
                if mb is not None:
                    memory.setdefault(f"{name}:{proc.pid}", []).append((time.time() - t0, mb))
            if time.time() >= next_fault:
                self.inject(self.rng.choice(FAULTS))
                next_fault = time.time() + self.a.fault_every_s
            self.check_processes()
        self.stop_producers()
        self.drain()
        self.stop_workers()
        report = self.check()
        lat = []
        for _, f in self.r.xrange(self.keys["results"]):
            res = unpack_result(f[b"payload"])
            if res.timings.captured_at is not None and res.timings.finished_at is not None:
                lat.append((res.timings.captured_at - t0, 1000 * (res.timings.finished_at - res.timings.captured_at)))
        first = [ms for t, ms in lat if t < 60]
        last = [ms for t, ms in lat if t > 60 * (self.a.minutes - 1)]
        whole = {k: v for k, v in memory.items() if v[0][0] < 20 and v[-1][0] > 60 * self.a.minutes - 20}
        report.update({
            "seconds": round(time.time() - t0, 1),
            "latency_first_minute_ms": {"p50": float(np.percentile(first, 50)), "p99": float(np.percentile(first, 99))},
            "latency_last_minute_ms": {"p50": float(np.percentile(last, 50)), "p99": float(np.percentile(last, 99))},
            "rss_growth_mb": {k: round(v[-1][1] - v[0][1], 1) for k, v in whole.items()},
            "rss_start_mb": {k: round(v[0][1], 1) for k, v in whole.items()},
        })  # fmt: skip
        return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fps", type=float, default=8.0, help="per producer")
    ap.add_argument("--fault-every-s", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="crd-soak-"))
    try:
        report = Soak(a, workdir).run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["verdict"] = "PASS" if ok(report) else "FAIL"
    print(json.dumps(report, indent=2))
    if not a.no_write:
        from bench.common import machine, write_section

        (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
        (ROOT / "bench" / "results" / "soak.json").write_text(json.dumps({"machine": machine(), **report}, indent=2))
        growth = report["rss_growth_mb"]
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(report["faults"].items()))
        lf, ll = report["latency_first_minute_ms"], report["latency_last_minute_ms"]
        write_section(
            "soak",
            "\n".join([
                "## Soak (`bench/soak.py`)",
                "",
                f"Machine: {machine()}. {a.minutes:g} minutes, {a.producers} producers at {a.fps:g} fps, {a.workers} "
                f"workers (labelled 5 ms stand-in model), one random fault every {a.fault_every_s:g} s "
                f"({report['faults_total']} in all: {kinds}).",
                "",
                "| frames confirmed | lost | doubled | latency p50/p99, first minute | last minute | "
                "RSS growth of processes that lived through the run | verdict |",
                "|---|---|---|---|---|---|---|",
                f"| {report['frames_confirmed']:,} | {report['lost_count']} | {report['doubled_count']} | "
                f"{lf['p50']:.0f} / {lf['p99']:.0f} ms | {ll['p50']:.0f} / {ll['p99']:.0f} ms | "
                + (", ".join(f"{k.split(':')[0]} {v:+.1f} MiB" for k, v in growth.items()) or "none lived through")
                + f" | **{report['verdict']}** |",
            ]),
        )  # fmt: skip
    return 0 if ok(report) else 1


if __name__ == "__main__":
    sys.exit(main())
