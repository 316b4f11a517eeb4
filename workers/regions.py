"""Anomalous regions of an anomaly map: 8-connected components above a threshold, as wire `Region`s.

scipy is imported lazily (it is in the `model` extra, not the camera-PC install) so importing this module
stays as light as crd_model.stream.
"""

from __future__ import annotations

import numpy as np

from crd_model.stream import Region

__all__ = ["find_regions", "preload"]

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity, as MVTec's PRO regions


def preload() -> None:
    """Import scipy.ndimage now (about half a second) rather than on a worker's first anomalous frame,
    whose result would wait for it."""
    from scipy import ndimage  # noqa: F401


def find_regions(
    amap: np.ndarray,
    threshold: float,
    min_area: int = 16,
    max_regions: int = 16,
    image_shape: tuple[int, int] | None = None,
) -> list[Region]:
    """Connected regions (8-connected) of `amap >= threshold`, largest peak first, at most `max_regions`.

    Bounding boxes (x, y, w, h) and areas are in pixels of the original image: `image_shape` (H, W)
    when the map is smaller (a wire-resolution map), else the map's own. Regions smaller than `min_area`
    original pixels are dropped; NaN never counts as anomalous; an infinite peak is clamped to the
    largest finite float64 (Region rejects non-finite numbers).
    """
    from scipy import ndimage  # lazy: see module docstring

    a = np.asarray(amap, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D (H, W), got shape {a.shape}")
    if max_regions <= 0 or a.size == 0:
        return []
    mask = a >= threshold  # NaN compares False
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return []
    # Scale from map pixels to original pixels: boxes outward (never cut an anomaly), areas by the ratio.
    big_h, big_w = image_shape or a.shape
    sy, sx = big_h / a.shape[0], big_w / a.shape[1]
    areas = np.ceil(np.bincount(labels.ravel(), minlength=n + 1)[1:] * (sy * sx) - 1e-9).astype(np.int64)
    # Per-label maxima over the labelled pixels only (ndimage.maximum argsorts the whole map).
    inside = labels > 0
    peaks = np.full(n + 1, -np.inf)
    np.maximum.at(peaks, labels[inside], a[inside])
    peaks = peaks[1:]
    peaks = np.clip(peaks, -np.finfo(np.float64).max, np.finfo(np.float64).max)
    keep = np.flatnonzero(areas >= max(1, min_area))
    # Peak descending, then area descending, then label (raster order of first pixel): deterministic ties.
    order = keep[np.lexsort((keep, -areas[keep], -peaks[keep]))][:max_regions]
    slices = ndimage.find_objects(labels)  # slices[i] is label i + 1, like areas[i] and peaks[i]
    regions: list[Region] = []
    for i in order:
        ys, xs = slices[i]
        x0, y0 = int(np.floor(xs.start * sx + 1e-9)), int(np.floor(ys.start * sy + 1e-9))
        x1, y1 = min(big_w, int(np.ceil(xs.stop * sx - 1e-9))), min(big_h, int(np.ceil(ys.stop * sy - 1e-9)))
        w, h = max(1, x1 - x0), max(1, y1 - y0)
        regions.append(Region(x=x0, y=y0, w=w, h=h, area=int(min(areas[i], w * h)), peak=float(peaks[i])))
    return regions
