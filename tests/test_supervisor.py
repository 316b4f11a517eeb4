"""`crd work --devices`: one worker process per device under a supervisor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crd_model.stream import unpack_result
from crd_model.stream.redis_streams import F_PAYLOAD, ensure_group
from producers.producer import Producer
from producers.sources import SourceFrame
from tests.plc_sims import free_port
from workers.supervisor import _without, resolve_devices


@pytest.mark.parametrize(
    "placement, placement_env",
    [
        (["--devices", "cpu,cpu"], {}),
        (["--device", "cpu", "--processes-per-device", "2"], {}),
        # from the environment, which the children inherit: each must still be one worker, not a supervisor
        ([], {"CRD_WORKER__DEVICE": "cpu", "CRD_WORKER__PROCESSES_PER_DEVICE": "2"}),
    ],
    ids=["one-per-device", "two-on-one-device", "two-on-one-device-from-env"],
)
def test_workers_under_a_supervisor_share_the_line(settings, r, placement, placement_env):
    ensure_group(r, settings.streams.key(settings.line, "frames"), settings.streams.group)
    port = free_port()
    env = dict(os.environ, REDIS_URL=settings.redis.url, CRD_LINE=settings.line, PYTHONUNBUFFERED="1", **placement_env)
    env.pop("CRD_REDIS__URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "crd_model.cli", "work", *placement, "--consumer", "node7",
         "--stand-in-latency-ms", "20", "--max-wait-ms", "5", "--metrics-port", str(port), "--plain-logs"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and not ready:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
                    ready = resp.status == 200
            except OSError:
                time.sleep(0.3)
        assert ready, "the supervisor never reported both workers ready"
        consumers = {c["name"].decode() for c in r.xinfo_consumers(settings.streams.key(settings.line, "frames"),
                                                                    settings.streams.group)}  # fmt: skip
        assert consumers == {"node7-0", "node7-1"}
        producer = Producer(settings, camera="c", r=r)
        rgb, xyz = np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.float32)
        sent = [producer.send(SourceFrame(rgb, xyz, "disc")) for _ in range(40)]
        key = settings.streams.key(settings.line, "results")
        while r.xlen(key) < 40 and time.monotonic() < deadline:
            time.sleep(0.1)
        results = [unpack_result(f[F_PAYLOAD]) for _, f in r.xrange(key)]
        assert sorted(x.frame_id for x in results) == sorted(sent)
        assert {x.worker for x in results} == {"node7-0", "node7-1"}  # both devices did work
        # The supervisor's one metrics port carries each worker's own metrics, labelled with its name.
        per_worker = {w: sum(1 for x in results if x.worker == w) for w in ("node7-0", "node7-1")}
        while (seen := _frames_by_worker(port)) != per_worker and time.monotonic() < deadline:
            time.sleep(0.2)
        assert seen == per_worker
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    assert "cpu_workers_share_the_cores" in out  # two CPU workers: told they compete for the cores


def _frames_by_worker(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    seen: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for x in fam.samples:
            if x.name == "crd_worker_frames_total":
                seen[x.labels["worker"]] = seen.get(x.labels["worker"], 0.0) + x.value
    return seen


def test_children_get_the_command_line_without_the_supervisors_own_flags():
    argv = ["--devices", "all", "--model", "disc=/m", "--consumer=n", "--metrics-port", "9102", "--max-batch", "8"]
    assert _without(argv, ("--devices", "--consumer", "--metrics-port")) == ["--model", "disc=/m", "--max-batch", "8"]


def test_several_processes_per_device_name_each_device_that_often():
    assert resolve_devices(["cuda:0", "cuda:1"], 3) == ["cuda:0"] * 3 + ["cuda:1"] * 3
    assert resolve_devices(["cpu"]) == ["cpu"]


def test_gpu_workers_under_a_supervisor_share_the_hosts_cores_for_decoding(settings):
    from workers.hostpool import default_processes
    from workers.supervisor import Supervisor

    sup = Supervisor(settings, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"], ["--model", "disc=/m"])
    shares = [c.argv[c.argv.index("--decode-processes") + 1] for c in sup.children]
    assert shares == [str(default_processes(4))] * 4
    assert default_processes(4) <= max(1, default_processes(1) // 4 + 1)
    explicit = settings.model_copy(update={"worker": settings.worker.model_copy(update={"decode_processes": 5})})
    sup = Supervisor(explicit, ["cuda:0", "cuda:1"], ["--model", "disc=/m", "--decode-processes", "5"])
    assert all(c.argv.count("--decode-processes") == 1 for c in sup.children)  # the operator's own, once
    sup = Supervisor(settings, ["cpu"], ["--model", "disc=/m"])
    assert "--decode-processes" not in sup.children[0].argv  # a CPU worker decodes in threads
