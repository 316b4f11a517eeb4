"""A bounded share of bench/faults.py: every kind of fault against real processes and a real server,
then every confirmed frame has exactly one result."""

from __future__ import annotations

import argparse
import shutil

from bench.faults import FAULTS, Harness, ok


def test_every_kind_of_fault_loses_and_doubles_nothing(tmp_path):
    a = argparse.Namespace(faults=2 * len(FAULTS), producers=2, workers=2, fps=5.0, gap_s=0.8, seed=1)
    report = Harness(a, tmp_path).run()
    print(report)
    assert set(report["faults"]) == set(FAULTS)
    assert report["frames_confirmed"] >= 50
    assert report["lost_count"] == 0, report["lost"]
    assert report["doubled_count"] == 0, report["doubled"]
    assert not report["error_results_without_dead_letter"]
    assert not report["unexpected_exits"]
    assert ok(report)
    shutil.rmtree(tmp_path / "redis", ignore_errors=True)
