"""Reader/writer of the MVTec 3D-AD directory layout.

```
<root>/<category>/{train,validation}/good/{rgb/NNN.png, xyz/NNN.tiff}
<root>/<category>/test/<good|defect_type>/{rgb/NNN.png, xyz/NNN.tiff, gt/NNN.png}
```

No torch here (camera PCs install the base distribution only): numpy, pillow and tifffile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

SPLITS: tuple[str, ...] = ("train", "validation", "test")

# MVTec writes .tiff; accept .tif too because users re-export their own scans with it.
_XYZ_SUFFIXES: tuple[str, ...] = (".tiff", ".tif")
_RGB_SUFFIX = ".png"
_GT_SUFFIX = ".png"
_NORMAL = ("good", "")


@dataclass(frozen=True)
class Sample:
    """One RGB + xyz pair (plus gt for the test split) on disk."""

    category: str
    split: str
    defect_type: str
    stem: str
    rgb_path: Path
    xyz_path: Path
    gt_path: Path | None
    # The folder `relpath` is relative to: the category folder, or the folder given to list_pairs.
    # Not part of equality so two listings of the same files compare equal regardless of root spelling.
    base_dir: Path | None = field(default=None, compare=False, repr=False)

    @property
    def is_anomalous(self) -> bool:
        return self.defect_type not in _NORMAL

    @property
    def relpath(self) -> str:
        """RGB path relative to the category folder (or list_pairs folder), POSIX separators."""
        if self.base_dir is not None:
            try:
                return self.rgb_path.relative_to(self.base_dir).as_posix()
            except ValueError:
                pass
        # Fall back to the layout itself: <split>/<defect>/rgb/<file>.
        parts = [p for p in (self.split, self.defect_type) if p]
        return "/".join([*parts, "rgb", self.rgb_path.name])


def _find_xyz(xyz_dir: Path, stem: str) -> Path | None:
    for suffix in _XYZ_SUFFIXES:
        candidate = xyz_dir / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _rgb_files(rgb_dir: Path) -> list[Path]:
    return sorted(
        p for p in rgb_dir.iterdir() if p.is_file() and p.suffix.lower() == _RGB_SUFFIX and not p.name.startswith(".")
    )


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of the folders under `root` that contain a train/ or test/ folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root does not exist or is not a folder: {root}")
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and ((p / "train").is_dir() or (p / "test").is_dir())
    )


def list_samples(root: str | Path, category: str, split: str) -> list[Sample]:
    """All samples of one category and split, sorted by (defect_type, stem)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    category_dir = Path(root) / category
    if not category_dir.is_dir():
        raise FileNotFoundError(f"category folder not found: {category_dir}")
    split_dir = category_dir / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder not found: {split_dir}")

    samples: list[Sample] = []
    defect_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for defect_dir in defect_dirs:
        defect_type = defect_dir.name
        rgb_dir = defect_dir / "rgb"
        if not rgb_dir.is_dir():
            raise FileNotFoundError(f"rgb folder not found: {rgb_dir}")
        xyz_dir = defect_dir / "xyz"
        for rgb_path in _rgb_files(rgb_dir):
            stem = rgb_path.stem
            xyz_path = _find_xyz(xyz_dir, stem)
            if xyz_path is None:
                raise FileNotFoundError(f"no xyz file for {rgb_path}: expected {xyz_dir / (stem + '.tiff')}")
            gt_path: Path | None = None
            if split == "test":
                candidate = defect_dir / "gt" / f"{stem}{_GT_SUFFIX}"
                if candidate.is_file():
                    gt_path = candidate
                elif defect_type not in _NORMAL:
                    # An anomalous image without a mask would silently count as all-normal pixels.
                    raise FileNotFoundError(f"no gt mask for anomalous sample {rgb_path}: expected {candidate}")
            samples.append(
                Sample(
                    category=category,
                    split=split,
                    defect_type=defect_type,
                    stem=stem,
                    rgb_path=rgb_path,
                    xyz_path=xyz_path,
                    gt_path=gt_path,
                    base_dir=category_dir,
                )
            )
    samples.sort(key=lambda s: (s.defect_type, s.stem))
    return samples


def list_pairs(folder: str | Path) -> list[Sample]:
    """RGB/xyz pairs in a user's own folder (no gt).

    Accepts `<folder>/rgb/*.png + <folder>/xyz/*.tiff` or any nested tree that holds such rgb/xyz
    sibling folders. Sorted by relative path; `relpath` is relative to `folder`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    samples: list[Sample] = []
    for dirpath, dirnames, _ in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # deterministic, skip hidden
        current = Path(dirpath)
        if "rgb" not in dirnames:
            continue
        rgb_dir, xyz_dir = current / "rgb", current / "xyz"
        if not xyz_dir.is_dir():
            raise FileNotFoundError(f"rgb folder {rgb_dir} has no sibling xyz folder {xyz_dir}")
        for rgb_path in _rgb_files(rgb_dir):
            xyz_path = _find_xyz(xyz_dir, rgb_path.stem)
            if xyz_path is None:
                raise FileNotFoundError(f"no xyz file for {rgb_path}: expected {xyz_dir / (rgb_path.stem + '.tiff')}")
            samples.append(
                Sample(
                    category=folder.name,
                    split="",
                    defect_type="",
                    stem=rgb_path.stem,
                    rgb_path=rgb_path,
                    xyz_path=xyz_path,
                    gt_path=None,
                    base_dir=folder,
                )
            )
    if not samples:
        raise FileNotFoundError(f"no rgb/*.png + xyz/*.tiff pairs found under {folder}")
    samples.sort(key=lambda s: s.relpath)
    return samples


def read_rgb(path: str | Path) -> np.ndarray:
    """8-bit RGB image as uint8 (H, W, 3); grey, palette, alpha and 16-bit inputs are converted."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            # Pillow cannot convert 16-bit/float grey to 8-bit by itself without clipping; scale by range.
            arr = np.asarray(img).astype(np.float64)
            top = 65535.0 if arr.max(initial=0) > 255 else 255.0
            grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        if img.mode != "RGB":
            img = img.convert("RGB")  # L, LA, P, RGBA, CMYK ... (alpha is dropped)
        return np.array(img, dtype=np.uint8)


def read_xyz(path: str | Path) -> np.ndarray:
    """Organised point map as float32 (H, W, 3) in metres; non-finite points become (0, 0, 0) (missing)."""
    arr = tifffile.imread(path)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"xyz image {path} has shape {arr.shape}; expected (H, W, 3) x/y/z channels")
    xyz = np.asarray(arr, dtype=np.float32)
    bad = ~np.isfinite(xyz).all(axis=2)
    if bad.any():
        xyz = xyz.copy()
        xyz[bad] = 0.0  # a point with any non-finite coordinate is missing as a whole
    return xyz


def read_gt(path: str | Path | None, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask as bool (H, W): pixel > 0 (values are defect class ids). None -> all False."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    with Image.open(path) as img:
        arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr.max(axis=2)  # a colour-saved mask: any non-zero channel is defect
    if arr.shape != tuple(shape):
        raise ValueError(f"gt mask {path} has size {arr.shape}; expected {tuple(shape)} (the rgb size)")
    return arr > 0


def write_rgb(path: str | Path, rgb: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) image as PNG, creating parent folders."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be uint8 (H, W, 3); got {rgb.dtype} {rgb.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, compress_level=1)  # fast; size is no concern here


def write_xyz(path: str | Path, xyz: np.ndarray) -> None:
    """Write a float32 (H, W, 3) point map as TIFF (tifffile), creating parent folders."""
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f"xyz must be (H, W, 3); got {xyz.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, xyz.astype(np.float32, copy=False), photometric="rgb")


def write_gt(path: str | Path, gt: np.ndarray) -> None:
    """Write a uint8 (H, W) mask (defect class ids, 0 = normal) as PNG, creating parent folders."""
    gt = np.asarray(gt)
    if gt.dtype == bool:
        gt = gt.astype(np.uint8) * 255
    if gt.dtype != np.uint8 or gt.ndim != 2:
        raise ValueError(f"gt must be uint8 (H, W); got {gt.dtype} {gt.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gt).save(path, compress_level=1)
