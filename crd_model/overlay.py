"""Anomaly-map overlays for people: heat colours blended over the RGB image (numpy + Pillow)."""

from __future__ import annotations

import numpy as np

# Anchor colours of a perceptually ordered blue -> cyan -> yellow -> red ramp.
_RAMP = np.array([[0, 0, 128], [0, 90, 255], [0, 220, 220], [255, 230, 0], [255, 60, 0], [180, 0, 0]], dtype=np.float32)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB."""
    v = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    t = (v - lo)[..., None]
    return (_RAMP[lo] * (1 - t) + _RAMP[hi] * t).astype(np.uint8)


def overlay(rgb: np.ndarray, anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """Blend the map over the image. The colour scale is tied to the threshold (0.75 of the ramp),
    so red always means 'above threshold' and every overlay of a model reads the same way."""
    scale = threshold / 0.75 if threshold > 0 else max(float(anomaly_map.max()), 1e-6)
    norm = np.clip(anomaly_map / scale, 0.0, 1.0)
    alpha = (0.15 + 0.6 * norm)[..., None]
    out = rgb.astype(np.float32) * (1 - alpha) + heat_colours(norm).astype(np.float32) * alpha
    return out.clip(0, 255).astype(np.uint8)
