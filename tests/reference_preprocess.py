"""Turning an RGB + xyz pair into model input: float32 CHW arrays in [0, 1] (numpy/scipy, no torch).

ImageNet normalisation happens inside the model, not here. The 3D branch follows the published recipe
(CRD / TRD, MVTec 3D-AD code): resize the point map with nearest neighbour only (never interpolate across
missing (0, 0, 0) points), fit the background plane on the border points, keep what is raised above it,
fill missing points inside the object from their neighbours, then encode as depth or surface normals.
"""

from __future__ import annotations

import functools
import threading
import warnings
from types import ModuleType
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage

F32 = np.float32
MIN_PLANE_POINTS = 16  # fewer valid border points than this: no trustworthy plane
RANSAC_MAX_POINTS = 2000  # subsample of border points (speed; the plane has 3 parameters)
RANSAC_ITERATIONS = 200
# open3d's RANSAC draws from one global generator: seeding + fitting must not interleave across the
# threads of a data loader, or results would depend on timing.
_OPEN3D_LOCK = threading.Lock()


def _valid(xyz: np.ndarray) -> np.ndarray:
    """Valid points: not the (0, 0, 0) that marks a missing point."""
    return (xyz[..., 0] != 0) | (xyz[..., 1] != 0) | (xyz[..., 2] != 0)  # 3x faster than any(axis=-1)


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, size, size) in [0, 1], bilinear (Pillow antialiases when shrinking)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be uint8 (H, W, 3); got {rgb.dtype} {rgb.shape}")
    img = Image.fromarray(rgb)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.ascontiguousarray((np.asarray(img, dtype=F32) / 255.0).transpose(2, 0, 1))


def resize_nearest(arr: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (H, W) or (H, W, C) by index arrays: values are copied, never mixed."""
    arr = np.asarray(arr)
    h, w = arr.shape[:2]
    oh, ow = out_hw
    if (oh, ow) == (h, w):
        return arr.copy()
    rows = np.minimum(((np.arange(oh) + 0.5) * (h / oh)).astype(np.intp), h - 1)  # pixel-centre sampling
    cols = np.minimum(((np.arange(ow) + 0.5) * (w / ow)).astype(np.intp), w - 1)
    return arr[rows[:, None], cols[None, :]]


def _border_mask(h: int, w: int, border: float, corners_only: bool) -> np.ndarray:
    bh, bw = max(1, round(border * h)), max(1, round(border * w))
    m = np.zeros((h, w), dtype=bool)
    if corners_only:
        for rows in (slice(0, bh), slice(h - bh, h)):
            for cols in (slice(0, bw), slice(w - bw, w)):
                m[rows, cols] = True
    else:
        m[:bh], m[h - bh :], m[:, :bw], m[:, w - bw :] = True, True, True, True
    return m


def _lsq_plane(points: np.ndarray) -> np.ndarray:
    """Total-least-squares plane (a, b, c, d) through points (SVD of the centred cloud)."""
    centre = points.mean(axis=0)
    normal = np.linalg.svd(points - centre, full_matrices=False)[2][-1]
    return np.array([*normal, -normal @ centre])


def _refine(points: np.ndarray, plane: np.ndarray, distance: float, rounds: int = 5) -> np.ndarray:
    """Inliers of `plane`, re-fitted until the inlier set stops changing.

    open3d's RANSAC is not reproducible even when seeded (its threads race for the sampler), so its
    answer only picks the basin; this fixed point makes the result the same from run to run.
    """
    keep = np.ones(len(points), dtype=bool)
    for _ in range(rounds):
        new = np.abs(points @ plane[:3] + plane[3]) < distance * np.linalg.norm(plane[:3])
        if new.sum() < 3 or np.array_equal(new, keep):
            break
        keep = new
        plane = _lsq_plane(points[keep])
    return points[keep]


@functools.cache
def _open3d() -> ModuleType | None:
    # Imported lazily: heavy, and absent (or broken, e.g. missing libusb) on some installs.
    try:
        import open3d
    except (ImportError, OSError) as exc:  # pragma: no cover - depends on the install
        warnings.warn(f"open3d unavailable ({exc}); using the numpy RANSAC", RuntimeWarning, stacklevel=3)
        return None
    return open3d


def _ransac_numpy(points: np.ndarray, distance: float, iterations: int, seed: int) -> np.ndarray:
    """Inlier indices of the best of `iterations` random 3-point planes (fallback without open3d)."""
    rng = np.random.default_rng(seed)
    tri = points[rng.integers(0, len(points), size=(iterations, 3))]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    norms = np.linalg.norm(normals, axis=1)
    ok = norms > 1e-12
    normals, tri = normals[ok] / norms[ok, None], tri[ok]
    if len(normals) == 0:
        return np.arange(len(points))
    dist = np.abs(points @ normals.T - np.einsum("ij,ij->i", normals, tri[:, 0]))  # (n_points, n_planes)
    return np.flatnonzero(dist[:, np.argmax((dist < distance).sum(axis=0))] < distance)


def fit_background_plane(
    xyz: np.ndarray,
    method: Literal["ransac", "corners"] = "ransac",
    distance: float = 0.005,
    border: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Background plane (a, b, c, d), unit normal, fitted on valid points of the image border.

    a*x + b*y + c*z + d = 0; oriented so the camera side (the origin) has positive signed distance.
    "ransac": open3d segment_plane on (a subsample of) the border strip, then a least-squares refit on
    its inliers; "corners": least squares through the four corner patches. ValueError if too few points.
    """
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"xyz must be (H, W, 3); got {xyz.shape}")
    if method not in ("ransac", "corners"):
        raise ValueError(f"unknown plane method {method!r}; expected 'ransac' or 'corners'")
    h, w = xyz.shape[:2]
    region = _border_mask(h, w, border, corners_only=method == "corners") & _valid(xyz)
    points = xyz[region].astype(np.float64)
    if len(points) < MIN_PLANE_POINTS:
        raise ValueError(f"too few valid border points to fit the background plane ({len(points)})")
    if method == "ransac":
        if len(points) > RANSAC_MAX_POINTS:
            points = points[np.random.default_rng(seed).choice(len(points), RANSAC_MAX_POINTS, replace=False)]
        o3d = _open3d()
        if o3d is None:
            inliers = _ransac_numpy(points, distance, RANSAC_ITERATIONS, seed)
        else:
            cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
            with _OPEN3D_LOCK:
                o3d.utility.random.seed(seed)
                _, idx = cloud.segment_plane(distance_threshold=distance, ransac_n=3, num_iterations=RANSAC_ITERATIONS)
            inliers = np.asarray(idx, dtype=np.intp)
        if len(inliers) >= 3:
            points = _refine(points, _lsq_plane(points[inliers]), distance)
    plane = _lsq_plane(points)
    plane /= np.linalg.norm(plane[:3])
    if plane[3] < 0:  # signed distance of the origin (the camera) is d: make it positive
        plane = -plane
    return plane


def _enclosed_missing(fg: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Holes of `fg` made only of missing points (valid background, e.g. a ring's centre, stays out)."""
    holes = ndimage.binary_fill_holes(fg) & ~fg
    if not holes.any():
        return holes
    labels, _ = ndimage.label(holes)
    with_valid = np.unique(labels[holes & valid])
    return holes & ~np.isin(labels, with_valid)


def _close_and_fill(
    fg: np.ndarray, valid: np.ndarray, closing: int, min_area: int, lifted: np.ndarray | None = None
) -> np.ndarray:
    if closing > 1:
        pad = closing  # pad so the closing does not eat objects touching the image border
        st = np.ones((closing, closing), dtype=bool)
        fg = ndimage.binary_closing(np.pad(fg, pad), structure=st)[pad:-pad, pad:-pad]
    if lifted is not None:  # enclosed points clear of the plane (a recessed face) are the object's
        fg = fg | (ndimage.binary_fill_holes(fg) & valid & lifted)
    fg = fg | _enclosed_missing(fg, valid)
    if min_area > 1 and fg.any():  # drop specks (outliers, edge artefacts)
        labels, n = ndimage.label(fg)
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        fg = (areas >= min_area)[labels] & fg
    return fg


def foreground_mask(
    xyz: np.ndarray,
    plane: np.ndarray,
    distance: float = 0.005,
    closing: int = 3,
    min_area: int = 8,
    grow_distance: float | None = None,
) -> np.ndarray:
    """bool (H, W): valid points raised more than `distance` (m) towards the camera above `plane`, with
    the components (4-connected) of points raised more than `grow_distance` that hold one of them, and
    the valid points they enclose (after the closing) more than `grow_distance / 2` above the plane.

    Then a binary closing with a `closing` x `closing` square (<= 1: none), missing points enclosed by
    the object become foreground (to be filled), and components under `min_area` pixels are dropped.
    """
    valid = _valid(xyz)
    signed = xyz @ np.asarray(plane[:3], dtype=F32) + F32(plane[3])
    raised = valid & (signed > distance)
    if grow_distance is None:
        return _close_and_fill(raised, valid, closing, min_area)
    rising = valid & (signed > grow_distance)
    labels, _ = ndimage.label(rising)
    raised = rising & np.isin(labels, np.unique(labels[raised]))  # raised lies inside rising
    return _close_and_fill(raised, valid, closing, min_area, lifted=signed > 0.5 * grow_distance)


def fill_holes(values: np.ndarray, valid: np.ndarray, region: np.ndarray, max_iter: int = 64) -> np.ndarray:
    """Fill pixels of `region` that are not `valid` with the mean of their valid 3x3 neighbours.

    Iterative (filled pixels become sources in the next round) until nothing is left or `max_iter`;
    pixels still unreachable keep their input values. `values` is (H, W, C) or (H, W); returns a copy.
    """
    out = np.array(values, dtype=F32, copy=True)
    squeeze = out.ndim == 2
    if squeeze:
        out = out[..., None]
    known, todo = valid.copy(), region & ~valid
    box = (3, 3)
    for _ in range(max_iter):
        if not todo.any():
            break
        rows, cols = np.nonzero(todo)  # work on the bounding box of what is left (holes are small)
        r0, r1 = max(rows.min() - 1, 0), rows.max() + 2
        c0, c1 = max(cols.min() - 1, 0), cols.max() + 2
        k = known[r0:r1, c0:c1]
        sub = out[r0:r1, c0:c1]  # a view: writing into it fills `out`
        src = np.where(k[..., None], sub, F32(0))  # not sub * k: a NaN at a missing pixel would spread
        count = ndimage.uniform_filter(k.astype(F32), size=box, mode="constant")
        sums = ndimage.uniform_filter(src, size=(*box, 1), mode="constant")  # per channel
        new = todo[r0:r1, c0:c1] & (count > 0.5 / 9)
        if not new.any():
            break
        sub[new] = sums[new] / count[new][:, None]
        known[r0:r1, c0:c1] |= new
        todo[r0:r1, c0:c1] &= ~new
    return out[..., 0] if squeeze else out


def _rotation_to(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation matrix taking unit vector a onto unit vector b (Rodrigues)."""
    v, c = np.cross(a, b), float(a @ b)
    if c < -0.999999:
        return -np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)


def _normals(points: np.ndarray, plane: np.ndarray | None) -> np.ndarray:
    """Unit normals (H, W, 3) of an organised point map without missing points, facing the camera."""
    # Sobel per channel: derivative along one image axis, [1, 2, 1] smoothing along the other only.
    du = ndimage.correlate1d(ndimage.correlate1d(points, [-1.0, 0.0, 1.0], axis=1), [1.0, 2.0, 1.0], axis=0)
    dv = ndimage.correlate1d(ndimage.correlate1d(points, [-1.0, 0.0, 1.0], axis=0), [1.0, 2.0, 1.0], axis=1)
    n = np.cross(du, dv)
    facing = n[..., 0] * points[..., 0] + n[..., 1] * points[..., 1] + n[..., 2] * points[..., 2]
    n *= np.where(facing > 0, F32(-1), F32(1))[..., None]  # towards the camera: n . (0 - P) > 0
    n /= np.maximum(np.sqrt(n[..., 0] ** 2 + n[..., 1] ** 2 + n[..., 2] ** 2), 1e-20)[..., None]
    if plane is not None:
        # Express normals in the plane's frame (plane normal -> (0, 0, -1), as for a level plane): the
        # rig's tilt drops out, as it does from the depth variant's height above the plane.
        rot = _rotation_to(np.asarray(plane[:3], dtype=np.float64), np.array([0.0, 0.0, -1.0]))
        n = n @ rot.T.astype(F32)
    return n


def _smooth_points(points: np.ndarray, region: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of the point map over `region` only (normalised convolution).

    Gradients of raw points amplify sensor noise, and nearest-neighbour upsampling repeats rows and
    columns (zero steps, then double steps); a little smoothing removes both without mixing in the
    background, at a scale (~1.5 px at 256) well below the defects of interest.
    """
    if sigma <= 0:
        return points
    w = region.astype(F32)
    num = ndimage.gaussian_filter(points * w[..., None], sigma=(sigma, sigma, 0), truncate=3.0)
    den = ndimage.gaussian_filter(w, sigma=sigma, truncate=3.0)
    out = points.copy()
    out[region] = num[region] / np.maximum(den[region], 1e-6)[:, None]
    return out


def _scaled_height(filled: np.ndarray, coeffs: np.ndarray | None, fg: np.ndarray) -> np.ndarray:
    """Height above the plane (no plane: -z), min-max over the foreground to [0.1, 0.9]; 0 off it."""
    height = -filled[..., 2] if coeffs is None else filled @ coeffs[:3].astype(F32) + F32(coeffs[3])
    lo, hi = float(height[fg].min()), float(height[fg].max())
    scaled = 0.1 + 0.8 * (height - lo) / (hi - lo) if hi - lo > 1e-9 else np.full_like(height, 0.5)
    return np.where(fg, scaled, 0.0).astype(F32)


def xyz_to_3d_input(
    xyz: np.ndarray,
    size: int,
    representation: Literal["normals", "depth", "normals_height"] = "normals",
    plane: Literal["ransac", "corners", "none"] = "ransac",
    distance: float = 0.005,
    smoothing: float = 1.5,
    grow_distance: float | None = 0.0025,
) -> tuple[np.ndarray, np.ndarray]:
    """Point map (H, W, 3) -> (float32 (3, size, size) in [0, 1], bool (size, size) foreground).

    Nearest-resize first, fit the background plane on the resized map, foreground = raised above it,
    fill missing points inside the foreground, then encode:
    - "depth": height above the plane (plane="none": -z), min-max over the foreground to [0.1, 0.9];
    - "normals": unit surface normals from Sobel gradients of the point map (smoothed over the object
      with a Gaussian of `smoothing` px at 256 px), mapped (n + 1) / 2, facing the camera = blue 1;
    - "normals_height": the normals' x and y, and the height as "depth" has it in place of their z.
    Background is 0. No valid points, no fittable plane, or no object: zeros and an empty foreground.
    """
    if representation not in ("normals", "depth", "normals_height"):
        raise ValueError(f"unknown representation {representation!r}; expected 'normals', 'depth' or 'normals_height'")
    if plane not in ("ransac", "corners", "none"):
        raise ValueError(f"unknown plane {plane!r}; expected 'ransac', 'corners' or 'none'")
    xyz = np.asarray(xyz, dtype=F32)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"xyz must be (H, W, 3); got {xyz.shape}")
    empty = np.zeros((3, size, size), dtype=F32), np.zeros((size, size), dtype=bool)
    small = resize_nearest(xyz, (size, size))
    if not np.isfinite(small).all():
        small[~np.isfinite(small).all(axis=-1)] = 0.0  # non-finite counts as missing
    valid = _valid(small)
    if valid.sum() < MIN_PLANE_POINTS:
        return empty

    coeffs: np.ndarray | None = None
    if plane == "none":
        fg = _close_and_fill(valid, valid, closing=3, min_area=8)
    else:
        try:
            coeffs = fit_background_plane(small, method=plane, distance=distance)
        except ValueError:
            return empty  # no background visible at the border: nothing to measure against
        fg = foreground_mask(small, coeffs, distance=distance, grow_distance=grow_distance)
    if not fg.any():
        return empty
    filled = fill_holes(small, valid & fg, fg)
    fg &= _valid(filled)  # anything fill_holes could not reach stays background

    if representation == "depth":
        return np.repeat(_scaled_height(filled, coeffs, fg)[None], 3, axis=0), fg

    # The 3x3 gradient stencils of foreground pixels must not see (0, 0, 0): fill the missing pixels
    # right around the foreground (occlusion bands) from their neighbours too.
    ring = ndimage.binary_dilation(fg, structure=np.ones((3, 3), dtype=bool))
    filled = fill_holes(filled, _valid(filled), ring)
    n = _normals(_smooth_points(filled, ring, sigma=smoothing * size / 256.0), coeffs)
    # Facing the camera maps to blue 1 (as in TRD's (-dz/dx, -dz/dy, 1) convention), so a flat face is
    # (0.5, 0.5, 1) and never confused with the background's 0.
    n[..., 2] *= -1
    out = np.where(fg[..., None], (n + 1) * 0.5, 0.0).astype(F32)
    if representation == "normals_height":  # the normal's z follows from its x and y: the height instead
        out[..., 2] = _scaled_height(filled, coeffs, fg)
    return np.ascontiguousarray(out.transpose(2, 0, 1)), fg
