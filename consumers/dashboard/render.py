"""Images of flagged frames for the page: the RGB, the anomaly map in colour, and both blended with regions."""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from consumers.dashboard.state import Flagged
from crd_model.overlay import heat_colours, overlay
from crd_model.stream import Limits, decode_map, decode_rgb

Kind = Literal["image", "map", "overlay"]


def _fit(hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    h, w = hw
    k = min(1.0, max_side / max(h, w))
    return max(1, round(w * k)), max(1, round(h * k))  # PIL size (w, h)


def render(f: Flagged, kind: Kind, max_side: int, limits: Limits) -> bytes:
    """PNG bytes, at most `max_side` on the longer side. Without the frame's RGB (trimmed before the
    dashboard saw it), the map is drawn on grey."""
    res = f.result
    am = res.anomaly_map
    image_hw = tuple(am.image_shape) if am is not None else (f.rgb.shape[0], f.rgb.shape[1]) if f.rgb else (1, 1)
    size = _fit(image_hw, max_side)  # type: ignore[arg-type]
    if f.rgb is not None:
        rgb = np.asarray(Image.fromarray(decode_rgb(f.rgb, limits)).resize(size, Image.BILINEAR))
    else:
        rgb = np.full((size[1], size[0], 3), 96, np.uint8)
    if kind == "image" or am is None:
        out = rgb
    else:
        amap = np.asarray(Image.fromarray(decode_map(am, limits)).resize(size, Image.BILINEAR), dtype=np.float32)
        threshold = res.threshold if res.threshold is not None else float(amap.max())
        if kind == "map":
            scale = threshold / 0.75 if threshold > 0 else max(float(amap.max()), 1e-6)
            out = heat_colours(amap / scale)
        else:
            out = overlay(rgb, amap, threshold)
    img = Image.fromarray(out)
    if kind == "overlay" and res.regions:
        draw = ImageDraw.Draw(img)
        sx, sy = size[0] / image_hw[1], size[1] / image_hw[0]
        for r in res.regions:
            draw.rectangle([r.x * sx, r.y * sy, (r.x + r.w) * sx - 1, (r.y + r.h) * sy - 1], outline=(0, 255, 0),
                           width=max(1, round(max(size) / 160)))  # fmt: skip
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
