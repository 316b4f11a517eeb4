"""The worker's device side: staging host arrays, and wire maps resized and quantised on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from crd_model.stream import decode_map, quantised_map
from workers.device import Staging, wire_maps, wire_shape


def test_staging_keeps_shapes_dtypes_and_values():
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 255, (5, 7, 3), dtype=np.uint8),
        rng.random((5, 7, 3), dtype=np.float32),
        rng.random((3, 4, 3)).astype(np.float16),
    ]
    out = Staging(torch.device("cpu")).upload(arrays)
    for a, t in zip(arrays, out, strict=True):
        assert tuple(t.shape) == a.shape
        np.testing.assert_array_equal(t.numpy(), a)


def test_wire_shape_keeps_the_aspect_and_caps_the_longer_side():
    assert wire_shape((200, 200), 256) == (200, 200)
    assert wire_shape((800, 800), 256) == (256, 256)
    assert wire_shape((600, 800), 256) == (192, 256)
    assert wire_shape((1000, 10), 256) == (256, 3)


def _reference(model_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """What the codec did before: Pillow's bilinear resize (antialiased when shrinking), float32."""
    return np.asarray(Image.fromarray(model_map).resize(shape[::-1], Image.Resampling.BILINEAR), np.float32)


@pytest.mark.parametrize("image_shape", [(600, 800), (200, 200), (96, 300)])
def test_png8_wire_maps_match_the_codec_within_a_quantisation_step(image_shape):
    rng = np.random.default_rng(1)
    maps = torch.from_numpy(rng.normal(0, 2, (3, 64, 64)).astype(np.float32))
    maps[1, 20:30, 30:40] += 15  # an anomaly
    out = wire_maps(maps, [image_shape] * 3, max_side=256)
    expected_shape = wire_shape(image_shape, 256)
    for k, wm in enumerate(out):
        assert wm.pixels.dtype == np.uint8 and wm.pixels.shape == expected_shape
        assert wm.values.shape == expected_shape and wm.image_shape == image_shape
        assert wm.lo == pytest.approx(float(wm.values.min())) and wm.hi == pytest.approx(float(wm.values.max()))
        ref = _reference(maps[k].numpy(), expected_shape)
        span = float(ref.max() - ref.min())
        assert np.abs(wm.values - ref).max() < 0.05 * span  # same map, resized by another library
        # What a consumer decodes from the wire equals the values within half a quantisation step.
        decoded = decode_map(quantised_map(wm.pixels, wm.image_shape, (wm.lo, wm.hi)))
        assert np.abs(decoded - wm.values).max() <= (wm.hi - wm.lo) / 255 * 0.5 + 1e-5
    assert out[1].values.max() > out[0].values.max() + 5  # the anomaly survived the resize


def test_float_maps_come_back_only_for_the_frames_that_need_them():
    """Regions are cut from anomalous frames' float maps only: the others' stay on the device, and
    what goes on the wire is the same either way."""
    rng = np.random.default_rng(2)
    maps = torch.from_numpy(rng.normal(0, 2, (4, 64, 64)).astype(np.float32))
    shapes = [(200, 200), (96, 300), (200, 200), (96, 300)]  # two wire shapes, two groups
    keep = [False, True, True, False]
    every = wire_maps(maps, shapes, max_side=256)
    some = wire_maps(maps, shapes, max_side=256, keep_values=keep)
    for k, (a, b) in enumerate(zip(every, some, strict=True)):
        assert np.array_equal(a.pixels, b.pixels) and (a.lo, a.hi, a.image_shape) == (b.lo, b.hi, b.image_shape)
        if keep[k]:
            assert np.array_equal(a.values, b.values)
        else:
            assert b.values is None


def test_flat_and_float16_maps():
    flat = torch.full((1, 32, 32), -3.0)
    (wm,) = wire_maps(flat, [(32, 32)], max_side=256)
    assert wm.hi > wm.lo == -3.0
    assert (decode_map(quantised_map(wm.pixels, wm.image_shape, (wm.lo, wm.hi))) == -3.0).all()
    maps = torch.linspace(-5, 5, 32 * 32).view(1, 32, 32)
    (wm,) = wire_maps(maps, [(64, 64)], max_side=256, encoding="float16")
    assert wm.pixels.dtype == np.float16 and wm.pixels.shape == (64, 64)
    decoded = decode_map(quantised_map(wm.pixels, wm.image_shape))
    np.testing.assert_allclose(decoded, wm.values, atol=5e-3)
    with pytest.raises(ValueError):
        wire_maps(maps, [(64, 64)], max_side=256, encoding="jpeg")
