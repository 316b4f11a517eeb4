"""The batched device preprocessing (crd_model.preprocessing) on point maps with a known answer, and its
agreement with the earlier numpy/scipy/open3d implementation (tests/reference_preprocess.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import crd_model.preprocessing as P
from crd_model.data.synth import render_sample

# Thin numpy-facing wrappers: the tests state their expectations on single frames.


def fit_background_plane(xyz: np.ndarray, method: str = "ransac") -> np.ndarray:
    planes, ok = P.fit_planes(_as_batch(xyz), method)
    assert bool(ok[0])
    return planes[0].numpy()


def _as_batch(xyz: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(xyz, dtype=np.float32)).permute(2, 0, 1)[None].contiguous()


def foreground_mask(
    xyz: np.ndarray, plane: np.ndarray, distance: float = 0.005, grow_distance: float | None = None
) -> np.ndarray:
    x = _as_batch(xyz)
    p = torch.from_numpy(plane).float()
    signed = (x * p[:3].view(1, 3, 1, 1)).sum(dim=1) + p[3]
    return P.foreground(P.valid_points(x), signed, distance, grow_distance)[0].numpy()


def resize_nearest(a: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    return P.resize_nearest(torch.from_numpy(a), out_hw).numpy()


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    return P.resize_rgb([torch.from_numpy(rgb)], size)[0].numpy()


def fill_holes(values: np.ndarray, valid: np.ndarray, region: np.ndarray, max_iter: int = 64) -> np.ndarray:
    a = np.ascontiguousarray(values, dtype=np.float32)
    v = torch.from_numpy(a if a.ndim == 3 else a[..., None]).permute(2, 0, 1)[None]
    out, _ = P.fill_missing(v, torch.from_numpy(valid)[None], torch.from_numpy(region)[None], max_iter)
    out = out[0].permute(1, 2, 0).numpy()
    return out if a.ndim == 3 else out[..., 0]


def xyz_to_3d_input(xyz: np.ndarray, size: int, representation: str = "normals", plane: str = "ransac"):
    x, fg = P.points_to_3d_input(P.resize_points([torch.from_numpy(xyz)], size), representation, plane)
    return x[0].numpy(), fg[0].numpy()


H, W, F, Z0 = 160, 200, 400.0, 0.6  # non-square on purpose; 1.5 mm per pixel


def make_scene(tilt_deg: float = 3.0, azimuth_deg: float = 30.0, box: bool = True, seed: int = 0,
               border_object: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Tilted plane at 0.6 m + a raised 20 mm box + missing zeros; returns (xyz, true normal, box mask)."""
    rng = np.random.default_rng(seed)
    t, a = np.radians(tilt_deg), np.radians(azimuth_deg)
    normal = np.array([np.sin(t) * np.cos(a), np.sin(t) * np.sin(a), -np.cos(t)])  # towards the camera
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    du, dv = (u - (W - 1) / 2) / F, (v - (H - 1) / 2) / F
    z = normal[2] * Z0 / (normal[0] * du + normal[1] * dv + normal[2])
    box_mask = np.zeros((H, W), bool)
    if box:
        box_mask[50:110, 60:150] = True
        z = z - 0.02 * box_mask
    if border_object:  # something raised inside the border strip (not in a corner): RANSAC must ignore it
        z[2:14, 80:120] -= 0.03
    z = z + rng.normal(0, 1e-4, z.shape)
    xyz = np.stack([du * z, dv * z, z], axis=-1).astype(np.float32)
    xyz[rng.random((H, W)) < 0.05] = 0.0  # scattered missing points
    xyz[70:76, 90:96] = 0.0  # a hole of missing points inside the box
    return xyz, normal, box_mask


def angle_deg(plane: np.ndarray, normal: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(plane[:3] @ normal, -1, 1))))


@pytest.mark.parametrize("method", ["ransac", "corners"])
@pytest.mark.parametrize(("tilt", "azimuth"), [(0.0, 0.0), (3.0, 30.0), (6.0, 200.0)])
def test_plane_fit_recovers_normal(method: str, tilt: float, azimuth: float) -> None:
    xyz, normal, _ = make_scene(tilt, azimuth)
    plane = fit_background_plane(xyz, method=method)
    assert plane.shape == (4,)
    assert np.linalg.norm(plane[:3]) == pytest.approx(1.0)
    assert plane[3] > 0  # the camera (origin) is on the positive side
    assert angle_deg(plane, normal) < 1.0
    # the plane passes through the background: 0.6 m along the optical axis
    assert -plane[3] / plane[2] == pytest.approx(Z0, abs=1e-3)


def test_ransac_ignores_objects_in_the_border_and_is_deterministic() -> None:
    xyz, normal, _ = make_scene(4.0, 120.0, border_object=True)
    a = fit_background_plane(xyz, method="ransac")
    for _ in range(5):  # fixed draws: the same frame always gets the same plane
        np.testing.assert_array_equal(fit_background_plane(xyz, method="ransac"), a)
    # ...also inside a batch of other frames (the draws are per frame, not per batch)
    other, _, _ = make_scene(1.0, 10.0, seed=5)
    planes, _ = P.fit_planes(torch.cat([_as_batch(other), _as_batch(xyz)]), "ransac")
    np.testing.assert_allclose(planes[1].numpy(), a, atol=1e-12)
    assert angle_deg(a, normal) < 1.0


def test_plane_fit_needs_points() -> None:
    _, ok = P.fit_planes(_as_batch(np.zeros((40, 50, 3), np.float32)), "ransac")
    assert not bool(ok[0])  # too few valid border points
    with pytest.raises(ValueError):
        P.fit_planes(_as_batch(np.zeros((40, 50, 3), np.float32) + 1), method="mean")


def test_foreground_mask_box_not_plane() -> None:
    xyz, _, box = make_scene()
    plane = fit_background_plane(xyz, method="corners")
    fg = foreground_mask(xyz, plane)
    inner = np.zeros_like(box)
    inner[52:108, 62:148] = True
    outer = np.ones_like(box)
    outer[47:113, 57:153] = False
    assert fg[inner].mean() > 0.99  # scattered missing points and the 6x6 hole are closed / filled
    assert fg[70:76, 90:96].all()
    assert not fg[outer].any()


def thin_part_scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A level plane at 0.6 m, a 4.7 mm thick plate (0.4 mm sensor noise: half its pixels cross 5 mm)
    with an 8 mm hub, and loose 3.5 mm specks on the background; returns (xyz, plate mask, speck mask)."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    plate = ((v - 80) / 50) ** 2 + ((u - 100) / 60) ** 2 < 1
    hub = ((v - 80) / 10) ** 2 + ((u - 100) / 10) ** 2 < 1
    specks = np.zeros((H, W), bool)
    specks[10:13, 20:23] = specks[140:143, 170:173] = True
    height = 0.0047 * plate + 0.0033 * hub + 0.0035 * specks + rng.normal(0, 4e-4, (H, W))
    z = Z0 - height
    du, dv = (u - (W - 1) / 2) / F, (v - (H - 1) / 2) / F
    return np.stack([du * z, dv * z, z], axis=-1).astype(np.float32), plate, specks


def test_a_thin_part_stays_whole_and_loose_background_specks_stay_out() -> None:
    from tests import reference_preprocess as ref

    xyz, plate, specks = thin_part_scene()
    plane = fit_background_plane(xyz, method="corners")
    inner = plate & np.roll(plate, 3, 0) & np.roll(plate, -3, 0) & np.roll(plate, 3, 1) & np.roll(plate, -3, 1)
    without = foreground_mask(xyz, plane)
    grown = foreground_mask(xyz, plane, grow_distance=0.0025)
    assert without[inner].mean() < 0.9  # the 5 mm threshold alone cuts the plate into pieces
    assert grown[inner].all()
    assert not grown[specks].any() and not grown[~plate].any()
    np.testing.assert_array_equal(grown, ref.foreground_mask(xyz, plane, grow_distance=0.0025))


def test_a_recessed_face_inside_the_object_is_object_and_a_bore_is_not() -> None:
    """A lid: a 5.5 mm rim around a centre 2.3 mm high (under the growth threshold, clear of the
    plane), with a bore through which the plane shows."""
    from tests import reference_preprocess as ref

    rng = np.random.default_rng(1)
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    r = np.hypot((v - 80) / 60, (u - 100) / 60)
    rim, centre, bore = (r < 1) & (r > 0.8), r <= 0.8, r < 0.15
    height = 0.0055 * rim + 0.0023 * (centre & ~bore) + rng.normal(0, 1e-4, (H, W))
    z = Z0 - height
    du, dv = (u - (W - 1) / 2) / F, (v - (H - 1) / 2) / F
    xyz = np.stack([du * z, dv * z, z], axis=-1).astype(np.float32)
    plane = fit_background_plane(xyz, method="corners")
    fg = foreground_mask(xyz, plane, grow_distance=0.0025)
    inside = centre & ~bore & (r > 0.2) & (r < 0.75)
    assert fg[rim & (r > 0.82) & (r < 0.98)].all() and fg[inside].all()
    assert not fg[r < 0.12].any()
    assert foreground_mask(xyz, plane)[inside].mean() < 0.01  # without: the centre is background
    np.testing.assert_array_equal(fg, ref.foreground_mask(xyz, plane, grow_distance=0.0025))


def test_old_checkpoints_keep_the_foreground_they_were_trained_with() -> None:
    from crd_model.config import CheckpointMeta, CRDConfig

    old = CheckpointMeta.model_validate({"model_id": "x", "config": {"image_size": 64}})
    assert old.config.plane_grow_distance is None
    assert CRDConfig().plane_grow_distance == 0.0025
    with pytest.raises(ValueError, match="below plane_distance"):
        CRDConfig(plane_grow_distance=0.005)


def test_resize_nearest_keeps_values_exactly() -> None:
    rng = np.random.default_rng(0)
    xyz = rng.random((37, 53, 3)).astype(np.float32)
    xyz[rng.random((37, 53)) < 0.3] = 0.0
    for out_hw in [(16, 16), (64, 80), (37, 53)]:
        out = resize_nearest(xyz, out_hw)
        assert out.shape == (*out_hw, 3) and out.dtype == np.float32
        source = {tuple(p) for p in xyz.reshape(-1, 3)}
        assert all(tuple(p) in source for p in out.reshape(-1, 3))  # no new values, zeros stay (0, 0, 0)
    up = resize_nearest(xyz, (74, 106))
    np.testing.assert_array_equal(up[::2, ::2], xyz)  # exact 2x: each pixel repeated
    labels = rng.integers(0, 5, (10, 12)).astype(np.uint8)
    small = resize_nearest(labels, (5, 7))
    assert small.dtype == np.uint8 and set(np.unique(small)) <= set(np.unique(labels))


def test_resize_rgb() -> None:
    rgb = np.full((120, 90, 3), (255, 128, 0), np.uint8)
    out = resize_rgb(rgb, 64)
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 10, 10], [1.0, 128 / 255, 0.0], atol=1e-6)
    noise = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    out = resize_rgb(noise, 32)
    assert out.min() >= 0.0 and out.max() <= 1.0
    with pytest.raises(ValueError):
        resize_rgb(noise.astype(np.float32), 32)


@pytest.mark.parametrize("hw", [(200, 200), (97, 131), (50, 60), (800, 600)])
def test_the_cpu_rgb_kernel_is_within_one_8_bit_step_of_the_gpu_one(hw) -> None:
    # A model trained on a GPU (float kernel) serves on a CPU (uint8 kernel) and the other way round.
    x = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, *hw, 3), dtype=np.uint8))
    x = x.permute(0, 3, 1, 2)
    fast, slow = P._resize_rgb_uint8(x, 96), P._resize_rgb_float(x, 96)
    assert fast.dtype == slow.dtype == torch.float32 and fast.shape == slow.shape == (2, 3, 96, 96)
    steps = (fast - slow).abs().mul_(255).round_()
    assert steps.max() <= 1 and steps.mean() < 0.25  # rounding between the passes, or not
    assert P.resize_rgb(list(x.permute(0, 2, 3, 1)), 96).equal(fast)  # the CPU path takes the fast one


@pytest.mark.parametrize("hw", [(192, 192), (64, 80), (9, 9), (5, 7), (2, 2)])
@pytest.mark.parametrize("corners_only", [False, True])
def test_border_points_are_the_border_index_gather(hw, corners_only) -> None:
    h, w = hw
    xyz = torch.randn(3, 3, h, w)
    index = P._border_index(h, w, corners_only)
    expected = xyz.reshape(3, 3, h * w).index_select(2, index).transpose(1, 2)
    assert P._border_points(xyz, corners_only).equal(expected)  # the same points, in the same order


def test_uint8_reductions_match_torch_any() -> None:
    mask = torch.rand(4, 17, 23) > 0.97
    for dim in (0, 1, 2, -1):
        assert P._any_along(mask, dim).equal(mask.any(dim=dim))
        assert P._any_along(mask, dim, keepdim=True).equal(mask.any(dim=dim, keepdim=True))
    assert P._any(mask) is True and P._any(torch.zeros(3, 3, dtype=torch.bool)) is False


def _reach_by_labels(seeds: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Independent reference for `_reach`: scipy's 4-connected components of the region that hold a seed
    or touch a seed outside it, plus the seeds."""
    from scipy import ndimage

    out = []
    for s, r in zip(seeds.numpy(), region.numpy(), strict=True):
        labels, _ = ndimage.label(r)  # 4-connected by default
        touched = ndimage.binary_dilation(s) & r  # a seed's own pixel and its 4 neighbours
        out.append(np.isin(labels, np.unique(labels[touched & (labels > 0)])) | s)
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("reach", [P._reach_by_pixels, P._reach_by_runs], ids=["pixels", "runs"])
def test_both_ways_of_reaching_give_the_connected_components_of_the_seeds(reach) -> None:
    # Random masks at every density, so that runs, turns, spirals and seeds outside the region all occur;
    # a spiral needs one round per turn by runs and one per pixel by pixels.
    gen = torch.Generator().manual_seed(0)
    for trial in range(150):
        b, h, w = (int(torch.randint(1, m, (1,), generator=gen)) for m in (4, 33, 33))
        region = torch.rand(b, h, w, generator=gen) < float(torch.rand(1, generator=gen))
        seeds = torch.rand(b, h, w, generator=gen) < 0.02
        if trial % 2:
            seeds &= region
        assert reach(seeds, region).equal(_reach_by_labels(seeds, region)), trial
    spiral = torch.zeros(1, 21, 21, dtype=torch.bool)
    for k in range(0, 10, 2):  # concentric squares, each opened into the next: one long winding path
        spiral[0, k, k : 21 - k] = spiral[0, 20 - k, k : 21 - k] = True
        spiral[0, k : 21 - k, k] = spiral[0, k : 21 - k, 20 - k] = True
        spiral[0, k + 1, k] = False
        if k:
            spiral[0, k - 1, k] = True
    seed = torch.zeros_like(spiral)
    seed[0, 0, 20] = True
    assert reach(seed, spiral).equal(_reach_by_labels(seed, spiral))


def test_outside_is_the_background_a_flood_from_the_border_reaches() -> None:
    # `_outside` seeds every pixel with a clear straight line to the border, so it floods in a few
    # rounds; the set must stay what a flood from the border alone gives (bays and bores included).
    gen = torch.Generator().manual_seed(1)
    for trial in range(150):
        b, h, w = (int(torch.randint(1, m, (1,), generator=gen)) for m in (4, 30, 30))
        fg = torch.rand(b, h, w, generator=gen) < float(torch.rand(1, generator=gen))
        if trial % 3 == 0:
            fg[0] = False  # an image without an object: everything is outside
        open_at = None if trial % 2 else torch.rand(b, h, w, generator=gen) < 0.05
        border = torch.zeros_like(fg)
        border[:, [0, -1]] = border[:, :, [0, -1]] = True
        seeds = ~fg & (border if open_at is None else border | open_at)
        assert P._outside(fg, open_at).equal(_reach_by_labels(seeds, ~fg)), trial
    ring = torch.zeros(1, 12, 12, dtype=torch.bool)
    ring[0, 3:10, 3] = ring[0, 3:10, 8] = ring[0, 9, 3:9] = ring[0, 3, 3:9] = True
    bay = ring.clone()  # the ring opened at (3, 4) under a roof: outside, but no straight line out
    bay[0, 3, 4] = False
    bay[0, 1, 2:10] = True
    assert not P._outside(ring)[0, 5, 6] and P._outside(bay)[0, 5, 6]
    assert not P._clear_to_border(bay)[0, 5, 6] and P._clear_to_border(bay)[0, 5, 1]


def test_a_point_with_any_non_finite_coordinate_goes_missing_and_no_other() -> None:
    xyz = torch.rand(6, 6, 3) + 0.5
    xyz[1, 2, 0], xyz[3, 3, 1], xyz[4, 0, 2] = float("nan"), float("inf"), float("-inf")
    out = P.resize_points([xyz], 6)[0]  # same size: no resampling, every point kept where it was
    missing = (out == 0).all(dim=0)
    assert missing.sum() == 3 and missing[1, 2] and missing[3, 3] and missing[4, 0]
    assert out.permute(1, 2, 0)[~missing].equal(xyz[~missing])


@pytest.mark.parametrize("max_iter", [3, 64])
def test_filling_whole_frames_equals_filling_their_bounding_box(monkeypatch, max_iter) -> None:
    # A GPU fills every round on the whole frames (no bounding box to ask the device for), a CPU on the
    # box of what is left: the same values and the same filled pixels, bit for bit.
    rng = np.random.default_rng(max_iter)
    points = torch.from_numpy(rng.normal(size=(3, 3, 48, 64)).astype(np.float32))
    known = torch.from_numpy(rng.random((3, 48, 64)) < 0.3)
    region = torch.zeros((3, 48, 64), dtype=torch.bool)
    region[0, 5:30, 10:50] = True  # a box of holes
    region[1, :, :7] = True  # at the border
    region[1, 40:, 60:] = True
    known[2] = False  # nothing known: nothing can be filled
    region[2, 10:20, 10:20] = True
    results = {}
    for whole in (True, False):
        monkeypatch.setattr(P, "launch_bound", lambda device, whole=whole: whole)
        results[whole] = P.fill_missing(points, known, region, max_iter)
    for a, b in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    filled = results[True][1] & ~known
    assert filled[0].any() and filled[1].any() and not filled[2].any()
    assert not (filled & ~region).any()
    for trial in range(40):  # random holes of every size, at the edges too, and a few rounds or all of them
        b, h, w = (int(v) for v in rng.integers(1, (4, 40, 40)))
        points = torch.from_numpy(rng.normal(size=(b, 3, h, w)).astype(np.float32))
        known = torch.from_numpy(rng.random((b, h, w)) < rng.random())
        region = torch.from_numpy(rng.random((b, h, w)) < rng.random())
        rounds = int(rng.integers(1, 70))
        for whole in (True, False):
            monkeypatch.setattr(P, "launch_bound", lambda device, whole=whole: whole)
            results[whole] = P.fill_missing(points, known, region, rounds)
        for gpu_way, cpu_way in zip(results[True], results[False], strict=True):
            assert gpu_way.equal(cpu_way), trial


@pytest.mark.parametrize("side", [37, 200])
def test_gathering_a_batch_at_once_equals_frame_by_frame(side) -> None:
    # The GPU's form (stack, then one gather) and the CPU's (a gather per frame) pick the same points.
    rng = np.random.default_rng(side)
    xyzs = [torch.from_numpy(rng.random((side, side, 3)).astype(np.float32)) for _ in range(5)]
    points = P._flat_nearest_indices(side, side, 64)
    at_once = P._gather_points(xyzs, points, stack_first=True)
    by_frame = P._gather_points(xyzs, points, stack_first=False)
    assert at_once.shape == (5, 64 * 64, 3)
    torch.testing.assert_close(at_once, by_frame, rtol=0, atol=0)
    expected = P.resize_nearest(xyzs[3], (64, 64)).reshape(-1, 3)
    torch.testing.assert_close(at_once[3], expected, rtol=0, atol=0)


def test_a_batch_of_mixed_sizes_resizes_as_each_frame_alone() -> None:
    # Frames of one size are resized together; the batch's order and every value stay as per frame.
    rng = np.random.default_rng(2)
    sizes = [(37, 53), (64, 64), (37, 53), (80, 60), (64, 64)]
    xyzs = [torch.from_numpy(rng.random((*hw, 3)).astype(np.float32)) for hw in sizes]
    xyzs[1][3, 4] = float("nan")  # non-finite -> missing, wherever it sits in the batch
    rgbs = [torch.from_numpy(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)) for hw in sizes]
    points, images = P.resize_points(xyzs, 64), P.resize_rgb(rgbs, 64)
    for i in range(len(sizes)):
        torch.testing.assert_close(points[i], P.resize_points([xyzs[i]], 64)[0], rtol=0, atol=0)
        torch.testing.assert_close(images[i], P.resize_rgb([rgbs[i]], 64)[0], rtol=0, atol=0)
        expected = P.resize_nearest(xyzs[i], (64, 64)).permute(2, 0, 1)
        expected = torch.where(torch.isfinite(expected).all(dim=0, keepdim=True), expected, 0.0)
        torch.testing.assert_close(points[i], expected, rtol=0, atol=0)
    assert (points[1] == 0).all(dim=0).sum() == 1  # the NaN point became one missing pixel


def test_fill_holes_fills_only_inside_region() -> None:
    values = np.zeros((30, 40, 3), np.float32)
    values[...] = (0.1, 0.2, 0.6)
    valid = np.ones((30, 40), bool)
    valid[10:17, 12:20] = False  # interior hole, 7x8
    valid[0:3, 0:3] = False  # a hole outside the region
    values[~valid] = 0.0
    region = np.zeros_like(valid)
    region[5:25, 5:30] = True
    out = fill_holes(values, valid, region)
    np.testing.assert_allclose(out[10:17, 12:20], np.broadcast_to((0.1, 0.2, 0.6), (7, 8, 3)), rtol=1e-6)
    assert (out[0:3, 0:3] == 0).all()
    np.testing.assert_array_equal(out[valid], values[valid])
    # a ramp is filled with values between its neighbours
    ramp = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (30, 1))
    filled = fill_holes(np.where(valid, ramp, 0), valid, region)
    assert np.abs(filled[10:17, 12:20] - ramp[10:17, 12:20]).max() < 0.1
    assert fill_holes(values, valid, region, max_iter=1)[13, 15].sum() == 0  # centre needs several rounds


@pytest.mark.parametrize("plane", ["ransac", "corners"])
@pytest.mark.parametrize("size", [64, 256])
def test_xyz_to_3d_input_representations(plane: str, size: int) -> None:
    xyz, _, box = make_scene(4.0, 300.0)
    box_small = resize_nearest(box, (size, size))
    inner = box_small & np.roll(box_small, 3, 0) & np.roll(box_small, -3, 0)  # eroded by 3 px
    inner &= np.roll(box_small, 3, 1) & np.roll(box_small, -3, 1)
    assert inner.sum() > 0.5 * box_small.sum()
    for rep in ("normals", "depth"):
        x, fg = xyz_to_3d_input(xyz, size, representation=rep, plane=plane)
        assert x.shape == (3, size, size) and x.dtype == np.float32
        assert fg.shape == (size, size) and fg.dtype == bool
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert fg[inner].all() and fg.mean() < box_small.mean() * 1.2
        assert (x[:, ~fg] == 0).all()  # background is zero
        if rep == "depth":
            np.testing.assert_array_equal(x[0], x[1])
            np.testing.assert_array_equal(x[0], x[2])
            assert x[0][fg].min() == pytest.approx(0.1, abs=1e-6)
            assert x[0][fg].max() == pytest.approx(0.9, abs=1e-6)
        else:
            top = x[:, inner]  # flat top facing the camera -> (0.5, 0.5, 1), unlike the background's 0
            np.testing.assert_allclose(np.median(top, axis=1), [0.5, 0.5, 1.0], atol=0.03)


def test_normals_height_is_the_normals_x_y_and_the_depth_channel() -> None:
    xyz, _, _ = make_scene(4.0, 300.0)
    normals, fg = xyz_to_3d_input(xyz, 64, representation="normals")
    depth, fg_depth = xyz_to_3d_input(xyz, 64, representation="depth")
    both, fg_both = xyz_to_3d_input(xyz, 64, representation="normals_height")
    np.testing.assert_array_equal(fg_both, fg)
    np.testing.assert_array_equal(fg_both, fg_depth)
    np.testing.assert_array_equal(both[:2], normals[:2])
    np.testing.assert_array_equal(both[2], depth[0])
    assert (both[:, ~fg] == 0).all() and both[2][fg].min() == pytest.approx(0.1, abs=1e-6)


def test_pooling_over_the_object_averages_object_pixels_and_drops_background_cells() -> None:
    x3d = torch.zeros(1, 3, 4, 4)
    fg = torch.zeros(1, 4, 4, dtype=torch.bool)
    x3d[0, :, :2, :2] = torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1)  # a whole object cell
    fg[0, :2, :2] = True
    x3d[0, :, 0, 2], fg[0, 0, 2] = 0.8, True  # one object pixel of four: background at the lower scale
    x3d[0, :, 2:, 2:3], fg[0, 2:, 2:3] = 1.0, True  # two object pixels of four: kept, their mean
    out = P.pool_over_object(x3d, fg, 2)
    assert out.shape == (1, 3, 2, 2)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.2, 0.4, 0.6]))
    assert (out[0, :, 0, 1] == 0).all() and (out[0, :, 1, 0] == 0).all()
    torch.testing.assert_close(out[0, :, 1, 1], torch.ones(3))  # not diluted by the background zeros


@pytest.mark.parametrize("representation", ["normals", "depth"])
def test_oversampled_3d_input_is_the_model_size_and_close_to_the_plain_one(representation) -> None:
    from crd_model.config import CRDConfig

    xyz, _, _ = make_scene(4.0, 300.0)
    xyzs, rgbs = [torch.from_numpy(xyz)], [torch.zeros((*xyz.shape[:2], 3), dtype=torch.uint8)]
    base = CRDConfig(image_size=64, representation_3d=representation)
    plain = P.Preprocessor(base)(rgbs, xyzs).x3d[0]
    over = P.Preprocessor(base.model_copy(update={"oversample_3d": 2}))(rgbs, xyzs).x3d[0]
    assert over.shape == plain.shape == (3, 64, 64)
    both = (plain > 0).any(0) & (over > 0).any(0)
    assert both.sum() > 0.9 * (plain > 0).any(0).sum()  # the same object, give or take its rim
    assert over.min() >= 0 and over.max() <= 1
    if representation == "normals":  # (depth is min-max over a flat top: noise, whatever the resolution)
        assert (over - plain).abs()[:, both].median() < 0.02
    smoother = P.Preprocessor(base.model_copy(update={"smoothing_3d": 3.0}))(rgbs, xyzs).x3d[0]
    if representation == "normals":  # the smoothing setting reaches the normals
        assert not torch.equal(smoother, plain)
    else:  # ...and only them
        assert torch.equal(smoother, plain)


def test_xyz_to_3d_input_robustness() -> None:
    for rep in ("normals", "depth"):
        for plane in ("ransac", "corners", "none"):
            x, fg = xyz_to_3d_input(np.zeros((50, 60, 3), np.float32), 32, representation=rep, plane=plane)
            assert x.shape == (3, 32, 32) and not x.any() and not fg.any()
    empty_scene, _, _ = make_scene(box=False)
    x, fg = xyz_to_3d_input(empty_scene, 64)
    assert not fg.any() and not x.any()
    only_object, _, box = make_scene()
    only_object[~box] = 0.0  # no background at the border: no plane to measure against
    x, fg = xyz_to_3d_input(only_object, 64, plane="corners")
    assert not fg.any() and not x.any()
    x, fg = xyz_to_3d_input(make_scene()[0], 64, representation="depth", plane="none")
    assert fg.mean() > 0.8 and x[0][fg].max() == pytest.approx(0.9, abs=1e-6)
    with pytest.raises(ValueError):
        xyz_to_3d_input(empty_scene, 64, representation="points")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        xyz_to_3d_input(empty_scene[..., :2], 64)


def test_synthetic_frames_and_speed() -> None:
    _, xyz, _ = render_sample("disc", "hole", np.random.default_rng(0))
    xyz_to_3d_input(xyz, 256)  # warm-up
    start = time.perf_counter()
    for rep in ("normals", "depth"):
        _, fg = xyz_to_3d_input(xyz, 256, representation=rep, plane="corners")
        assert 0.1 < fg.mean() < 0.7
    assert (time.perf_counter() - start) / 2 < 0.25  # ~10 ms here; generous for slow CI


def test_reference_numpy_ransac_fallback_finds_the_plane() -> None:
    # the reference implementation's own fallback where open3d cannot be imported
    from tests.reference_preprocess import _lsq_plane, _ransac_numpy

    xyz, normal, _ = make_scene(5.0, 60.0, border_object=True)
    border = np.zeros((H, W), bool)
    border[:16], border[-16:], border[:, :20], border[:, -20:] = True, True, True, True
    points = xyz[border & (xyz[..., 2] != 0)].astype(np.float64)
    inliers = _ransac_numpy(points, 0.005, 200, seed=0)
    assert 0.8 * len(points) < len(inliers) < len(points)  # the raised border object is left out
    plane = _lsq_plane(points[inliers])
    assert min(angle_deg(plane, normal), angle_deg(-plane, normal)) < 1.0


# -- agreement with the reference implementation ---------------------------------------------------------


def _reference_inputs(rgbs, xyzs, size: int, representation: str):
    from tests import reference_preprocess as ref

    rgb = np.stack([ref.resize_rgb(r, size) for r in rgbs])
    x3d = np.stack([ref.xyz_to_3d_input(np.nan_to_num(x), size, representation=representation)[0] for x in xyzs])
    return rgb, x3d


@pytest.mark.parametrize("representation", ["normals_height", "normals", "depth"])
def test_device_path_agrees_with_the_reference_on_the_synthetic_test_split(tiny_data, representation):
    from crd_model.data.mvtec3d import list_samples, read_rgb, read_xyz
    from tests.conftest import TINY_CATEGORY

    samples = list_samples(tiny_data, TINY_CATEGORY, "test")
    rgbs = [read_rgb(s.rgb_path) for s in samples]
    xyzs = [read_xyz(s.xyz_path) for s in samples]
    ref_rgb, ref_x3d = _reference_inputs(rgbs, xyzs, 96, representation)
    rgb = P.resize_rgb([torch.from_numpy(r) for r in rgbs], 96).numpy()
    x3d, _ = P.points_to_3d_input(P.resize_points([torch.from_numpy(x) for x in xyzs], 96), representation)
    x3d = x3d.numpy()
    # RGB: Pillow rounds to uint8 between its two passes, the device path does not.
    assert np.abs(rgb - ref_rgb).max() < 0.01
    diff = np.abs(x3d - ref_x3d)
    print(f"{representation}: mean {diff.mean():.2e}, share > 0.05: {(diff > 0.05).mean():.2e}")
    # The same foreground but for a few pixels at object edges (speck removal without labelling, whole
    # points dropped when one coordinate is not finite), and the same values everywhere else.
    assert (diff > 0.05).mean() < 5e-4
    assert diff.mean() < 2e-4


def test_a_trained_checkpoint_scores_the_same_through_both_paths(tiny_data, tiny_checkpoint):
    from crd_model.data.mvtec3d import list_samples, read_rgb, read_xyz
    from crd_model.inputs import PreparedFrame
    from crd_model.inspector import Inspector
    from tests.conftest import TINY_CATEGORY

    inspector = Inspector(tiny_checkpoint, "cpu")
    size = inspector.config.image_size
    samples = list_samples(tiny_data, TINY_CATEGORY, "test")
    rgbs = [read_rgb(s.rgb_path) for s in samples]
    xyzs = [read_xyz(s.xyz_path) for s in samples]
    ref_rgb, ref_x3d = _reference_inputs(rgbs, xyzs, size, inspector.config.representation_3d)
    reference = inspector.infer(
        [PreparedFrame(r, x, rgb.shape[:2]) for r, x, rgb in zip(ref_rgb, ref_x3d, rgbs, strict=True)]
    )
    device = inspector.inspect(rgbs, xyzs)
    ours = np.array([d.score for d in device])
    theirs = np.array([r.score for r in reference])
    print("score differences relative to the threshold:", np.abs(ours - theirs).max() / inspector.threshold)
    # Within 3 % of the threshold (measured here: under 2 %), and the same verdict wherever the score is
    # not that close to the threshold.
    np.testing.assert_allclose(ours, theirs, rtol=0.03, atol=0.03 * abs(inspector.threshold))
    clear = np.abs(theirs - inspector.threshold) > 0.03 * abs(inspector.threshold)
    assert [d.verdict for d, c in zip(device, clear, strict=True) if c] == [
        r.verdict for r, c in zip(reference, clear, strict=True) if c
    ]
