"""Training of CRD and its baselines, then calibration on the validation (normal) split.

Recipe of the paper: Adam(lr 0.005, betas (0.5, 0.999)), exponential decay 0.95 per epoch,
batch 16, no augmentation, one optimiser per branch stepped one after the other.
The teacher is frozen and the inputs do not change between epochs (the paper has no augmentation;
`augment` adds flips and quarter turns, a fixed set), so the teacher's features of every (symmetry,
image) are computed once and cached (when they fit `cache_budget_mb`): training then only runs the
students.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from tqdm import tqdm

import crd_model
from crd_model import augment
from crd_model.calibration import calibrate_frames
from crd_model.checkpoint import save_checkpoint
from crd_model.config import Calibration, CheckpointMeta, CRDConfig, TrainingInfo
from crd_model.dataset import LoadedSplit, load_split
from crd_model.inspector import Inspector, default_device
from crd_model.loss import LOSS_KINDS
from crd_model.torch_model import CRDModel

log = structlog.get_logger(__name__)


@dataclass
class TrainOptions:
    epochs: int = 200
    batch_size: int = 16
    learning_rate: float = 0.005
    betas: tuple[float, float] = (0.5, 0.999)
    lr_decay: float = 0.95
    seed: int = 42
    false_reject_rate: float = 0.01
    device: str | None = None
    cache_budget_mb: float = 4096.0
    teacher_weights: str | None = None  # None: the backbone's bundled offline weights
    progress: bool = True
    workers: int | None = None
    bf16: bool | None = None  # bf16 autocast of the students' forward/backward; None = on CUDA only
    # "position" (mean of 1 - cos, the paper's), "hard" (that plus the mean of each scale's hardest tenth of
    # positions), "global" (TRD's flattened cosine), "magnitude" (an experiment): crd_model/loss.py
    loss: str = "position"
    augment: str = "none"  # "none" (the paper), "flips" or "d4" (flips and quarter turns): crd_model/augment.py
    shift: int = 0  # > 0: each training image moved by up to this many pixels per epoch (teacher run per batch)
    gain: float = 0.0  # > 0: each RGB channel scaled by 1 +- up to this per image and epoch (teacher run per batch)
    # > 0: the students reconstruct each clean image's teacher features from a copy with a patch of fractal
    # noise peaking at this amplitude (input units; RD++ uses 0.2) in each modality (augment.pseudo_defects)
    noise: float = 0.0

    def __post_init__(self) -> None:
        # Refused here, before minutes of preprocessing, rather than silently read as "off" later.
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "learning_rate": self.learning_rate > 0,
            "lr_decay": 0 < self.lr_decay <= 1,
            "false_reject_rate": 0 <= self.false_reject_rate <= 1,
            "shift": self.shift >= 0,
            "gain": 0 <= self.gain < 1,
            "noise": 0 <= self.noise <= 1,
        }
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid training options: {', '.join(bad)} (epochs, batch_size >= 1; learning_rate > 0; "
                "0 < lr_decay <= 1; 0 <= false_reject_rate <= 1; shift >= 0 pixels; 0 <= gain < 1; 0 <= noise <= 1)"
            )
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {list(LOSS_KINDS)}")
        augment.variants(self.augment)  # raises on an unknown name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def _features_nbytes(model: CRDModel, n: int, config: CRDConfig) -> int:
    per_image = sum(
        c * (config.image_size // r) ** 2 for c, r in zip(model.teacher.channels, model.teacher.reductions, strict=True)
    )
    modalities = int(config.uses_rgb) + int(config.uses_3d)
    return per_image * modalities * n * 4


def _to_device(a: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(a).to(device)


def _drawn(per_image: torch.Tensor | None, sym: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """The rows of a per-image tensor whose images drew symmetry `k` (all of them when none are drawn)."""
    return per_image if per_image is None or sym is None else per_image[sym == k]


def bf16_enabled(options: TrainOptions, device: torch.device) -> bool:
    """bf16 autocast for the students: on CUDA by default, never on a CPU (slow there, and float32 is exact)."""
    return device.type == "cuda" and (options.bf16 is None or options.bf16)


def fit(
    model: CRDModel,
    train: LoadedSplit,
    options: TrainOptions,
    device: torch.device,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train the model's branches in place; returns the last epoch's mean loss per branch."""
    n = len(train.frames)
    rgb_all, x3d_all = train.stack("rgb"), train.stack("x3d")
    symmetries = augment.variants(options.augment)
    normals = model.config.representation_3d in ("normals", "normals_height")

    # Pseudo-defects draw from their own stream too (the batches, shifts and gains stay as they were).
    noise_draws = torch.Generator().manual_seed(options.seed + 2)

    def encode(
        idx: np.ndarray,
        symmetry: tuple[bool, bool, bool],
        offsets: torch.Tensor | None = None,
        gains: torch.Tensor | None = None,
        corrupt: bool = False,
    ) -> dict[str, list[torch.Tensor]]:
        rgb = _to_device(None if rgb_all is None else rgb_all[idx], device)
        x3d = _to_device(None if x3d_all is None else x3d_all[idx], device)
        if rgb is not None:
            rgb = augment.transform(rgb, symmetry)
        if x3d is not None:
            x3d = augment.transform(x3d, symmetry, normals=normals)
        if offsets is not None:
            rgb = None if rgb is None else augment.translate(rgb, offsets)
            x3d = None if x3d is None else augment.translate(x3d, offsets)
        if gains is not None and rgb is not None:
            rgb = augment.recolour(rgb, gains)
        if corrupt:
            rgb = None if rgb is None else augment.pseudo_defects(rgb, noise_draws, options.noise)
            x3d = None if x3d is None else augment.pseudo_defects(x3d, noise_draws, options.noise, on_object=True)
        with torch.inference_mode():
            return model.encode(rgb, x3d)

    def batch_features(
        idx: torch.Tensor,
        sym: torch.Tensor | None,
        offsets: torch.Tensor | None,
        gains: torch.Tensor | None,
        corrupt: bool = False,
    ) -> dict[str, list[torch.Tensor]]:
        """Teacher features of a batch computed now, images grouped by the symmetry they drew."""
        ks = [0] if sym is None else sorted(set(sym.tolist()))
        parts = [
            encode(_drawn(idx, sym, k).numpy(), symmetries[k], _drawn(offsets, sym, k), _drawn(gains, sym, k), corrupt)
            for k in ks
        ]
        return {m: [torch.cat([p[m][j] for p in parts]).clone() for j in range(len(fs))] for m, fs in parts[0].items()}

    # Teacher features of every (symmetry, image), row s * n + i, when they fit the budget. Shifted or
    # recoloured images are new every epoch, so their features are computed per batch.
    cache = None
    new_every_epoch = options.shift > 0 or options.gain > 0
    fits = _features_nbytes(model, n * len(symmetries), model.config) <= options.cache_budget_mb * 2**20
    if fits and not new_every_epoch:
        chunks = [
            encode(np.arange(i, min(i + options.batch_size, n)), sym)
            for sym in symmetries
            for i in range(0, n, options.batch_size)
        ]
        # Flatten to one tensor per modality and scale for random batching.
        cache = {m: [torch.cat([c[m][k] for c in chunks]).clone() for k in range(len(chunks[0][m]))] for m in chunks[0]}

    branches = dict(model.branches.items())
    optimisers = {
        name: torch.optim.Adam(b.parameters(), lr=options.learning_rate, betas=options.betas)
        for name, b in branches.items()
    }
    schedulers = {
        name: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=options.lr_decay) for name, opt in optimisers.items()
    }
    generator = torch.Generator().manual_seed(options.seed)
    # Shifts and gains draw from their own stream, so turning them on leaves the batches as they were.
    jitter = torch.Generator().manual_seed(options.seed + 1)
    # bf16 autocast on CUDA only: the students' convolutions run in bf16, the cosine loss in float32
    # (autocast's float32 list), and the parameters and Adam's state stay float32, so no loss scaling is
    # needed (bf16 has float32's exponent range). CPUs train in float32.
    use_bf16 = bf16_enabled(options, device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)
    last: dict[str, float] = {}
    bar = tqdm(range(options.epochs), desc="train", unit="epoch", disable=not options.progress, leave=False)
    for epoch in bar:
        model.branches.train()
        order = torch.randperm(n, generator=generator)
        sums = dict.fromkeys(branches, 0.0)
        steps = 0
        for i in range(0, n, options.batch_size):
            idx = order[i : i + options.batch_size]
            if len(idx) < 2 and n >= 2:
                continue  # BatchNorm cannot train on a batch of one
            # One symmetry per image, drawn only when augmenting (the unaugmented draws stay as they were).
            sym = torch.randint(len(symmetries), (len(idx),), generator=generator) if len(symmetries) > 1 else None
            offsets = None
            if options.shift > 0:
                offsets = torch.randint(-options.shift, options.shift + 1, (len(idx), 2), generator=jitter)
            gains = None
            if options.gain > 0:
                gains = 1 + options.gain * (2 * torch.rand((len(idx), 3), generator=jitter) - 1)
            if options.noise > 0 and sym is not None:
                # Corrupted features are computed per symmetry group: put the clean rows in that order too.
                grouped = torch.argsort(sym, stable=True)
                idx, sym = idx[grouped], sym[grouped]
                offsets = None if offsets is None else offsets[grouped]
                gains = None if gains is None else gains[grouped]
            if cache is not None:
                rows = idx if sym is None else sym * n + idx
                dev_rows = rows.to(device)
                feats = {m: [f.index_select(0, dev_rows) for f in fs] for m, fs in cache.items()}
            else:
                feats = batch_features(idx, sym, offsets, gains)
            inputs, targets = feats, None
            if options.noise > 0:
                inputs, targets = batch_features(idx, sym, offsets, gains, corrupt=True), feats
            # Separate optimisers, stepped one after the other (the branches share no parameters).
            for name in branches:
                with autocast:
                    out = model.run_branch(inputs, name, targets)
                    loss = sum(out.loss_terms(options.loss).values())
                optimisers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimisers[name].step()
                sums[name] += float(loss.detach())
            steps += 1
        for s in schedulers.values():
            s.step()
        last = {k: v / max(steps, 1) for k, v in sums.items()}
        bar.set_postfix({k: f"{v:.4f}" for k, v in last.items()})
        if on_epoch is not None:
            on_epoch(epoch, last)
    model.eval()
    return last


def calibrate(
    model: CRDModel,
    validation: LoadedSplit,
    device: torch.device,
    false_reject_rate: float,
    batch_size: int = 16,
    *,
    statistics_images: Sequence[int] | None = None,
    threshold_images: Sequence[int] | None = None,
    source_path: str = "",
) -> Calibration:
    """Branch statistics from one share of the validation images, the threshold from the others' scores.

    Everything is computed through an `Inspector` around this model (the serving path: memory format,
    autocast, buckets), so inference scores a validation image exactly as calibration did. See
    crd_model/calibration.py. `statistics_images` / `threshold_images` override the seeded split.
    """
    # Eager, not compiled: compiling every batch shape would add minutes to a GPU training run, and a
    # compiled graph differs from eager only by bf16 rounding, which the threshold's repeat guard covers.
    inspector = Inspector.from_model(model, device, compile=False)
    root = Path(source_path) if source_path else None
    names = [_relative(s.rgb_path, root) for s in validation.samples] if validation.samples else None
    return calibrate_frames(
        inspector,
        validation.frames,
        false_reject_rate,
        batch_size=batch_size,
        names=names,
        statistics_idx=statistics_images,
        threshold_idx=threshold_images,
        source_kind="validation",
        source_path=source_path,
    )


def _relative(path: Path, root: Path | None) -> str:
    if root is None:
        return str(path)
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def train_category(
    data_root: str | Path,
    category: str,
    out_dir: str | Path,
    config: CRDConfig | None = None,
    options: TrainOptions | None = None,
) -> CheckpointMeta:
    """Train on `<root>/<category>/train`, calibrate on `validation`, save a checkpoint."""
    config = config or CRDConfig()
    options = options or TrainOptions()
    seed_everything(options.seed)
    device = torch.device(options.device) if options.device else default_device()
    teacher_weights: str | bool = options.teacher_weights or True
    model = CRDModel(config, teacher_weights=teacher_weights).to(device)
    t0 = time.perf_counter()
    train = load_split(data_root, category, "train", config, options.workers, device)
    validation = load_split(data_root, category, "validation", config, options.workers, device)
    log.info(
        "training",
        category=category,
        architecture=config.architecture,
        backbone=config.backbone,
        n_train=len(train.frames),
        n_validation=len(validation.frames),
        device=str(device),
        trainable_parameters=model.trainable_parameters(),
    )

    epoch_started = [time.perf_counter()]

    def report(epoch: int, losses: dict[str, float]) -> None:
        now = time.perf_counter()
        took, epoch_started[0] = now - epoch_started[0], now
        tqdm.write(
            f"epoch {epoch + 1}/{options.epochs} "
            + " ".join(f"loss_{k}={v:.5f}" for k, v in losses.items())
            + f" ({took:.1f}s)"
        )

    t_fit = time.perf_counter()
    final = fit(model, train, options, device, on_epoch=report if options.progress else None)
    fit_seconds = time.perf_counter() - t_fit
    validation_dir = Path(data_root) / category / "validation"
    calibration = calibrate(
        model, validation, device, options.false_reject_rate, options.batch_size, source_path=str(validation_dir)
    )
    seconds = time.perf_counter() - t0
    meta = CheckpointMeta(
        model_id="pending",
        config=config,
        calibration=calibration,
        training=TrainingInfo(
            category=category,
            epochs=options.epochs,
            batch_size=options.batch_size,
            learning_rate=options.learning_rate,
            seed=options.seed,
            n_train=len(train.frames),
            seconds=round(seconds, 2),
            final_loss=final,
            trainable_parameters=model.trainable_parameters(),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            crd_inspect_version=crd_model.__version__,
            torch_version=torch.__version__,
            device=device.type,
            bf16=bf16_enabled(options, device),
            loss=options.loss,
            augment=options.augment,
            shift=options.shift,
            gain=options.gain,
            noise=options.noise,
            seconds_per_epoch=round(fit_seconds / options.epochs, 3),
            fit_seconds=round(fit_seconds, 2),
        ),
    )
    meta = save_checkpoint(out_dir, model, meta)
    log.info(
        "trained",
        category=category,
        model_id=meta.model_id,
        device=device.type,
        bf16=bf16_enabled(options, device),
        seconds=round(seconds, 1),
        fit_seconds=round(fit_seconds, 1),
        seconds_per_epoch=round(fit_seconds / options.epochs, 2),
        threshold=round(calibration.threshold, 4),
    )
    return meta
