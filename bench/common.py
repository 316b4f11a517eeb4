"""Helpers shared by the benchmarks: machine description and BENCHMARKS.md section updates."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
        torch_v = f", torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    except ImportError:
        torch_v = ""
    return f"{cpu}, {os.cpu_count()} logical CPUs{gpu}{torch_v}, Python {platform.python_version()}"


def repeated(items: list, n: int) -> list:
    """`items` over and over, in order, cut to exactly n (a benchmark's frames from a few distinct ones)."""
    return (list(items) * (n // max(1, len(items)) + 1))[:n]


def write_section(name: str, body: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` (append if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)
