"""Evaluation metrics in the style of MVTec 3D-AD: I-AUROC, P-AUROC and AU-PRO.

`pro_curve` / `aupro` reproduce the exact PRO curve of MVTec's reference evaluation code
(`compute_pro` + `trapezoid` in the official evaluation scripts): every pixel score is a
threshold candidate, regions are the 8-connected components of each ground-truth mask, and
the area up to the FPR limit is normalised by that limit so a perfect detector scores 1.0.

Needs numpy, scipy and scikit-learn (the `model` extra) but never torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = [
    "Scores",
    "aupro",
    "clopper_pearson",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "summarise",
    "threshold_at_false_reject_rate",
    "threshold_for_detection_rate",
    "trapezoid",
]

# Pixels processed per step of the cumulative sums. Bounds the float64 temporaries to
# ~8 MiB each regardless of stack size (100 images x 800x800 = 64M pixels).
_CHUNK = 1 << 20

# 8-connectivity, as in MVTec's reference code: diagonal neighbours belong to one region.
_STRUCTURE = np.ones((3, 3), dtype=int)

MapStack = Sequence[ArrayLike] | NDArray[Any]


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC of image-level anomaly scores; `labels` are 0/1 or bool, 1 = anomalous.

    Returns nan when only one class is present (AUC is undefined, and sklearn would raise).
    """
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be bool or 0/1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    y = y.astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def pixel_auroc(gt_masks: MapStack, maps: MapStack) -> float:
    """ROC AUC over every pixel of every image (gt binarised with `> 0`).

    Images may have different shapes; each map must match its mask. nan if one class only.
    """
    pairs = _pairs(gt_masks, maps)
    if not pairs:
        return float("nan")
    y = np.concatenate([g.ravel() for g, _ in pairs])
    s = np.concatenate([m.ravel() for _, m in pairs])
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))


def pro_curve(gt_masks: MapStack, maps: MapStack) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The exact (FPR, PRO) curve of MVTec's reference `compute_pro`.

    Thresholds sweep downwards through every distinct pixel score of the stack. At each one,
    FPR = normal pixels with score >= t / all normal pixels, and PRO = mean over all gt regions
    (8-connected components, pooled over images) of the fraction of the region with score >= t.
    The curve starts at (0, 0) and, like the reference, ends with an explicit (1, 1) so that
    accumulated rounding cannot leave it short of the corner. Both arrays are non-decreasing.

    Raises ValueError if the stack has no normal pixel or no gt region (the curve is undefined).
    """
    data = _collect(_pairs(gt_masks, maps))
    if data is None:
        raise ValueError("PRO curve needs at least one normal pixel and one ground-truth region")
    return data


def aupro(gt_masks: MapStack, maps: MapStack, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit (perfect = 1.0).

    nan if there are no gt regions or no normal pixels.
    """
    _check_limit(fpr_limit)
    data = _collect(_pairs(gt_masks, maps))
    if data is None:
        return float("nan")
    fprs, pros = data
    return trapezoid(fprs, pros, x_max=fpr_limit) / fpr_limit


def trapezoid(x: ArrayLike, y: ArrayLike, x_max: float | None = None) -> float:
    """Trapezoid-rule area under (x, y) up to `x_max`, as MVTec's reference `trapezoid`.

    `x` must be sorted ascending (repeats allowed; the order of their y values then matters).
    Non-finite points are dropped. If `x_max` is not one of the x values, y at `x_max` is
    linearly interpolated between its two neighbours and the last partial trapezoid added.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[finite], ya[finite]
    correction = 0.0
    if x_max is not None:
        if x_max not in xa:
            ins = int(np.searchsorted(xa, x_max, side="right"))
            if not 0 < ins < xa.size:
                raise ValueError(f"x_max={x_max} lies outside the curve's x range")
            x0, x1, y0, y1 = xa[ins - 1], xa[ins], ya[ins - 1], ya[ins]
            y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            correction = 0.5 * (y_interp + y0) * (x_max - x0)
        keep = xa <= x_max
        xa, ya = xa[keep], ya[keep]
    return float(np.sum(0.5 * (ya[1:] + ya[:-1]) * (xa[1:] - xa[:-1])) + correction)


def threshold_at_false_reject_rate(normal_scores: ArrayLike, rate: float) -> float:
    """Score threshold that rejects (score >= threshold) at most `rate` of `normal_scores`.

    Defined as `np.nextafter(np.quantile(scores, 1 - rate, method="higher"), +inf)`: the
    "higher" quantile q is an actual normal score at sorted index ceil((1 - rate) * (n - 1)),
    and stepping one ulp above it means only scores strictly greater than q are rejected, i.e.
    at most (n - 1) * rate <= n * rate of them. With rate=0, q is the maximum, so every given
    normal passes. The step is taken in the scores' own float dtype (float32 stays float32) so
    the threshold is still above q when a consumer compares in that dtype.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    s = np.asarray(normal_scores).ravel()
    if s.size == 0:
        raise ValueError("need at least one normal score")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("normal scores must be finite")
    q = np.quantile(s, 1.0 - rate, method="higher")
    dtype = s.dtype.type
    return float(np.nextafter(dtype(q), dtype(np.inf)))


def threshold_for_detection_rate(anomalous_scores: ArrayLike, rate: float) -> float:
    """The highest threshold that still catches (score >= threshold) at least `rate` of `anomalous_scores`:
    the ceil(rate * n)-th largest score (rate 0: just above the highest, catching none)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    s = np.sort(np.asarray(anomalous_scores, dtype=np.float64).ravel())[::-1]
    if s.size == 0:
        raise ValueError("need at least one anomalous score")
    k = int(np.ceil(round(rate * s.size, 9)))
    return float(np.nextafter(s[0], np.inf)) if k == 0 else float(s[k - 1])


def clopper_pearson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval for a binomial rate observed as successes / n."""
    from scipy.stats import beta

    if n <= 0:
        return (float("nan"), float("nan"))
    alpha = 1.0 - confidence
    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return lo, hi


@dataclass(frozen=True)
class Scores:
    """The four headline numbers of an MVTec 3D-AD style evaluation."""

    i_auroc: float
    p_auroc: float
    aupro_30: float
    aupro_01: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarise(labels: ArrayLike, image_scores: ArrayLike, gt_masks: MapStack, maps: MapStack) -> dict[str, float]:
    """{"i_auroc", "p_auroc", "aupro_30", "aupro_01"}; AU-PRO at FPR limits 0.3 and 0.01."""
    pairs = _pairs(gt_masks, maps)
    data = _collect(pairs)
    if data is None:
        au30 = au01 = float("nan")
    else:
        # One (expensive) curve serves both limits.
        au30 = trapezoid(*data, x_max=0.3) / 0.3
        au01 = trapezoid(*data, x_max=0.01) / 0.01
    return Scores(
        i_auroc=image_auroc(labels, image_scores),
        p_auroc=pixel_auroc([g for g, _ in pairs], [m for _, m in pairs]),
        aupro_30=au30,
        aupro_01=au01,
    ).as_dict()


# --------------------------------------------------------------------------- internals


def _check_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def _pairs(gt_masks: MapStack, maps: MapStack) -> list[tuple[NDArray[np.bool_], NDArray[Any]]]:
    """Validate and pair (binarised gt, finite float map) per image; shapes may vary by image."""
    gts = list(gt_masks)
    ams = list(maps)
    if len(gts) != len(ams):
        raise ValueError(f"{len(gts)} ground-truth masks but {len(ams)} anomaly maps")
    out = []
    for i, (g, m) in enumerate(zip(gts, ams, strict=True)):
        ga = np.asarray(g)
        ma = np.asarray(m)
        if ga.ndim != 2 or ga.shape != ma.shape:
            raise ValueError(f"image {i}: mask {ga.shape} and map {ma.shape} must be equal 2-D shapes")
        if not np.issubdtype(ma.dtype, np.floating):
            ma = ma.astype(np.float64)
        if not np.isfinite(ma).all():
            raise ValueError(f"image {i}: anomaly map has non-finite values")
        out.append((ga > 0, ma))
    return out


def _collect(
    pairs: list[tuple[NDArray[np.bool_], NDArray[Any]]],
) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
    """Vectorised reference PRO curve; None if there is no normal pixel or no region."""
    if not pairs:
        return None
    n_total = sum(g.size for g, _ in pairs)
    # Keep float32 maps float32: halves the biggest buffers and cannot change the score order.
    score_dtype = np.result_type(*(m.dtype for _, m in pairs))
    scores = np.empty(n_total, dtype=score_dtype)
    # One uint32 per pixel: 0 = normal, k = k-th region of the whole stack. Storing ids rather
    # than per-pixel weights 1/size keeps the weights exact (float64) at 4 bytes a pixel.
    region_id = np.empty(n_total, dtype=np.uint32)
    sizes: list[NDArray[np.int64]] = []
    n_regions = 0
    pos = 0
    for g, m in pairs:
        labeled, n = ndimage.label(g, structure=_STRUCTURE)
        flat = labeled.ravel()
        region_id[pos : pos + flat.size] = np.where(flat > 0, flat + n_regions, 0)
        scores[pos : pos + flat.size] = m.ravel()
        sizes.append(np.bincount(flat, minlength=n + 1)[1:])
        n_regions += n
        pos += flat.size
    n_normal = int(np.count_nonzero(region_id == 0))
    if n_regions == 0 or n_normal == 0:
        return None
    # inv_size[0] = 0 so normal pixels add nothing to the PRO sum.
    inv_size = np.concatenate([[0.0], 1.0 / np.concatenate(sizes).astype(np.float64)])

    # Ascending order, walked backwards below (descending thresholds). Stability is irrelevant
    # because tied runs collapse. Sorting `scores` in place instead of gathering it through
    # `order` yields the same sorted values and saves one full-size copy at the peak.
    order = np.argsort(scores)
    region_id = region_id[order]
    del order
    scores.sort()
    scores = scores[::-1]
    region_id = region_id[::-1]
    # Only the last index of each run of equal scores is a real threshold: there all tied
    # pixels have switched to anomalous together (reference: np.diff(sorted) != 0, True).
    # A bool mask (1 byte a pixel) rather than int64 indices (8 bytes a pixel).
    keep = np.empty(n_total, dtype=bool)
    np.not_equal(scores[1:], scores[:-1], out=keep[:-1])
    keep[-1] = True
    del scores
    n_keep = int(np.count_nonzero(keep))

    fprs = np.empty(n_keep + 2, dtype=np.float64)
    pros = np.empty(n_keep + 2, dtype=np.float64)
    out = 1  # next free slot; slot 0 holds the (0, 0) start
    fp_carry = 0
    pro_carry = 0.0
    for start in range(0, n_total, _CHUNK):
        stop = min(start + _CHUNK, n_total)
        ids = region_id[start:stop]
        fp = np.cumsum(ids == 0, dtype=np.int64)
        fp += fp_carry
        w = inv_size[ids]
        # Seeding the first element with the carry makes the chunked sums bit-identical to
        # one global float64 cumsum (accumulate is strictly sequential).
        w[0] += pro_carry
        np.cumsum(w, out=w)
        fp_carry = int(fp[-1])
        pro_carry = float(w[-1])
        sel = keep[start:stop]
        fp_kept = fp[sel]
        end = out + fp_kept.size
        np.divide(fp_kept, n_normal, out=fprs[out:end])
        np.divide(w[sel], n_regions, out=pros[out:end])
        out = end
    fprs[0] = pros[0] = 0.0
    fprs[-1] = pros[-1] = 1.0
    # Rounding in the cumsum could push PRO a hair above 1.
    np.clip(fprs, 0.0, 1.0, out=fprs)
    np.clip(pros, 0.0, 1.0, out=pros)
    return fprs, pros
