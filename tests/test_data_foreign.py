"""Data laid out by other tools reads right: anomalib's MVTec 3D-AD test fixture and TRD's loader.

The trees are written here, file by file, the way those projects write or expect them (our own code;
see docs/data.md for what each one does):

- anomalib (openvinotoolkit/anomalib, tests/helpers/data.py,
  `DummyImageDatasetGenerator._generate_dummy_mvtec_3d_dataset`): `<root>/mvtec_3d/dummy/`, train and
  validation with `num_train` good pairs each, test with `num_test` images in `good/` and in `bad/`;
  rgb is an 8-bit RGB PNG, "xyz" is the same kind of 8-bit RGB image saved as TIFF (not a point map),
  gt is an 8-bit PNG of 0/255 (a Perlin-noise blob thresholded at 0.5, `img_as_ubyte`), all zero in good/.
- TRD (hito2448/TRD, dataset/dataset_rgbn.py `MVTecADRGBNDataset.get_data_info`): the MVTec 3D-AD
  download as it is, `<data_root>/<class>/{train,validation,test}/<sub_dir>/{rgb,xyz,gt}`; every folder
  under a split is read as a sample folder, rgb files are those ending `.png`, xyz is the same name with
  `.tiff`, gt the same name as the rgb; gt is opened as 8-bit grey, scaled to 0-1 and binarised `> 0.5`
  (train_MVTec3D_rgbn.py `test`). Here the tree also has what real copies collect: readme and licence
  files, soft-edged masks, an upper-case export, a `.tif`, a float64 point map and a stray folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from crd_model.config import CRDConfig
from crd_model.data.mvtec3d import DataError, list_categories, list_samples, read_gt, read_rgb, read_xyz
from crd_model.dataset import load_split

SIZE = 64  # the model's smallest image size: gt at model resolution is the file's own mask, pixel for pixel


def _blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random smooth blob as a bool mask (anomalib thresholds Perlin noise at 0.5; this is coarser noise)."""
    coarse = rng.random((5, 5))
    fine = np.kron(coarse, np.ones((h // 4, w // 4)))[:h, :w]
    yy, xx = np.mgrid[:h, :w]
    return (fine > 0.4) & (np.hypot(yy - h / 2, xx - w / 2) < min(h, w) / 3)


def write_anomalib_fixture(root: Path, num_train: int = 5, num_test: int = 5, seed: int = 0) -> Path:
    """anomalib's dummy MVTec 3D-AD data set; returns the data root (`<root>/mvtec_3d`)."""
    rng = np.random.default_rng(seed)
    category = root / "mvtec_3d" / "dummy"

    def image() -> np.ndarray:  # one random colour per image, as DummyImageGenerator.generate_normal_image
        return np.broadcast_to(rng.integers(0, 255, 3).astype(np.uint8), (SIZE, SIZE, 3)).copy()

    def save(path: Path, arr: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".tiff":
            tifffile.imwrite(path, arr, photometric="rgb")  # skimage.io.imsave -> tifffile: RGB uint8
        else:
            Image.fromarray(arr).save(path)

    for split in ("train", "validation"):
        for sub, ext in (("rgb", ".png"), ("xyz", ".tiff")):  # rgb and xyz are drawn independently
            for i in range(num_train):
                save(category / split / "good" / sub / f"{i:03}{ext}", image())
    for label in ("good", "bad"):
        for i in range(num_test):
            img, mask = image(), np.zeros((SIZE, SIZE), np.uint8)
            if label == "bad":
                blob = _blob(rng, SIZE, SIZE)
                img[blob] = img[blob] // 2 + 100
                mask[blob] = 255
            save(category / "test" / label / "rgb" / f"{i:03}.png", img)
            save(category / "test" / label / "xyz" / f"{i:03}.tiff", img)  # the same image as "xyz"
            save(category / "test" / label / "gt" / f"{i:03}.png", mask)
    return root / "mvtec_3d"


def _point_map(rng: np.random.Generator, bump: np.ndarray | None = None) -> np.ndarray:
    """A plane 0.6 m away with a 10 mm raised square, a few missing (0, 0, 0) points, optionally a dent."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    z = 0.6 + 0.0002 * yy
    z[16:48, 16:48] -= 0.01
    if bump is not None:
        z[bump] += 0.002
    xyz = np.stack([(xx - SIZE / 2) * z / 500, (yy - SIZE / 2) * z / 500, z], axis=-1).astype(np.float32)
    xyz[rng.random((SIZE, SIZE)) < 0.02] = 0.0
    return xyz


def _soft_disc(cy: float, cx: float, radius: float, edge: float, value: int) -> np.ndarray:
    """A class-id disc whose rim ramps down to 0 over `edge` pixels, as a resampled or brushed mask has it."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    ramp = np.clip((radius + edge / 2 - np.hypot(yy - cy, xx - cx)) / edge, 0, 1)
    return np.rint(ramp * value).astype(np.uint8)


def write_trd_tree(root: Path, seed: int = 0) -> Path:
    """An MVTec 3D-AD copy as TRD's loader reads it, with what real copies collect; returns the data root."""
    rng = np.random.default_rng(seed)
    data = root / "mvtec_3d_anomaly_detection"
    bagel = data / "bagel"
    (data / "readme.txt").parent.mkdir(parents=True)
    (data / "readme.txt").write_text("MVTec 3D-AD\n")
    (data / "license.txt").write_text("CC BY-NC-SA 4.0\n")
    (bagel / "calibration").mkdir(parents=True)
    (bagel / "calibration" / "camera_parameters.json").write_text(json.dumps({"fx": 500.0}))
    (bagel / "class_ids.json").write_text(json.dumps({"crack": 255, "hole": 254}))

    def sample(folder: Path, stem: str, gt: np.ndarray | None, names: tuple[str, str, str] = ("", "", "")) -> None:
        rgb_name, xyz_name, gt_name = (
            n or default for n, default in zip(names, (".png", ".tiff", ".png"), strict=True)
        )
        rgb = np.full((SIZE, SIZE, 3), 120, np.uint8)
        for sub in ("rgb", "xyz", "gt"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / "rgb" / f"{stem}{rgb_name}")
        xyz = _point_map(rng, None if gt is None else gt >= 128)
        if xyz_name.lower() == ".tif":  # a user's re-export: float64 in a .tif
            tifffile.imwrite(folder / "xyz" / f"{stem}{xyz_name}", xyz.astype(np.float64), photometric="rgb")
        else:
            tifffile.imwrite(folder / "xyz" / f"{stem}{xyz_name}", xyz, photometric="rgb")
        if gt is not None:
            Image.fromarray(gt).save(folder / "gt" / f"{stem}{gt_name}")

    for split, n in (("train", 4), ("validation", 2)):
        for i in range(n):
            sample(bagel / split / "good", f"{i:03}", None)
    for i in range(3):
        sample(bagel / "test" / "good", f"{i:03}", np.zeros((SIZE, SIZE), np.uint8))
    # crack: soft-edged class-id masks; the second one was written out as 000.tif float64 by someone
    sample(bagel / "test" / "crack", "000", _soft_disc(32, 32, radius=20.4, edge=13, value=255))
    sample(bagel / "test" / "crack", "001", _soft_disc(20, 40, radius=8, edge=6, value=255), ("", ".tif", ""))
    # hole: exported on Windows with upper-case extensions
    sample(bagel / "test" / "hole", "000", _soft_disc(30, 30, radius=6, edge=2, value=254), (".PNG", ".TIFF", ".PNG"))
    sample(bagel / "test" / "hole", "001", _soft_disc(40, 24, radius=5, edge=0.5, value=254), (".PNG", ".TIFF", ".PNG"))
    # a folder of previews someone saved next to the defect types, and a note
    (bagel / "test" / "previews").mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(bagel / "test" / "previews" / "crack_000.png")
    (bagel / "test" / "NOTES.md").write_text("hole 001 is borderline\n")
    return data


def _trd_gt(path: Path) -> np.ndarray:
    """TRD's test-time mask at native size: grey 8-bit, scaled to 0-1, `> 0.5`."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0 > 0.5


def test_anomalib_fixture_counts_masks_and_points(tmp_path: Path) -> None:
    data = write_anomalib_fixture(tmp_path)
    assert list_categories(data) == ["dummy"]
    train, validation, test = (list_samples(data, "dummy", split) for split in ("train", "validation", "test"))
    assert (len(train), len(validation), len(test)) == (5, 5, 10)
    assert [s.defect_type for s in test] == ["bad"] * 5 + ["good"] * 5
    assert sum(s.is_anomalous for s in test) == 5
    for s in test:
        raw = np.asarray(Image.open(s.gt_path))
        mask = read_gt(s.gt_path, (SIZE, SIZE))
        np.testing.assert_array_equal(mask, raw == 255)
        assert mask.any() == s.is_anomalous
        # its "xyz" is the 8-bit image itself: read as float32 numbers, shape checked against the rgb
        xyz = read_xyz(s.xyz_path)
        assert xyz.dtype == np.float32 and xyz.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(xyz, read_rgb(s.rgb_path).astype(np.float32))

    # a new user's first guesses at --data: the folder above, or the category folder itself
    with pytest.raises(FileNotFoundError, match="one level down: mvtec_3d/dummy"):
        list_samples(tmp_path, "dummy", "test")
    with pytest.raises(FileNotFoundError, match="itself a category folder"):
        list_samples(data / "dummy", "dummy", "test")

    loaded = load_split(data, "dummy", "test", CRDConfig(image_size=SIZE), workers=1)
    assert len(loaded.frames) == 10 and loaded.labels.tolist() == [True] * 5 + [False] * 5
    assert loaded.gt is not None
    for s, gt in zip(loaded.samples, loaded.gt, strict=True):
        np.testing.assert_array_equal(gt, np.asarray(Image.open(s.gt_path)) == 255)


def test_trd_tree_counts_masks_and_points(tmp_path: Path) -> None:
    data = write_trd_tree(tmp_path)
    assert list_categories(data) == ["bagel"]  # readme.txt, license.txt at the root are not categories
    assert len(list_samples(data, "bagel", "train")) == 4
    assert len(list_samples(data, "bagel", "validation")) == 2
    test = list_samples(data, "bagel", "test")  # previews/ and NOTES.md skipped with a warning
    assert [(s.defect_type, s.stem) for s in test] == [
        ("crack", "000"),
        ("crack", "001"),
        ("good", "000"),
        ("good", "001"),
        ("good", "002"),
        ("hole", "000"),
        ("hole", "001"),
    ]
    assert [s.rgb_path.name for s in test if s.defect_type == "hole"] == ["000.PNG", "001.PNG"]
    assert [s.xyz_path.name for s in test if s.defect_type == "crack"] == ["000.tiff", "001.tif"]

    for s in test:
        mask = read_gt(s.gt_path, (SIZE, SIZE))
        np.testing.assert_array_equal(mask, _trd_gt(s.gt_path))  # the same pixels TRD scores
        raw = np.asarray(Image.open(s.gt_path))
        if s.is_anomalous:
            assert 0 < mask.sum() < (raw > 0).sum()  # the soft rim does not count
        xyz = read_xyz(s.xyz_path)
        assert xyz.dtype == np.float32 and xyz.shape == (SIZE, SIZE, 3)
        assert 0.55 < np.median(xyz[..., 2][xyz[..., 2] > 0]) < 0.65
    first = np.asarray(Image.open(test[0].gt_path))
    # the case: a blurred disc of about 1,311 px at half scale whose rim makes > 0 count about 2,271
    assert 1250 < read_gt(test[0].gt_path, (SIZE, SIZE)).sum() < 1370 and 2150 < (first > 0).sum() < 2400

    loaded = load_split(data, "bagel", "test", CRDConfig(image_size=SIZE), workers=1)
    assert loaded.gt is not None and len(loaded.frames) == 7
    assert loaded.labels.tolist() == [True, True, False, False, False, True, True]
    for s, gt in zip(loaded.samples, loaded.gt, strict=True):
        np.testing.assert_array_equal(gt, _trd_gt(s.gt_path))
        assert loaded.frames[test.index(s)].x3d is not None


def test_trd_tree_errors_reach_the_cli_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As a new user meets it: `crd predict` on a copy where one xyz does not match its rgb."""
    from crd_model.cli import main

    data = write_trd_tree(tmp_path)
    xyz_path = data / "bagel" / "test" / "hole" / "xyz" / "001.TIFF"
    tifffile.imwrite(xyz_path, np.zeros((SIZE, SIZE + 8, 3), np.float32), photometric="rgb")
    argv = ["predict", "--checkpoint", str(tmp_path / "no_model"), "--data", str(data), "--category", "bagel"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2  # found while listing, before any model loads
    err = capsys.readouterr().err
    # Warnings about the tree's stray entries may come first; the error is the last thing said.
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"crd predict: error: {xyz_path}: xyz is 72 wide x 64 high") and "001.PNG" in last
    with pytest.raises(DataError):
        list_samples(data, "bagel", "test")
