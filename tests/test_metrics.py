"""Tests for crd_model.metrics against hand-derived answers and independent slow references."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from collections import deque

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from crd_model import metrics
from crd_model.metrics import (
    aupro,
    image_auroc,
    pixel_auroc,
    pro_curve,
    summarise,
    threshold_at_false_reject_rate,
)

# --------------------------------------------------------------------------- independent references


def brute_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Fraction of (positive, negative) pairs ranked correctly; ties count one half."""
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


def flood_regions(mask: np.ndarray, eight: bool = True) -> list[list[tuple[int, int]]]:
    """Connected components by BFS (no scipy), 8- or 4-connected."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    if not eight:
        steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    regions = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or seen[y, x]:
                continue
            seen[y, x] = True
            queue, region = deque([(y, x)]), []
            while queue:
                cy, cx = queue.popleft()
                region.append((cy, cx))
                for dy, dx in steps:
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            regions.append(region)
    return regions


def slow_curve(gts: list[np.ndarray], maps: list[np.ndarray], eight: bool = True) -> list[tuple[float, float]]:
    """(FPR, PRO) at every distinct threshold, descending, by explicit loops; starts at (0, 0)."""
    regions = [(i, r) for i, g in enumerate(gts) for r in flood_regions(g > 0, eight)]
    n_normal = sum(int((g == 0).sum()) for g in gts)
    thresholds = sorted({float(v) for m in maps for v in m.ravel()}, reverse=True)
    points = [(0.0, 0.0)]
    for t in thresholds:
        fp = sum(int(((m >= t) & (g == 0)).sum()) for g, m in zip(gts, maps, strict=True))
        overlaps = [sum(1 for (y, x) in r if maps[i][y, x] >= t) / len(r) for i, r in regions]
        points.append((fp / n_normal, sum(overlaps) / len(overlaps)))
    return points


def slow_aupro(points: list[tuple[float, float]], limit: float) -> float:
    """Walk the polyline in order, cut it at `limit` by linear interpolation, integrate."""
    xs, ys = [points[0][0]], [points[0][1]]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x1 <= limit:
            xs.append(x1)
            ys.append(y1)
            continue
        if x0 < limit:  # this segment crosses the limit: interpolate and stop
            xs.append(limit)
            ys.append(y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
        break
    return float(np.trapezoid(ys, xs)) / limit


# --------------------------------------------------------------------------- image / pixel AUROC


def test_image_auroc_matches_pairwise_bruteforce() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(0, 2, size=60)
        labels[:2] = [0, 1]
        scores = np.round(rng.normal(size=60) + labels, 1)  # rounding creates ties
        assert image_auroc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)
        assert image_auroc(labels.astype(bool), scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)


def test_image_auroc_single_class_is_nan() -> None:
    assert math.isnan(image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(image_auroc([True, True], [0.1, 0.2]))


def test_image_auroc_rejects_bad_labels() -> None:
    with pytest.raises(ValueError):
        image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        image_auroc([0, 1, 1], [0.1, 0.2])


def test_pixel_auroc_mixed_shapes_matches_sklearn_and_bruteforce() -> None:
    rng = np.random.default_rng(1)
    shapes = [(5, 7), (6, 4), (3, 9)]
    gts = [(rng.random(s) < 0.3).astype(np.uint8) * 255 for s in shapes]  # 255 = anomalous
    maps = [np.round(rng.random(s) + 0.3 * (g > 0), 2).astype(np.float32) for s, g in zip(shapes, gts, strict=True)]
    y = np.concatenate([(g > 0).ravel() for g in gts]).astype(int)
    s = np.concatenate([m.ravel() for m in maps])
    got = pixel_auroc(gts, maps)
    assert got == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert got == pytest.approx(brute_auc(y, s.astype(np.float64)), abs=1e-12)


def test_pixel_auroc_single_class_is_nan() -> None:
    assert math.isnan(pixel_auroc([np.zeros((3, 3))], [np.random.default_rng(2).random((3, 3))]))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        pixel_auroc([np.zeros((3, 3))], [np.zeros((3, 4))])
    with pytest.raises(ValueError):
        aupro([np.zeros((3, 3))], [np.zeros((3, 3)), np.zeros((3, 3))])


# --------------------------------------------------------------------------- AU-PRO, hand-made cases


def test_aupro_perfect_map_is_one() -> None:
    # Map = gt: at threshold 1 every region is fully covered with no false positive, so the
    # curve jumps (0,0) -> (0,1) and stays at PRO 1: area = limit, normalised = 1.
    gt = np.zeros((8, 8), np.uint8)
    gt[1:3, 1:3] = 1
    gt[5:8, 4:7] = 1
    gt2 = np.zeros((8, 8), np.uint8)
    gt2[0, 7] = 1
    maps = [gt.astype(np.float32), gt2.astype(np.float32)]
    for limit in (0.3, 0.01, 1.0):
        assert aupro([gt, gt2], maps, fpr_limit=limit) == pytest.approx(1.0, abs=1e-12)


def test_aupro_inverted_map_is_zero() -> None:
    # Map = 1 - gt: the first threshold flags every normal pixel (FPR 1) while PRO is still 0,
    # so the curve runs along PRO = 0 for all FPR < 1: area 0.
    gt = np.zeros((6, 6), np.uint8)
    gt[2:4, 2:5] = 1
    assert aupro([gt], [1.0 - gt], fpr_limit=0.3) == 0.0
    assert aupro([gt], [1.0 - gt], fpr_limit=0.01) == 0.0


def test_aupro_two_regions_partial_coverage() -> None:
    # 10x10 image: region A = 2x2 block (4 px), region B = 2x4 block (8 px), 88 normal pixels.
    # Scores: all of A and half of B (4 px) = 0.9; the other half of B = 0.1;
    # 22 normal pixels = 0.5; the other 66 normals = 0.
    # Thresholds, descending:
    #   t=0.9: FPR 0,        PRO = (1 + 1/2) / 2 = 0.75   (A full, B half)
    #   t=0.5: FPR 22/88 = 0.25, PRO 0.75
    #   t=0.1: FPR 0.25,     PRO 1
    #   t=0  : FPR 1,        PRO 1
    # Area to 0.3 = 0.25 * 0.75 + 0.05 * 1 = 0.2375  ->  /0.3 = 0.791666...
    # Area to 0.01 = 0.01 * 0.75                    ->  /0.01 = 0.75
    gt = np.zeros((10, 10), np.uint8)
    gt[0:2, 0:2] = 1
    gt[6:8, 4:8] = 1
    amap = np.zeros((10, 10))
    amap[0:2, 0:2] = 0.9
    amap[6:8, 4:6] = 0.9
    amap[6:8, 6:8] = 0.1
    normal_idx = np.flatnonzero(gt.ravel() == 0)
    amap.ravel()[normal_idx[::4]] = 0.5  # every 4th of 88 normals = 22
    assert (amap == 0.5).sum() == 22

    fprs, pros = pro_curve([gt], [amap])
    np.testing.assert_allclose(fprs, [0, 0, 0.25, 0.25, 1, 1])
    np.testing.assert_allclose(pros, [0, 0.75, 0.75, 1, 1, 1])
    assert aupro([gt], [amap], 0.3) == pytest.approx(0.2375 / 0.3, abs=1e-12)
    assert aupro([gt], [amap], 0.01) == pytest.approx(0.75, abs=1e-12)


def test_aupro_uses_eight_connectivity() -> None:
    # gt pixels (0,0), (1,1), (1,2): 8-connected -> ONE region of 3 px;
    # 4-connected it would be {(0,0)} and {(1,1),(1,2)}.
    # Scores: (0,0)=1.0, (1,1),(1,2)=0.5, two normals = 0.7, the other 20 normals = 0 (22 normals).
    #   t=1.0: FPR 0,     PRO 1/3   (4-conn would give (1 + 0) / 2 = 1/2)
    #   t=0.7: FPR 2/22,  PRO 1/3
    #   t=0.5: FPR 2/22,  PRO 1
    # Area to 0.3 = (1/11) * (1/3) + (0.3 - 1/11) * 1.
    gt = np.zeros((5, 5), np.uint8)
    gt[0, 0] = gt[1, 1] = gt[1, 2] = 1
    amap = np.zeros((5, 5))
    amap[0, 0] = 1.0
    amap[1, 1] = amap[1, 2] = 0.5
    amap[4, 0] = amap[4, 4] = 0.7
    f = 2 / 22
    expected_8 = (f / 3 + (0.3 - f)) / 0.3
    expected_4 = (f / 2 + (0.3 - f)) / 0.3
    assert abs(expected_8 - expected_4) > 0.05  # the case discriminates
    assert aupro([gt], [amap], 0.3) == pytest.approx(expected_8, abs=1e-12)
    # and the slow reference agrees only when it uses 8-connectivity
    assert slow_aupro(slow_curve([gt], [amap], eight=True), 0.3) == pytest.approx(expected_8, abs=1e-12)
    assert slow_aupro(slow_curve([gt], [amap], eight=False), 0.3) == pytest.approx(expected_4, abs=1e-12)


def test_aupro_interpolates_at_the_limit() -> None:
    # 2x10 image; region = row 0, cols 0..3 (4 px); 16 normals.
    # Scores: region cols 0,1 = 1.0; region cols 2,3 = 0.5; 8 normals = 0.5 (tied with the
    # region's second half); 8 normals = 0.
    #   t=1.0: (FPR 0,   PRO 0.5)
    #   t=0.5: (FPR 0.5, PRO 1.0)  <- the tie makes a sloped segment with a kink at FPR 0.5
    #   t=0  : (1, 1)
    # Limit 0.3 is inside the slope: PRO(0.3) = 0.5 + 0.5 * 0.3 / 0.5 = 0.8,
    #   area = 0.5 * (0.5 + 0.8) * 0.3 = 0.195 -> /0.3 = 0.65.
    #   (Dropping the segment instead of interpolating would give 0.)
    # Limit 0.5 hits the kink exactly: area = 0.5 * (0.5 + 1) * 0.5 = 0.375 -> /0.5 = 0.75.
    # Limit 0.8 is past it: area = 0.375 + 0.3 * 1 = 0.675 -> /0.8 = 0.84375.
    gt = np.zeros((2, 10), np.uint8)
    gt[0, 0:4] = 1
    amap = np.zeros((2, 10))
    amap[0, 0:2] = 1.0
    amap[0, 2:4] = 0.5
    amap[0, 4:10] = 0.5
    amap[1, 0:2] = 0.5
    assert ((amap == 0.5) & (gt == 0)).sum() == 8
    assert aupro([gt], [amap], 0.3) == pytest.approx(0.65, abs=1e-12)
    assert aupro([gt], [amap], 0.5) == pytest.approx(0.75, abs=1e-12)
    assert aupro([gt], [amap], 0.8) == pytest.approx(0.84375, abs=1e-12)


def test_aupro_nan_without_regions_or_normals() -> None:
    amap = np.random.default_rng(3).random((4, 4))
    assert math.isnan(aupro([np.zeros((4, 4))], [amap]))
    assert math.isnan(aupro([np.ones((4, 4))], [amap]))
    with pytest.raises(ValueError):
        pro_curve([np.zeros((4, 4))], [amap])


def test_aupro_rejects_bad_limit() -> None:
    gt = np.eye(4)
    with pytest.raises(ValueError):
        aupro([gt], [gt], 0.0)
    with pytest.raises(ValueError):
        aupro([gt], [gt], 1.5)


# --------------------------------------------------------------------------- AU-PRO vs slow reference


def random_stack(rng: np.random.Generator, shapes: list[tuple[int, int]], levels: int | None):
    gts, maps = [], []
    for s in shapes:
        g = (rng.random(s) < 0.25).astype(np.uint8)
        m = rng.random(s) + 0.4 * g
        if levels is not None:  # quantise so tied scores mix normal and anomalous pixels
            m = np.floor(m * levels) / levels
        gts.append(g)
        maps.append(m)
    return gts, maps


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(3, 9)), int(rng.integers(3, 9))) for _ in range(int(rng.integers(1, 4)))]
    gts, maps = random_stack(rng, shapes, levels=[None, 7, 20][seed % 3])
    gts[0][0, 0], gts[0][-1, -1] = 1, 0  # at least one region and one normal pixel
    points = slow_curve(gts, maps)
    fprs, pros = pro_curve(gts, maps)
    # Same points (the fast curve also carries the closing (1, 1)).
    np.testing.assert_allclose(fprs[:-1], [p[0] for p in points], rtol=0, atol=1e-12)
    np.testing.assert_allclose(pros[:-1], [p[1] for p in points], rtol=0, atol=1e-12)
    for limit in (0.3, 0.01, 0.123, 1.0):
        assert aupro(gts, maps, limit) == pytest.approx(slow_aupro(points, limit), abs=1e-9)


def test_pro_curve_chunking_is_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    gts, maps = random_stack(rng, [(9, 11), (7, 5)], levels=13)
    whole = pro_curve(gts, maps)
    monkeypatch.setattr(metrics, "_CHUNK", 5)
    chunked = pro_curve(gts, maps)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])


def test_pro_curve_shape_invariants_float32() -> None:
    rng = np.random.default_rng(8)
    gts, maps = random_stack(rng, [(20, 30), (25, 10)], levels=None)
    fprs, pros = pro_curve(gts, [m.astype(np.float32) for m in maps])
    assert fprs.dtype == np.float64 and pros.dtype == np.float64
    assert (fprs[0], pros[0]) == (0.0, 0.0) and (fprs[-1], pros[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(pros) >= 0)


# --------------------------------------------------------------------------- thresholds & summary


def test_threshold_rate_zero_passes_every_normal() -> None:
    rng = np.random.default_rng(9)
    for dtype in (np.float64, np.float32):
        scores = rng.random(50).astype(dtype)
        t = threshold_at_false_reject_rate(scores, 0.0)
        assert not np.any(scores >= t)  # compared in float64 ...
        assert not np.any(scores >= dtype(t))  # ... and in the scores' own dtype
        assert t == np.nextafter(scores.max(), dtype(np.inf))


def test_threshold_rate_tenth_rejects_at_most_ten_of_hundred() -> None:
    scores = np.random.default_rng(10).permutation(np.arange(100) / 100.0)
    t = threshold_at_false_reject_rate(scores, 0.1)
    rejected = int(np.sum(scores >= t))
    assert rejected <= 10
    # "higher" quantile at 0.9 is sorted index ceil(0.9 * 99) = 90 -> the 9 scores above it fail.
    assert rejected == 9


def test_threshold_with_ties_never_exceeds_rate() -> None:
    scores = np.array([0.0] * 10 + [1.0] * 10)
    for rate in (0.0, 0.05, 0.25, 0.5, 0.75, 1.0):
        t = threshold_at_false_reject_rate(scores, rate)
        assert np.mean(scores >= t) <= rate


def test_threshold_rejects_bad_rate() -> None:
    with pytest.raises(ValueError):
        threshold_at_false_reject_rate([0.1, 0.2], 1.5)
    with pytest.raises(ValueError):
        threshold_at_false_reject_rate([], 0.1)


def test_summarise_keys_and_values() -> None:
    rng = np.random.default_rng(11)
    gts, maps = random_stack(rng, [(6, 6), (6, 6), (5, 8)], levels=None)
    labels = [int(g.any()) for g in gts]
    labels[0] = 0  # guarantee both classes
    image_scores = [float(m.max()) for m in maps]
    out = summarise(labels, image_scores, gts, maps)
    assert set(out) == {"i_auroc", "p_auroc", "aupro_30", "aupro_01"}
    assert out["i_auroc"] == image_auroc(labels, image_scores)
    assert out["p_auroc"] == pixel_auroc(gts, maps)
    assert out["aupro_30"] == pytest.approx(aupro(gts, maps, 0.3), abs=1e-15)
    assert out["aupro_01"] == pytest.approx(aupro(gts, maps, 0.01), abs=1e-15)


def test_metrics_module_does_not_import_torch() -> None:
    # Fresh interpreter: other tests in the session may have imported torch already.
    code = "import sys, crd_model.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
