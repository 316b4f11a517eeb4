"""Scoring variants on trained checkpoints, without retraining (the evaluation-only part of issue 10's tuning).

    .venv/bin/python bench/scoring_variants.py --checkpoints runs/tune/baseline --categories tile block

For each `<checkpoints>/<category>/crd-seed<seed>` trained by bench/quality.py, scores the test split
with other ways of turning the per-scale (1 - cos) maps into a map and a score: the blur's sigma, the
maximum of the two blurred branch maps instead of their sum, standardisation per (branch, scale), and
subsets of the scales, each image's peak against its own level over the object, a local-contrast (difference
of Gaussians) map; with `--memory-bank`, PatchCore on the checkpoint's own teacher (alone and added to
the model's map). Statistics come from the checkpoint's own calibration statistics images. Prints
I-AUROC (overall, RGB-only and 3D-only defects) and AUPRO@30% per variant; writes them to `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT
from bench.quality import _blur_max, _branch_sum, _raw_scale_maps, _stats, visibility_groups
from crd_model.anomaly_map import unit_error
from crd_model.calibration import shrunk_whitener


def _evaluation(inspector, data: Path, category: str):
    """(test split, validation split, the checkpoint's statistics images, score): `score(blurred maps, image
    scores[, validation image scores])` gives I-AUROC (overall, RGB-only, 3D-only), AUPRO@30% and, with
    validation scores, the verdicts at a threshold just above every held-out validation score."""
    from crd_model.dataset import load_split
    from crd_model.metrics import aupro, image_auroc

    test = load_split(data, category, "test", inspector.config)
    val = load_split(data, category, "validation", inspector.config)
    names = [str(s.rgb_path.relative_to(data / category / "validation")) for s in val.samples]
    stats_idx = np.array([names.index(n) for n in inspector.meta.calibration.source.statistics_images])
    threshold_idx = np.setdiff1d(np.arange(len(val.samples)), stats_idx)
    types = np.array([s.defect_type for s in test.samples])
    good = types == "good"
    groups = visibility_groups()

    def score(blurred: np.ndarray, scores: np.ndarray, val_scores: np.ndarray | None = None) -> dict[str, float]:
        row = {"i_auroc": image_auroc(test.labels, scores), "aupro_30": aupro(test.gt, blurred, 0.3)}
        for g in ("rgb", "3d"):
            sel = good | np.isin(types, groups[g])
            row[f"i_auroc_{g}"] = image_auroc(test.labels[sel], scores[sel])
        if val_scores is not None:
            threshold = float(val_scores[threshold_idx].max())
            row["false_reject_rate"] = float((scores[good] > threshold).mean())
            row["detection_rate"] = float((scores[~good] > threshold).mean())
        return row

    return test, val, stats_idx, score


def variants_for(
    ckpt: Path,
    data: Path,
    category: str,
    skip_magnitude: bool = False,
    memory_bank: bool = False,
    tta: bool = False,
    feature_space: bool = False,
    conditional: bool = False,
) -> dict[str, dict[str, float]]:
    from crd_model.inspector import Inspector

    inspector = Inspector(ckpt, "cpu")
    test, val, stats_idx, score = _evaluation(inspector, data, category)
    t_maps, v_maps = _raw_scale_maps(inspector, test), _raw_scale_maps(inspector, val)
    sigma = inspector.config.effective_blur_sigma

    def standardised(maps: dict, ref: dict, b: str, scales: list[int]) -> np.ndarray:
        """Branch b's maps at `scales`, summed, standardised on `ref`'s statistics images."""
        m, s = _stats(_branch_sum([ref[b][k][stats_idx] for k in scales]))
        return (_branch_sum([maps[b][k] for k in scales]) - np.float32(m)) / np.float32(s)

    def per_branch(scales: list[int], t_maps: dict = t_maps, v_maps: dict = v_maps) -> np.ndarray:
        return sum(standardised(t_maps, v_maps, b, scales) for b in t_maps)

    def per_scale(scales: list[int]) -> np.ndarray:
        return sum(standardised(t_maps, v_maps, b, [k]) for b in t_maps for k in scales)

    everything = list(range(len(next(iter(t_maps.values())))))
    # Each branch's standardised map (all scales), on the test and the validation images: the model's map
    # is their sum; several variants below recombine them.
    branch_test = {b: standardised(t_maps, v_maps, b, everything) for b in t_maps}
    branch_val = {b: standardised(v_maps, v_maps, b, everything) for b in t_maps}
    model, model_val = sum(branch_test.values()), sum(branch_val.values())
    model_blurred, model_scores = _blur_max(model, sigma)
    model_val_blurred, model_val_scores = _blur_max(model_val, sigma)
    out = {"model: branch-standardised sum, all scales": score(model_blurred, model_scores, model_val_scores)}
    if conditional:  # the model and the appearance-conditional variants only
        out.update(_conditional_variants(inspector, test, val, stats_idx, score, sigma))
        return out
    if feature_space:  # the model and the feature-space variants only
        out.update(_feature_space_variants(inspector, test, val, stats_idx, score, sigma))
        return out
    # Image scores per detector (a branch, or a (branch, scale)), each standardised on the statistics
    # images' scores, then their maximum or sum: a textured object's RGB tail no longer hides what only
    # the 3D branch sees. The map (AUPRO) stays the model's.
    for unit in ("branch", "scale"):
        parts = [(b, [k]) for b in t_maps for k in everything] if unit == "scale" else [(b, everything) for b in t_maps]
        z_test, z_val = [], []
        for b, ks in parts:
            t_s = _blur_max(standardised(t_maps, v_maps, b, ks), sigma)[1]
            v_s = _blur_max(standardised(v_maps, v_maps, b, ks), sigma)[1]
            mu, sd = float(v_s[stats_idx].mean()), max(float(v_s[stats_idx].std(ddof=1)), 1e-8)
            z_test.append((t_s - mu) / sd)
            z_val.append((v_s - mu) / sd)
        for how, reduce in (("max", np.maximum.reduce), ("sum", np.add.reduce)):
            out[f"per-{unit} image scores standardised, {how}"] = score(model_blurred, reduce(z_test), reduce(z_val))
    for s in (0.5 * sigma, 1.5 * sigma, 2.0 * sigma):
        out[f"blur sigma {s:g} px"] = score(*_blur_max(model, s))
    branch_blurred = [_blur_max(z, sigma) for z in branch_test.values()]
    out["max of the blurred branch maps"] = score(
        np.maximum.reduce([bb[0] for bb in branch_blurred]), np.maximum.reduce([bb[1] for bb in branch_blurred])
    )
    # Only evidence above a branch's mean counts: a branch that sees nothing (the 3D branch on a colour
    # defect) adds no negative or noisy share to the other's peak.
    rectified = sum(np.maximum(z, 0) for z in branch_test.values())
    rectified_val = sum(np.maximum(z, 0) for z in branch_val.values())
    out["rectified branch-standardised sum"] = score(*_blur_max(rectified, sigma), _blur_max(rectified_val, sigma)[1])
    # Each branch blurred at its own scale: a good part's highest RGB responses are its texture's small
    # spikes (pores, speckle), while a colour defect is a patch; the 3D branch's defects are sharper.
    for rgb_x, x3d_x in ((1.5, 1.0), (2.0, 1.0), (1.0, 0.5), (1.5, 0.5)) if set(branch_test) == {"rgb", "3d"} else ():
        own = {"rgb": rgb_x * sigma, "3d": x3d_x * sigma}
        blurred = sum(_blur_max(z, own[b])[0] for b, z in branch_test.items())
        blurred_val = sum(_blur_max(z, own[b])[0] for b, z in branch_val.items())
        out[f"blur rgb x{rgb_x:g}, 3d x{x3d_x:g}"] = score(blurred, _peaks(blurred), _peaks(blurred_val))
    # Local contrast (a difference of Gaussians): the map blurred as the model does, minus the map blurred
    # 4x wider, so a broad rise of the response (a textured zone) drops out and a patch-sized peak stays.
    wide, wide_val = _blur_max(model, 4 * sigma)[0], _blur_max(model_val, 4 * sigma)[0]
    dog, dog_val = model_blurred - wide, model_val_blurred - wide_val
    out["local contrast: blur minus 4x wider blur"] = score(dog, _peaks(dog), _peaks(dog_val))
    out["branch-standardised, scales 1-2"] = score(*_blur_max(per_branch(everything[:2]), sigma))
    out["per-(branch, scale) standardised, all scales"] = score(*_blur_max(per_scale(everything), sigma))
    out["per-(branch, scale) standardised, scales 1-2"] = score(*_blur_max(per_scale(everything[:2]), sigma))
    out["scale 1 only"] = score(*_blur_max(per_scale(everything[:1]), sigma))
    # Rim-aware standardisation: the object's rim (normals turning, occlusion bands filled from their
    # neighbours, the silhouette moving with the pose) varies more between good parts than its inside, so
    # a good part's highest score sits on the rim; each band of distance to the silhouette gets its own
    # mean and std (statistics images), then blur and max as the model does.
    if test.frames[0].x3d is not None:
        t_bands, v_bands = _rim_bands(test.frames), _rim_bands(val.frames)
        # The score taken only on the object (the 3D foreground, widened by 0 or 16 px): a defect lies on the
        # part, so a background response should not set a good part's score.
        t_signed = np.stack([signed_distance_to_silhouette(f) for f in test.frames])
        v_signed = np.stack([signed_distance_to_silhouette(f) for f in val.frames])
        for widen in (0, 16):
            out[f"max over the object (3D foreground + {widen} px)"] = score(
                model_blurred,
                _masked_max(model_blurred, t_signed > -widen),
                _masked_max(model_val_blurred, v_signed > -widen),
            )
        # Each image against its own level: the peak minus the median of the blurred map over the object
        # (or that excess in units of the object's own spread). A good part whose whole surface responds a
        # little higher (its tint, pose or texture density) no longer reaches the threshold by that offset;
        # a defect is a local excess over the image's own response.
        for robust in (False, True):
            name = "(peak - object median) / object MAD" if robust else "peak - object median"
            out[name] = score(
                model_blurred,
                _over_own_level(model_blurred, t_signed > 0, robust),
                _over_own_level(model_val_blurred, v_signed > 0, robust),
            )
        bands = _band_stats(model_val[stats_idx], v_bands[stats_idx])
        out["model, rim-aware standardisation"] = score(
            *_blur_max(_band_standardise(model, t_bands, bands), sigma),
            _blur_max(_band_standardise(model_val, v_bands, bands), sigma)[1],
        )
    if tta:
        # Test-time augmentation: the raw maps of the flipped / turned inputs, moved back and averaged.
        for name in ("flips", "d4"):
            t_tta, v_tta = _tta_raw_scale_maps(inspector, test, name), _tta_raw_scale_maps(inspector, val, name)
            out[f"test-time {name}, mean of the raw maps"] = score(
                *_blur_max(per_branch(everything, t_tta, v_tta), sigma),
                _blur_max(per_branch(everything, v_tta, v_tta), sigma)[1],
            )
    if memory_bank:
        splits, maps = (test, val), (model, model_val)
        out.update(_memory_bank_variants(inspector, data, category, splits, maps, score, stats_idx, sigma))
    if skip_magnitude:
        return out
    # Image score from the top of the map instead of its single highest pixel.
    flat = np.sort(model_blurred.reshape(len(model_blurred), -1), axis=1)
    for share in (0.001, 0.01):
        k = max(1, round(share * flat.shape[1]))
        out[f"score = mean of the top {100 * share:g} % of the map"] = score(model_blurred, flat[:, -k:].mean(axis=1))
    # Feature magnitude: (1 - cos) is blind to a student that points the right way at the wrong length,
    # which is what a brightness or gain defect does to low-level features.
    t_mag = _raw_scale_maps(inspector, test, per_scale=_magnitude_maps)
    v_mag = _raw_scale_maps(inspector, val, per_scale=_magnitude_maps)

    def magnitude(scales: list[int]) -> np.ndarray:
        return per_branch(scales, t_mag, v_mag)

    out["magnitude alone, all scales"] = score(*_blur_max(magnitude(everything), sigma))
    for weight in (0.5, 1.0):
        out[f"model + {weight:g} x magnitude, all scales"] = score(
            *_blur_max(model + np.float32(weight) * magnitude(everything), sigma)
        )
        out[f"model + {weight:g} x magnitude, scale 1"] = score(
            *_blur_max(model + np.float32(weight) * magnitude(everything[:1]), sigma)
        )
    return out


def ensemble_for(ckpts: list[Path], data: Path, category: str) -> dict[str, dict[str, float]]:
    """Students of several training seeds (one teacher), alone and with their raw maps averaged."""
    from crd_model.inspector import Inspector

    members = [Inspector(c, "cpu") for c in ckpts]
    cal = members[0].meta.calibration
    test, val, stats_idx, score = _evaluation(members[0], data, category)
    sigma = members[0].config.effective_blur_sigma
    raw = []  # per member: {branch: (test maps, validation maps)}, the scales summed
    for inspector in members:
        assert list(inspector.meta.calibration.source.statistics_images) == list(cal.source.statistics_images)
        t_maps, v_maps = _raw_scale_maps(inspector, test), _raw_scale_maps(inspector, val)
        raw.append({b: (_branch_sum(t_maps[b]), _branch_sum(v_maps[b])) for b in t_maps})

    def fused(chosen: list[int], split: int) -> np.ndarray:
        """The members' raw branch maps averaged (as one model holding several students would), then
        standardised per branch on the statistics images and summed."""
        out = 0
        for b in raw[0]:
            mean = sum(raw[i][b][split] for i in chosen) / np.float32(len(chosen))
            ref = sum(raw[i][b][1][stats_idx] for i in chosen) / np.float32(len(chosen))
            m, sd = _stats(ref)
            out = out + (mean - np.float32(m)) / np.float32(sd)
        return out

    out = {}
    chosen_sets = [(f"{c.name} alone", [i]) for i, c in enumerate(ckpts)]
    chosen_sets += [(f"mean of the first {k}", list(range(k))) for k in range(2, len(ckpts) + 1)]
    for label, chosen in chosen_sets:
        out[label] = score(*_blur_max(fused(chosen, 0), sigma), _blur_max(fused(chosen, 1), sigma)[1])
    return out


def _tta_raw_scale_maps(inspector, split, augment_name: str, batch_size: int = 16) -> dict[str, list[np.ndarray]]:
    """`_raw_scale_maps` averaged over the symmetries of `augment_name` (inputs turned, maps turned back)."""
    from crd_model import augment
    from crd_model.preprocessing import ModelInput

    normals = inspector.config.representation_3d in ("normals", "normals_height")
    total: dict[str, list[np.ndarray]] = {}
    symmetries = augment.variants(augment_name)
    for sym in symmetries:

        def turn(x, sym=sym):
            return ModelInput(
                None if x.rgb is None else augment.transform(x.rgb, sym),
                None if x.x3d is None else augment.transform(x.x3d, sym, normals=normals),
            )

        def turn_back(m, sym=sym):
            return augment.undo(m, sym)

        maps = _raw_scale_maps(inspector, split, batch_size, turn=turn, turn_back=turn_back)
        for name, scales in maps.items():
            acc = total.setdefault(name, [np.zeros_like(m) for m in scales])
            for k, m in enumerate(scales):
                acc[k] += m / np.float32(len(symmetries))
    return total


def _teacher_features(teacher: list, student: list, size: tuple[int, int]) -> list:
    return [t.float() for t in teacher]


def _patch_features(scales: list, idx: tuple[int, ...]) -> torch.Tensor:
    """PatchCore's locally aware patch features: each chosen scale 3x3-averaged, brought to the first
    one's grid, concatenated; (N, C, h, w)."""
    import torch
    import torch.nn.functional as F

    first = scales[idx[0]]
    parts = []
    for k in idx:
        f = F.avg_pool2d(scales[k], 3, stride=1, padding=1, count_include_pad=False)
        if f.shape[-2:] != first.shape[-2:]:
            f = F.interpolate(f, size=first.shape[-2:], mode="bilinear", align_corners=False)
        parts.append(f)
    return torch.cat(parts, dim=1)


def _coreset(bank: torch.Tensor, share: float, seed: int = 0) -> torch.Tensor:
    """Greedy k-centre coreset (PatchCore), distances in a 128-d random projection."""
    import torch

    n = max(1, int(len(bank) * share))
    g = torch.Generator().manual_seed(seed)
    proj = bank @ torch.randn(bank.shape[1], 128, generator=g) / 128**0.5
    chosen = [int(torch.randint(len(bank), (1,), generator=g))]
    dist = torch.cdist(proj, proj[chosen[-1] : chosen[-1] + 1])[:, 0]
    for _ in range(n - 1):
        chosen.append(int(dist.argmax()))
        dist = torch.minimum(dist, torch.cdist(proj, proj[chosen[-1] : chosen[-1] + 1])[:, 0])
    return bank[chosen]


def _nn_maps(feats: torch.Tensor, bank: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    out = []
    for i in range(0, len(feats), 8):
        f = feats[i : i + 8]
        n, c, h, w = f.shape
        q = f.permute(0, 2, 3, 1).reshape(-1, c)
        d = torch.cat([torch.cdist(q[j : j + 4096], bank).min(dim=1).values for j in range(0, len(q), 4096)])
        out.append(F.interpolate(d.reshape(n, 1, h, w), size=size, mode="bilinear", align_corners=False)[:, 0])
    return torch.cat(out).numpy()


def _memory_bank_variants(inspector, data, category, splits, model_maps, score, standardised_on, sigma):
    """PatchCore on the checkpoint's own frozen teacher: per branch, the distance of each position's
    locally averaged (scales 1-2) teacher feature to its nearest neighbour among the training images'
    (10 % greedy coreset); standardised per branch on the statistics images like the model's maps, alone
    and added to the model's map."""
    import torch

    from crd_model.dataset import load_split

    (test, val), (model, model_val) = splits, model_maps
    train = load_split(data, category, "train", inspector.config)
    size = (inspector.config.image_size, inspector.config.image_size)
    feats = {s: _raw_scale_maps(inspector, split, per_scale=_teacher_features) for s, split in
             (("train", train), ("test", test), ("val", val))}  # fmt: skip
    knn_t, knn_v = {}, {}
    for b in feats["train"]:
        for idx in ((1, 2),):
            pf = {s: _patch_features([torch.from_numpy(x) for x in feats[s][b]], idx) for s in feats}
            c = pf["train"].shape[1]
            bank = _coreset(pf["train"].permute(0, 2, 3, 1).reshape(-1, c), 0.1)
            t, v = _nn_maps(pf["test"], bank, size), _nn_maps(pf["val"], bank, size)
            m, sd = _stats(v[standardised_on])
            knn_t[(b, idx)] = (t - np.float32(m)) / np.float32(sd)
            knn_v[(b, idx)] = (v - np.float32(m)) / np.float32(sd)
    out = {}
    for idx in ((1, 2),):
        tag = f"scales {idx[0]}-{idx[1]}"
        both_t = sum(knn_t[(b, idx)] for b in feats["train"])
        both_v = sum(knn_v[(b, idx)] for b in feats["train"])
        out[f"patchcore alone, {tag}"] = score(*_blur_max(both_t, sigma), _blur_max(both_v, sigma)[1])
        out[f"model + patchcore, {tag}"] = score(
            *_blur_max(model + both_t, sigma), _blur_max(model_val + both_v, sigma)[1]
        )
        if "rgb" in feats["train"]:
            out[f"model + patchcore rgb only, {tag}"] = score(
                *_blur_max(model + knn_t[("rgb", idx)], sigma), _blur_max(model_val + knn_v[("rgb", idx)], sigma)[1]
            )
    return out


RIM_BANDS = (-np.inf, -4, -2, 0, 2, 4, 8, np.inf)  # signed px to the silhouette at the model's size (- = outside)


def _peaks(maps: np.ndarray) -> np.ndarray:
    """Each map's maximum: the model's image score, for maps made outside the model."""
    return maps.reshape(len(maps), -1).max(axis=1)


def _over_own_level(maps: np.ndarray, keep: np.ndarray, robust: bool) -> np.ndarray:
    """Each map's peak over its `keep` pixels' median (whole map where it keeps under 16), or, robust,
    that excess divided by those pixels' median absolute deviation (x 1.4826: a standard deviation)."""
    out = []
    for m, k in zip(maps, keep, strict=True):
        level = m[k] if k.sum() >= 16 else m.ravel()
        median = float(np.median(level))
        excess = float(m.max()) - median
        if robust:
            excess /= max(1.4826 * float(np.median(np.abs(level - median))), 1e-6)
        out.append(excess)
    return np.asarray(out)


def _masked_max(maps: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Each map's maximum over its `keep` pixels (the whole map where it keeps none)."""
    inside = _peaks(np.where(keep, maps, -np.inf))
    return np.where(np.isfinite(inside), inside, _peaks(maps))


def signed_distance_to_silhouette(frame) -> np.ndarray:
    """(S, S) distance of each pixel to the silhouette of the frame's 3D foreground, in px at the model's
    size; negative outside the object."""
    from scipy import ndimage

    fg = (frame.x3d > 0).any(axis=0)
    return ndimage.distance_transform_edt(fg) - ndimage.distance_transform_edt(~fg)


def _rim_bands(frames: list) -> np.ndarray:
    """(N, S, S) int8 band of each pixel's signed distance to the object's silhouette (3D foreground)."""
    signed = [signed_distance_to_silhouette(f) for f in frames]
    return np.stack([np.digitize(d, RIM_BANDS[1:-1], right=True).astype(np.int8) for d in signed])


def _band_stats(ref_maps: np.ndarray, ref_bands: np.ndarray) -> dict[int, tuple[float, float]]:
    """Mean and std of the maps in each band on and inside the rim (the background beyond it is left as
    it is: its spread is ~0, so z-scores there would blow up)."""
    stats = {}
    for b in range(2, len(RIM_BANDS) - 1):
        ref = ref_maps[ref_bands == b].astype(np.float64)
        stats[b] = (float(ref.mean()), max(float(ref.std()), 1e-8)) if ref.size > 1 else (0.0, 1.0)
    return stats


def _band_standardise(maps: np.ndarray, bands: np.ndarray, stats: dict[int, tuple[float, float]]) -> np.ndarray:
    out = maps.copy()
    for b, (m, s) in stats.items():
        sel = bands == b
        out[sel] = (maps[sel] - m) / s
    return out


def _branch_features(inspector, frames: list, batch_size: int = 16):
    """Per batch of `frames`: branch -> (teacher features, student features), shallow scale first."""
    import torch

    model = inspector.model
    for i in range(0, len(frames), batch_size):
        x = inspector.stack(frames[i : i + batch_size])
        with torch.inference_mode():
            outs = model.run_branches(model.encode(x.rgb, x.x3d))
        yield {name: (o.target, o.mixed) for name, o in outs.items()}


def _feature_space_maps(inspector, split, per_scale) -> dict[str, list[np.ndarray]]:
    """branch -> per-scale maps `per_scale(branch, k, teacher, student)` (B, 1, h, w), upsampled bilinearly
    to the input size as the model's maps are, (N, S, S) float32 each."""
    import torch.nn.functional as F

    size = (inspector.config.image_size, inspector.config.image_size)
    out: dict[str, list[list[np.ndarray]]] = {}
    for feats in _branch_features(inspector, split.frames):
        for name, (teacher, student) in feats.items():
            slot = out.setdefault(name, [[] for _ in teacher])
            for k, (t, s) in enumerate(zip(teacher, student, strict=True)):
                d = F.interpolate(per_scale(name, k, t, s), size=size, mode="bilinear", align_corners=False)
                slot[k].append(d[:, 0].numpy())
    return {name: [np.concatenate(c) for c in scales] for name, scales in out.items()}


def _feature_space_variants(inspector, test, val, stats_idx, score, sigma) -> dict[str, dict[str, float]]:
    """The student's error measured otherwise than by its per-position 1 - cos (evaluation only):
    - of the features averaged over 3 x 3 positions first: a student that errs in a random direction at
      each position of a normal texture cancels out, a coherent (defect) deviation stays;
    - whitened per channel: sum over channels of e_c^2 / var_c (optionally centred on the channel's mean
      error), var_c from the statistics images, so channels the students always get wrong on good parts
      (texture) weigh less than channels they reproduce well."""
    import torch
    import torch.nn.functional as F

    stats_frames = [val.frames[i] for i in stats_idx]
    sums: dict[tuple[str, int], list[torch.Tensor]] = {}
    for feats in _branch_features(inspector, stats_frames):
        for name, (teacher, student) in feats.items():
            for k, (t, s) in enumerate(zip(teacher, student, strict=True)):
                e = unit_error(t, s).double()
                acc = sums.setdefault((name, k), [torch.zeros(()), 0.0, 0.0])
                acc[0] = acc[0] + e.sum(dim=(0, 2, 3))
                acc[1] = acc[1] + (e * e).sum(dim=(0, 2, 3))
                acc[2] += e.shape[0] * e.shape[2] * e.shape[3]
    moments = {key: (s1 / n, s2 / n) for key, (s1, s2, n) in sums.items()}
    # Second pass: each (branch, scale)'s full error covariance, shrunk towards its diagonal's mean (the
    # deep scale has few positions per channel), and its inverse square root.
    outer: dict[tuple[str, int], torch.Tensor] = {}
    for feats in _branch_features(inspector, stats_frames):
        for name, (teacher, student) in feats.items():
            for k, (t, s) in enumerate(zip(teacher, student, strict=True)):
                e = unit_error(t, s).double() - moments[(name, k)][0].view(1, -1, 1, 1)
                flat = e.permute(0, 2, 3, 1).reshape(-1, e.shape[1])
                outer[(name, k)] = outer.get((name, k), 0) + flat.T @ flat
    whiteners = {}
    for key, o in outer.items():
        n = sums[key][2]
        whiteners[key] = shrunk_whitener(o / (n - 1), 0.1).float()

    def pooled(name, k, t, s):
        t3 = F.avg_pool2d(t.float(), 3, stride=1, padding=1, count_include_pad=False)
        s3 = F.avg_pool2d(s.float(), 3, stride=1, padding=1, count_include_pad=False)
        return (1.0 - F.cosine_similarity(t3, s3, dim=1)).unsqueeze(1)

    def whitened(centred: bool):
        def per_scale(name, k, t, s):
            mean, square = moments[(name, k)]
            var = (square - mean * mean) if centred else square
            e = unit_error(t, s)
            if centred:
                e = e - mean.float().view(1, -1, 1, 1)
            return (e * e / var.float().clamp_min(1e-12).view(1, -1, 1, 1)).mean(dim=1, keepdim=True)

        return per_scale

    def mahalanobis(name, k, t, s):
        e = unit_error(t, s) - moments[(name, k)][0].float().view(1, -1, 1, 1)
        z = torch.einsum("ij,bjhw->bihw", whiteners[(name, k)], e)
        return (z * z).mean(dim=1, keepdim=True)

    variants = [
        ("error whitened, full covariance", mahalanobis),
        ("1 - cos of 3x3-averaged features", pooled),
        ("error whitened per channel", whitened(False)),
        ("error whitened per channel, centred", whitened(True)),
    ]
    return _scored_as_the_model(inspector, test, val, stats_idx, score, sigma, variants)


def _scored_as_the_model(inspector, test, val, stats_idx, score, sigma, variants) -> dict[str, dict[str, float]]:
    """Each (label, per-scale map) of `variants` fused as the model fuses its maps (each branch's scale sum
    standardised on the statistics images, branches summed, blurred, maxed), then scored."""
    out = {}
    for label, per_scale in variants:
        t_maps, v_maps = _feature_space_maps(inspector, test, per_scale), _feature_space_maps(inspector, val, per_scale)
        fused, fused_val = 0, 0
        for b in t_maps:
            m, sd = _stats(_branch_sum([v[stats_idx] for v in v_maps[b]]))
            fused = fused + (_branch_sum(t_maps[b]) - np.float32(m)) / np.float32(sd)
            fused_val = fused_val + (_branch_sum(v_maps[b]) - np.float32(m)) / np.float32(sd)
        out[label] = score(*_blur_max(fused, sigma), _blur_max(fused_val, sigma)[1])
    return out


def _conditional_variants(
    inspector, test, val, stats_idx, score, sigma, clusters=(4, 8)
) -> dict[str, dict[str, float]]:
    """The students' error whitened *given the local appearance* (evaluation only). A good part's score is the
    students' failure on its normal texture (docs/model.md), so an error that is ordinary where the teacher
    sees a pore is extraordinary on a smooth face. The appearance is the teacher's unit feature t at the
    position, at the same scale:
    - linear: the error's Gaussian conditional on t, e | t ~ N(m + B (t - m_t), S_r), scored |S_r^-1/2 r|^2 / C
      with r the residual (B by ridge regression on the statistics images' positions);
    - k clusters of t (k-means): each cluster's own error mean and covariance, shrunk towards the global
      one by n0 = 4 C positions;
    - k clusters, scalar: the model's whitened map divided by its mean over the cluster's positions."""
    import torch
    import torch.nn.functional as F
    from sklearn.cluster import KMeans

    stats_frames = [val.frames[i] for i in stats_idx]
    t_rows: dict[tuple[str, int], list[torch.Tensor]] = {}
    e_rows: dict[tuple[str, int], list[torch.Tensor]] = {}
    for feats in _branch_features(inspector, stats_frames):
        for name, (teacher, student) in feats.items():
            for k, (t, s) in enumerate(zip(teacher, student, strict=True)):
                c = t.shape[1]
                t_rows.setdefault((name, k), []).append(
                    F.normalize(t.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, c).double()
                )
                e_rows.setdefault((name, k), []).append(unit_error(t, s).permute(0, 2, 3, 1).reshape(-1, c).double())
    fits = {}
    for key in t_rows:
        tt, ee = torch.cat(t_rows[key]), torch.cat(e_rows[key])
        n, c = ee.shape
        m_e, m_t = ee.mean(0), tt.mean(0)
        ec, tc = ee - m_e, tt - m_t
        cov_e = ec.T @ ec / (n - 1)
        fit = {"m": m_e.float(), "W": shrunk_whitener(cov_e, max(0.1, c / n)).float()}
        # Linear conditional: ridge B = S_et (S_tt + lam I)^-1.
        s_tt, s_et = tc.T @ tc / (n - 1), ec.T @ tc / (n - 1)
        lam = 0.01 * float(s_tt.diagonal().mean())
        b = torch.linalg.solve(s_tt + lam * torch.eye(c, dtype=s_tt.dtype), s_et.T).T
        r = ec - tc @ b.T
        fit.update(B=b.float(), m_t=m_t.float(), W_r=shrunk_whitener(r.T @ r / (n - 1), max(0.1, c / n)).float())
        sub = tt[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:20000]].float().numpy()
        z_global = ((ec.float() @ fit["W"].T) ** 2).mean(1)
        for nk in clusters:
            km = KMeans(nk, n_init=2, random_state=0).fit(sub)
            centres = torch.from_numpy(km.cluster_centers_).float()
            assign = torch.cdist(tt.float(), centres).argmin(1)
            means, whiteners, levels = [], [], []
            n0 = 4 * c
            for j in range(nk):
                sel = assign == j
                nj = int(sel.sum())
                ej = ee[sel]
                mj = (ej.sum(0) + n0 * m_e) / (nj + n0)
                dj = ej - mj
                cov_j = (dj.T @ dj + n0 * cov_e) / (nj + n0)
                means.append(mj.float())
                whiteners.append(shrunk_whitener(cov_j, 0.1).float())
                levels.append(float(z_global[sel].mean()) if nj else float(z_global.mean()))
            fit[nk] = (centres, torch.stack(means), torch.stack(whiteners), torch.tensor(levels))
        fits[key] = fit

    def _assign(t, centres):
        tu = F.normalize(t.float(), dim=1)
        flat = tu.permute(0, 2, 3, 1).reshape(-1, tu.shape[1])
        return torch.cdist(flat, centres).argmin(1).view(tu.shape[0], tu.shape[2], tu.shape[3])

    def linear(name, k, t, s):
        f = fits[(name, k)]
        e = unit_error(t, s) - f["m"].view(1, -1, 1, 1)
        dt = F.normalize(t.float(), dim=1) - f["m_t"].view(1, -1, 1, 1)
        r = e - torch.einsum("ij,bjhw->bihw", f["B"], dt)
        z = torch.einsum("ij,bjhw->bihw", f["W_r"], r)
        return (z * z).mean(dim=1, keepdim=True)

    def per_cluster(nk):
        def per_scale(name, k, t, s):
            centres, means, whiteners, _ = fits[(name, k)][nk]
            a = _assign(t, centres)
            e = unit_error(t, s)
            out = torch.zeros(e.shape[0], 1, e.shape[2], e.shape[3])
            for j in range(nk):
                z = torch.einsum("ij,bjhw->bihw", whiteners[j], e - means[j].view(1, -1, 1, 1))
                out = torch.where((a == j).unsqueeze(1), (z * z).mean(dim=1, keepdim=True), out)
            return out

        return per_scale

    def scalar(nk):
        def per_scale(name, k, t, s):
            f = fits[(name, k)]
            centres, _, _, levels = f[nk]
            e = unit_error(t, s) - f["m"].view(1, -1, 1, 1)
            z = torch.einsum("ij,bjhw->bihw", f["W"], e)
            return (z * z).mean(dim=1, keepdim=True) / levels[_assign(t, centres)].unsqueeze(1)

        return per_scale

    def whitened(name, k, t, s):
        f = fits[(name, k)]
        z = torch.einsum("ij,bjhw->bihw", f["W"], unit_error(t, s) - f["m"].view(1, -1, 1, 1))
        return (z * z).mean(dim=1, keepdim=True)

    variants = [("error whitened (bench's copy of the model)", whitened), ("error whitened given t, linear", linear)]
    variants += [(f"error whitened per t cluster, k={nk}", per_cluster(nk)) for nk in clusters]
    variants += [(f"whitened / t cluster's mean, k={nk}", scalar(nk)) for nk in clusters]
    return _scored_as_the_model(inspector, test, val, stats_idx, score, sigma, variants)


def _magnitude_maps(teacher: list, student: list, size: tuple[int, int]) -> list:
    """Per scale, |‖t‖ - ‖s‖| / ‖t‖ at each position, upsampled like the (1 - cos) maps."""
    import torch.nn.functional as F

    out = []
    for t, s in zip(teacher, student, strict=True):
        nt, ns = t.float().norm(dim=1, keepdim=True), s.float().norm(dim=1, keepdim=True)
        d = (nt - ns).abs() / nt.clamp_min(1e-6)
        out.append(F.interpolate(d, size=size, mode="bilinear", align_corners=False)[:, 0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", default=str(ROOT / "runs" / "tune" / "baseline"))
    ap.add_argument("--data", default=str(ROOT / "runs" / "bench-data-v2"))
    ap.add_argument("--categories", nargs="*", default=["tile", "block"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="crd", help="the checkpoints' folder prefix (<model>-seed<seed>)")
    ap.add_argument("--skip-magnitude", action="store_true", help="leave out the feature-magnitude variants")
    ap.add_argument("--memory-bank", action="store_true", help="add the PatchCore (teacher memory bank) variants")
    ap.add_argument("--tta", action="store_true", help="add test-time augmentation (flips, flips and turns)")
    ap.add_argument("--feature-space", action="store_true",
                    help="add the feature-space variants (averaged features, whitened errors)")  # fmt: skip
    ap.add_argument("--conditional", action="store_true",
                    help="instead: errors whitened given the teacher feature (linear, k-means)")  # fmt: skip
    ap.add_argument("--ensemble-seeds", type=int, nargs="*", help="instead: each seed's students, and their mean")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "tune-2-scoring-variants.json"))
    a = ap.parse_args()
    from crd_model.stream.logs import configure_logging

    configure_logging(level="WARNING")
    results = {}
    for c in a.categories:
        if a.ensemble_seeds:
            ckpts = [Path(a.checkpoints) / c / f"{a.model}-seed{s}" for s in a.ensemble_seeds]
            results[c] = ensemble_for(ckpts, Path(a.data), c)
        else:
            ckpt = Path(a.checkpoints) / c / f"{a.model}-seed{a.seed}"
            options = (a.skip_magnitude, a.memory_bank, a.tta, a.feature_space, a.conditional)
            results[c] = variants_for(ckpt, Path(a.data), c, *options)
        for name, r in results[c].items():
            verdicts = (
                f"  FRR {r['false_reject_rate']:.3f} det {r['detection_rate']:.3f}" if "detection_rate" in r else ""
            )
            print(f"{c:>8} {name:<46} I-AUROC {r['i_auroc']:.3f} (RGB-only {r['i_auroc_rgb']:.3f}, "
                  f"3D-only {r['i_auroc_3d']:.3f})  AUPRO@30% {r['aupro_30']:.3f}{verdicts}", flush=True)  # fmt: skip
    names = list(next(iter(results.values())))
    print("\nmean over categories:")
    for name in names:
        i = np.mean([results[c][name]["i_auroc"] for c in results])
        p = np.mean([results[c][name]["aupro_30"] for c in results])
        d = [results[c][name].get("detection_rate") for c in results]
        det = f"  det {np.mean(d):.3f}" if None not in d else ""
        print(f"  {name:<46} I-AUROC {i:.3f}  AUPRO@30% {p:.3f}{det}")
    command = "bench/scoring_variants.py " + " ".join(sys.argv[1:])
    Path(a.json).write_text(json.dumps({"command": command, "args": vars(a), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
