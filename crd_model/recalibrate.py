"""`crd calibrate`: new branch statistics and threshold for a checkpoint from a folder of good parts
(and, with `scoring`, another way of scoring it).

The weights, and so the model id, stay as they are: the statistics are non-persistent buffers set from
config.json at load, and the threshold lives there too. Only config.json is (re)written, with a record of
when and from what the calibration was measured (`calibration.source`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import structlog

from crd_model.calibration import calibrate_frames
from crd_model.checkpoint import WEIGHTS, load_weights, read_meta, write_meta
from crd_model.config import CheckpointMeta, Scoring
from crd_model.data.mvtec3d import list_pairs
from crd_model.dataset import load_samples
from crd_model.inspector import Inspector
from crd_model.torch_model import CRDModel

log = structlog.get_logger(__name__)


def recalibrate(
    checkpoint: str | Path,
    folder: str | Path,
    false_reject_rate: float | None = None,
    out: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 16,
    scoring: Scoring | None = None,
) -> CheckpointMeta:
    """Calibrate `checkpoint` on the good parts in `folder` (rgb/*.png + xyz/*.tiff pairs, as
    `crd predict --folder` reads them) and write config.json to `out` (default: in place).

    `false_reject_rate` None keeps the checkpoint's own requested rate. `scoring` ("whitened" or
    "cosine") switches how the checkpoint scores (e.g. one trained before whitened errors existed); it
    only changes calibration and scoring, so the weights and the model id stay. None keeps it.
    """
    checkpoint, folder = Path(checkpoint), Path(folder)
    inspector = Inspector(checkpoint, device)
    meta = inspector.meta
    assert meta is not None and meta.calibration is not None  # Inspector refuses uncalibrated checkpoints
    if scoring is not None and scoring != meta.config.scoring:
        meta = meta.model_copy(update={"config": meta.config.model_copy(update={"scoring": scoring})})
        # The same weights, scored the new way.
        model = load_weights(CRDModel(meta.config, teacher_weights=None), inspector.model.state_dict())
        inspector = Inspector.from_model(model, inspector.device, model_id=meta.model_id)
    rate = meta.calibration.false_reject_rate if false_reject_rate is None else false_reject_rate
    samples = list_pairs(folder)
    if not samples:
        raise ValueError(f"{folder}: no rgb/xyz pairs of good parts found (expected rgb/*.png + xyz/*.tiff)")
    loaded = load_samples(samples, inspector.config, with_gt=False, device=inspector.device)
    calibration = calibrate_frames(
        inspector,
        loaded.frames,
        rate,
        batch_size=batch_size,
        names=[s.relpath for s in samples],
        source_kind="folder",
        source_path=str(folder),
        previous_threshold=meta.calibration.threshold,
    )
    new_meta = meta.model_copy(update={"calibration": calibration})
    target = checkpoint if out is None else Path(out)
    target.mkdir(parents=True, exist_ok=True)
    if target.resolve() != checkpoint.resolve():
        shutil.copy2(checkpoint / WEIGHTS, target / WEIGHTS)  # same bytes, same digest, same model id
    write_meta(target, new_meta)
    written = read_meta(target)
    log.info(
        "recalibrated",
        checkpoint=str(target),
        model_id=written.model_id,
        previous_threshold=meta.calibration.threshold,
        threshold=calibration.threshold,
        n_images=len(samples),
    )
    return written
