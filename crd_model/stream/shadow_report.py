"""`crd shadow-report`: how a candidate model, run in shadow mode, compares with the live one.

Reads a line's results stream (the results a worker published while it ran the candidate beside the
live model) and reports, over the results that carry a `shadow`: verdict agreement, what each model
would have rejected, the correlation of their scores, and the frames they disagree on, so an
engineer can promote the candidate (or not) with evidence. Torch-free.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import redis

from crd_model.stream.messages import Result, WireError
from crd_model.stream.packing import unpack_result
from crd_model.stream.redis_streams import F_PAYLOAD


@dataclass
class ShadowReport:
    line: str
    results: int = 0  # results read
    compared: int = 0  # results with a shadow score (errors and results without one are left out)
    live_models: Counter = field(default_factory=Counter)
    candidate_models: Counter = field(default_factory=Counter)
    both_reject: int = 0
    live_only: int = 0  # the live model rejected, the candidate would have passed
    candidate_only: int = 0  # the candidate would have rejected what the live model passed
    both_pass: int = 0
    pearson: float = float("nan")
    spearman: float = float("nan")
    disagreements: list[dict] = field(default_factory=list)  # the first few, for a look at the frames

    @property
    def agreement(self) -> float:
        return (self.both_reject + self.both_pass) / self.compared if self.compared else float("nan")

    @property
    def live_reject_rate(self) -> float:
        return (self.both_reject + self.live_only) / self.compared if self.compared else float("nan")

    @property
    def candidate_reject_rate(self) -> float:
        return (self.both_reject + self.candidate_only) / self.compared if self.compared else float("nan")

    def as_dict(self) -> dict:
        return {
            "line": self.line,
            "results": self.results,
            "compared": self.compared,
            "live_models": dict(self.live_models),
            "candidate_models": dict(self.candidate_models),
            "agreement": self.agreement,
            "live_reject_rate": self.live_reject_rate,
            "candidate_reject_rate": self.candidate_reject_rate,
            "both_reject": self.both_reject,
            "live_only": self.live_only,
            "candidate_only": self.candidate_only,
            "both_pass": self.both_pass,
            "score_pearson": self.pearson,
            "score_spearman": self.spearman,
            "disagreements": self.disagreements,
        }


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), for Spearman's correlation without scipy."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def compare(results: list[Result], line: str, max_disagreements: int = 20) -> ShadowReport:
    report = ShadowReport(line=line, results=len(results))
    live_scores, candidate_scores = [], []
    for res in results:
        if res.shadow is None or res.verdict == "error" or res.score is None:
            continue
        report.compared += 1
        report.live_models[res.model_id or "?"] += 1
        report.candidate_models[res.shadow.model_id] += 1
        live, candidate = res.verdict == "anomalous", res.shadow.verdict == "anomalous"
        if live and candidate:
            report.both_reject += 1
        elif live:
            report.live_only += 1
        elif candidate:
            report.candidate_only += 1
        else:
            report.both_pass += 1
        if live != candidate and len(report.disagreements) < max_disagreements:
            report.disagreements.append({
                "frame_id": res.frame_id, "live": res.verdict, "live_score": res.score,
                "candidate": res.shadow.verdict, "candidate_score": res.shadow.score, "meta": res.meta,
            })  # fmt: skip
        live_scores.append(res.score)
        candidate_scores.append(res.shadow.score)
    a, b = np.asarray(live_scores, float), np.asarray(candidate_scores, float)
    report.pearson = _correlation(a, b)
    report.spearman = _correlation(_ranks(a), _ranks(b)) if len(a) else float("nan")
    return report


def read_results(r: redis.Redis, key: str, start: str = "-", count: int | None = None) -> list[Result]:
    """Every decodable result of the stream from `start` (undecodable ones are skipped: reported by count)."""
    out: list[Result] = []
    cursor = start
    while True:
        page = r.xrange(key, min=cursor, max="+", count=1000)
        if not page:
            return out
        for _, fields in page:
            try:
                out.append(unpack_result(fields.get(F_PAYLOAD, b"")))
            except WireError:
                continue
            if count is not None and len(out) >= count:
                return out
        last = page[-1][0].decode() if isinstance(page[-1][0], bytes) else page[-1][0]
        cursor = f"({last}"


def format_report(report: ShadowReport) -> str:
    if not report.compared:
        return f"line {report.line}: {report.results} results, none with a shadow score (is a candidate running?)"
    lines = [
        f"line {report.line}: {report.compared} of {report.results} results scored by both models",
        f"  live:      {', '.join(f'{m} ({n})' for m, n in report.live_models.items())}",
        f"  candidate: {', '.join(f'{m} ({n})' for m, n in report.candidate_models.items())}",
        f"  verdicts agree on {report.agreement:.1%} of frames",
        f"  reject rate: live {report.live_reject_rate:.2%}, candidate {report.candidate_reject_rate:.2%}",
        "                     candidate rejects  candidate passes",
        f"    live rejects     {report.both_reject:>17}  {report.live_only:>16}",
        f"    live passes      {report.candidate_only:>17}  {report.both_pass:>16}",
        f"  score correlation: Pearson {report.pearson:.3f}, Spearman {report.spearman:.3f}",
    ]
    for d in report.disagreements[:10]:
        lines.append(
            f"  differ: {d['frame_id']}  live {d['live']} ({d['live_score']:.3f}), "
            f"candidate {d['candidate']} ({d['candidate_score']:.3f})"
        )
    return "\n".join(lines)
