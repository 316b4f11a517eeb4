"""The worker's models file: one read per check, and what counts as a change."""

from __future__ import annotations

import json
import os

import pytest

from workers.rollout import ModelsFile


def test_a_snapshot_changes_with_the_file_and_with_a_checkpoint_it_names(tmp_path):
    ckpt = tmp_path / "disc-v1"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": {"disc": str(ckpt)}}))
    f = ModelsFile(path)
    first, spec, error = f.snapshot()
    assert spec is not None and spec.models["disc"] == ckpt and error == ""
    assert f.snapshot()[0] == first  # nothing changed: the same fingerprint
    st = (ckpt / "config.json").stat()
    os.utime(ckpt / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # retrained in place
    assert f.snapshot()[0] != first
    path.write_text(json.dumps({"models": {"disc": str(ckpt)}, "shadow_models": {"disc": str(ckpt)}}))
    assert f.snapshot()[1].shadow_models == {"disc": ckpt}


def test_a_broken_file_is_a_stable_snapshot_with_its_error(tmp_path):
    path = tmp_path / "models.json"
    path.write_text('{"models": ')
    f = ModelsFile(path)
    fingerprint, spec, error = f.snapshot()
    assert spec is None and "models.json" in error
    assert f.snapshot()[0] == fingerprint  # reported once per change, not at every check
    with pytest.raises(ValueError, match=r"models\.json"):
        f.read()
    path.unlink()
    with pytest.raises(ValueError, match=r"models\.json"):
        f.snapshot()
