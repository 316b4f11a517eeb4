"""One worker per device on a node with several GPUs: `crd work --devices all` (or `cuda:0,cuda:1`),
and several per device with `--processes-per-device N`.

The supervisor starts one `crd work` process per device (or N each), each pinned to its device, with its own
consumer name (`<consumer>-<index>`) and, when a metrics port is set, its own port (`port + 1 +
index`). Separate processes keep each GPU's worker independent (its own CUDA context, allocator,
compiled graphs and GIL), which is how a CUDA application scales over devices; one process feeding
several GPUs would share one GIL between their host-side stages. The supervisor restarts a child
that dies (with backoff), forwards SIGTERM so every child drains, and serves its own `/healthz`
(alive) and `/readyz` (every child ready) on the metrics port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence

import structlog
from prometheus_client import Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from crd_model.stream.daemon import Daemon
from crd_model.stream.redis_streams import Backoff
from crd_model.stream.settings import Settings
from workers.hostpool import default_processes

log = structlog.get_logger("crd.supervisor")


def resolve_devices(devices: Sequence[str], per_device: int = 1) -> list[str]:
    """`all` -> every visible CUDA device (or the CPU if there is none); else the list as given. Each
    device is named `per_device` times: one worker process per entry."""
    if list(devices) == ["all"]:
        import torch

        n = torch.cuda.device_count()
        devices = [f"cuda:{i}" for i in range(n)] if n else ["cpu"]
    return [d for d in devices for _ in range(per_device)]


class Child:
    def __init__(self, index: int, device: str, argv: list[str], port: int | None, consumer: str):
        self.index, self.device, self.argv, self.port, self.consumer = index, device, argv, port, consumer
        self.proc: subprocess.Popen | None = None
        self.backoff = Backoff(base=1.0, cap=30.0)
        self.started_at = 0.0

    def start(self) -> None:
        # CRD_WORKER__DEVICES cleared: a child is one device's worker, never a supervisor again.
        env = dict(os.environ, CRD_WORKER__DEVICES="[]", CRD_WORKER__PROCESSES_PER_DEVICE="1")
        self.proc = subprocess.Popen(self.argv, env=env)
        self.started_at = time.monotonic()

    def get(self, path: str, timeout: float) -> bytes:
        """GET a path of the child's metrics port (it has one); OSError if it does not answer 2xx."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as resp:
            return resp.read()

    def ready(self) -> bool:
        if self.port is None:
            return self.proc is not None and self.proc.poll() is None
        try:
            self.get("/readyz", timeout=1)
            return True
        except OSError:
            return False


class ChildMetrics:
    """The children's own metrics (`crd_*`) on the supervisor's /metrics, each sample labelled with its
    worker's consumer name: one scrape of the pod's metrics port sees every worker process."""

    def __init__(self, children: Sequence[Child]):
        self.children = children

    def describe(self) -> list[Metric]:
        return []  # names vary with what the children report; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for child in self.children:
            if child.port is None:
                continue
            try:
                text = child.get("/metrics", timeout=2).decode()
            except OSError:
                continue  # starting or restarting: its series are absent from this scrape
            for fam in text_string_to_metric_families(text):
                if not fam.name.startswith("crd_"):
                    continue
                out = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
                for x in fam.samples:
                    out.add_sample(x.name, {**x.labels, "worker": child.consumer}, x.value, x.timestamp, x.exemplar)
        yield from families.values()


class Supervisor(Daemon):
    def __init__(self, settings: Settings, devices: Sequence[str], child_args: list[str]):
        super().__init__(settings.observability, log.bind(devices=list(devices)))
        base_port = settings.observability.http_port
        gpus = sum(1 for d in devices if d.startswith("cuda"))
        # Unset, each GPU worker would take the whole host's cores for its decode processes: share them.
        share = [] if settings.worker.decode_processes is not None or not gpus else [
            "--decode-processes", str(default_processes(gpus))]  # fmt: skip
        self.children = []
        for i, device in enumerate(devices):
            port = None if base_port is None else base_port + 1 + i
            consumer = f"{settings.worker.consumer}-{i}"
            argv = [sys.executable, "-m", "crd_model.cli", "work", *child_args, "--device", device,
                    "--consumer", consumer]  # fmt: skip
            if device.startswith("cuda"):
                argv += share
            if port is not None:
                argv += ["--metrics-port", str(port)]
            self.children.append(Child(i, device, argv, port, consumer))
        self.up = Gauge("crd_supervisor_children_ready", "Worker processes ready (one per device, or N each)",
                        registry=self.registry)  # fmt: skip
        self.restarts = Gauge("crd_supervisor_child_restarts", "Worker processes restarted after dying",
                              registry=self.registry)  # fmt: skip
        self.registry.register(ChildMetrics(self.children))
        cpu_workers = sum(1 for d in devices if d == "cpu")
        if cpu_workers > 1:
            # Each CPU worker's model takes every core: on 2 cores two ran at 0.24x one (docs/deploy.md).
            self.log.warning("cpu_workers_share_the_cores", workers=cpu_workers)

    def reload(self, *_: object) -> None:
        """SIGHUP: each worker re-reads its models file."""
        for child in self.children:
            if child.proc is not None:
                child.proc.send_signal(signal.SIGHUP)

    def run(self) -> int:
        with self.running():
            for child in self.children:
                child.start()
                self.log.info("child_started", index=child.index, device=child.device, pid=child.proc.pid)
            while not self.stopping.is_set():
                self.health.beat()
                ready = 0
                for child in self.children:
                    if child.proc is not None and child.proc.poll() is not None:
                        self.log.error("child_died", index=child.index, device=child.device,
                                       code=child.proc.returncode)  # fmt: skip
                        if time.monotonic() - child.started_at < 60:
                            child.backoff.sleep()  # it died soon after starting: do not spin
                        else:
                            child.backoff.reset()
                        child.start()
                        self.restarts.inc()
                    ready += child.ready()
                self.up.set(ready)
                self.health.set_ready(ready == len(self.children), f"{ready}/{len(self.children)} workers ready")
                self.stopping.wait(1.0)
            self.log.info("stopping_children")
            for child in self.children:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            codes = []
            for child in self.children:
                if child.proc is not None:
                    try:
                        codes.append(child.proc.wait(timeout=120))
                    except subprocess.TimeoutExpired:
                        child.proc.kill()
                        codes.append(child.proc.wait())
        return 0 if all(c == 0 for c in codes) else 1


def supervise(settings: Settings, devices: Sequence[str], argv: Sequence[str]) -> int:
    """Run one worker per device; `argv` is this command line without --devices (children inherit it)."""
    own_flags = ("--devices", "--device", "--consumer", "--metrics-port", "--processes-per-device")
    child_args = _without(list(argv), own_flags)
    sup = Supervisor(settings, devices, child_args)
    sup.install_signal_handlers()
    threading.current_thread().name = "supervisor"
    return sup.run()


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in flags:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out
