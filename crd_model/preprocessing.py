"""Batched preprocessing on the model's device: raw (rgb, xyz) frames -> model input tensors.

One implementation serves training, `eval`, `predict` and the workers, so the model sees in serving
exactly what it saw in training. It follows the published 3D recipe (CRD / TRD on MVTec 3D-AD):
resize the point map with nearest neighbour only (missing (0, 0, 0) points are never mixed in), fit the
background plane on the border points, keep what is raised above it, fill missing points inside the
object from their neighbours, then encode as surface normals or as height above the plane.

Everything after the per-frame resize runs on whole (B, ..., S, S) batches with torch ops (max-pool
morphology, separable convolutions, batched least squares and RANSAC). Iterative steps (hole filling,
reachability) stop as soon as nothing changes, so their cost follows the data, not a worst case.
tests/reference_preprocess.py keeps the earlier numpy/scipy/open3d implementation that this one is
checked against.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crd_model.config import CRDConfig

MIN_PLANE_POINTS = 16  # fewer valid border points than this: no trustworthy plane
REFINE_POINTS = 2048  # border points the plane is refined on (a deterministic, evenly spread subsample)
RANSAC_POINTS = 512  # of those, the ones each candidate plane is scored on
RANSAC_ITERATIONS = 128  # 3-point draws; with 30 % of border points on the plane, P(miss) ~ 1e-2 ** 1.5
REFINE_ROUNDS = 5
BORDER = 0.1  # share of each side that forms the border strip the plane is fitted on
CLOSING = 3  # side of the square closing the foreground mask
MIN_AREA = 8  # foreground specks smaller than this (pixels at model resolution) are dropped
FILL_MAX_ITER = 64
SMOOTHING_AT_256 = 1.5  # Gaussian sigma (px at 256 px) of the point-map smoothing before normals
CPU_CHUNK = 2  # frames per pass of the normals stage on a CPU (cache-sized working set)


@dataclass
class ModelInput:
    """A batch ready for the model: float32 (B, 3, S, S) tensors in [0, 1] on the model's device."""

    rgb: torch.Tensor | None
    x3d: torch.Tensor | None

    def __len__(self) -> int:
        t = self.rgb if self.rgb is not None else self.x3d
        return 0 if t is None else int(t.shape[0])


# ------------------------------------------------------------------------------------------------ resizing


def launch_bound(device: torch.device) -> bool:
    """Whether launching operators, rather than their passes over memory, costs the time on `device` (a
    GPU): then the whole batch goes at once, flood fills take whole runs per round, and a batch's points
    are gathered in one operator. On a CPU a few frames at a time stay in cache and each pass counts.
    (bench/preprocess_profile.py --like-gpu takes these paths on a CPU to count a GPU's operators.)"""
    return device.type != "cpu"


@functools.cache
def nearest_indices(size_in: int, size_out: int) -> torch.Tensor:
    """Source index of each output pixel, sampled at pixel centres (as `nearest-exact`), in float64."""
    idx = ((torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out)).long()
    return idx.clamp_(max=size_in - 1)


@functools.cache
def _flat_nearest_indices(h: int, w: int, size: int) -> torch.Tensor:
    """Row-major source pixel of each pixel of a (size, size) nearest-neighbour resize of (h, w):
    one gather of whole (x, y, z) rows instead of a row gather and then a column gather."""
    return (nearest_indices(h, size).unsqueeze(1) * w + nearest_indices(w, size).unsqueeze(0)).flatten()


def resize_nearest(a: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of (H, W, ...) by index gathering: values are copied, never mixed."""
    h, w = a.shape[:2]
    if (h, w) == tuple(out_hw):
        return a
    rows = nearest_indices(h, out_hw[0]).to(a.device)
    cols = nearest_indices(w, out_hw[1]).to(a.device)
    return a.index_select(0, rows).index_select(1, cols)


def _group_by_shape(arrays: Sequence[torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(tuple(a.shape), []).append(i)
    return groups


def _resize_rgb_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """CPU: torch's uint8 kernel for channels-last images (Pillow-SIMD's integer arithmetic), 5-10x
    faster than resizing floats; within one 8-bit step of `_resize_rgb_float`."""
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.float().div_(255.0)


def _resize_rgb_float(x: torch.Tensor, size: int) -> torch.Tensor:
    """GPU (no uint8 antialiased kernel there): resized as floats, then rounded to 8-bit steps."""
    x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0.0, 255.0).div_(255.0)


def resize_rgb(rgbs: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """uint8 (H, W, 3) images (any sizes) -> float32 (B, 3, size, size) in [0, 1].

    Bilinear with antialiasing when shrinking (Pillow's BILINEAR resize); frames of one size are resized
    together.
    """
    for t in rgbs:
        if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[2] != 3:
            raise ValueError(f"rgb must be uint8 (H, W, 3); got {t.dtype} {tuple(t.shape)}")
    device = rgbs[0].device
    groups = _group_by_shape(rgbs)
    out = None if len(groups) == 1 else torch.empty((len(rgbs), 3, size, size), dtype=torch.float32, device=device)
    for (h, w, _), idx in groups.items():
        x = torch.stack([rgbs[i] for i in idx]).permute(0, 3, 1, 2)  # channels-last memory, NCHW view
        if (h, w) == (size, size):
            x = x.float().div_(255.0)
        elif device.type == "cpu":
            x = _resize_rgb_uint8(x, size)
        else:
            x = _resize_rgb_float(x, size)
        if out is None:
            out = x
        else:
            out[torch.tensor(idx, device=device)] = x
    return out


def _gather_points(xyzs: Sequence[torch.Tensor], points: torch.Tensor, stack_first: bool) -> torch.Tensor:
    """(B, len(points), 3): the flat pixels `points` of each (H, W, 3) frame (all of one size).

    stack_first: one stack and one gather for the batch (two operator launches whatever its size: a GPU
    is bound by launches here); else frame by frame, so full-resolution frames are never stacked (a
    large frame is mostly dropped: on a CPU, stacking 800 x 800 frames first was 4.8x slower)."""
    if stack_first:
        return torch.stack(list(xyzs)).flatten(1, 2).index_select(1, points)
    return torch.stack([t.reshape(-1, 3).index_select(0, points) for t in xyzs])


def resize_points(xyzs: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """float (H, W, 3) point maps (any sizes) -> float32 (B, 3, size, size); non-finite points -> missing."""
    for t in xyzs:
        if t.ndim != 3 or t.shape[2] != 3 or not t.is_floating_point():
            raise ValueError(f"xyz must be float (H, W, 3); got {t.dtype} {tuple(t.shape)}")
    device = xyzs[0].device
    groups = _group_by_shape(xyzs)
    out = None if len(groups) == 1 else torch.empty((len(xyzs), size, size, 3), dtype=torch.float32, device=device)
    for (h, w, _), idx in groups.items():
        if (h, w) == (size, size):
            x = torch.stack([xyzs[i] for i in idx]).float()
        else:  # one copy of the indices per size (no per-frame host -> device copy)
            points = _flat_nearest_indices(h, w, size).to(device)
            x = _gather_points([xyzs[i] for i in idx], points, stack_first=launch_bound(device))
            x = x.float().view(len(idx), size, size, 3)
        if out is None:
            out = x
        else:
            out[torch.tensor(idx, device=device)] = x
    out = out.permute(0, 3, 1, 2).contiguous()
    # A point's sum is finite unless a coordinate is not (or they overflow float32 together: no point
    # either); twice as fast as testing each coordinate on a CPU.
    return out.masked_fill_(~torch.isfinite(out.sum(dim=1, keepdim=True)), 0.0)


# ---------------------------------------------------------------------------------------------- plane fit


def _any_along(mask: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """`mask.any(dim)` as a max over uint8: torch's boolean reductions are 3-10x slower on a CPU."""
    return mask.view(torch.uint8).amax(dim=dim, keepdim=keepdim).view(torch.bool)


def _any(mask: torch.Tensor) -> bool:
    return bool(mask.view(torch.uint8).max())


def valid_points(xyz: torch.Tensor) -> torch.Tensor:
    """(B, S, S) bool of (B, 3, S, S) point maps: not the (0, 0, 0) that marks a missing point."""
    return _any_along(xyz != 0, dim=1)


@functools.cache
def _border_index(h: int, w: int, corners_only: bool) -> torch.Tensor:
    bh, bw = max(1, round(BORDER * h)), max(1, round(BORDER * w))
    m = torch.zeros((h, w), dtype=torch.bool)
    if corners_only:
        for rows in (slice(0, bh), slice(h - bh, h)):
            for cols in (slice(0, bw), slice(w - bw, w)):
                m[rows, cols] = True
    else:
        m[:bh], m[h - bh :], m[:, :bw], m[:, w - bw :] = True, True, True, True
    return torch.nonzero(m.flatten()).flatten()


def _border_points(xyz: torch.Tensor, corners_only: bool) -> torch.Tensor:
    """(B, Nb, 3) points of the border strip (or its four corner patches) of (B, 3, H, W), row-major.

    Slices rather than an index gather (several times faster on a CPU); the same points in the same
    order as `_border_index`, which serves images too small for the strips not to overlap.
    """
    b, _, h, w = xyz.shape
    bh, bw = max(1, round(BORDER * h)), max(1, round(BORDER * w))
    if h <= 2 * bh or w <= 2 * bw:
        index = _border_index(h, w, corners_only).to(xyz.device)
        return xyz.reshape(b, 3, h * w).index_select(2, index).transpose(1, 2)
    top, bottom = xyz[:, :, :bh], xyz[:, :, h - bh :]
    if corners_only:
        parts = [torch.cat([band[..., :bw], band[..., w - bw :]], dim=3) for band in (top, bottom)]
    else:
        middle = xyz[:, :, bh : h - bh]
        parts = [top, torch.cat([middle[..., :bw], middle[..., w - bw :]], dim=3), bottom]
    return torch.cat([p.flatten(2) for p in parts], dim=2).transpose(1, 2)


@functools.cache
def _ransac_draws(iterations: int) -> torch.Tensor:
    """Fixed uniform draws (iterations, 3): each image maps them onto its own valid points, so a frame's
    plane never depends on the rest of its batch or on timing."""
    return torch.rand((iterations, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _lsq_planes(points: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Total-least-squares planes (B, 4) of weighted point sets (B, N, 3): unit normal n and d, n.p + d = 0."""
    w = weights.unsqueeze(-1)
    total = w.sum(dim=1).clamp_min(1e-12)
    centre = (points * w).sum(dim=1) / total
    diff = (points - centre.unsqueeze(1)) * w.sqrt()
    cov = diff.transpose(1, 2) @ diff
    normal = torch.linalg.eigh(cov)[1][..., 0]  # eigenvector of the smallest eigenvalue
    return torch.cat([normal, -(normal * centre).sum(dim=1, keepdim=True)], dim=1)


def fit_planes(xyz: torch.Tensor, method: str = "ransac", distance: float = 0.005) -> tuple[torch.Tensor, torch.Tensor]:
    """Background planes of a batch of point maps (B, 3, S, S), fitted on valid points of the border.

    Returns (planes (B, 4) float64, unit normal oriented so the camera (origin) is on the positive side;
    ok (B,) bool, False where fewer than MIN_PLANE_POINTS valid border points exist).
    "ransac": the best of RANSAC_ITERATIONS 3-point planes on an evenly spread subsample of the border
    points, then least-squares refits on its inliers until they settle; "corners": least squares through
    the four corner patches.
    """
    if method not in ("ransac", "corners"):
        raise ValueError(f"unknown plane method {method!r}; expected 'ransac' or 'corners'")
    b = xyz.shape[0]
    device = xyz.device
    pts = _border_points(xyz, method == "corners")  # (B, Nb, 3)
    valid = _any_along(pts != 0, dim=-1)
    counts = valid.sum(dim=1)
    ok = counts >= MIN_PLANE_POINTS
    # An evenly spread subsample of the valid points, in border order: the k-th valid point is where
    # the running count of valid points first reaches k + 1.
    m = REFINE_POINTS if method == "ransac" else pts.shape[1]
    j = torch.arange(m, device=device, dtype=torch.float64)
    span = torch.clamp(counts, min=m).to(torch.float64)
    pos = (j.unsqueeze(0) * span.unsqueeze(1) / m).long()
    take = torch.searchsorted(valid.cumsum(dim=1), pos + 1).clamp_(max=pts.shape[1] - 1)
    weight = (j.unsqueeze(0) < counts.unsqueeze(1)).double()
    sample = pts.gather(1, take.unsqueeze(-1).expand(-1, -1, 3)).double() * weight.unsqueeze(-1)  # (B, M, 3)

    if method == "corners":
        planes = _lsq_planes(sample, weight)
    else:
        n_avail = torch.clamp(torch.minimum(counts, torch.tensor(m, device=device)), min=1)
        # Candidates are drawn from, and scored on, every (m / RANSAC_POINTS)-th point of the subsample.
        stride = m // RANSAC_POINTS
        scored = sample[:, ::stride]
        n_scored = torch.clamp((n_avail + stride - 1) // stride, min=1).to(torch.float64)
        draws = _ransac_draws(RANSAC_ITERATIONS).to(device)
        tri_idx = (draws.unsqueeze(0) * n_scored.view(b, 1, 1)).long()  # (B, K, 3)
        tri = scored.gather(1, tri_idx.view(b, -1, 1).expand(-1, -1, 3)).view(b, RANSAC_ITERATIONS, 3, 3)
        normals = torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])
        norms = normals.norm(dim=-1, keepdim=True)
        degenerate = norms[..., 0] < 1e-12
        normals = normals / norms.clamp_min(1e-12)
        offsets = -(normals * tri[:, :, 0]).sum(dim=-1, keepdim=True)  # (B, K, 1)
        # Scoring in float32 (0.1 um steps at 1 m, far below the inlier distance), in homogeneous
        # coordinates so one matmul gives every signed distance; padding points sit far off every plane.
        far = torch.where(weight[:, ::stride].unsqueeze(-1) > 0, scored, torch.full_like(scored, 1e9))
        homo = torch.cat([far, torch.ones_like(far[..., :1])], dim=-1).float()
        dist = homo @ torch.cat([normals, offsets], dim=-1).float().transpose(1, 2)  # (B, M', K)
        inliers = torch.count_nonzero(dist.abs_() < distance, dim=1)
        inliers = torch.where(degenerate, torch.full_like(inliers, -1), inliers)
        best = inliers.argmax(dim=1)  # ties: the first draw, as a sequential RANSAC keeps it
        planes = torch.cat([normals, offsets], dim=-1)[torch.arange(b, device=device), best]
        keep = weight > 0
        for _ in range(REFINE_ROUNDS):
            near = ((sample @ planes[:, :3].unsqueeze(-1)).squeeze(-1) + planes[:, 3:]).abs() < distance
            near &= weight > 0
            enough = near.sum(dim=1, keepdim=True) >= 3
            keep = torch.where(enough, near, keep)
            planes = _lsq_planes(sample, keep.double())
    planes = planes / planes[:, :3].norm(dim=1, keepdim=True).clamp_min(1e-12)
    planes = torch.where(planes[:, 3:] < 0, -planes, planes)  # d = signed distance of the camera: positive
    return planes, ok


# ------------------------------------------------------------------------------------ masks and hole filling


def _dilate(mask: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Binary dilation of (B, S, S) with a k x k square; pixels outside the image count as background.

    Separable, on booleans: a max over k shifted copies per axis (cheaper than pooling floats on a CPU).
    """
    r = k // 2
    out = mask
    for dim in (1, 2):
        acc = out.clone()
        n = out.shape[dim]
        for shift in range(1, r + 1):
            acc.narrow(dim, shift, n - shift).logical_or_(out.narrow(dim, 0, n - shift))
            acc.narrow(dim, 0, n - shift).logical_or_(out.narrow(dim, shift, n - shift))
        out = acc
    return out


def _erode(mask: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Binary erosion; pixels outside the image do not erode (callers pad when that matters)."""
    return ~_dilate(~mask, k)


def _closing(mask: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 1:
        return mask
    padded = F.pad(mask, (k, k, k, k))  # so the closing does not eat objects touching the image border
    return _erode(_dilate(padded, k), k)[:, k:-k, k:-k]


def _grow4(mask: torch.Tensor) -> torch.Tensor:
    """mask | its 4-connected neighbours."""
    out = mask.clone()
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    out[:, :, 1:] |= mask[:, :, :-1]
    out[:, :, :-1] |= mask[:, :, 1:]
    return out


def _reach(seeds: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """The pixels of `region` 4-connected to `seeds` within it (seeds outside `region` count as reached,
    and reach their neighbours in it)."""
    if launch_bound(region.device):
        return _reach_by_runs(seeds, region)
    return _reach_by_pixels(seeds, region)


def _reach_by_pixels(seeds: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """`_reach` one pixel per round: a few cheap boolean operators per round, one round per pixel of
    the longest path (the cheaper way on a CPU, where each operator's work counts)."""
    reached = seeds
    for _ in range(region.shape[1] * region.shape[2]):  # ends when nothing changes
        grown = (_grow4(reached) & region) | seeds
        if not _any(grown ^ reached):  # grown holds reached: equal when nothing was added
            break
        reached = grown
    return reached


def _run_ids(region: torch.Tensor) -> torch.Tensor:
    """Flat (B * H * W,) index of the run (maximal horizontal segment) of `region` (B, H, W) each pixel
    lies in: the k-th run's pixels carry k (other pixels a neighbour's: callers mask them out)."""
    starts = region.clone()
    starts[..., 1:] &= ~region[..., :-1]  # a run starts where the region does, or at a row's first pixel
    return starts.flatten().cumsum(0)


def _spread_along_runs(reached: torch.Tensor, region: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """reached | every run of `region` holding a reached pixel; (B, H, W) bool. `run` numbers each
    pixel's run (flat, in `region`'s order): computed once per flood fill, the region does not change."""
    hits = torch.zeros(run.numel() + 1, dtype=torch.int32, device=run.device)
    hits.scatter_add_(0, run, (reached & region).flatten().to(torch.int32))
    return reached | (region & (hits[run] > 0).view_as(region))


def _reach_by_runs(seeds: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """`_reach` a whole horizontal, then vertical, run of the region per step: one round per turn of
    the longest path instead of one per pixel, so a few rounds (each a host synchronisation on a GPU)
    instead of up to S; heavier operators (scan, scatter, gather), cheap on a GPU."""
    b, h, w = region.shape
    reached = (_grow4(seeds) & region) | seeds
    rows = _run_ids(region)
    # Vertical runs are numbered along the columns, then each number is put back at its pixel: the
    # rounds then scatter and gather in the frames' own layout, with no transposes.
    columns = _run_ids(region.transpose(1, 2).contiguous()).view(b, w, h).transpose(1, 2).flatten()
    for _ in range(h * w):  # ends when nothing changes
        grown = _spread_along_runs(_spread_along_runs(reached, region, rows), region, columns)
        if not _any(grown ^ reached):
            break
        reached = grown
    return reached


def _clear_to_border(fg: torch.Tensor) -> torch.Tensor:
    """(B, S, S): the pixels from which a straight line left, right, up or down meets no `fg` pixel
    (before a row's or column's first object pixel, or after its last)."""
    u = fg.view(torch.uint8)
    clear = None
    for dim in (2, 1):
        n = fg.shape[dim]
        index = torch.int16 if n < 2**15 - 1 else torch.int32  # half the bytes of int32 where it fits
        pos = torch.arange(n, device=fg.device, dtype=index).view((1, 1, n) if dim == 2 else (1, n, 1))
        last = (u * (pos + 1)).amax(dim=dim, keepdim=True) - 1  # -1 where the line holds no object pixel
        first = n - (u * (n - pos)).amax(dim=dim, keepdim=True)  # n there
        side = (pos < first) | (pos > last)
        clear = side if clear is None else clear | side
    return clear


def _outside(fg: torch.Tensor, open_at: torch.Tensor | None = None) -> torch.Tensor:
    """Background pixels (~fg) 4-connected, through background, to the image border or to `open_at`."""
    region = ~fg
    seeds = torch.zeros_like(region) if open_at is None else region & open_at
    # Seed every pixel with a straight line to the border (all of the outside of a convex object), so
    # the flood only has the object's bays left to fill: a few rounds instead of ~S/2.
    seeds |= _clear_to_border(fg)
    return _reach(seeds, region)


def enclosed_missing(fg: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Holes of `fg` made only of missing points (4-connected, as scipy's fill_holes and label).

    A background pixel is outside a hole if its component of ~fg reaches the image border or holds a
    valid point (valid background, e.g. a ring's centre, stays out).
    """
    return ~fg & ~_outside(fg, valid)


def drop_specks(fg: torch.Tensor, min_area: int = MIN_AREA) -> torch.Tensor:
    """Drop foreground pixels whose (2 * min_area - 1)-square window holds fewer than `min_area` of them.

    A component of fewer than `min_area` pixels lies inside that window around any of its pixels, so an
    isolated speck is always dropped; a pixel of a larger component never is. A speck within
    `min_area - 2` pixels of other foreground is kept (unlike a full component labelling; cheap on any
    device).
    """
    if min_area <= 1:
        return fg
    return fg & (_box_count(fg, 2 * (min_area - 1) + 1) >= min_area)


def foreground(
    valid: torch.Tensor, height: torch.Tensor | None, distance: float, grow_distance: float | None = None
) -> torch.Tensor:
    """The object: the valid points more than `distance` above the plane (`height` None: every valid
    point), grown through the valid points 4-connected to them more than `grow_distance` above it
    (hysteresis: a thin body whose height sits near `distance` stays whole), closed, with the valid
    points it encloses more than `grow_distance / 2` above the plane (a recessed face) and its holes of
    missing points added, specks dropped; a bore, which shows the plane, stays out."""
    grow = height is not None and grow_distance is not None
    fg = valid if height is None else valid & (height > distance)
    if grow:
        fg = _reach(fg, valid & (height > grow_distance))
    fg = _closing(fg, CLOSING)
    if grow:
        fg = fg | (valid & (height > 0.5 * grow_distance) & ~_outside(fg))
    fg = fg | enclosed_missing(fg, valid)
    return drop_specks(fg)


def _box_count(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Number of True pixels in the k x k window around each pixel of (B, S, S) (zeros outside), exact.

    Integral image: two cumulative sums and four lookups, whatever k is.
    """
    r = k // 2
    c = F.pad(mask.to(torch.int32), (r + 1, r, r + 1, r)).cumsum(1).cumsum(2)
    h, w = mask.shape[1:]
    return c[:, k:, k:] - c[:, :h, k:] - c[:, k:, :w] + c[:, :h, :w]


def _box3_sum(x: torch.Tensor) -> torch.Tensor:
    """3 x 3 box sums over the last two dims, zeros outside (shifted adds: exact for any values)."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = p[..., :-2, :] + p[..., 1:-1, :] + p[..., 2:, :]
    return rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]


def fill_missing(
    points: torch.Tensor, known: torch.Tensor, region: torch.Tensor, max_iter: int = FILL_MAX_ITER
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill pixels of `region` that are not `known` with the mean of their known 3 x 3 neighbours.

    Iterative (filled pixels become sources in the next round) until nothing is left, nothing changes,
    or `max_iter` rounds. points: (B, C, S, S). Returns (points, known) with the filled pixels known.
    """
    if launch_bound(points.device) or len(points) <= CPU_CHUNK:
        return _fill_missing(points, known, region, max_iter)
    parts = [
        _fill_missing(points[i : i + CPU_CHUNK], known[i : i + CPU_CHUNK], region[i : i + CPU_CHUNK], max_iter)
        for i in range(0, len(points), CPU_CHUNK)
    ]
    return torch.cat([v for v, _ in parts]), torch.cat([k for _, k in parts])


def _fill_missing(
    points: torch.Tensor, known: torch.Tensor, region: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    values = points.clone()
    known = known.clone()
    todo = region & ~known
    h, w = todo.shape[1:]
    whole = launch_bound(points.device)
    for _ in range(max_iter):
        if whole:  # every round on the whole frames: no bounding box to ask the device for
            (r0, r1), (c0, c1) = (0, h), (0, w)
        else:  # the bounding box (over the batch) of what is left, plus the 1-pixel ring it reads
            box = _bounding_box(todo, margin=1)
            if box is None:
                break
            (r0, r1), (c0, c1) = (box[0].start, box[0].stop), (box[1].start, box[1].stop)
        k = known[:, r0:r1, c0:c1]
        v = values[:, :, r0:r1, c0:c1]
        kf = k.unsqueeze(1).to(values.dtype)
        if whole:  # the known values' sums and their count in one pass: fewer launches
            both = _box3_sum(torch.cat([v * kf, kf], dim=1))
            sums, count = both[:, :-1], both[:, -1]
        else:  # the count first: the last round needs no sums (a CPU pays for each pass)
            sums, count = None, _box3_sum(kf)[:, 0]
        new = todo[:, r0:r1, c0:c1] & (count > 0.5)
        if not _any(new):  # also when nothing is left to fill
            break
        if sums is None:
            sums = _box3_sum(v * kf)
        v.copy_(torch.where(new.unsqueeze(1), sums / count.clamp_min(1.0).unsqueeze(1), v))
        k |= new
        todo[:, r0:r1, c0:c1] &= ~new
    return values, known


# -------------------------------------------------------------------------------------- representations


def _correlate1d(x: torch.Tensor, weights: Sequence[float], dim: int) -> torch.Tensor:
    """Correlate along `dim` with a short odd kernel, symmetric padding (scipy.ndimage's "reflect")."""
    r = len(weights) // 2
    n = x.shape[dim]
    if r:
        lead, tail = x.narrow(dim, 0, r).flip(dim), x.narrow(dim, n - r, r).flip(dim)
        x = torch.cat([lead, x, tail], dim=dim)
    out = None
    for i, wt in enumerate(weights):
        if wt == 0:
            continue
        term = x.narrow(dim, i, n)
        if out is None:
            out = term * wt
        else:
            out.add_(term, alpha=wt)  # in place: one pass per tap, no temporaries (memory-bound on a CPU)
    assert out is not None
    return out


def _correlate_separable(x: torch.Tensor, along_w: Sequence[float], along_h: Sequence[float]) -> torch.Tensor:
    """Correlate (B, C, H, W) with 1-D kernels along W then H."""
    return _correlate1d(_correlate1d(x, along_w, dim=3), along_h, dim=2)


def _gaussian_weights(sigma: float, truncate: float) -> list[float]:
    radius = int(truncate * sigma + 0.5)  # as scipy.ndimage.gaussian_filter
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).tolist()


def _smooth_points(points: torch.Tensor, region: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of (B, 3, S, S) over `region` only (normalised convolution).

    Gradients of raw points amplify sensor noise, and nearest-neighbour upsampling repeats rows and
    columns (zero steps, then double steps); a little smoothing removes both without mixing in the
    background, at a scale (~1.5 px at 256) well below the defects of interest.
    """
    if sigma <= 0:
        return points
    k = _gaussian_weights(sigma, 3.0)
    w = region.unsqueeze(1).to(points.dtype)
    both = _correlate_separable(torch.cat([points * w, w], dim=1), k, k)  # numerator and weights at once
    smoothed = both[:, :3] / both[:, 3:].clamp_min(1e-6)
    return torch.where(region.unsqueeze(1), smoothed, points)


def _rotations_to_down(normals: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (B, 3, 3) taking unit vectors (B, 3) onto (0, 0, -1) (Rodrigues)."""
    target = torch.tensor([0.0, 0.0, -1.0], dtype=normals.dtype, device=normals.device).expand_as(normals)
    v = torch.linalg.cross(normals, target)
    c = (normals * target).sum(dim=1)
    zero = torch.zeros_like(c)
    vx = torch.stack(
        [
            torch.stack([zero, -v[:, 2], v[:, 1]], dim=1),
            torch.stack([v[:, 2], zero, -v[:, 0]], dim=1),
            torch.stack([-v[:, 1], v[:, 0], zero], dim=1),
        ],
        dim=1,
    )
    eye = torch.eye(3, dtype=normals.dtype, device=normals.device).expand(len(normals), 3, 3)
    rot = eye + vx + vx @ vx / (1 + c).clamp_min(1e-12).view(-1, 1, 1)
    return torch.where((c < -0.999999).view(-1, 1, 1), -eye, rot)


def surface_normals(points: torch.Tensor, planes: torch.Tensor | None) -> torch.Tensor:
    """Unit normals (B, 3, S, S) of organised point maps (B, 3, S, S) without missing points, facing the camera."""
    diff, smooth = (-1.0, 0.0, 1.0), (1.0, 2.0, 1.0)
    du = _correlate_separable(points, diff, smooth)  # Sobel: d/dcol, smoothed along rows
    dv = _correlate_separable(points, smooth, diff)
    n = torch.stack(
        [
            du[:, 1] * dv[:, 2] - du[:, 2] * dv[:, 1],
            du[:, 2] * dv[:, 0] - du[:, 0] * dv[:, 2],
            du[:, 0] * dv[:, 1] - du[:, 1] * dv[:, 0],
        ],
        dim=1,
    )
    facing = (n * points).sum(dim=1, keepdim=True)
    n = torch.where(facing > 0, -n, n)  # towards the camera: n . (0 - P) > 0
    n = n / (n * n).sum(dim=1, keepdim=True).sqrt_().clamp_min_(1e-20)
    if planes is not None:
        # Express normals in the plane's frame (plane normal -> (0, 0, -1), as for a level plane): the
        # rig's tilt drops out, as it does from the depth variant's height above the plane.
        rot = _rotations_to_down(planes[:, :3]).to(n.dtype)
        n = torch.einsum("bij,bjhw->bihw", rot, n)
    return n


def _bounding_box(mask: torch.Tensor, margin: int) -> tuple[slice, slice] | None:
    """Rows and columns (over the whole batch) where `mask` has pixels, widened by `margin`."""
    plane = _any_along(mask, dim=0)  # one pass over the batch, then two over one (S, S) plane
    rows = torch.nonzero(_any_along(plane, dim=1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(_any_along(plane, dim=0)).flatten()
    h, w = mask.shape[1:]
    r0, r1 = max(int(rows[0]) - margin, 0), min(int(rows[-1]) + margin + 1, h)
    c0, c1 = max(int(cols[0]) - margin, 0), min(int(cols[-1]) + margin + 1, w)
    return slice(r0, r1), slice(c0, c1)


def _scaled_height(filled: torch.Tensor, planes: torch.Tensor | None, fg: torch.Tensor) -> torch.Tensor:
    """Height above the plane (no plane: -z), min-max over each frame's foreground to [0.1, 0.9]; 0 off it."""
    b = len(filled)
    if planes is None:
        height = -filled[:, 2]
    else:
        p = planes.to(filled.dtype)
        height = (filled * p[:, :3, None, None]).sum(dim=1) + p[:, 3, None, None]
    inf = torch.tensor(float("inf"), device=height.device, dtype=height.dtype)
    lo = torch.where(fg, height, inf).flatten(1).amin(dim=1).view(b, 1, 1)
    hi = torch.where(fg, height, -inf).flatten(1).amax(dim=1).view(b, 1, 1)
    spread = hi - lo
    flat = ~(spread > 1e-9)
    scaled = torch.where(flat, torch.full_like(height, 0.5), 0.1 + 0.8 * (height - lo) / torch.where(flat, 1.0, spread))
    return torch.where(fg, scaled, torch.zeros((), device=height.device))


def points_to_3d_input(
    xyz: torch.Tensor,
    representation: str = "normals",
    plane: str = "ransac",
    distance: float = 0.005,
    smoothing: float = SMOOTHING_AT_256,
    grow_distance: float | None = 0.0025,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Point maps (B, 3, S, S) at model resolution -> (float32 (B, 3, S, S) in [0, 1], bool (B, S, S) fg).

    - "depth": height above the plane (plane="none": -z), min-max over the foreground to [0.1, 0.9];
    - "normals": unit surface normals from Sobel gradients of the point map (smoothed over the object
      with a Gaussian of 1.5 px at 256 px), mapped (n + 1) / 2, facing the camera = blue 1;
    - "normals_height": the normals' x and y, and the height as "depth" has it in place of their z.
    The object is the valid points more than `distance` (m) above the plane, grown through the connected
    points more than `grow_distance` above it, with the points it encloses that are more than
    `grow_distance / 2` above it (None: neither). Background is 0. A frame with too few
    valid points, no fittable plane, or no object gets zeros.
    """
    if representation not in ("normals", "depth", "normals_height"):
        raise ValueError(f"unknown representation {representation!r}; expected 'normals', 'depth' or 'normals_height'")
    if plane not in ("ransac", "corners", "none"):
        raise ValueError(f"unknown plane {plane!r}; expected 'ransac', 'corners' or 'none'")
    b, _, s, _ = xyz.shape
    out = torch.zeros((b, 3, s, s), dtype=torch.float32, device=xyz.device)
    valid = valid_points(xyz)
    usable = valid.flatten(1).sum(dim=1) >= MIN_PLANE_POINTS
    planes: torch.Tensor | None = None
    if plane == "none":
        fg = foreground(valid, None, distance)
    else:
        planes, ok = fit_planes(xyz, plane, distance)
        usable &= ok
        p = planes.to(xyz.dtype)
        signed = (xyz * p[:, :3, None, None]).sum(dim=1) + p[:, 3, None, None]
        fg = foreground(valid, signed, distance, grow_distance)
    fg &= usable.view(b, 1, 1)
    filled, known = fill_missing(xyz, valid & fg, fg)
    fg &= known  # anything filling could not reach stays background

    if representation == "depth":
        out[:] = _scaled_height(filled, planes, fg).unsqueeze(1)
        return out, fg

    # The 3x3 gradient stencils of foreground pixels must not see (0, 0, 0): fill the missing pixels right
    # around the foreground (occlusion bands) from their neighbours too.
    ring = _dilate(fg, 3)
    filled, _ = fill_missing(filled, valid_points(filled), ring)
    sigma = smoothing * s / 256.0
    # Only the objects' bounding box (plus what the smoothing and Sobel stencils read) needs the work.
    box = _bounding_box(ring, margin=int(3.0 * sigma + 0.5) + 2)
    if box is None:
        return out, fg
    rows, cols = box
    # On a CPU these ~50 passes are memory-bound: a few frames at a time stay in cache (5x faster);
    # a GPU takes the whole batch at once.
    chunk = b if launch_bound(xyz.device) else CPU_CHUNK
    blue = torch.tensor([1.0, 1.0, -1.0], device=xyz.device, dtype=xyz.dtype).view(1, 3, 1, 1)
    for i in range(0, b, chunk):
        part = slice(i, i + chunk)
        smoothed = _smooth_points(filled[part, :, rows, cols], ring[part, rows, cols], sigma)
        n = surface_normals(smoothed, None if planes is None else planes[part]) * blue  # facing -> blue 1
        crop_fg = fg[part, rows, cols].unsqueeze(1)
        out[part, :, rows, cols] = torch.where(crop_fg, (n + 1) * 0.5, torch.zeros((), device=n.device))
    if representation == "normals_height":
        # A camera-facing normal's z follows from its x and y; its channel carries the height instead.
        out[:, 2] = _scaled_height(filled, planes, fg)
    return out, fg


def pool_over_object(x3d: torch.Tensor, fg: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 3, k*S, k*S) -> (B, 3, S, S): the mean over each k x k cell's object pixels; a cell that is
    mostly background is background (0), as at the model's own resolution."""
    w = fg.unsqueeze(1).to(x3d.dtype)
    total = F.avg_pool2d(x3d * w, k)
    share = F.avg_pool2d(w, k)
    return torch.where(share >= 0.5, total / share.clamp_min(1e-6), torch.zeros((), device=x3d.device))


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` (None: unchanged) for the block, restored after it."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _one_cpu_thread(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """On a CPU, run these many small, memory-bound ops on one thread: OpenMP's fork/join per op costs
    more than it saves here (and stalls badly when the cores are shared), 1.5-4x measured."""
    return intra_op_threads(1 if device.type == "cpu" else None)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a frame the worker uploaded already is taken as it is (no operator launched)."""
    return t if t.device == device else t.to(device, non_blocking=True)


class Preprocessor:
    """Raw frames -> `ModelInput` for one model configuration, on `device`."""

    def __init__(self, config: CRDConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)

    def __call__(self, rgbs: Sequence[torch.Tensor | None], xyzs: Sequence[torch.Tensor | None]) -> ModelInput:
        """rgbs: uint8 (H, W, 3); xyzs: float (H, W, 3) in metres, missing = 0; any sizes, on any device."""
        cfg, size = self.config, self.config.image_size
        rgb = x3d = None
        with torch.inference_mode(), _one_cpu_thread(self.device):
            if cfg.uses_rgb:
                rgb = resize_rgb([_on(t, self.device) for t in rgbs], size)
            if cfg.uses_3d:
                k = cfg.oversample_3d
                xyz = resize_points([_on(t, self.device) for t in xyzs], size * k)
                # the smoothing scales with the resolution: the same blur of the object whatever k is
                x3d, fg = points_to_3d_input(
                    xyz, cfg.representation_3d, cfg.plane, cfg.plane_distance, cfg.smoothing_3d, cfg.plane_grow_distance
                )
                if k > 1:
                    x3d = pool_over_object(x3d, fg, k)
        return ModelInput(rgb, x3d)
