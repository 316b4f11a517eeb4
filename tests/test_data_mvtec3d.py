"""Tests for crd_model.data.mvtec3d on real PNG/TIFF files written by the synthetic generator."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from crd_model.data.mvtec3d import (
    SPLITS,
    Sample,
    list_categories,
    list_pairs,
    list_samples,
    read_gt,
    read_rgb,
    read_xyz,
    write_gt,
    write_rgb,
    write_xyz,
)
from crd_model.data.synth import SYNTH_CATEGORIES, generate_dataset

COUNTS = {"n_train": 3, "n_validation": 2, "n_test_good": 2, "n_test_per_defect": 2}
SCALE = 0.5


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mvtec3d")
    generate_dataset(out, ["disc", "rod"], seed=3, size_scale=SCALE, **COUNTS)
    return out


def _size(category: str) -> tuple[int, int]:
    spec = SYNTH_CATEGORIES[category]
    return round(spec.height * SCALE), round(spec.width * SCALE)


def test_list_categories(root: Path, tmp_path: Path) -> None:
    (root / "not_a_category").mkdir(exist_ok=True)  # no train/ or test/ inside: ignored
    assert list_categories(root) == ["disc", "rod"]
    with pytest.raises(FileNotFoundError):
        list_categories(tmp_path / "missing")


@pytest.mark.parametrize("split", SPLITS)
def test_list_samples_every_split(root: Path, split: str) -> None:
    samples = list_samples(root, "rod", split)
    defects = SYNTH_CATEGORIES["rod"].defect_types
    expected = {"train": 3, "validation": 2, "test": 2 + 2 * len(defects)}[split]
    assert len(samples) == expected
    assert samples == sorted(samples, key=lambda s: (s.defect_type, s.stem))
    for s in samples:
        assert s.category == "rod" and s.split == split
        assert s.rgb_path.stem == s.xyz_path.stem == s.stem
        assert s.rgb_path.suffix == ".png" and s.xyz_path.suffix == ".tiff"
        assert s.relpath == f"{split}/{s.defect_type}/rgb/{s.stem}.png"
        assert s.is_anomalous == (s.defect_type != "good")
        if split == "test":
            assert s.gt_path is not None and s.gt_path.stem == s.stem
        else:
            assert s.gt_path is None and s.defect_type == "good"
    if split == "train":
        assert [s.stem for s in samples] == ["000", "001", "002"]


def test_read_shapes_dtypes_and_non_square(root: Path) -> None:
    for category in ("disc", "rod"):
        h, w = _size(category)
        for s in list_samples(root, category, "test"):
            rgb, xyz = read_rgb(s.rgb_path), read_xyz(s.xyz_path)
            gt = read_gt(s.gt_path, rgb.shape[:2])
            assert rgb.dtype == np.uint8 and rgb.shape == (h, w, 3)
            assert xyz.dtype == np.float32 and xyz.shape == (h, w, 3)
            assert gt.dtype == bool and gt.shape == (h, w)
    assert _size("rod")[0] != _size("rod")[1]  # rod is 176 wide x 224 high at scale 1


def test_gt_values_are_class_ids(root: Path) -> None:
    class_ids = json.loads((root / "disc" / "class_ids.json").read_text())
    for s in list_samples(root, "disc", "test"):
        raw = np.asarray(Image.open(s.gt_path))
        mask = read_gt(s.gt_path, raw.shape)
        np.testing.assert_array_equal(mask, raw > 0)
        if s.is_anomalous:
            assert set(np.unique(raw)) == {0, class_ids[s.defect_type]}
            assert class_ids[s.defect_type] > 0 and mask.any()
        else:
            assert not raw.any()  # test/good/gt exists and is all zeros


def test_missing_points_are_exact_zeros(root: Path) -> None:
    xyz = np.stack([read_xyz(s.xyz_path) for s in list_samples(root, "disc", "train")])
    missing = (xyz == 0).all(axis=-1)
    assert missing.any()
    # a point is missing as a whole or valid with a positive depth, nothing in between
    assert (xyz[~missing][:, 2] > 0.3).all()
    calib = json.loads((root / "disc" / "calibration" / "camera_parameters.json").read_text())
    assert {"fx", "fy", "cx", "cy"} <= calib.keys()
    assert "synthetic" in (root / "disc" / "readme.txt").read_text().lower()


def test_read_gt_none_and_size_mismatch(root: Path) -> None:
    assert not read_gt(None, (4, 5)).any() and read_gt(None, (4, 5)).shape == (4, 5)
    s = next(s for s in list_samples(root, "disc", "test") if s.is_anomalous)
    with pytest.raises(ValueError, match="size"):
        read_gt(s.gt_path, (3, 3))


def test_clear_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        list_samples(root, "disc", "testing")
    with pytest.raises(FileNotFoundError, match="category"):
        list_samples(root, "nope", "train")
    # a category without a validation split
    broken = tmp_path / "data"
    shutil.copytree(root / "disc" / "train", broken / "disc" / "train")
    with pytest.raises(FileNotFoundError, match="split"):
        list_samples(broken, "disc", "validation")
    # an rgb file whose xyz is missing
    victim = broken / "disc" / "train" / "good" / "xyz" / "001.tiff"
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="001"):
        list_samples(broken, "disc", "train")
    with pytest.raises(FileNotFoundError, match="001"):
        list_pairs(broken)
    # test/good may lack gt (-> None); an anomalous test image without its mask is an error
    shutil.copytree(root / "rod" / "test", broken / "rod" / "test")
    shutil.rmtree(broken / "rod" / "test" / "good" / "gt")
    assert all(s.gt_path is None for s in list_samples(broken, "rod", "test") if s.defect_type == "good")
    (broken / "rod" / "test" / "cut" / "gt" / "000.png").unlink()
    with pytest.raises(FileNotFoundError, match="gt"):
        list_samples(broken, "rod", "test")


def test_read_xyz_validates_and_cleans(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tiff"
    tifffile.imwrite(bad, np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        read_xyz(bad)
    xyz = np.full((4, 5, 3), 0.5, np.float32)
    xyz[1, 2, 0] = np.nan
    xyz[3, 4, 2] = np.inf
    path = tmp_path / "sub" / "nan.tiff"
    write_xyz(path, xyz)  # creates parent folders
    back = read_xyz(path)
    assert back.dtype == np.float32
    assert (back[1, 2] == 0).all() and (back[3, 4] == 0).all()
    assert (back[0, 0] == 0.5).all()


def test_read_rgb_converts_modes(tmp_path: Path) -> None:
    grey = (np.arange(20, dtype=np.uint8) * 10).reshape(4, 5)
    Image.fromarray(grey).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "l.png"), np.repeat(grey[..., None], 3, axis=2))
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = read_rgb(tmp_path / "rgba.png")
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8 and (out[..., 0] == 200).all()
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "i16.png")  # 16-bit grey
    out = read_rgb(tmp_path / "i16.png")
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out[..., 1], grey)


def test_writers_create_dirs_and_roundtrip(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    gt = np.zeros((6, 7), np.uint8)
    gt[2:4, 3:5] = 253
    write_rgb(tmp_path / "a" / "rgb" / "000.png", rgb)
    write_gt(tmp_path / "a" / "gt" / "000.png", gt)
    np.testing.assert_array_equal(read_rgb(tmp_path / "a" / "rgb" / "000.png"), rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / "gt" / "000.png")), gt)
    with pytest.raises(ValueError):
        write_rgb(tmp_path / "x.png", rgb.astype(np.float32))


def test_list_pairs_flat_and_nested(root: Path, tmp_path: Path) -> None:
    user = tmp_path / "my_scans"
    for stem in ("a1", "b2"):
        src = list_samples(root, "rod", "train")[0]
        (user / "rgb").mkdir(parents=True, exist_ok=True)
        (user / "xyz").mkdir(parents=True, exist_ok=True)
        shutil.copy(src.rgb_path, user / "rgb" / f"{stem}.png")
        shutil.copy(src.xyz_path, user / "xyz" / f"{stem}.tiff")
    pairs = list_pairs(user)
    assert [p.stem for p in pairs] == ["a1", "b2"]
    assert [p.relpath for p in pairs] == ["rgb/a1.png", "rgb/b2.png"]
    assert all(isinstance(p, Sample) and p.split == "" and p.defect_type == "" and p.gt_path is None for p in pairs)
    assert not any(p.is_anomalous for p in pairs)

    # a nested tree (here a whole category in the MVTec layout): every rgb/xyz pair is found
    nested = list_pairs(root / "rod")
    total = sum(len(list_samples(root, "rod", split)) for split in SPLITS)
    assert len(nested) == total
    assert "test/good/rgb/000.png" in {p.relpath for p in nested}
    assert all(p.gt_path is None for p in nested)

    with pytest.raises(FileNotFoundError):
        list_pairs(tmp_path / "empty_does_not_exist")


def test_data_package_does_not_import_torch() -> None:
    code = (
        "import sys; import crd_model.data.mvtec3d, crd_model.data.synth; "
        "bad = [m for m in ('torch', 'open3d') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
