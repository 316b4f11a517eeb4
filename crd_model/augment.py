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
    on_object = x[:, 2:3] > 0  # background is 0 in every channel; on the object blue >= 0.5, or height >= 0.1
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


def fractal_noise(
    shape: tuple[int, int, int, int],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    octaves: int = 6,
    persistence: float = 0.6,
) -> torch.Tensor:
    """Value noise summed over octaves, (B, C, H, W) in [-1, 1]: octave o is a random grid of 2 ** (o + 1)
    cells a side, upsampled bilinearly, weighted persistence ** o (the simplex-octave noise of RD++)."""
    b, c, h, w = shape
    total = torch.zeros(shape, device=device)
    weight_sum = 0.0
    for o in range(octaves):
        cells = 2 ** (o + 1)
        grid = torch.rand((b, c, cells + 1, cells + 1), generator=generator) * 2 - 1
        up = torch.nn.functional.interpolate(grid.to(device), size=(h, w), mode="bilinear", align_corners=True)
        total += persistence**o * up
        weight_sum += persistence**o
    return total / weight_sum


def pseudo_defects(
    x: torch.Tensor,
    generator: torch.Generator,
    amplitude: float,
    on_object: bool = False,
) -> torch.Tensor:
    """Add a patch of fractal noise to each image (B, C, S, S): a rectangle of 10 px (at 256 px) to an eighth
    of the side, placed at random, noise peaking at `amplitude` in the input's units. `on_object`: only where the
    image is not background (any channel > 0; the 3D inputs' background is 0 in every channel), which
    stays 0.

    The students are trained to reconstruct the clean image's teacher features from these corrupted
    ones (TrainOptions.noise), so they learn to restore normal appearance rather than to copy whatever
    they are shown; the idea and the patch recipe are RD++'s (Tien et al., CVPR 2023).
    """
    b, c, s, _ = x.shape
    smallest, largest = max(2, round(10 * s / 256)), max(3, s // 8)
    sizes = torch.randint(smallest, largest + 1, (b, 2), generator=generator)
    corners = (torch.rand((b, 2), generator=generator) * (s - sizes + 1)).long()
    noise = fractal_noise((b, c, largest, largest), generator, x.device)
    patch = torch.zeros_like(x)
    for i, ((h, w), (r, col)) in enumerate(zip(sizes.tolist(), corners.tolist(), strict=True)):
        crop = noise[i, :, :h, :w]
        patch[i, :, r : r + h, col : col + w] = crop / crop.abs().max().clamp_min(1e-6)  # its peak: amplitude
    if on_object:
        patch = patch * (x.amax(dim=1, keepdim=True) > 0)
    return x + amplitude * patch
