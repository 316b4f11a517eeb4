"""Model rollout without a stop: the worker's models file, watched; a new set of models is loaded and
warmed beside the live ones, then swapped in between two batches.

    {"models": {"disc": "/models/disc/v7"}, "shadow_models": {"disc": "/models/disc/v8"}}

A change of the file, or of a checkpoint it names (a `current` symlink moved, a new config.json),
is noticed within `reload_check_s`, or at once on SIGHUP. Frames are never lost or doubled by a
swap: the batch in hand finishes on the model that started it, the next batch runs on the new one,
and every result carries the model id that scored it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class ModelsSpec(BaseModel):
    """The models file's content."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, Path]
    shadow_models: dict[str, Path] = {}


class ModelsFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.loaded_fingerprint: tuple | None = None

    def read(self) -> ModelsSpec:
        spec, error = self._parse(self._raw())
        if spec is None:
            raise ValueError(error)
        return spec

    def snapshot(self) -> tuple[tuple, ModelsSpec | None, str]:
        """(fingerprint, spec, error) from one read of the file. The fingerprint is what a change of
        would mean new models: the file's bytes and each checkpoint it points at. A file that does not
        parse gives spec None, the error, and its bytes as the fingerprint (so it is reported once per
        change, not at every check)."""
        raw = self._raw()
        spec, error = self._parse(raw)
        if spec is None:
            return (raw,), None, error
        parts: list = [raw]
        for path in [*spec.models.values(), *spec.shadow_models.values()]:
            real = os.path.realpath(path)
            meta = Path(real) / "config.json"
            parts.append((real, meta.stat().st_mtime_ns if meta.exists() else None))
        return tuple(parts), spec, ""

    def _raw(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise ValueError(f"models file {self.path}: {exc}") from None

    def _parse(self, raw: bytes) -> tuple[ModelsSpec | None, str]:
        try:
            return ModelsSpec.model_validate(json.loads(raw)), ""
        except ValueError as exc:
            return None, f"models file {self.path}: {exc}"
