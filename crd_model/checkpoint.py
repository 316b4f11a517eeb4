"""Checkpoint directories: `model.safetensors` + `config.json`. Loading never unpickles.

A checkpoint is checked before it is trusted: config.json must be valid JSON of the known schema,
model.safetensors must really be a complete safetensors file (not a pickle under that name, not cut
short), hold exactly the tensors of the architecture config.json describes, with their shapes and
dtypes, all finite, and its sha256 must be the one in `model_id`. Anything else is a `CheckpointError`
naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from crd_model.config import CheckpointMeta
from crd_model.torch_model import CRDModel

WEIGHTS = "model.safetensors"
META = "config.json"

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own bound on the JSON header
_PICKLED_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle")
_DIGEST_RE = re.compile(r"-([0-9a-f]{12})$")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint whose files are not what they claim; the message names the file and what is wrong."""


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
    write_meta(out, meta)
    return meta


def write_meta(directory: Path, meta: CheckpointMeta) -> None:
    """config.json, atomically (a worker watching it never reads half a file): indented, but each list of
    numbers on one line, so the whitening matrices take half the bytes of one number per line."""
    tmp = directory / (META + ".tmp")
    tmp.write_text(_json_text(json.loads(meta.model_dump_json())) + "\n")
    tmp.replace(directory / META)


def _json_text(value: object, depth: int = 0) -> str:
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_json_text(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and value and not all(isinstance(v, int | float) for v in value):
        return "[\n" + ",\n".join(inner + _json_text(v, depth + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value, allow_nan=False)


def read_meta(ckpt_dir: str | Path) -> CheckpointMeta:
    path = Path(ckpt_dir) / META
    if not path.is_file():
        raise FileNotFoundError(f"not a checkpoint directory (no {META}): {ckpt_dir}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from None
    try:
        return CheckpointMeta.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'top level'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)[:5]
        )
        raise CheckpointError(f"{path}: not a checkpoint description this version reads: {problems}") from None


def _safetensors_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from the header, after checking the file is a whole safetensors file.

    Read by hand so that a pickle or zip under the name, a header longer than the file, or tensor
    data cut short are told apart, without handing the bytes to any deserialiser first.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head[:4] == b"PK\x03\x04":
            kind = "a zip (torch.save)" if head[:2] == b"PK" else "a pickle"
            raise CheckpointError(
                f"{path}: is {kind} file, not safetensors; refused without unpickling it "
                "(pickles can run code: convert it to safetensors where you trust it)"
            )
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file (truncated?)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: header claims {header_len} bytes but the file has {size}: truncated, or not safetensors"
            )
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({exc}): corrupt") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object: corrupt")
    data_len = size - 8 - header_len
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry: corrupt") from None
        if not 0 <= begin <= stop:
            raise CheckpointError(f"{path}: tensor {name!r} has offsets {begin}..{stop}: corrupt")
        layout[name] = (dtype, shape)
        end = max(end, stop)
    if end > data_len:
        raise CheckpointError(
            f"{path}: truncated: the header places tensor data up to byte {end}, the file holds {data_len}"
        )
    if end < data_len:
        raise CheckpointError(f"{path}: {data_len - end} bytes after the last tensor: corrupt or not safetensors")
    return layout


def _check_weights_match(path: Path, layout: dict[str, tuple[str, tuple[int, ...]]], model: CRDModel) -> None:
    """The file holds exactly the tensors the architecture needs, with their shapes and dtypes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(layout))
    unexpected = sorted(set(layout) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{path}: does not hold the weights of the model {META} describes: {'; '.join(parts)}")
    for name, tensor in expected.items():
        dtype, shape = layout[name]
        if shape != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(shape)}, the model {META} describes needs "
                f"{list(tensor.shape)}"
            )
        if _SAFETENSORS_DTYPES.get(dtype) != tensor.dtype:
            raise CheckpointError(f"{path}: tensor {name!r} is {dtype}, the model needs {tensor.dtype}")


def _check_digest(path: Path, meta: CheckpointMeta, meta_path: Path) -> None:
    """model_id ends in the weights' sha256 prefix: results name exactly the weights that made them."""
    match = _DIGEST_RE.search(meta.model_id)
    digest = weights_digest(path)
    if match is None:
        raise CheckpointError(
            f"{meta_path}: model_id {meta.model_id!r} does not end in the weights' sha256 prefix "
            f"(-{digest}), so results could not be traced to these weights"
        )
    if match.group(1) != digest:
        raise CheckpointError(
            f"{path}: its sha256 starts {digest}, but model_id {meta.model_id!r} in {META} names other weights "
            "(replaced or corrupted after saving)"
        )


def load_weights(model: CRDModel, state: dict[str, torch.Tensor]) -> CRDModel:
    """`model` holding `state`, every tensor of it (the teacher's included, so the teacher counts as
    pretrained), in place."""
    model.load_state_dict(state, strict=True)
    model.teacher.pretrained = True
    return model


def load_checkpoint(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> tuple[CRDModel, CheckpointMeta]:
    meta = read_meta(ckpt_dir)
    meta_path = Path(ckpt_dir) / META
    weights = Path(ckpt_dir) / WEIGHTS
    if not weights.is_file():
        pickled = sorted(p.name for p in Path(ckpt_dir).iterdir() if p.suffix in _PICKLED_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"{weights}: missing; {Path(ckpt_dir) / pickled[0]} is a pickle-based torch file, which is "
                "never unpickled here: save the weights as model.safetensors"
            )
        raise FileNotFoundError(f"checkpoint weights missing: {weights}")
    layout = _safetensors_layout(weights)
    _check_digest(weights, meta, meta_path)
    try:
        model = CRDModel(meta.config, teacher_weights=None)  # weights come from the checkpoint itself
    except Exception as exc:  # e.g. a backbone this timm does not know
        raise CheckpointError(f"{meta_path}: cannot build the model it describes: {exc}") from exc
    _check_weights_match(weights, layout, model)
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as exc:  # the safetensors library's own checks
        raise CheckpointError(f"{weights}: cannot be read: {exc}") from None
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{weights}: tensor {name!r} holds NaN or infinite values")
    load_weights(model, state)
    if meta.calibration is not None:
        cal = meta.calibration
        moments = cal.moments()
        values = [cal.threshold, *[x for s in cal.statistics().values() for x in s]]
        values += [x for scales in (moments or {}).values() for mean, whitener in scales for x in (*mean, *whitener)]
        if not all(math.isfinite(v) for v in values):
            raise CheckpointError(f"{meta_path}: calibration holds NaN or infinite values")
        if (meta.config.scoring == "whitened") != (moments is not None):
            raise CheckpointError(
                f"{meta_path}: scoring {meta.config.scoring!r} but the calibration "
                f"{'lacks' if moments is None else 'holds'} error moments: recalibrate it (crd calibrate)"
            )
        try:
            model.set_calibration(cal.statistics(), moments)
        except ValueError as exc:  # moments that do not fit this network's channels
            raise CheckpointError(f"{meta_path}: {exc}") from None
    return model.to(device).eval(), meta
