"""Checkpoint directories: `model.safetensors` + `config.json`. Loading never unpickles."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from crd_model.config import CheckpointMeta
from crd_model.torch_model import CRDModel

WEIGHTS = "model.safetensors"
META = "config.json"


def weights_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def save_checkpoint(out_dir: str | Path, model: CRDModel, meta: CheckpointMeta) -> CheckpointMeta:
    """Write weights (teacher included, so a checkpoint needs no other file) and metadata.

    `model_id` becomes `<category>-<architecture>-<sha256 of the weights, 12 hex>`, so any change
    of weights is a new id that results on the wire can be traced back to.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS))
    category = meta.training.category if meta.training else "model"
    meta = meta.model_copy(
        update={"model_id": f"{category}-{meta.config.architecture}-{weights_digest(out / WEIGHTS)}"}
    )
    tmp = out / (META + ".tmp")
    tmp.write_text(meta.model_dump_json(indent=2))
    tmp.replace(out / META)
    return meta


def read_meta(ckpt_dir: str | Path) -> CheckpointMeta:
    path = Path(ckpt_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"not a checkpoint directory (no {META}): {ckpt_dir}")
    return CheckpointMeta.model_validate(json.loads(path.read_text()))


def load_checkpoint(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> tuple[CRDModel, CheckpointMeta]:
    meta = read_meta(ckpt_dir)
    weights = Path(ckpt_dir) / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint weights missing: {weights}")
    model = CRDModel(meta.config, teacher_weights=None)  # weights come from the checkpoint itself
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    model.teacher.pretrained = True
    if meta.calibration is not None:
        model.set_calibration(meta.calibration.statistics())
    return model.to(device).eval(), meta
