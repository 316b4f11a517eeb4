"""Missing results: a gap in a camera's capture sequence that stays open longer than a timeout is reported."""

from __future__ import annotations

from dataclasses import dataclass, field

# A jump this large (or any step backwards beyond it) is a camera restart or a new producer boot,
# not thousands of lost frames: the tracker starts over for that camera.
MAX_GAP = 1000


@dataclass
class _Camera:
    last: int
    missing: dict[int, float] = field(default_factory=dict)  # capture seq -> deadline (stream clock, s)


class GapTracker:
    """Per camera of one line. Time is the stream's clock (entry times), so a backlog read after an
    outage is judged by when results were published, not by when the bridge got to them."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.cameras: dict[str, _Camera] = {}

    def observe(self, camera: str, seq: int | None, at: float) -> bool:
        """Note a result; returns True if it filled a gap (a late result)."""
        if not camera or seq is None:
            return False
        cam = self.cameras.get(camera)
        if cam is None:
            self.cameras[camera] = _Camera(seq)
            return False
        if seq in cam.missing:
            del cam.missing[seq]
            return True
        if seq > cam.last:
            if seq - cam.last > MAX_GAP:
                self.cameras[camera] = _Camera(seq)
                return False
            for k in range(cam.last + 1, seq):
                cam.missing[k] = at + self.timeout_s
            cam.last = seq
        elif cam.last - seq > MAX_GAP:
            self.cameras[camera] = _Camera(seq)
        return False

    def expired(self, now: float) -> list[tuple[str, int]]:
        """(camera, capture seq) of gaps whose deadline passed; each is reported once."""
        out = []
        for name, cam in self.cameras.items():
            for k in sorted(k for k, deadline in cam.missing.items() if deadline <= now):
                del cam.missing[k]
                out.append((name, k))
        return out

    @property
    def open(self) -> int:
        return sum(len(c.missing) for c in self.cameras.values())
