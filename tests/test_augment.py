"""Pose augmentation: a flipped or turned normals image is the normals image of the flipped or turned part;
the pseudo-defects of denoising training stay where they are drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crd_model.preprocessing as P
from crd_model import augment
from crd_model.data.synth import render_sample

SIZE = 96


def _mirrored_points(xyz: torch.Tensor, symmetry: tuple[bool, bool, bool]) -> torch.Tensor:
    """The point map of the mirrored scene: pixels move, and so do the coordinates they hold."""
    transpose, flip_rows, flip_cols = symmetry
    x, y, z = xyz[:, 0:1], xyz[:, 1:2], xyz[:, 2:3]
    if transpose:
        x, y = y, x
    if flip_cols:
        x = -x
    if flip_rows:
        y = -y
    return augment.transform(torch.cat([x, y, z], dim=1), symmetry)


@pytest.mark.parametrize("symmetry", augment.variants("d4")[1:])
def test_turned_normals_are_the_normals_of_the_turned_part(symmetry) -> None:
    _, xyz, _ = render_sample("rod", "good", np.random.default_rng(3))  # not square, not symmetric
    points = P.resize_points([torch.from_numpy(xyz)], SIZE)
    # The corners' plane: the mirrored scene has the same corner points, so the same (mirrored) plane.
    normals, fg = P.points_to_3d_input(points, "normals", "corners")
    want, want_fg = P.points_to_3d_input(_mirrored_points(points, symmetry), "normals", "corners")
    got = augment.transform(normals, symmetry, normals=True)
    assert torch.equal(augment.transform(fg.unsqueeze(1), symmetry)[:, 0], want_fg)
    assert want_fg.sum() > 500
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)


def test_depth_and_rgb_only_move() -> None:
    x = torch.rand(2, 3, 8, 8)
    turned = augment.transform(x, (True, False, True))
    assert torch.equal(turned, x.transpose(-1, -2).flip(-1))


def test_the_identity_comes_first_and_unknown_settings_are_refused() -> None:
    assert augment.variants("none") == [(False, False, False)]
    assert len(augment.variants("flips")) == 4 and len(set(augment.variants("d4"))) == 8
    assert all(v[0] == (False, False, False) for v in map(augment.variants, ("none", "flips", "d4")))
    with pytest.raises(ValueError, match="unknown augment"):
        augment.variants("rotate")


@pytest.mark.parametrize("symmetry", augment.variants("d4"))
def test_undo_returns_every_pixel_to_its_place(symmetry) -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    assert torch.equal(augment.undo(augment.transform(x, symmetry), symmetry), x)


def test_translate_moves_each_image_by_its_own_offset_and_replicates_the_edges():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    moved = augment.translate(x, torch.tensor([[2, -1], [0, 0]]))
    # Image 0 moved 2 rows down and 1 column left: pixel (r, c) holds the source's (r - 2, c + 1).
    assert torch.equal(moved[0, 0, 2:, :5], x[0, 0, :4, 1:])
    assert torch.equal(moved[0, 0, :2, :5], x[0, 0, :1, 1:].expand(2, 5))  # top rows: the edge row, repeated
    assert torch.equal(moved[0, 0, 2:, 5], x[0, 0, :4, 5])  # right column: the edge column, repeated
    assert torch.equal(moved[1], x[1])
    assert torch.equal(augment.translate(x, torch.zeros(2, 2, dtype=torch.long)), x)


def test_recolour_scales_each_channel_of_each_image_and_clips():
    rgb = torch.full((2, 3, 4, 4), 0.5)
    got = augment.recolour(rgb.clone(), torch.tensor([[1.1, 0.9, 1.0], [3.0, 1.0, 1.0]]))
    assert torch.allclose(got[0, :, 0, 0], torch.tensor([0.55, 0.45, 0.5]))
    assert torch.equal(got[1, :, 0, 0], torch.tensor([1.0, 0.5, 0.5]))  # 1.5 clipped to the image's range


def test_pseudo_defects_add_one_bounded_noise_rectangle_per_image():
    x = torch.rand(6, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    got = augment.pseudo_defects(x, torch.Generator().manual_seed(1), 0.2)
    for before, after in zip(x, got, strict=True):
        changed = (after != before).any(dim=0)
        rows, cols = changed.any(dim=1).nonzero().flatten(), changed.any(dim=0).nonzero().flatten()
        height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert 10 <= height <= 32 and 10 <= width <= 32  # RD++'s 10 px to an eighth of the side, at 256 px
        assert changed[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].float().mean() > 0.9  # one filled rectangle
        assert float((after - before).abs().max()) == pytest.approx(0.2, rel=1e-5)  # its peak is the amplitude
    again = augment.pseudo_defects(x, torch.Generator().manual_seed(1), 0.2)
    assert torch.equal(again, got)  # drawn from the generator alone


def test_pseudo_defects_on_the_object_leave_the_background_at_zero():
    x3d = torch.zeros(8, 3, 64, 64)
    x3d[:, :, 16:48, 16:48] = 0.5  # the object; the 3D inputs' background is 0 in every channel
    got = augment.pseudo_defects(x3d, torch.Generator().manual_seed(2), 0.3, on_object=True)
    background = torch.ones(64, 64, dtype=torch.bool)
    background[16:48, 16:48] = False
    assert torch.equal(got[:, :, background], x3d[:, :, background])
    assert (got != x3d).any()  # and the object is corrupted
