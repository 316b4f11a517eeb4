"""The worker's device side: host arrays in one batched copy to the device, and the wire maps back.

`upload` packs a batch's decoded frames into one pinned host buffer and copies it to the device in one
transfer (on a CPU it just wraps the arrays). `wire_maps` downsizes and quantises the anomaly maps on the
device, so only the small maps and the scores come back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from workers.processing import WireMap

_ALIGN = 64  # byte alignment of each array in the staging buffer (any dtype's view stays aligned)


class Staging:
    """A reusable pinned host buffer for host -> device copies; grows to the largest batch seen."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffer: torch.Tensor | None = None

    def upload(self, arrays: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Tensors on the device with the arrays' shapes and dtypes (one host -> device copy on CUDA)."""
        if self.device.type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        offsets, total = [], 0
        for a in arrays:
            offsets.append(total)
            total += -(-a.nbytes // _ALIGN) * _ALIGN
        if self._buffer is None or self._buffer.numel() < total:
            self._buffer = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=True)
        host = self._buffer.numpy()
        for a, off in zip(arrays, offsets, strict=True):
            host[off : off + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        # The pinned buffer is reused by the next batch: this copy must finish before we return.
        on_device = self._buffer[:total].to(self.device, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        out = []
        for a, off in zip(arrays, offsets, strict=True):
            raw = on_device[off : off + a.nbytes]
            out.append(raw.view(_TORCH_DTYPES[a.dtype.str]).view(a.shape))
        return out


_TORCH_DTYPES = {
    np.dtype(np.uint8).str: torch.uint8,
    np.dtype(np.float32).str: torch.float32,
    np.dtype(np.float16).str: torch.float16,
    np.dtype(np.float64).str: torch.float64,
}


def wire_shape(image_hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(h, w) of the map on the wire: the image's aspect, longer side at most `max_side`."""
    h, w = image_hw
    if max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    return max(1, min(max_side, round(h * s))), max(1, min(max_side, round(w * s)))


def wire_maps(
    maps: torch.Tensor,
    image_shapes: Sequence[tuple[int, int]],
    max_side: int,
    encoding: str = "png8",
    keep_values: Sequence[bool] | None = None,
) -> list[WireMap]:
    """Model-resolution maps (B, S, S) on the device -> per frame, the map resized to its wire shape and
    quantised (png8: uint8 with the map's own min/max; float16: halfs), copied back per distinct shape.
    The float maps themselves (`values`, for cutting regions) come back only for the frames marked in
    `keep_values` (the anomalous ones; default: all)."""
    if encoding not in ("png8", "float16"):
        raise ValueError(f"unknown map encoding {encoding!r}")
    out: list[WireMap | None] = [None] * len(image_shapes)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(image_shapes):
        groups.setdefault(wire_shape(hw, max_side), []).append(i)
    with torch.inference_mode():
        for shape, idx in groups.items():
            m = maps[torch.tensor(idx, device=maps.device)].float().unsqueeze(1)
            if tuple(m.shape[-2:]) != shape:
                shrink = shape[0] < m.shape[-2] or shape[1] < m.shape[-1]
                m = F.interpolate(m, size=shape, mode="bilinear", align_corners=False, antialias=shrink)
            m = m[:, 0]
            lo = m.flatten(1).amin(dim=1)
            hi = m.flatten(1).amax(dim=1)
            # A flat map: any hi > lo decodes every pixel 0 back to lo.
            hi = torch.where(hi > lo, hi, lo + torch.clamp(lo.abs(), min=1.0))
            if encoding == "png8":
                scale = 255.0 / (hi - lo).double()
                px = ((m.double() - lo.double().view(-1, 1, 1)) * scale.view(-1, 1, 1)).round_().clamp_(0, 255)
                px = px.to(torch.uint8)
            else:
                px = m.clamp(-65504.0, 65504.0).half()
            kept = [k for k, i in enumerate(idx) if keep_values is None or keep_values[i]]
            value_of = dict(zip(kept, (m if len(kept) == len(idx) else m[kept]).cpu().numpy(), strict=True))
            px, (lo, hi) = px.cpu().numpy(), torch.stack([lo, hi]).tolist()
            for k, i in enumerate(idx):
                out[i] = WireMap(value_of.get(k), px[k], float(lo[k]), float(hi[k]), tuple(image_shapes[i]))
    return [w for w in out if w is not None]
