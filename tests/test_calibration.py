"""Calibration that holds: held-out statistics/threshold, stated uncertainty, scores that repeat, recalibration.

Real models and files: the session's tiny CRD checkpoint (tests/conftest.py) and its synthetic data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crd_model.calibration import (
    false_reject_bound,
    images_needed,
    isolated_order_statistic,
    split_for_calibration,
    threshold_rank,
)
from crd_model.checkpoint import META, WEIGHTS, load_checkpoint, read_meta
from crd_model.cli import main
from crd_model.data.mvtec3d import list_pairs, list_samples, read_rgb, read_xyz
from crd_model.dataset import load_split
from crd_model.evaluate import evaluate, format_report
from crd_model.inspector import Inspector
from crd_model.train import TrainOptions, bf16_enabled
from tests.conftest import TINY_CATEGORY

# ------------------------------------------------------------------------------ the statistics alone


def test_threshold_rank_is_the_split_conformal_rank():
    assert threshold_rank(99, 0.01) == 99  # ceil(100 * 0.99) = 99 exactly, not 100 (float rounding)
    assert threshold_rank(299, 0.01) == 297
    assert threshold_rank(20, 0.01) == 20  # too few: the maximum
    assert threshold_rank(20, 0.0) == 20
    assert threshold_rank(20, 1.0) == 1


def test_the_stated_false_reject_rate_is_what_new_good_parts_get():
    """Monte Carlo over calibration sets: a threshold above the k-th of m held-out scores rejects, on average,
    (m + 1 - k) / (m + 1) of new good parts, and the stated 90 % interval holds 90 % of calibration sets."""
    rng = np.random.default_rng(0)
    m, rate = 60, 0.05
    k = threshold_rank(m, rate)
    bound = false_reject_bound(m, k)
    sets = rng.gumbel(size=(20_000, m))  # any continuous score distribution
    thresholds = np.sort(sets, axis=1)[:, k - 1]
    # The true false-reject rate of each threshold, from the Gumbel CDF: P(score > t).
    true_rates = 1.0 - np.exp(-np.exp(-thresholds))
    assert true_rates.mean() == pytest.approx(bound.expected, abs=0.002)
    assert bound.expected <= rate
    inside = (true_rates >= bound.interval[0]) & (true_rates <= bound.interval[1])
    assert inside.mean() == pytest.approx(0.90, abs=0.01)


def test_an_isolated_top_score_is_told_from_a_heavy_tail():
    """Honest good parts rarely trip the isolation test, whatever their score distribution; one part that scores
    far above the rest (a defective part filed as good) does."""
    rng = np.random.default_rng(1)
    m, k = 75, threshold_rank(75, 0.01)
    draws = {
        "normal": (rng.normal(size=(5_000, m)), 0.001),
        "gumbel": (rng.gumbel(size=(5_000, m)), 0.006),
        "lognormal": (rng.lognormal(0.0, 0.5, size=(5_000, m)), 0.015),
        "t5": (rng.standard_t(5, size=(5_000, m)), 0.02),
    }
    for name, (sets, most) in draws.items():
        tripped = np.mean([isolated_order_statistic(np.sort(s), k) for s in sets])
        assert tripped <= most, name
    good = np.sort(rng.normal(5.0, 1.0, size=m))
    misfiled = np.sort(np.append(good[1:], 14.0))  # a defect scoring 9 sigma above the median
    assert isolated_order_statistic(misfiled, k) and not isolated_order_statistic(good, k)
    # the order statistic the threshold sits on is what counts, not the maximum: at rate 0.05 it is not the top
    assert not isolated_order_statistic(misfiled, threshold_rank(m, 0.05))
    assert not isolated_order_statistic(misfiled[-9:], 9)  # too few scores to judge


def test_how_many_images_a_rate_needs():
    # A 1 % rate needs about a hundred held-out images for a 95 % bound within 3x the rate.
    assert 95 <= images_needed(0.01) <= 105
    assert images_needed(0.05) < 25
    assert images_needed(0.0) is None


def test_the_split_is_disjoint_seeded_and_mostly_for_the_threshold():
    stats, thr = split_for_calibration(100)
    assert not set(stats) & set(thr) and sorted(stats + thr) == list(range(100))
    assert len(stats) == 25 and (stats, thr) == split_for_calibration(100)
    assert split_for_calibration(1) == ([0], [0])  # one image cannot be split (the record says so)


def test_bf16_only_where_training_runs_on_cuda():
    # Untested on a GPU in this repository's CI: the CPU path must stay float32.
    assert not bf16_enabled(TrainOptions(), torch.device("cpu"))
    assert not bf16_enabled(TrainOptions(bf16=True), torch.device("cpu"))
    assert bf16_enabled(TrainOptions(), torch.device("cuda"))
    assert not bf16_enabled(TrainOptions(bf16=False), torch.device("cuda"))


# ------------------------------------------------------------------------------ a trained checkpoint


def _validation_images(tiny_data: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root = tiny_data / TINY_CATEGORY / "validation"
    return {
        str(s.rgb_path.relative_to(root)): (read_rgb(s.rgb_path), read_xyz(s.xyz_path))
        for s in list_samples(tiny_data, TINY_CATEGORY, "validation")
    }


def test_statistics_and_threshold_come_from_different_images(tiny_data: Path, tiny_checkpoint: Path):
    meta = read_meta(tiny_checkpoint)
    cal = meta.calibration
    assert cal is not None and cal.source is not None
    src = cal.source
    assert cal.method == "held-out"
    assert not set(src.statistics_images) & set(src.threshold_images)
    assert len(src.statistics_images) + len(src.threshold_images) == cal.n_validation == 8
    assert cal.n_statistics == 2 and cal.n_threshold == 6

    # The stored statistics are those of the statistics images alone (measured here independently) ...
    images = _validation_images(tiny_data)
    inspector = Inspector(tiny_checkpoint, "cpu")

    def raw_maps(names: list[str]) -> dict[str, np.ndarray]:
        inputs = inspector.preprocess(
            [torch.from_numpy(images[n][0]) for n in names], [torch.from_numpy(images[n][1]) for n in names]
        )
        with torch.inference_mode():
            maps = inspector.model.branch_maps(inputs.rgb, inputs.x3d)
        return {k: v.double().numpy() for k, v in maps.items()}

    own = raw_maps(src.statistics_images)
    everything = raw_maps(sorted(images))
    for branch, stats in cal.branch_stats.items():
        assert stats.mean == pytest.approx(own[branch].mean(), rel=1e-5)
        assert stats.std == pytest.approx(own[branch].std(ddof=1), rel=1e-5)
        # ... not those of every validation image (what calibration measured before).
        assert abs(stats.mean - everything[branch].mean()) > 1e-4 * abs(stats.mean)

    # The threshold sits just above the rank-k score of the threshold images: the maximum of six for 1 %.
    scores = np.array(src.threshold_scores)
    assert cal.threshold_rank == 6 and cal.threshold > scores.max()
    assert cal.threshold - scores.max() == pytest.approx(cal.score_tolerance)
    assert cal.score_tolerance < 1e-4 * scores.max()


def test_a_set_too_small_for_the_rate_is_stated_and_warned(tiny_data: Path, tiny_checkpoint: Path, capsys):
    cal = read_meta(tiny_checkpoint).calibration
    assert cal is not None and cal.false_reject_rate == 0.01
    assert cal.expected_false_reject_rate == pytest.approx(1 / 7)  # max of 6 held-out scores
    lo, hi = cal.false_reject_rate_interval
    assert lo < 1 / 7 < hi and hi > 3 * 0.01
    assert any("too few" in w and "about 99 threshold images" in w for w in cal.warnings)
    # crd eval repeats the calibration's uncertainty and its warning next to the measured rates.
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data),
                 "--category", TINY_CATEGORY]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "expected 0.143" in printed and "warning: 6 threshold images are too few" in printed


def test_scoring_the_threshold_images_again_reproduces_the_calibration_scores(tiny_data: Path, tiny_checkpoint: Path):
    cal = read_meta(tiny_checkpoint).calibration
    assert cal is not None and cal.source is not None
    names, expected = cal.source.threshold_images, np.array(cal.source.threshold_scores)
    inspector = Inspector(tiny_checkpoint, "cpu")
    # In the batches calibration used (preprocessed frames, as training keeps them): bit for bit.
    val = load_split(tiny_data, TINY_CATEGORY, "validation", inspector.config)
    root = tiny_data / TINY_CATEGORY / "validation"
    index = {str(s.rgb_path.relative_to(root)): i for i, s in enumerate(val.samples)}
    frames = [val.frames[index[n]] for n in names]
    b = cal.source.batch_size
    same_batches = [r.score for i in range(0, len(frames), b) for r in inspector.infer(frames[i : i + b])]
    np.testing.assert_array_equal(np.float32(same_batches), np.float32(expected))
    # From the files, at any batch size: to float rounding, and never rejected.
    images = _validation_images(tiny_data)
    for batch in (1, 2, 3, len(names)):
        scores = []
        for i in range(0, len(names), batch):
            chunk = names[i : i + batch]
            results = inspector.inspect([images[n][0] for n in chunk], [images[n][1] for n in chunk])
            scores += [r.score for r in results]
            assert all(r.verdict == "ok" for r in results), (batch, [r.score for r in results], cal.threshold)
        np.testing.assert_allclose(scores, expected, rtol=1e-6)


# ------------------------------------------------------------------------------ crd calibrate


@pytest.fixture(scope="module")
def good_folder(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plant's folder of good parts: validation and train images under new names, rgb/ + xyz/."""
    folder = tmp_path_factory.mktemp("good") / "line3-good"
    for sub in ("rgb", "xyz"):
        (folder / sub).mkdir(parents=True)
    for split in ("validation", "train"):
        for s in list_samples(tiny_data, TINY_CATEGORY, split)[:8]:
            stem = f"{split}_{s.stem}"
            shutil.copy(s.rgb_path, folder / "rgb" / f"{stem}.png")
            shutil.copy(s.xyz_path, folder / "xyz" / f"{stem}.tiff")
    return folder


def test_crd_calibrate_recalibrates_from_a_folder_without_touching_the_weights(
    tiny_checkpoint: Path, good_folder: Path, tmp_path: Path, capsys
):
    before = read_meta(tiny_checkpoint)
    weights_before = (tiny_checkpoint / WEIGHTS).read_bytes()
    out = tmp_path / "recalibrated"
    args = ["calibrate", "--checkpoint", str(tiny_checkpoint), "--folder", str(good_folder), "--out", str(out)]
    assert main([*args, "--false-reject-rate", "0"]) == 0
    printed = capsys.readouterr().out
    assert "threshold" in printed and "warning: a false-reject rate of 0 cannot be guaranteed" in printed
    assert "rests on one image" not in printed  # good parts only

    after = read_meta(out)
    cal = after.calibration
    assert cal is not None and cal.source is not None
    # Same weights, same model id; the original checkpoint is untouched.
    assert after.model_id == before.model_id and (out / WEIGHTS).read_bytes() == weights_before
    assert read_meta(tiny_checkpoint) == before
    # A record of what it was calibrated on.
    assert cal.source.kind == "folder" and cal.source.path == str(good_folder) and cal.source.n_images == 16
    assert cal.source.previous_threshold == before.calibration.threshold
    assert cal.false_reject_rate == 0.0 and cal.n_statistics == 4 and cal.n_threshold == 12
    # The students' error moments are measured again, on the folder's statistics images.
    assert before.config.scoring == "whitened" and cal.error_moments is not None
    assert cal.error_moments != before.calibration.error_moments
    assert all(n.startswith("rgb/") for n in cal.source.threshold_images)

    # The threshold comes from the folder: at rate 0 it sits just above the highest score of the folder's
    # threshold images, scored here through the Inspector at several batch sizes: none is rejected.
    inspector = Inspector(out, "cpu")
    by_name = {s.relpath: s for s in list_pairs(good_folder)}
    chosen = [by_name[n] for n in cal.source.threshold_images]
    rgbs, xyzs = [read_rgb(s.rgb_path) for s in chosen], [read_xyz(s.xyz_path) for s in chosen]
    for batch in (1, 5, len(chosen)):
        results = []
        for i in range(0, len(chosen), batch):
            results += inspector.inspect(rgbs[i : i + batch], xyzs[i : i + batch])
        scores = np.array([r.score for r in results])
        np.testing.assert_allclose(scores, cal.source.threshold_scores, rtol=1e-6)
        assert all(r.verdict == "ok" for r in results)
    top = max(cal.source.threshold_scores)
    assert top < cal.threshold <= top * (1 + 1e-5)

    # In place (no --out): config.json changes, the weights file does not.
    inplace = tmp_path / "inplace"
    shutil.copytree(tiny_checkpoint, inplace)
    assert main(["calibrate", "--checkpoint", str(inplace), "--folder", str(good_folder)]) == 0
    rewritten = read_meta(inplace)
    assert rewritten.model_id == before.model_id and (inplace / WEIGHTS).read_bytes() == weights_before
    assert rewritten.calibration.false_reject_rate == before.calibration.false_reject_rate  # kept by default
    assert rewritten.calibration.source.kind == "folder"


def test_crd_calibrate_warns_when_one_part_sets_the_threshold(
    tiny_checkpoint: Path, good_folder: Path, tmp_path: Path, capsys
):
    folder = tmp_path / "with-a-misfiled-part"
    shutil.copytree(good_folder, folder)
    # A part filed as good by mistake: a good part with a black square over a quarter of it.
    source = sorted((folder / "rgb").glob("*.png"))[0]
    rgb = read_rgb(source)
    rgb[: rgb.shape[0] // 2, : rgb.shape[1] // 2] = 0
    Image.fromarray(rgb).save(folder / "rgb" / "zz_misfiled.png")
    shutil.copy(folder / "xyz" / f"{source.stem}.tiff", folder / "xyz" / "zz_misfiled.tiff")
    assert 16 in split_for_calibration(17)[1], "the misfiled part (sorted last) must be a threshold image"
    out = tmp_path / "out"
    args = ["calibrate", "--checkpoint", str(tiny_checkpoint), "--folder", str(folder), "--out", str(out)]
    assert main([*args, "--false-reject-rate", "0"]) == 0
    printed = capsys.readouterr().out
    assert "warning: the threshold rests on one image far above the others: rgb/zz_misfiled.png scores" in printed
    cal = read_meta(out).calibration
    assert any("rgb/zz_misfiled.png" in w for w in cal.warnings)  # also in the record
    scores = dict(zip(cal.source.threshold_images, cal.source.threshold_scores, strict=True))
    assert max(scores, key=scores.get) == "rgb/zz_misfiled.png"


def test_crd_calibrate_switches_the_scoring_without_touching_the_weights(
    tiny_checkpoint: Path, good_folder: Path, tmp_path: Path
):
    before = read_meta(tiny_checkpoint)
    assert before.config.scoring == "whitened"
    cosine, back = tmp_path / "cosine", tmp_path / "back"
    base = ["calibrate", "--folder", str(good_folder), "--scoring"]
    assert main([*base, "cosine", "--checkpoint", str(tiny_checkpoint), "--out", str(cosine)]) == 0
    assert main([*base, "whitened", "--checkpoint", str(cosine), "--out", str(back)]) == 0
    for out, scoring in ((cosine, "cosine"), (back, "whitened")):
        meta = read_meta(out)
        whitened = scoring == "whitened"
        assert meta.config.scoring == scoring and (meta.calibration.error_moments is not None) == whitened
        assert meta.model_id == before.model_id
        assert (out / WEIGHTS).read_bytes() == (tiny_checkpoint / WEIGHTS).read_bytes()
        # The checkpoint scores the new way: its own threshold images as calibration scored them.
        inspector = Inspector(out, "cpu")
        assert (inspector.model.error_whitening is not None) == whitened
        by_name = {s.relpath: s for s in list_pairs(good_folder)}
        chosen = [by_name[n] for n in meta.calibration.source.threshold_images]
        results = inspector.inspect([read_rgb(s.rgb_path) for s in chosen], [read_xyz(s.xyz_path) for s in chosen])
        np.testing.assert_allclose([r.score for r in results], meta.calibration.source.threshold_scores, rtol=1e-6)
    # The two scorings are not the same numbers (the switch took effect), the same images calibrated both.
    a, b = read_meta(cosine).calibration, read_meta(back).calibration
    assert a.source.threshold_images == b.source.threshold_images
    assert not np.allclose(a.source.threshold_scores, b.source.threshold_scores)


def test_crd_calibrate_names_what_is_wrong(tiny_checkpoint: Path, tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["calibrate", "--checkpoint", str(tiny_checkpoint), "--folder", str(empty)]) == 2
    assert f"no rgb/*.png + xyz/*.tiff pairs found under {empty}" in capsys.readouterr().err


def test_checkpoints_calibrated_before_the_split_still_load(tiny_checkpoint: Path, tmp_path: Path, capsys):
    """A config.json as earlier versions wrote it (no held-out fields, no training timings) loads and serves."""
    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old)
    data = json.loads((old / META).read_text())
    keep = {"branch_stats", "threshold", "false_reject_rate", "n_validation", "validation_score_max",
            "validation_score_median"}  # fmt: skip
    data["calibration"] = {k: v for k, v in data["calibration"].items() if k in keep}
    for k in ("device", "bf16", "loss", "seconds_per_epoch", "fit_seconds"):
        data["training"].pop(k)
    data["config"].pop("scoring")  # nor the whitened scoring: (1 - cos) maps
    (old / META).write_text(json.dumps(data))
    meta = read_meta(old)
    assert meta.calibration.method is None and meta.calibration.source is None and meta.calibration.warnings == []
    assert meta.config.scoring == "cosine" and meta.calibration.error_moments is None
    inspector = Inspector(old, "cpu")
    assert inspector.threshold == data["calibration"]["threshold"]
    blank = np.zeros((40, 40, 3), np.uint8), np.zeros((40, 40, 3), np.float32)
    assert np.isfinite(inspector.inspect([blank[0]], [blank[1]])[0].score)


# ------------------------------------------------------------------------------ crd eval


def test_eval_reports_the_threshold_a_target_detection_rate_needs(tiny_data: Path, tiny_checkpoint: Path):
    report = evaluate(tiny_checkpoint, tiny_data, TINY_CATEGORY, target_detection=0.8)
    # The scores, independently: the same Inspector over the test split.
    inspector = Inspector(tiny_checkpoint, "cpu")
    test = load_split(tiny_data, TINY_CATEGORY, "test", inspector.config)
    scores = np.array([r.score for r in inspector.infer(test.frames)])
    good = ~test.labels
    bad_sorted = np.sort(scores[~good])[::-1]
    t = report["at_target_detection"]
    # 15 defective images: 80 % needs 12 caught, so the threshold is the 12th highest defective score.
    assert t["threshold"] == pytest.approx(bad_sorted[11], rel=1e-6)
    assert t["detections"] == 12 and t["detection_rate"] == pytest.approx(0.8)
    assert t["false_rejects"] == int((scores[good] >= bad_sorted[11]).sum())
    v = report["verdicts"]
    assert v["false_rejects"] == int((scores[good] >= inspector.threshold).sum()) and v["n_good"] == 8
    assert v["detections"] == int((scores[~good] >= inspector.threshold).sum()) and v["n_anomalous"] == 15
    lo, hi = v["false_reject_rate_ci95"]
    assert lo <= v["false_reject_rate"] <= hi
    # Where the stored threshold loses: each defect type's parts it catches, counted independently.
    types = np.array([s.defect_type for s in test.samples])
    for defect, row in report["per_defect"].items():
        assert row["caught"] == int((scores[types == defect] >= inspector.threshold).sum())
    assert sum(r["caught"] for r in report["per_defect"].values()) == v["detections"] == report["overall"]["caught"]
    text = format_report(report)
    assert "for a detection rate >= 0.8" in text and "good parts rejected (95 % CI" in text
    color, line = report["per_defect"]["color"], next(t for t in text.splitlines() if t.startswith("color"))
    assert line.endswith(f" {color['caught']}/{color['n_anomalous']}")


def test_crd_train_says_how_long_a_category_took_and_warns(tiny_data: Path, tmp_path: Path, capsys):
    out = tmp_path / "ckpt"
    args = ["train", "--data", str(tiny_data), "--category", TINY_CATEGORY, "--out", str(out), "--image-size", "64",
            "--epochs", "2", "--batch-size", "8", "--seed", "1", "--scoring", "cosine",
            "--teacher-input-weight", "4"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    meta = read_meta(out)
    assert meta.config.scoring == "cosine" and meta.calibration.error_moments is None  # the paper's maps, on request
    assert meta.config.teacher_input_weight == 4.0
    assert load_checkpoint(out)[0].teacher.channels[0] == 24 + 3  # efficientnet_lite0's stride-4 stage, and RGB
    training = meta.training
    assert training.device == "cpu" and training.bf16 is False and training.epochs == 2
    assert training.seconds_per_epoch > 0 and 0 < training.fit_seconds <= training.seconds
    assert f"{training.seconds_per_epoch:.2f}s per epoch on cpu" in printed and "s in all" in printed
    assert "warning: 6 threshold images are too few for a false-reject rate of 0.01" in printed
