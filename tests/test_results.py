"""`crd results` and the tail helper, against a real server."""

from __future__ import annotations

import threading
import time

import numpy as np

from crd_model.cli import main
from crd_model.stream.redis_streams import F_PAYLOAD, ensure_group
from crd_model.stream.results import format_result, latency_ms, tail_results
from producers.producer import Producer
from producers.sources import SourceFrame
from workers.models import ModelRegistry, StandInInspector
from workers.worker import Worker


def _run_line(settings, r, n: int, bad: int = 0) -> None:
    s = settings.model_copy(
        update={
            "producer": settings.producer.model_copy(update={"fps": 1000.0}),
            "worker": settings.worker.model_copy(update={"block_ms": 100, "max_wait_ms": 5}),
        }
    )
    rgb = np.zeros((24, 24, 3), np.uint8)
    xyz = np.zeros((24, 24, 3), np.float32)
    Producer(s, camera="c", r=r).run([SourceFrame(rgb, xyz, "disc", {"serial": f"S{i}"}) for i in range(n)])
    frames_key = s.streams.key(s.line, "frames")
    for i in range(bad):
        r.xadd(frames_key, {b"frame_id": f"broken{i}".encode(), F_PAYLOAD: b"\x01\x02"})
    Worker(s, ModelRegistry({"disc": StandInInspector(1)}), r=r).run(max_frames=n + bad, idle_exit_s=3)


def test_tail_from_start_and_live(settings, r):
    _run_line(settings, r, 3, bad=1)
    key = settings.streams.key(settings.line, "results")
    got = list(tail_results(r, key, start="0", count=4, timeout_s=5))
    assert len(got) == 4
    results = [x for _, x in got]
    assert [x.meta.get("serial") for x in results[:3]] == ["S0", "S1", "S2"]  # frame meta echoed back
    assert results[3].verdict == "error" and results[3].frame_id == "broken0"
    assert all(latency_ms(x) is None or latency_ms(x) >= 0 for x in results)
    assert "ERROR" in format_result(results[3]) and "bad_msgpack" in format_result(results[3])
    # '$' only sees results published after the tail started.
    live: list = []
    t = threading.Thread(target=lambda: live.extend(tail_results(r, key, start="$", count=2, timeout_s=10)))
    t.start()
    time.sleep(0.3)
    _run_line(settings, r, 2)
    t.join(timeout=15)
    assert len(live) == 2


def test_results_command_prints_one_line_per_result(settings, r, capsys, monkeypatch):
    _run_line(settings, r, 2)
    capsys.readouterr()  # drop the worker's own logs
    monkeypatch.setenv("REDIS_URL", settings.redis.url)
    monkeypatch.delenv("CRD_REDIS__URL", raising=False)
    code = main(
        ["results", "--line", settings.line, "--from-start", "--count", "2", "--timeout-s", "5", "--plain-logs"]
    )
    assert code == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("#")]
    assert len(lines) == 2 and all(" ok " in x for x in lines)


def test_group_is_ready_for_consumers_without_a_producer(settings, r):
    key = settings.streams.key(settings.line, "frames")
    ensure_group(r, key, settings.streams.group)
    assert r.xlen(key) == 0
