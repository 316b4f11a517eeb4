"""Reader/writer of the MVTec 3D-AD directory layout.

```
<root>/<category>/{train,validation}/good/{rgb/NNN.png, xyz/NNN.tiff}
<root>/<category>/test/<good|defect_type>/{rgb/NNN.png, xyz/NNN.tiff, gt/NNN.png}
```

Data written by other tools reads the same (docs/data.md lists what varies): file names match
by stem whatever the case of their extension (`000.PNG`, `000.TIF`), folders that are not
sample folders are skipped with a warning, xyz TIFFs may be float64 or channel-first, and gt
masks are binarised at half their full scale (soft, anti-aliased edges count where they are
mostly defect). Every problem with a data file raises `DataError` naming that file.

No torch here (camera PCs install the base distribution only): numpy, pillow, tifffile, structlog.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog
import tifffile
from PIL import Image

log = structlog.get_logger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")

# Lower case: names are matched case-insensitively. MVTec writes .tiff; users' own exports use .tif.
_RGB_SUFFIXES: tuple[str, ...] = (".png",)
_XYZ_SUFFIXES: tuple[str, ...] = (".tiff", ".tif")
_GT_SUFFIXES: tuple[str, ...] = (".png", ".tiff", ".tif", ".bmp")
_TIFF_SUFFIXES: tuple[str, ...] = (".tiff", ".tif")
# gt/<stem>.png as MVTec names it; gt/<stem>_mask.png as MVTec AD and anomalib's folder formats name it.
_GT_STEM_ENDINGS: tuple[str, ...] = ("", "_mask")
_NORMAL = ("good", "")
_MAX_NAMES_LOGGED = 10


class DataError(ValueError):
    """A data file (or folder) that cannot be used as it is. The message starts with its path."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}")


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


# --------------------------------------------------------------------------------------------
# Finding files: case-insensitive names, stray entries skipped with a warning
# --------------------------------------------------------------------------------------------


def _visible_entries(folder: Path) -> list[Path]:
    """Sorted entries of `folder` without hidden ones (.DS_Store, ._000.png from macOS copies)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _child_dir(parent: Path, name: str) -> Path | None:
    """The sub-folder `name` of `parent`, spelled in any case (rgb/, RGB/); exact spelling wins."""
    exact = parent / name
    if exact.is_dir():
        return exact
    if not parent.is_dir():
        return None
    matches = [p for p in _visible_entries(parent) if p.is_dir() and p.name.lower() == name]
    if len(matches) > 1:
        raise DataError(parent, f"several folders are named {name!r} in some case: {[p.name for p in matches]}")
    return matches[0] if matches else None


class _FolderIndex:
    """The files of one folder by lower-cased name, so lookups by stem ignore the extension's case."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.by_name: dict[str, list[Path]] = {}
        if folder is not None and folder.is_dir():
            for p in _visible_entries(folder):
                if p.is_file():
                    self.by_name.setdefault(p.name.lower(), []).append(p)

    def find(self, stem: str, suffixes: Sequence[str], stem_endings: Sequence[str] = ("",)) -> Path | None:
        """The file `<stem><ending><suffix>` in any case; the first ending, then suffix, that exists wins."""
        for ending in stem_endings:
            for suffix in suffixes:
                matches = self.by_name.get(f"{stem}{ending}{suffix}".lower(), [])
                if len(matches) > 1:
                    # 000.tiff and 000.TIFF side by side: which one is meant cannot be guessed.
                    names = ", ".join(p.name for p in matches)
                    raise DataError(matches[0].parent, f"several files match {stem}{ending}{suffix}: {names}")
                if matches:
                    return matches[0]
        return None


def _rgb_files(rgb_dir: Path) -> list[Path]:
    """PNG files of an rgb folder (any case of extension); anything else is skipped with a warning."""
    images, stray = [], []
    for p in _visible_entries(rgb_dir):
        (images if p.is_file() and p.suffix.lower() in _RGB_SUFFIXES else stray).append(p)
    if stray:
        names = [p.name for p in stray]
        shown = names if len(names) <= _MAX_NAMES_LOGGED else [*names[:_MAX_NAMES_LOGGED], "..."]
        log.warning(
            "skipping entries that are not rgb PNG images", folder=str(rgb_dir), count=len(names), entries=shown
        )
    # xyz and gt are found by stem in any case, so 000.png and 000.PNG (or A.png and a.png) would share them.
    stems: dict[str, Path] = {}
    for p in images:
        key = p.stem.lower()
        if key in stems:
            raise DataError(rgb_dir, f"two rgb images have the same stem: {stems[key].name}, {p.name}")
        stems[key] = p
    return images


def _defect_dirs(split_dir: Path) -> list[tuple[Path, Path]]:
    """(defect folder, its rgb folder) under a split; stray files and folders without rgb/ are skipped."""
    found = []
    for entry in _visible_entries(split_dir):
        rgb_dir = _child_dir(entry, "rgb") if entry.is_dir() else None
        if rgb_dir is None:
            # A readme, a zip, an export folder next to the defect types: not data, but say so.
            if entry.is_dir():
                log.warning("skipping a folder without rgb/ in a split folder", path=str(entry))
            else:
                log.warning("skipping a file in a split folder", path=str(entry))
            continue
        found.append((entry, rgb_dir))
    return found


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


def _categories_hint(root: Path) -> str:
    """What a user pointing --data one level too deep or too high most likely meant."""
    if not root.is_dir():
        return ""
    if any((root / split).is_dir() for split in SPLITS):
        return f" ({root} is itself a category folder: give its parent folder as the data root)"
    categories = list_categories(root)
    if categories:
        return f" (categories under {root}: {', '.join(categories)})"
    nested = sorted(f"{p.name}/{c}" for p in _visible_entries(root) if p.is_dir() for c in list_categories(p))
    if nested:
        return f" (no categories directly under {root}; one level down: {', '.join(nested[:_MAX_NAMES_LOGGED])})"
    return ""


def list_samples(root: str | Path, category: str, split: str) -> list[Sample]:
    """All samples of one category and split, sorted by (defect_type, stem).

    The sizes of each sample's rgb, xyz and gt are checked from the file headers here, so a
    mismatch stops a run before it starts and names the files.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    category_dir = Path(root) / category
    if not category_dir.is_dir():
        raise FileNotFoundError(f"category folder not found: {category_dir}{_categories_hint(Path(root))}")
    split_dir = category_dir / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in category_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise FileNotFoundError(f"split folder not found: {split_dir} (the category has: {', '.join(present)})")

    samples: list[Sample] = []
    for defect_dir, rgb_dir in _defect_dirs(split_dir):
        defect_type = defect_dir.name
        xyz_dir = _child_dir(defect_dir, "xyz")
        xyz_files = _FolderIndex(xyz_dir)
        gt_dir = _child_dir(defect_dir, "gt") if split == "test" else None
        gt_files = _FolderIndex(gt_dir)
        for rgb_path in _rgb_files(rgb_dir):
            stem = rgb_path.stem
            xyz_path = xyz_files.find(stem, _XYZ_SUFFIXES)
            if xyz_path is None:
                expected = (xyz_dir or defect_dir / "xyz") / f"{stem}.tiff"
                raise FileNotFoundError(f"no xyz file for {rgb_path}: expected {expected}")
            gt_path: Path | None = None
            if split == "test":
                gt_path = gt_files.find(stem, _GT_SUFFIXES, _GT_STEM_ENDINGS)
                if gt_path is None and defect_type not in _NORMAL:
                    # An anomalous image without a mask would silently count as all-normal pixels.
                    expected = (gt_dir or defect_dir / "gt") / f"{stem}.png"
                    raise FileNotFoundError(f"no gt mask for anomalous sample {rgb_path}: expected {expected}")
            _check_sizes(rgb_path, xyz_path, gt_path)
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
        rgb_dir = _child_dir(current, "rgb") if any(d.lower() == "rgb" for d in dirnames) else None
        if rgb_dir is None:
            continue
        xyz_dir = _child_dir(current, "xyz")
        if xyz_dir is None:
            raise FileNotFoundError(f"rgb folder {rgb_dir} has no sibling xyz folder {current / 'xyz'}")
        xyz_files = _FolderIndex(xyz_dir)
        for rgb_path in _rgb_files(rgb_dir):
            xyz_path = xyz_files.find(rgb_path.stem, _XYZ_SUFFIXES)
            if xyz_path is None:
                raise FileNotFoundError(f"no xyz file for {rgb_path}: expected {xyz_dir / (rgb_path.stem + '.tiff')}")
            _check_sizes(rgb_path, xyz_path, None)
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


# --------------------------------------------------------------------------------------------
# Reading: every failure names its file
# --------------------------------------------------------------------------------------------


@contextmanager
def _reading(path: str | Path, what: str) -> Iterator[None]:
    """Re-raise any decoder failure as DataError naming `path` (decoders often name no file)."""
    try:
        yield
    except (DataError, FileNotFoundError, MemoryError):
        raise
    except Exception as exc:  # pillow/tifffile raise OSError, ValueError, KeyError, struct.error, ...
        raise DataError(path, f"cannot read the {what}: {type(exc).__name__}: {exc}") from exc


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in _TIFF_SUFFIXES


def _xyz_hwc_axes(shape: tuple[int, ...], path: str | Path) -> tuple[int, ...]:
    """Axis order that turns a TIFF's point-map array into (H, W, 3).

    Accepts (H, W, 3) (contiguous samples, as MVTec writes) and (3, H, W) (planar samples or three
    pages); leading axes of length 1 are dropped by the caller. Last-axis 3 wins when both fit.
    """
    if len(shape) == 3 and shape[2] == 3:
        return (0, 1, 2)
    if len(shape) == 3 and shape[0] == 3:
        return (1, 2, 0)
    raise DataError(path, f"xyz image has shape {shape}; expected (H, W, 3) x/y/z channels (or (3, H, W))")


def _squeeze_leading(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 3 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _xyz_hw(path: Path) -> tuple[int, int]:
    """(H, W) of a point map from its TIFF header only (no pixel decoding)."""
    with _reading(path, "xyz image"), tifffile.TiffFile(path) as tif:
        shape = _squeeze_leading(tuple(tif.series[0].shape))
    order = _xyz_hwc_axes(shape, path)
    return int(shape[order[0]]), int(shape[order[1]])


def _image_hw(path: Path, what: str) -> tuple[int, int]:
    """(H, W) of an rgb image or gt mask from its header only (no pixel decoding)."""
    with _reading(path, what):
        if _is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                shape = tuple(tif.series[0].shape)
            return int(shape[0]), int(shape[1])
        with Image.open(path) as img:
            width, height = img.size
        return int(height), int(width)


def _check_sizes(rgb_path: Path, xyz_path: Path, gt_path: Path | None) -> None:
    rgb_hw = _image_hw(rgb_path, "rgb image")
    xyz_hw = _xyz_hw(xyz_path)
    if xyz_hw != rgb_hw:
        raise DataError(xyz_path, f"xyz is {_hw_text(xyz_hw)} but its rgb {rgb_path} is {_hw_text(rgb_hw)}")
    if gt_path is not None:
        gt_hw = _image_hw(gt_path, "gt mask")
        if gt_hw != rgb_hw:
            raise DataError(gt_path, f"gt mask is {_hw_text(gt_hw)} but its rgb {rgb_path} is {_hw_text(rgb_hw)}")


def _hw_text(hw: tuple[int, int]) -> str:
    return f"{hw[1]} wide x {hw[0]} high"


def read_rgb(path: str | Path) -> np.ndarray:
    """8-bit RGB image as uint8 (H, W, 3); grey, palette, alpha and 16-bit inputs are converted."""
    with _reading(path, "rgb image"), Image.open(path) as img:
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


_warned_integer_xyz: set[str] = set()


def read_xyz(path: str | Path) -> np.ndarray:
    """Organised point map as float32 (H, W, 3) in metres; non-finite points become (0, 0, 0) (missing).

    Reads (H, W, 3) and (3, H, W) layouts and any real dtype (float64, float16, integers).
    """
    with _reading(path, "xyz image"):
        arr = tifffile.imread(path)
    arr = np.asarray(arr)
    shape = _squeeze_leading(tuple(arr.shape))
    arr = arr.reshape(shape).transpose(_xyz_hwc_axes(shape, path))
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(path, f"xyz image has dtype {arr.dtype}; expected float32 (or another real number type)")
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype.name not in _warned_integer_xyz:
        # MVTec's point maps are float metres; integer ones are often millimetres or an image saved as
        # xyz (anomalib's test fixture). Read as they are, but say so once per dtype.
        _warned_integer_xyz.add(arr.dtype.name)
        log.warning("xyz image holds integers; reading them as metres", path=str(path), dtype=arr.dtype.name)
    xyz = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(xyz).all(axis=2)
    if bad.any():
        xyz = xyz.copy()
        xyz[bad] = 0.0  # a point with any non-finite coordinate is missing as a whole
    return xyz


# --------------------------------------------------------------------------------------------
# Ground truth: binarised at half scale
# --------------------------------------------------------------------------------------------


def _gt_values(path: Path) -> np.ndarray:
    """The mask's pixel values as stored: 2-D bool, integer or float; colour masks give their brightest channel."""
    with _reading(path, "gt mask"):
        if _is_tiff(path):
            arr = np.asarray(tifffile.imread(path))
            if arr.ndim == 3 and arr.shape[2] in (2, 4):
                arr = arr[..., :-1]  # grey+alpha, RGBA: alpha is not defect
        else:
            with Image.open(path) as img:
                img.load()
                if img.mode == "P":
                    img = img.convert("RGBA")  # palette masks: what the colours show
                if img.mode not in ("1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "RGB", "RGBA", "LA"):
                    img = img.convert("RGB")
                arr = np.asarray(img)
                if img.mode in ("LA", "RGBA"):
                    arr = arr[..., :-1]
    if arr.ndim == 3:
        arr = arr.max(axis=2)  # a colour-saved mask: the brightest channel (a red mask is defect too)
    if arr.ndim != 2:
        raise DataError(path, f"gt mask has shape {arr.shape}; expected a 2-D mask (H, W)")
    return arr


def _full_scale(values: np.ndarray) -> float:
    """The value that means "fully defect" for this mask's storage."""
    if values.dtype == bool:
        return 1.0
    top = float(values.max(initial=0))
    if top == 1.0:
        return 1.0  # a 0/1 mask stored as integers (e.g. cv2.imwrite(mask.astype(np.uint8))): 1 is defect
    if np.issubdtype(values.dtype, np.floating):
        # Float masks are 0-1; a float mask holding 0-255 (or 0-65535) values is read on that scale.
        return 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
    if values.dtype.itemsize == 1:
        return 255.0
    if values.dtype.itemsize == 2 or values.dtype == np.int32:
        return 65535.0  # 16-bit PNGs open as Pillow mode I;16 (uint16) or, in some versions, I (int32)
    return float(np.iinfo(values.dtype).max)


def gt_mask_from_values(values: np.ndarray) -> np.ndarray:
    """Binarise stored mask values: a pixel is defect when it is above half the full scale.

    Full scale is 255 for 8-bit, 65535 for 16-bit and 1.0 for float masks, so >= 128 of 255,
    >= 32768 of 65535, > 0.5 of 1.0. MVTec's class ids (255, 254, ...) and 0/255 masks read as
    `> 0` would; soft, anti-aliased edges count only where they are more defect than not (as TRD
    and most published evaluation code binarise: > 0.5 after scaling to 0-1). A mask that holds
    only 0 and 1 is a 0/1 mask, and 1 is defect.
    """
    values = np.asarray(values)
    if values.dtype == bool:
        return values.copy()
    return values.astype(np.float64, copy=False) > _full_scale(values) / 2.0


def read_gt(path: str | Path | None, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask as bool (H, W), binarised at half scale (`gt_mask_from_values`). None -> all False."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    path = Path(path)
    values = _gt_values(path)
    if values.shape != tuple(shape):
        raise DataError(path, f"gt mask has size {values.shape}; expected {tuple(shape)} (the rgb size)")
    mask = gt_mask_from_values(values)
    if not mask.any() and values.any():
        # e.g. a label map with ids 1, 2, 3: nothing reaches half scale, so nothing counts as defect.
        log.warning(
            "gt mask has non-zero pixels but none at half scale; reading it as all normal",
            path=str(path),
            max_value=float(values.max()),
            full_scale=_full_scale(values),
        )
    return mask


# --------------------------------------------------------------------------------------------
# Writing (the synthetic generator)
# --------------------------------------------------------------------------------------------


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
    """Write a uint8 (H, W) mask (defect class ids >= 128, 0 = normal) as PNG, creating parent folders.

    Class ids below 128 are refused: the reader binarises at half scale, so they would read as normal.
    """
    gt = np.asarray(gt)
    if gt.dtype == bool:
        gt = gt.astype(np.uint8) * 255
    if gt.dtype != np.uint8 or gt.ndim != 2:
        raise ValueError(f"gt must be uint8 (H, W); got {gt.dtype} {gt.shape}")
    low = np.unique(gt[(gt > 0) & (gt < 128)])
    if low.size:
        raise ValueError(f"gt class ids must be 0 or >= 128 (read back at half scale); got {low.tolist()} for {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gt).save(path, compress_level=1)
