"""Anomalous regions of an anomaly map: 8-connected components above a threshold, as wire `Region`s.

scipy is imported lazily (it is in the `model` extra, not the camera-PC install) so importing this module
stays as light as crd_model.stream.
"""

from __future__ import annotations

import numpy as np

from crd_model.stream import Region

__all__ = ["find_regions"]

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity, as MVTec's PRO regions


def find_regions(amap: np.ndarray, threshold: float, min_area: int = 16, max_regions: int = 16) -> list[Region]:
    """Connected regions of `amap >= threshold`, largest peak first, at most `max_regions`.

    Pass the map at ORIGINAL image resolution: bounding boxes (x, y, w, h) and areas are in its pixels.
    Regions with fewer than `min_area` pixels are dropped; NaN never counts as anomalous; an infinite
    peak is clamped to the largest finite float64 (Region rejects non-finite numbers).
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
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    peaks = np.asarray(ndimage.maximum(a, labels, np.arange(1, n + 1)), dtype=np.float64).reshape(n)
    peaks = np.clip(peaks, -np.finfo(np.float64).max, np.finfo(np.float64).max)
    keep = np.flatnonzero(areas >= max(1, min_area))
    # Peak descending, then area descending, then label (raster order of first pixel): deterministic ties.
    order = keep[np.lexsort((keep, -areas[keep], -peaks[keep]))][:max_regions]
    slices = ndimage.find_objects(labels)  # slices[i] is label i + 1, like areas[i] and peaks[i]
    regions: list[Region] = []
    for i in order:
        ys, xs = slices[i]
        regions.append(
            Region(
                x=int(xs.start),
                y=int(ys.start),
                w=int(xs.stop - xs.start),
                h=int(ys.stop - ys.start),
                area=int(areas[i]),
                peak=float(peaks[i]),
            )
        )
    return regions
