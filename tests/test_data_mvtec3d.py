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
from structlog.testing import capture_logs

from crd_model.data.mvtec3d import (
    SPLITS,
    DataError,
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


# --- Data written by other tools (issue 10: "reading other people's data") -----------------------


def _soft_disc(h: int, w: int, cy: float, cx: float, radius: float, edge: float) -> np.ndarray:
    """A disc whose edge ramps linearly from 255 to 0 over `edge` pixels (an anti-aliased/blurred mask)."""
    yy, xx = np.mgrid[:h, :w]
    dist = np.hypot(yy - cy, xx - cx)
    return np.clip(np.rint(255 * (radius + edge / 2 - dist) / edge), 0, 255).astype(np.uint8)


def _write_sample(
    defect_dir: Path,
    stem: str,
    hw: tuple[int, int] = (12, 16),
    rgb_name: str | None = None,
    xyz_name: str | None = None,
    gt: np.ndarray | None = None,
    gt_name: str | None = None,
) -> None:
    """One rgb/xyz(/gt) sample with the given file names (default NNN.png / NNN.tiff / NNN.png)."""
    h, w = hw
    write_rgb(defect_dir / "rgb" / (rgb_name or f"{stem}.png"), np.full((h, w, 3), 90, np.uint8))
    write_xyz(defect_dir / "xyz" / (xyz_name or f"{stem}.tiff"), np.full((h, w, 3), 0.5, np.float32))
    if gt is not None:
        path = defect_dir / "gt" / (gt_name or f"{stem}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gt).save(path)


def test_gt_soft_edges_count_from_half_scale(tmp_path: Path) -> None:
    # A defect mask with a blurred edge, as an anti-aliasing resize or a soft brush leaves it.
    raw = _soft_disc(96, 120, 48, 60, radius=20, edge=12)
    path = tmp_path / "gt" / "000.png"
    path.parent.mkdir()
    Image.fromarray(raw).save(path)
    mask = read_gt(path, raw.shape)
    half_scale_area = int((raw >= 128).sum())
    assert int(mask.sum()) == half_scale_area
    assert half_scale_area < 0.8 * (raw > 0).sum()  # `> 0` would count the whole blurred rim
    np.testing.assert_array_equal(mask, raw >= 128)
    assert abs(half_scale_area - np.pi * 20**2) < 0.05 * np.pi * 20**2  # the disc the edge was drawn around


def test_gt_half_scale_for_every_storage(tmp_path: Path) -> None:
    """The exact boundary per storage: 127|128 of 255, 32767|32768 of 65535, 0.5|0.5001 of 1.0."""

    def read(name: str, values: np.ndarray) -> list[bool]:
        path = tmp_path / name
        if name.endswith(".tiff"):
            tifffile.imwrite(path, values)
        else:
            Image.fromarray(values).save(path)
        return read_gt(path, values.shape[:2]).ravel().tolist()

    assert read("u8.png", np.array([[0, 1, 127, 128, 255]], np.uint8)) == [False, False, False, True, True]
    assert read("u16.png", np.array([[0, 255, 32767, 32768, 65535]], np.uint16)) == [False, False, False, True, True]
    assert read("f.tiff", np.array([[0, 0.25, 0.5, 0.5001, 1]], np.float32)) == [False, False, False, True, True]
    assert read("f255.tiff", np.array([[0, 1, 127, 128, 255]], np.float32)) == [False, False, False, True, True]
    # a 0/1 mask (cv2.imwrite(mask.astype(np.uint8))): 1 is defect
    assert read("01.png", np.array([[0, 1, 1, 0]], np.uint8)) == [False, True, True, False]
    assert read("bool.png", np.array([[0, 1, 1, 0]], bool)) == [False, True, True, False]
    # colour masks: the brightest colour channel counts (a pure red defect is a defect), alpha does not
    rgb = np.zeros((1, 4, 3), np.uint8)
    rgb[0, 1] = (200, 0, 0)
    rgb[0, 2] = (0, 100, 120)
    rgb[0, 3] = (0, 0, 128)
    assert read("rgb.png", rgb) == [False, True, False, True]
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[..., 3] = 255  # fully opaque everywhere: not a defect everywhere
    rgba[0, 2, 1] = 255
    assert read("rgba.png", rgba) == [False, False, True]
    palette = Image.fromarray(np.array([[0, 1, 0]], np.uint8)).convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 drawn red
    palette.save(tmp_path / "p.png")
    assert read_gt(tmp_path / "p.png", (1, 3)).tolist() == [[False, True, False]]


def test_gt_below_half_scale_warns_naming_the_file(tmp_path: Path) -> None:
    # A label map with small ids reads as no defect at half scale: say so instead of failing silently.
    labels = np.zeros((6, 6), np.uint8)
    labels[2:4, 2:4] = 3
    path = tmp_path / "labels.png"
    Image.fromarray(labels).save(path)
    with capture_logs() as logs:
        assert not read_gt(path, labels.shape).any()
    assert [e["path"] for e in logs if e["log_level"] == "warning"] == [str(path)]


def test_write_gt_refuses_ids_that_would_read_as_normal(tmp_path: Path) -> None:
    gt = np.zeros((4, 4), np.uint8)
    gt[1, 1] = 127
    with pytest.raises(ValueError, match="127"):
        write_gt(tmp_path / "gt.png", gt)
    gt[1, 1] = 128
    write_gt(tmp_path / "gt.png", gt)
    assert read_gt(tmp_path / "gt.png", gt.shape)[1, 1]


def test_names_match_whatever_the_case(tmp_path: Path) -> None:
    """Upper-case extensions (000.PNG, 000.TIFF), .tif, MVTec AD's `_mask` gt names, RGB/ folders."""
    test = tmp_path / "part" / "test"
    blob = np.zeros((12, 16), np.uint8)
    blob[3:6, 4:9] = 255
    _write_sample(test / "crack", "000", rgb_name="000.PNG", xyz_name="000.TIFF", gt=blob, gt_name="000.PNG")
    _write_sample(test / "crack", "001", rgb_name="001.png", xyz_name="001.Tif", gt=blob, gt_name="001.Png")
    _write_sample(test / "crack", "002", gt=blob, gt_name="002_mask.png")
    _write_sample(test / "good", "000", gt=np.zeros_like(blob))
    # a Windows export: upper-case folder names too
    _write_sample(test / "hole", "000", gt=blob)
    for sub in ("rgb", "xyz", "gt"):
        (test / "hole" / sub).rename(test / "hole" / sub.upper())

    samples = list_samples(tmp_path, "part", "test")
    found = {(s.defect_type, s.stem): (s.rgb_path.name, s.xyz_path.name, s.gt_path and s.gt_path.name) for s in samples}
    assert found == {
        ("crack", "000"): ("000.PNG", "000.TIFF", "000.PNG"),
        ("crack", "001"): ("001.png", "001.Tif", "001.Png"),
        ("crack", "002"): ("002.png", "002.tiff", "002_mask.png"),
        ("good", "000"): ("000.png", "000.tiff", "000.png"),
        ("hole", "000"): ("000.png", "000.tiff", "000.png"),
    }
    assert next(s for s in samples if s.defect_type == "hole").relpath == "test/hole/RGB/000.png"
    for s in samples:
        assert read_gt(s.gt_path, read_rgb(s.rgb_path).shape[:2]).sum() == (0 if s.defect_type == "good" else 15)
        assert read_xyz(s.xyz_path).shape == (12, 16, 3)
    assert [p.stem for p in list_pairs(test / "hole")] == ["000"]  # list_pairs takes RGB/ + XYZ/ too

    # two files that differ only in case cannot both be meant: an error naming them, not a guess
    for name in ("Scan.png", "scan.PNG"):  # both would pair with xyz/scan.tiff
        write_rgb(test / "crack" / "rgb" / name, np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(DataError, match=r"Scan\.png, scan\.PNG"):
        list_samples(tmp_path, "part", "test")
    for name in ("Scan.png", "scan.PNG"):
        (test / "crack" / "rgb" / name).unlink()
    _write_sample(test / "good", "001", xyz_name="001.TIFF")
    write_xyz(test / "good" / "xyz" / "001.tiff", np.zeros((12, 16, 3), np.float32))
    with pytest.raises(DataError, match=r"001\.TIFF") as exc:
        list_samples(tmp_path, "part", "test")
    assert str(test / "good" / "xyz") in str(exc.value)


def test_stray_folders_and_files_are_skipped_with_a_warning(root: Path, tmp_path: Path) -> None:
    shutil.copytree(root / "rod", tmp_path / "rod")
    expected = len(list_samples(tmp_path, "rod", "test"))
    test = tmp_path / "rod" / "test"
    stray_dir = test / "previews"  # e.g. overlays someone saved next to the defect types
    stray_dir.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(stray_dir / "000.png")
    stray_file = test / "notes.txt"
    stray_file.write_text("cut 003 looks odd")
    stray_in_rgb = test / "cut" / "rgb" / "Thumbs.db"
    stray_in_rgb.write_bytes(b"\0")
    (test / ".DS_Store").write_bytes(b"\0")  # hidden: skipped without a word

    with capture_logs() as logs:
        samples = list_samples(tmp_path, "rod", "test")
    assert len(samples) == expected
    warnings = [e for e in logs if e["log_level"] == "warning"]
    named = {e.get("path") or e.get("folder") for e in warnings}
    assert named == {str(stray_dir), str(stray_file), str(test / "cut" / "rgb")}
    in_rgb = next(e for e in warnings if e.get("folder"))
    assert in_rgb["entries"] == ["Thumbs.db"] and in_rgb["count"] == 1


def test_data_errors_name_their_file(root: Path, tmp_path: Path) -> None:
    shutil.copytree(root / "disc" / "test" / "good", tmp_path / "disc" / "test" / "good")
    folder = tmp_path / "disc" / "test" / "good"
    rgb_path, xyz_path, gt_path = folder / "rgb" / "000.png", folder / "xyz" / "000.tiff", folder / "gt" / "000.png"

    # truncated files: the decoders' own messages name no file
    rgb_bytes, xyz_bytes = rgb_path.read_bytes(), xyz_path.read_bytes()
    rgb_path.write_bytes(rgb_bytes[: len(rgb_bytes) // 2])
    with pytest.raises(DataError, match="truncated") as exc:
        read_rgb(rgb_path)
    assert str(rgb_path) in str(exc.value) and exc.value.path == rgb_path
    rgb_path.write_bytes(rgb_bytes)
    xyz_path.write_bytes(xyz_bytes[: len(xyz_bytes) // 2])
    with pytest.raises(DataError) as exc:
        read_xyz(xyz_path)
    assert str(xyz_path) in str(exc.value)
    xyz_path.write_bytes(xyz_bytes[:100])  # not even a whole header: found while listing
    with pytest.raises(DataError) as exc:
        list_samples(tmp_path, "disc", "test")
    assert str(xyz_path) in str(exc.value)
    xyz_path.write_bytes(xyz_bytes)
    gt_path.write_bytes(b"not a png")
    with pytest.raises(DataError) as exc:
        read_gt(gt_path, (4, 4))
    assert str(gt_path) in str(exc.value)
    with pytest.raises(DataError, match="size") as exc:  # the gt size check names the mask too
        read_gt(folder / "gt" / "001.png", (3, 3))
    assert str(folder / "gt" / "001.png") in str(exc.value)
    shutil.copy(folder / "gt" / "001.png", gt_path)

    # rgb and xyz of different sizes: caught while listing, naming both files
    h, w = read_rgb(rgb_path).shape[:2]
    write_xyz(xyz_path, np.zeros((h, w + 1, 3), np.float32))
    with pytest.raises(DataError, match="wide") as exc:
        list_samples(tmp_path, "disc", "test")
    assert str(xyz_path) in str(exc.value) and str(rgb_path) in str(exc.value)
    with pytest.raises(DataError) as exc:
        list_pairs(folder)
    assert str(xyz_path) in str(exc.value)
    write_xyz(xyz_path, np.zeros((h, w, 3), np.float32))
    Image.fromarray(np.zeros((h + 2, w), np.uint8)).save(gt_path)
    with pytest.raises(DataError) as exc:
        list_samples(tmp_path, "disc", "test")
    assert str(gt_path) in str(exc.value) and str(rgb_path) in str(exc.value)
    assert issubclass(DataError, ValueError)  # the CLI prints ValueError as `crd <cmd>: error: ...`


@pytest.mark.parametrize(
    "layout",
    ["float64", "float16", "big_endian", "planar", "pages", "leading_1", "uint16"],
)
def test_read_xyz_layouts_and_dtypes(tmp_path: Path, layout: str) -> None:
    xyz = np.random.default_rng(0).uniform(0.1, 0.9, (5, 7, 3)).astype(np.float32)
    path = tmp_path / "xyz" / "000.tif"
    path.parent.mkdir()
    if layout == "float64":
        tifffile.imwrite(path, xyz.astype(np.float64), photometric="rgb")
    elif layout == "float16":
        tifffile.imwrite(path, xyz.astype(np.float16), photometric="rgb")
    elif layout == "big_endian":
        tifffile.imwrite(path, xyz.astype(">f4"), photometric="rgb", byteorder=">")
    elif layout == "planar":  # one plane per coordinate
        tifffile.imwrite(path, xyz.transpose(2, 0, 1), photometric="rgb", planarconfig="separate")
    elif layout == "pages":  # x, y and z as three grey pages
        tifffile.imwrite(path, xyz.transpose(2, 0, 1), photometric="minisblack", metadata=None)
    elif layout == "leading_1":
        tifffile.imwrite(path, xyz[None], photometric="rgb")
    elif layout == "uint16":
        xyz = np.rint(xyz * 1000)  # e.g. a scanner's millimetres: read as the numbers they are
        tifffile.imwrite(path, xyz.astype(np.uint16), photometric="rgb")
    back = read_xyz(path)
    assert back.dtype == np.float32 and back.shape == (5, 7, 3)
    write_rgb(tmp_path / "rgb" / "000.png", np.zeros((5, 7, 3), np.uint8))
    assert [p.xyz_path for p in list_pairs(tmp_path)] == [path]  # the header-only size check agrees
    np.testing.assert_allclose(back, xyz, rtol=1e-3 if layout == "float16" else 1e-6)


def test_read_xyz_refuses_what_is_not_a_point_map(tmp_path: Path) -> None:
    for name, arr in {
        "depth.tiff": np.zeros((5, 7), np.float32),  # a depth image: no x, y without the camera
        "four.tiff": np.zeros((5, 7, 4), np.float32),
        "complex.tiff": np.zeros((5, 7, 3), np.complex64),
    }.items():
        tifffile.imwrite(tmp_path / name, arr, photometric="minisblack")
        with pytest.raises(DataError) as exc:
            read_xyz(tmp_path / name)
        assert str(tmp_path / name) in str(exc.value)


def test_missing_validation_split_says_what_is_there(root: Path, tmp_path: Path) -> None:
    shutil.copytree(root / "disc" / "train", tmp_path / "disc" / "train")
    shutil.copytree(root / "disc" / "test", tmp_path / "disc" / "test")
    with pytest.raises(FileNotFoundError, match=r"validation.*has: test, train"):
        list_samples(tmp_path, "disc", "validation")
