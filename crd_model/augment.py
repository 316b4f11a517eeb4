"""Pose augmentation for training: flips and quarter turns of the paired RGB and 3D inputs.

Reverse distillation learns what good parts look like from the training images alone; parts that
come down the line in poses the training set barely covers then score like defects. Flipping and
turning the (square, model-size) inputs by the dihedral group's eight symmetries shows the students
those poses. Surface normals are vectors, so their in-plane components turn with the image (channel
0 is the normal's x, along the columns; channel 1 its y, along the rows; both mapped to [0, 1] as
(n + 1) / 2 with the background at 0); a depth map is a scalar field and only moves.
"""

from __future__ import annotations

from typing import Literal

import torch

Augment = Literal["none", "flips", "d4"]

# (transpose, flip rows, flip columns): applied in that order.
_TRANSFORMS: dict[str, list[tuple[bool, bool, bool]]] = {
    "none": [(False, False, False)],
    "flips": [(False, False, False), (False, False, True), (False, True, False), (False, True, True)],
    "d4": [(t, r, c) for t in (False, True) for r in (False, True) for c in (False, True)],
}


def variants(augment: str) -> list[tuple[bool, bool, bool]]:
    """The symmetries an `augment` setting trains on, the identity first."""
    try:
        return _TRANSFORMS[augment]
    except KeyError:
        raise ValueError(f"unknown augment {augment!r}; expected one of {sorted(_TRANSFORMS)}") from None


def transform(x: torch.Tensor, symmetry: tuple[bool, bool, bool], normals: bool = False) -> torch.Tensor:
    """Apply one symmetry to images (B, C, S, S); `normals`: channels 0-1 are a normal's (x, y), and turn."""
    transpose, flip_rows, flip_cols = symmetry
    if transpose:
        x = x.transpose(-1, -2)
    if flip_rows:
        x = x.flip(-2)
    if flip_cols:
        x = x.flip(-1)
    if not normals or symmetry == (False, False, False):
        return x.contiguous()
    nx, ny = (x[:, 1:2], x[:, 0:1]) if transpose else (x[:, 0:1], x[:, 1:2])
    if flip_cols:  # x now runs the other way
        nx = 1 - nx
    if flip_rows:
        ny = 1 - ny
    on_object = x[:, 2:3] > 0  # the background is 0 in every channel; a surface facing the camera has blue >= 0.5
    return torch.where(on_object, torch.cat([nx, ny, x[:, 2:]], dim=1), x).contiguous()


def undo(x: torch.Tensor, symmetry: tuple[bool, bool, bool]) -> torch.Tensor:
    """Move the pixels of maps (..., S, S) computed on a transformed image back to the image's frame."""
    transpose, flip_rows, flip_cols = symmetry
    if flip_cols:
        x = x.flip(-1)
    if flip_rows:
        x = x.flip(-2)
    if transpose:
        x = x.transpose(-1, -2)
    return x.contiguous()


def translate(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Move each image (B, C, S, S) by its own whole-pixel offset (B, 2) = (rows, columns), edges replicated.

    A part on the line sits at any offset modulo the teacher's strides (4-16 px); moving the training
    images by up to a stride shows the students each texture at other sampling phases.
    """
    reach = int(offsets.abs().max()) if offsets.numel() else 0
    if reach == 0:
        return x.contiguous()
    size = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (reach, reach, reach, reach), mode="replicate")
    return torch.stack(
        [
            padded[i, :, reach - dy : reach - dy + size[0], reach - dx : reach - dx + size[1]]
            for i, (dy, dx) in enumerate(offsets.tolist())
        ]
    )


def recolour(rgb: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """Scale each RGB image (B, 3, S, S) in [0, 1] by its own per-channel gains (B, 3), clipped to [0, 1].

    Parts differ in tint and the light drifts: gains of a few percent show the students the same
    textures under another exposure and white balance.
    """
    return (rgb * gains.to(rgb).view(*gains.shape, 1, 1)).clamp_(0, 1)
