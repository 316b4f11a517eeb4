"""Where frames come from: replay of an MVTec 3D-AD folder, the synthetic camera, a watch folder."""

from __future__ import annotations

import itertools
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crd_model.data.mvtec3d import list_samples, read_rgb, read_xyz


@dataclass
class SourceFrame:
    rgb: np.ndarray
    xyz: np.ndarray
    category: str
    meta: dict[str, str | int | float | bool] = field(default_factory=dict)
    # Called once the frame is safely on the stream (e.g. to move a watched file out of the way).
    on_sent: Callable[[], None] | None = None
    # The source's own identity for this capture (a watched file's name and time): the frame id is
    # then <camera>:<key>, the same if the frame is ever sent again. None: <camera>:<epoch>:<seq>.
    key: str | None = None


class ReplaySource:
    """Replays `<root>/<category>/<split>` in order, optionally looping, like a camera on a line."""

    def __init__(self, root: Path, category: str, split: str = "test", loop: bool = False):
        self.samples = list_samples(Path(root), category, split)
        if not self.samples:
            raise ValueError(f"nothing to replay in {root}/{category}/{split}")
        self.category, self.loop = category, loop

    def __iter__(self) -> Iterator[SourceFrame]:
        return self.frames(0)

    def frames(self, start: int) -> Iterator[SourceFrame]:
        """From the `start`-th frame of the replay (the split, over and over with `loop`)."""
        n = len(self.samples)
        indices = itertools.count(start) if self.loop else range(start, n)
        for i in indices:
            s = self.samples[i % n]
            yield SourceFrame(
                read_rgb(s.rgb_path),
                read_xyz(s.xyz_path),
                self.category,
                {"path": s.relpath, "defect_type": s.defect_type},
            )


class SyntheticSource:
    """The synthetic generator as a live line camera (endless)."""

    def __init__(self, category: str, seed: int = 0, anomaly_rate: float = 0.2):
        from crd_model.data.synth import SyntheticCamera

        self.camera = SyntheticCamera(category, seed=seed, anomaly_rate=anomaly_rate)
        self.category = category

    def __iter__(self) -> Iterator[SourceFrame]:
        return self.frames(0)

    def frames(self, start: int) -> Iterator[SourceFrame]:
        """The camera's frames from the `start`-th (each frame is reproducible from the seed and its index)."""
        self.camera.frame_index = start
        while True:
            rgb, xyz, _gt, defect = self.camera.next_frame()
            yield SourceFrame(rgb, xyz, self.category, {"defect_type": defect, "synthetic": True})


def capture_key(rgb_path: Path) -> str:
    """A watched capture's identity, stable across producer restarts: its name and modification time
    (a file sent, then found again after a crash before it was moved, gets the same frame id)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", rgb_path.stem)[:80] or "capture"
    return f"{stem}:{rgb_path.stat().st_mtime_ns // 1_000_000}"


class WatchFolderSource:
    """A folder where a camera SDK drops `rgb/<stem>.png` + `xyz/<stem>.tiff`.

    A pair is taken once both files exist and neither has changed for `settle_s` (the SDK may
    still be writing); after it is on the stream both files move to `<folder>/sent/`, so a
    restart neither loses nor resends them. A pair that cannot be read moves to `<folder>/failed/`.
    """

    def __init__(
        self,
        folder: Path,
        category: str,
        settle_s: float = 0.5,
        poll_s: float = 0.2,
        stop: Callable[[], bool] = lambda: False,
        on_idle: Callable[[], None] = lambda: None,
    ):
        self.folder, self.category = Path(folder), category
        self.settle_s, self.poll_s, self.stop = settle_s, poll_s, stop
        # Called on every empty poll: a stopped line is idle, not stuck (liveness probes).
        self.on_idle = on_idle
        for sub in ("rgb", "xyz"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)

    def _ready_pairs(self) -> list[tuple[Path, Path]]:
        now = time.time()
        pairs = []
        for rgb in sorted((self.folder / "rgb").glob("*.png")):
            xyz = self.folder / "xyz" / f"{rgb.stem}.tiff"
            try:
                if xyz.is_file() and now - max(rgb.stat().st_mtime, xyz.stat().st_mtime) >= self.settle_s:
                    pairs.append((rgb, xyz))
            except FileNotFoundError:
                continue
        return pairs

    def _move(self, paths: tuple[Path, Path], to: str) -> None:
        for p in paths:
            dest = self.folder / to / p.parent.name / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), dest)

    def __iter__(self) -> Iterator[SourceFrame]:
        while not self.stop():
            pairs = self._ready_pairs()
            if not pairs:
                self.on_idle()
                time.sleep(self.poll_s)
                continue
            for rgb_path, xyz_path in pairs:
                try:
                    rgb, xyz = read_rgb(rgb_path), read_xyz(xyz_path)
                except (OSError, ValueError) as exc:
                    self._move((rgb_path, xyz_path), "failed")
                    (self.folder / "failed" / f"{rgb_path.stem}.error.txt").write_text(f"{exc}\n")
                    continue
                paths = (rgb_path, xyz_path)
                yield SourceFrame(
                    rgb,
                    xyz,
                    self.category,
                    {"path": f"rgb/{rgb_path.name}"},
                    on_sent=lambda paths=paths: self._move(paths, "sent"),
                    key=capture_key(rgb_path),
                )
