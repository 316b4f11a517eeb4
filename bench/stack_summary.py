"""Where a py-spy raw profile's samples went (not a test).

    .venv/bin/python bench/stack_summary.py PROFILE.txt [--top 40]

PROFILE is py-spy's `--format raw` output (one collapsed stack and its sample count per line), as
`bench/throughput.py --profile-worker` writes it. Prints the samples per thread (numbers stripped from
thread names), per function anywhere on the stack (inclusive) and per innermost frame (self, with
its line).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys


def summarise(lines: list[str], top: int) -> str:
    threads: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    innermost: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        head = frames[0]
        threads[re.sub(r"\d+", "", head.split(":", 1)[1] if ":" in head else head).strip()] += n
        for name in {f.split(" (")[0] for f in frames[1:]}:
            inclusive[name] += n
        innermost[frames[-1]] += n
    out = [f"samples: {total}", "", "per thread:"]
    out += [f"  {n:6d} {100 * n / max(total, 1):5.1f} %  {k}" for k, n in threads.most_common()]
    out += ["", f"inclusive (top {top}):"]
    out += [f"  {n:6d} {100 * n / max(total, 1):5.1f} %  {k}" for k, n in inclusive.most_common(top)]
    out += ["", f"innermost frame (top {top}):"]
    out += [f"  {n:6d} {100 * n / max(total, 1):5.1f} %  {k}" for k, n in innermost.most_common(top)]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    with open(a.profile) as f:
        print(summarise(f.readlines(), a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
