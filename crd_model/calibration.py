"""Calibration: branch statistics and an image threshold that hold on good parts the model has not seen.

Two rules, and why:

1. **Statistics and threshold come from different images.** The per-branch map mean/std (which
   standardise the raw maps before they are fused) are measured on one share of the good images
   (`STATISTICS_SHARE`, a seeded random pick); the threshold is set on the scores of the others. The
   threshold images' scores are then honest held-out draws of the very function inference computes
   (same statistics, same code path), so the order-statistic guarantees below apply. K-fold
   cross-fitting was not used: it would set the threshold on scores computed with per-fold statistics
   that inference never uses, so calibration and inference would not compute the same number.
2. **The threshold is an order statistic, and its uncertainty is stated.** With m held-out scores and a
   requested false-reject rate a, the threshold sits just above the k-th smallest score,
   k = ceil((m + 1)(1 - a)) (split-conformal rank). For continuous scores the false-reject rate on new
   good parts is then a Beta(m + 1 - k, k) random variable over calibration sets: its mean,
   (m + 1 - k) / (m + 1), is at most a, and its 5 %-95 % quantiles are stored as the interval. When the
   95 % bound exceeds `ENOUGH_FACTOR` x a the set is too small for the rate: calibration still stores a
   threshold but logs and records a warning naming how many images would do (a 1 % rate needs about
   100 threshold images for a 3 % bound).

Scores are computed through the same `Inspector` path that serves (channels_last, autocast, batch
buckets), so a threshold image scored again by `Inspector.inspect`/`infer` or a worker gives the number
calibration saw: bit for bit in the same batch, and to float rounding in any other. That rounding (a
batch of one takes different convolution kernels than a batch of eight) is measured: the top scores are
scored again one at a time, and the threshold keeps a guard of four times the largest change (at least
8 float32 ulps) above the order statistic, so a good part calibrated at rate 0 is not rejected by a
different batch size.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import structlog
import torch
from scipy import stats as sps

import crd_model
from crd_model.anomaly_map import error_sums
from crd_model.config import BranchStats, Calibration, CalibrationSource, ScaleErrorMoments, moment_pairs
from crd_model.inputs import PreparedFrame

log = structlog.get_logger(__name__)

STATISTICS_SHARE = 0.25  # of the good images; the rest set the threshold
MAX_STATISTICS_IMAGES = 64  # the mean/std of millions of pixels settle long before this
SPLIT_SEED = 0
INTERVAL = (0.05, 0.95)  # quantiles of the false-reject rate over calibration sets
ENOUGH_FACTOR = 3.0  # a set is big enough when the 95 % bound is within this factor of the rate
REPEAT_CHECK_IMAGES = 16  # top-scoring threshold images scored again one at a time
GUARD_FACTOR = 4.0
MIN_GUARD_ULPS = 8
ISOLATION_FACTOR = 2.0  # see `isolated_order_statistic`
MIN_ISOLATION_SCORES = 10  # fewer scores say too little about their own spread
ERROR_SHRINKAGE = 0.1  # of the error covariance, towards its mean variance x identity (whitened scoring)


def split_for_calibration(n: int, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(statistics indices, threshold indices): disjoint, seeded, spread over the whole set.

    A single image cannot be split: it serves both (the calibration record then says so).
    """
    if n < 1:
        raise ValueError("calibration needs at least one good image")
    if n == 1:
        return [0], [0]
    n_stats = min(MAX_STATISTICS_IMAGES, max(1, round(n * STATISTICS_SHARE)))
    order = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in order[:n_stats]), sorted(int(i) for i in order[n_stats:])


def threshold_rank(n: int, rate: float) -> int:
    """Rank k (1-based) of the order statistic the threshold sits above: ceil((n + 1)(1 - rate)), at most n."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    k = math.ceil(round((n + 1) * (1.0 - rate), 9))  # round: 100 * 0.99 must be 99, not 99.00000000000001
    return min(max(k, 1), n)


@dataclass(frozen=True)
class FalseRejectBound:
    """What a threshold at the k-th of n held-out scores implies for the false-reject rate on new good parts."""

    n: int
    rank: int
    expected: float  # mean over calibration sets: (n + 1 - k) / (n + 1)
    interval: tuple[float, float]  # INTERVAL quantiles of Beta(n + 1 - k, k)

    @property
    def upper(self) -> float:
        return self.interval[1]


def false_reject_bound(n: int, rank: int) -> FalseRejectBound:
    if not 1 <= rank <= n:
        raise ValueError(f"rank must be in 1..{n}, got {rank}")
    above = n + 1 - rank
    lo, hi = (float(sps.beta.ppf(q, above, rank)) for q in INTERVAL)
    return FalseRejectBound(n, rank, above / (n + 1), (lo, hi))


def images_needed(rate: float, factor: float = ENOUGH_FACTOR, limit: int = 100_000) -> int | None:
    """Fewest threshold images for which the 95 % bound on the false-reject rate is <= factor x rate.

    None for rate 0 (no finite set bounds it at 0) or when `limit` images would not do.
    """
    if rate <= 0:
        return None
    n = np.arange(1, limit + 1)
    k = np.minimum(np.ceil(np.round((n + 1) * (1.0 - rate), 9)), n)
    upper = sps.beta.ppf(INTERVAL[1], n + 1 - k, k)
    ok = np.flatnonzero(upper <= factor * rate)
    return int(n[ok[0]]) if ok.size else None


def isolated_order_statistic(ordered: np.ndarray, rank: int) -> bool:
    """Whether the k-th smallest of the sorted scores `ordered`, the one the threshold sits on, stands apart
    from those below it: its gap to the next lower score exceeds ISOLATION_FACTOR x that score's distance
    to the median.

    A part filed as good by mistake (a defective one, a mangled image) scores far above the good parts, and
    a threshold set on it lets every defect that scores less pass. Sets of honest good parts trip the test
    rarely: for 75 scores about 1 % of draws from a heavy-tailed (Student t, 5 degrees of freedom) or a
    lognormal distribution, 0.2 % of Gumbel draws, none of normal ones (`test_calibration`).
    """
    m = len(ordered)
    if m < MIN_ISOLATION_SCORES or rank < 2:
        return False
    below = float(ordered[rank - 2])
    spread = below - float(np.median(ordered))
    return spread > 0 and float(ordered[rank - 1]) - below > ISOLATION_FACTOR * spread


def threshold_above(score: float, tolerance: float) -> float:
    """The smallest float32 >= score + tolerance that is strictly above `score` in float32 (scores are float32)."""
    q = np.float32(score)
    t = np.float32(float(q) + tolerance)
    while t <= q:
        t = np.nextafter(t, np.float32(np.inf))
    return float(t)


def repeat_guard(score: float, repeat_error: float) -> float:
    """Guard above the order statistic: GUARD_FACTOR x the measured repeat error, at least MIN_GUARD_ULPS ulps."""
    ulp = float(np.spacing(np.float32(abs(score)) or np.float32(1.0)))
    return max(GUARD_FACTOR * repeat_error, MIN_GUARD_ULPS * ulp)


def branch_statistics(inspector, frames: Sequence[PreparedFrame], batch_size: int) -> dict[str, BranchStats]:
    """Mean and (unbiased) std of each branch's raw map over every pixel of `frames`, in float64.

    Accumulated per image in float64, so the numbers do not depend on how the images were batched.
    """
    maps: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(frames), batch_size):
        for name, m in inspector.branch_maps(inspector.stack(frames[i : i + batch_size])).items():
            maps.setdefault(name, []).append(m.to("cpu", torch.float64))
    out = {}
    for name, chunks in maps.items():
        count = sum(c.numel() for c in chunks)
        mean = sum(float(c.sum()) for c in chunks) / count
        sq = sum(float(((c - mean) ** 2).sum()) for c in chunks)  # two passes: no cancellation
        std = math.sqrt(sq / max(count - 1, 1))
        out[name] = BranchStats(mean=mean, std=max(std, 1e-8))
    return out


def error_moments(inspector, frames: Sequence[PreparedFrame], batch_size: int) -> dict[str, list[ScaleErrorMoments]]:
    """Per branch and scale, the students' unit error over every position of `frames`: its mean and the
    inverse square root of its covariance, shrunk towards the identity (`moments_from_sums`); accumulated
    per image in float64, so independent of batching."""
    sums: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(frames), batch_size):
        inputs = inspector.stack(frames[i : i + batch_size])
        for name, scales in inspector.scale_maps(inputs, per_scale=error_sums).items():
            acc = sums.setdefault(name, [torch.zeros(s.shape[1], dtype=torch.float64) for s in scales])
            for k, per_image in enumerate(scales):
                acc[k] += per_image.to("cpu", torch.float64).sum(dim=0)
    return {name: [moments_from_sums(total) for total in scales] for name, scales in sums.items()}


def moments_from_sums(total: torch.Tensor) -> ScaleErrorMoments:
    """`error_sums`' (C + C * C + 1,) totals over images -> the error's mean and whitener.

    The covariance is shrunk as (1 - s) x cov + s x (mean variance) x I, s = `ERROR_SHRINKAGE`, or C / n
    where n positions (over all statistics images) are few for C channels: the deep scale has a hundred
    channels and a few thousand positions per calibration, and a direction the students happen to reproduce
    almost exactly there must not blow a new part's noise up."""
    c = math.isqrt(total.numel() - 1)
    n = float(total[-1])
    mean = total[:c] / n
    second = total[c : c + c * c].view(c, c) / n
    cov = (second - torch.outer(mean, mean)) * (n / max(n - 1.0, 1.0))
    cov = (cov + cov.T) / 2
    whitener = shrunk_whitener(cov, min(max(ERROR_SHRINKAGE, c / n), 1.0))
    return ScaleErrorMoments(mean=_float32_values(mean), whitener=_float32_values(whitener))


def shrunk_whitener(cov: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """The inverse square root of the covariance `cov` shrunk as (1 - s) x cov + s x (mean variance) x I."""
    c = cov.shape[0]
    level = max(float(cov.diagonal().mean()), 1e-24)
    shrunk = (1.0 - shrinkage) * cov + shrinkage * level * torch.eye(c, dtype=cov.dtype)
    values, vectors = torch.linalg.eigh(shrunk)
    return vectors @ torch.diag(values.clamp_min(shrinkage * level).rsqrt()) @ vectors.T


def _float32_values(t: torch.Tensor) -> list[float]:
    """The float32 values the model holds, each written with the fewest digits that give it back (half the
    bytes of float64's): config.json round-trips exactly what calibration used."""
    return [float(str(v)) for v in t.float().flatten().numpy()]


def score_frames(inspector, frames: Sequence[PreparedFrame], batch_size: int) -> np.ndarray:
    """Image scores (float32) through the inspector's serving path, in batches of `batch_size`."""
    scores = [
        inspector.forward(inspector.stack(frames[i : i + batch_size])).pred_score.float().cpu()
        for i in range(0, len(frames), batch_size)
    ]
    return torch.cat(scores).numpy()


def calibrate_frames(
    inspector,
    frames: Sequence[PreparedFrame],
    false_reject_rate: float,
    *,
    batch_size: int = 16,
    names: Sequence[str] | None = None,
    statistics_idx: Sequence[int] | None = None,
    threshold_idx: Sequence[int] | None = None,
    source_kind: str = "validation",
    source_path: str = "",
    previous_threshold: float | None = None,
) -> Calibration:
    """Measure branch statistics on one share of `frames`, set them on the model, and set the threshold
    from the other share's scores (see the module docstring). `inspector` is an `Inspector` (loaded or
    `Inspector.from_model`); its model keeps the new statistics.

    `statistics_idx` / `threshold_idx` override the seeded split (tests, and the pre-split protocol when
    both name the same images: then the record says so and warns).
    """
    n = len(frames)
    if n == 0:
        raise ValueError("calibration needs at least one good image")
    if not 0.0 <= false_reject_rate <= 1.0:
        raise ValueError(f"false_reject_rate must be in [0, 1], got {false_reject_rate}")
    default_stats, default_thr = split_for_calibration(n)
    s_idx = list(default_stats if statistics_idx is None else statistics_idx)
    t_idx = list(default_thr if threshold_idx is None else threshold_idx)
    if not s_idx or not t_idx:
        raise ValueError("calibration needs at least one statistics image and one threshold image")
    shared = sorted(set(s_idx) & set(t_idx))
    warnings: list[str] = []
    if shared:
        warnings.append(
            f"{len(shared)} image(s) served both the map statistics and the threshold: the threshold is not "
            "set on held-out scores (give more good images)"
        )

    stats_frames = [frames[i] for i in s_idx]
    moments = None
    if inspector.model.error_whitening is not None:  # the map the statistics describe is measured with these
        moments = error_moments(inspector, stats_frames, batch_size)
        inspector.model.error_whitening.set_moments(moment_pairs(moments))
    stats = branch_statistics(inspector, stats_frames, batch_size)
    inspector.model.set_calibration({k: (s.mean, s.std) for k, s in stats.items()})

    thr_frames = [frames[i] for i in t_idx]
    scores = score_frames(inspector, thr_frames, batch_size)
    # The same images one at a time (the top scores, where a flip would matter): how far a score moves
    # when only the batch around it changes.
    order = np.argsort(scores, kind="stable")  # threshold images by score, lowest first
    top = order[::-1][:REPEAT_CHECK_IMAGES]
    alone = np.array([score_frames(inspector, [thr_frames[int(i)]], 1)[0] for i in top], dtype=np.float32)
    repeat_error = float(np.max(np.abs(alone.astype(np.float64) - scores[top].astype(np.float64)), initial=0.0))

    m = len(scores)
    rank = threshold_rank(m, false_reject_rate)
    ordered = scores[order]
    median = float(np.median(scores))
    q = float(ordered[rank - 1])
    guard = repeat_guard(q, repeat_error)
    threshold = threshold_above(q, guard)
    bound = false_reject_bound(m, rank)
    if false_reject_rate == 0:
        warnings.append(
            f"a false-reject rate of 0 cannot be guaranteed by any finite set: the threshold is above the highest "
            f"of {m} held-out scores, which still rejects about 1/(m+1) = {bound.expected:.3f} of new good parts"
        )
    elif bound.upper > ENOUGH_FACTOR * false_reject_rate:
        needed = images_needed(false_reject_rate)
        warnings.append(
            f"{m} threshold images are too few for a false-reject rate of {false_reject_rate:g}: on new good parts "
            f"expect {bound.expected:.3f} (90 % of calibration sets: {bound.interval[0]:.3f}-{bound.interval[1]:.3f}); "
            f"about {needed} threshold images (~{_total_for(needed)} good images in all) bring the 95 % bound "
            f"within {ENOUGH_FACTOR:g}x the rate"
        )

    def name(i: int) -> str:
        return names[i] if names is not None else str(i)

    if isolated_order_statistic(ordered, rank):
        setter = name(t_idx[int(order[rank - 1])])
        below = float(ordered[rank - 2])
        warnings.append(
            f"the threshold rests on one image far above the others: {setter} scores {q:.4g}, the next score below "
            f"it is {below:.4g} (median {median:.4g}); if it is not a good part, remove it and "
            f"calibrate again, or defects scoring between {below:.4g} and {q:.4g} pass"
        )
    for w in warnings:
        log.warning("calibration_warning", warning=w, n_threshold=m, false_reject_rate=false_reject_rate)

    source = CalibrationSource(
        kind=source_kind,  # type: ignore[arg-type]
        path=source_path,
        n_images=n,
        calibrated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        crd_inspect_version=crd_model.__version__,
        device=inspector.device.type,
        previous_threshold=previous_threshold,
        statistics_images=[name(i) for i in s_idx],
        threshold_images=[name(i) for i in t_idx],
        threshold_scores=[float(s) for s in scores],
        batch_size=batch_size,
    )
    calibration = Calibration(
        branch_stats=stats,
        threshold=threshold,
        false_reject_rate=false_reject_rate,
        n_validation=len(set(s_idx) | set(t_idx)),
        validation_score_max=float(scores.max()),
        validation_score_median=median,
        method="same-images" if shared else "held-out",
        n_statistics=len(s_idx),
        n_threshold=m,
        threshold_rank=rank,
        expected_false_reject_rate=bound.expected,
        false_reject_rate_interval=bound.interval,
        score_tolerance=threshold - q,
        score_repeat_error=repeat_error,
        warnings=warnings,
        source=source,
        error_moments=moments,
    )
    log.info(
        "calibrated",
        n_statistics=len(s_idx),
        n_threshold=m,
        rank=rank,
        threshold=round(threshold, 5),
        expected_false_reject_rate=round(bound.expected, 4),
        false_reject_rate_interval=[round(x, 4) for x in bound.interval],
        score_repeat_error=repeat_error,
    )
    return calibration


def _total_for(n_threshold: int | None) -> str:
    if n_threshold is None:
        return "?"
    return str(math.ceil(n_threshold / (1 - STATISTICS_SHARE)))


__all__ = [
    "ENOUGH_FACTOR",
    "STATISTICS_SHARE",
    "FalseRejectBound",
    "branch_statistics",
    "calibrate_frames",
    "error_moments",
    "false_reject_bound",
    "images_needed",
    "moments_from_sums",
    "score_frames",
    "split_for_calibration",
    "threshold_above",
    "threshold_rank",
]
