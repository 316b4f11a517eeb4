"""End to end on tiny synthetic data: train -> calibrate -> checkpoint -> eval / predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from crd_model.checkpoint import WEIGHTS, load_checkpoint, read_meta
from crd_model.cli import main
from crd_model.data.mvtec3d import list_samples, read_rgb, read_xyz
from crd_model.evaluate import evaluate
from crd_model.inputs import FrameError
from crd_model.inspector import Inspector
from tests.conftest import TINY_CATEGORY


def test_anomalies_score_higher_than_normals(tiny_data: Path, tiny_checkpoint: Path):
    report = evaluate(tiny_checkpoint, tiny_data, TINY_CATEGORY)
    overall = report["overall"]
    assert overall["n"] == 8 + 3 * 5
    # A few epochs on 24 images: far from the benchmark's numbers, but clearly better than chance.
    assert overall["i_auroc"] > 0.7
    assert overall["p_auroc"] > 0.8
    assert 0.0 < overall["aupro_30"] <= 1.0
    assert set(report["per_defect"]) == {"color", "dent", "hole", "cut", "combined"}
    # At the stored threshold the verdicts mean something: most defects caught, most good parts pass
    # (a threshold of 1e9, or one below every score, fails here).
    verdicts = report["verdicts"]
    print("verdicts at the stored threshold:", verdicts)
    assert verdicts["detection_rate"] >= 0.5
    assert verdicts["false_reject_rate"] <= 0.75


def test_checkpoint_round_trip_gives_the_same_scores(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path):
    meta = read_meta(tiny_checkpoint)
    assert meta.calibration is not None and meta.training is not None
    assert meta.model_id.startswith(f"{TINY_CATEGORY}-crd-")
    assert set(meta.calibration.branch_stats) == {"rgb", "3d"}
    samples = list_samples(tiny_data, TINY_CATEGORY, "test")[:4]
    rgbs = [read_rgb(s.rgb_path) for s in samples]
    xyzs = [read_xyz(s.xyz_path) for s in samples]
    first = Inspector(tiny_checkpoint, "cpu").inspect(rgbs, xyzs)
    second = Inspector(tiny_checkpoint, "cpu").inspect(rgbs, xyzs)
    for a, b in zip(first, second, strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-5)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-5, atol=1e-5)
        # Maps come back at the input image's own (non-square) resolution.
    assert first[0].anomaly_map.shape == rgbs[0].shape[:2]
    # The weights file is plain safetensors: a truncated one fails loudly instead of loading junk.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    (broken / WEIGHTS).write_bytes((tiny_checkpoint / WEIGHTS).read_bytes()[:1000])
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error type
        load_checkpoint(broken)


def test_batch_results_do_not_depend_on_batch_composition(tiny_data: Path, tiny_checkpoint: Path):
    samples = list_samples(tiny_data, TINY_CATEGORY, "test")[:3]
    rgbs = [read_rgb(s.rgb_path) for s in samples]
    xyzs = [read_xyz(s.xyz_path) for s in samples]
    inspector = Inspector(tiny_checkpoint, "cpu")
    together = inspector.inspect(rgbs, xyzs)
    alone = [inspector.inspect([r], [x])[0] for r, x in zip(rgbs, xyzs, strict=True)]
    for a, b in zip(together, alone, strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-4)


def test_bad_frames_get_clear_errors(tiny_checkpoint: Path):
    inspector = Inspector(tiny_checkpoint, "cpu")
    rgb = np.zeros((40, 50, 3), np.uint8)
    with pytest.raises(FrameError, match="differ") as exc:
        inspector.check(rgb, np.zeros((40, 51, 3), np.float32))
    assert exc.value.code == "shape_mismatch"
    with pytest.raises(FrameError) as exc:
        inspector.check(rgb.astype(np.float32), np.zeros((40, 50, 3), np.float32))
    assert exc.value.code == "bad_rgb"
    with pytest.raises(FrameError) as exc:
        inspector.check(rgb, np.zeros((40, 50), np.float32))
    assert exc.value.code == "bad_xyz"
    # An all-missing point cloud is valid input (a camera dropout): it is scored, not a crash.
    result = inspector.inspect([rgb], [np.zeros((40, 50, 3), np.float32)])[0]
    assert np.isfinite(result.score)


def test_cli_eval_and_predict(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path, capsys):
    report_path = tmp_path / "report.json"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(tiny_checkpoint),
                "--data",
                str(tiny_data),
                "--category",
                TINY_CATEGORY,
                "--out",
                str(report_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "I-AUROC" in printed and "overall" in printed and "dent" in printed
    assert json.loads(report_path.read_text())["overall"]["n"] == 23

    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tiny_checkpoint),
                "--data",
                str(tiny_data),
                "--category",
                TINY_CATEGORY,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 23
    hole = next(r for r in lines if r["path"] == "test/hole/rgb/000.png")
    assert hole["verdict"] in ("ok", "anomalous") and hole["defect_type"] == "hole"
    amap = tifffile.imread(out / "maps" / "test/hole/rgb/000.tiff")
    rgb = read_rgb(tiny_data / TINY_CATEGORY / "test/hole/rgb/000.png")
    assert amap.dtype == np.float32 and amap.shape == rgb.shape[:2]
    assert (out / "overlays" / "test/hole/rgb/000.png").is_file()


def test_cli_predict_on_a_plain_folder_of_pairs(tiny_data: Path, tiny_checkpoint: Path, tmp_path: Path):
    # A user's own images: rgb/ and xyz/ side by side, no gt, no split folders.
    folder = tmp_path / "mine"
    for sub in ("rgb", "xyz"):
        (folder / sub).mkdir(parents=True)
    src = tiny_data / TINY_CATEGORY / "validation" / "good"
    for stem in ("000", "001"):
        (folder / "rgb" / f"part_{stem}.png").write_bytes((src / "rgb" / f"{stem}.png").read_bytes())
        (folder / "xyz" / f"part_{stem}.tiff").write_bytes((src / "xyz" / f"{stem}.tiff").read_bytes())
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), "--folder", str(folder), "--out", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["path"] for r in lines] == ["rgb/part_000.png", "rgb/part_001.png"]
    assert all((out / r["map"]).is_file() for r in lines)


def test_cli_reports_missing_data_cleanly(tmp_path: Path, capsys):
    code = main(["eval", "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--category", "x"])
    assert code == 2
    assert "error" in capsys.readouterr().err


def test_padding_to_batch_buckets_changes_no_score(tiny_data: Path, tiny_checkpoint: Path):
    samples = list_samples(tiny_data, TINY_CATEGORY, "test")[:5]
    rgbs = [read_rgb(s.rgb_path) for s in samples]
    xyzs = [read_xyz(s.xyz_path) for s in samples]
    plain = Inspector(tiny_checkpoint, "cpu").inspect(rgbs, xyzs)
    bucketed = Inspector(tiny_checkpoint, "cpu", buckets=(1, 2, 4))
    assert bucketed.buckets == (1, 2, 4)
    bucketed.warmup()  # every bucket once
    # 5 frames: a full bucket of 4, then one frame in the bucket of 1; padding rows never leak in.
    for a, b in zip(plain, bucketed.inspect(rgbs, xyzs), strict=True):
        assert b.score == pytest.approx(a.score, rel=1e-4, abs=1e-4)
        np.testing.assert_allclose(b.model_map, a.model_map, rtol=1e-4, atol=1e-4)
    from crd_model.inspector import batch_buckets

    assert batch_buckets(16) == (1, 2, 4, 8, 16) and batch_buckets(24) == (1, 2, 4, 8, 16, 24)


def test_warmup_runs_the_whole_preprocessing_at_the_largest_batch(tiny_checkpoint: Path, monkeypatch):
    # On a GPU the preprocessing's kernels load lazily and the plane fit's solver initialises on first
    # use: warm-up runs it before serving, on a scene with an object, so every step (normals included)
    # runs, at the largest batch shape.
    import crd_model.preprocessing as P

    seen: list[tuple[int, bool]] = []
    original = P.points_to_3d_input

    def watched(xyz, *args, **kwargs):
        x3d, fg = original(xyz, *args, **kwargs)
        seen.append((len(xyz), bool(fg.flatten(1).any(dim=1).all())))
        return x3d, fg

    monkeypatch.setattr(P, "points_to_3d_input", watched)
    Inspector(tiny_checkpoint, "cpu", buckets=(1, 2, 4)).warmup()
    assert seen == [(4, True)]


def test_the_workers_batch_buckets_setting_reaches_its_models(tiny_checkpoint: Path):
    from workers.models import ModelRegistry

    registry = ModelRegistry.load({TINY_CATEGORY: tiny_checkpoint}, "cpu", max_batch=8, buckets=[2, 8])
    assert registry.get(TINY_CATEGORY).buckets == (2, 8)
    # Unset: a CPU worker runs its batches unpadded.
    assert ModelRegistry.load({TINY_CATEGORY: tiny_checkpoint}, "cpu", max_batch=8).get(TINY_CATEGORY).buckets == ()


def test_a_saved_checkpoint_scores_exactly_as_the_model_did_before_saving(tmp_path: Path):
    import torch

    from crd_model.checkpoint import save_checkpoint
    from crd_model.config import BranchStats, Calibration, CheckpointMeta, CRDConfig, ScaleErrorMoments, TrainingInfo
    from crd_model.inputs import PreparedFrame
    from crd_model.torch_model import CRDModel

    torch.manual_seed(0)
    model = CRDModel(CRDConfig(image_size=64), teacher_weights=True).eval()
    stats = {"rgb": BranchStats(mean=3.2, std=0.2), "3d": BranchStats(mean=3.0, std=0.15)}
    rng = np.random.default_rng(0)
    moments = {  # the whitened scoring's moments travel in config.json too
        b: [
            ScaleErrorMoments(
                mean=rng.normal(0, 0.01, c).tolist(), whitener=np.diag(rng.uniform(1, 9, c)).ravel().tolist()
            )
            for c in model.teacher.channels
        ]
        for b in ("rgb", "3d")
    }
    calibration = Calibration(branch_stats=stats, threshold=4.0, false_reject_rate=0.01, n_validation=5,
                              validation_score_max=3.9, validation_score_median=3.5, error_moments=moments)  # fmt: skip
    model.set_calibration(calibration.statistics(), calibration.moments())
    g = torch.Generator().manual_seed(1)
    rgb, x3d = torch.rand(3, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g)
    with torch.inference_mode():
        before_maps, before_scores = model(rgb, x3d)
    training = TrainingInfo(category="disc", epochs=0, batch_size=1, learning_rate=0.0, seed=0, n_train=0, seconds=0,
                            trainable_parameters=model.trainable_parameters(), created_at="2026-01-01T00:00:00+00:00",
                            crd_inspect_version="test", torch_version=torch.__version__)  # fmt: skip
    meta = save_checkpoint(
        tmp_path / "ckpt",
        model,
        CheckpointMeta(model_id="x", config=model.config, calibration=calibration, training=training),
    )
    inspector = Inspector(tmp_path / "ckpt", "cpu")
    assert inspector.model_id == meta.model_id and inspector.threshold == 4.0
    frames = [PreparedFrame(rgb[i].numpy(), x3d[i].numpy(), (64, 64)) for i in range(3)]
    after = inspector.infer(frames)
    np.testing.assert_allclose([a.score for a in after], before_scores.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.stack([a.model_map for a in after]), before_maps.numpy(), rtol=1e-4, atol=1e-5)


def _trainer(tiny_data: Path):
    """Train a fresh 64 px CRD for 2 epochs with the given TrainOptions; returns its last losses."""
    import torch

    from crd_model.config import CRDConfig
    from crd_model.dataset import load_split
    from crd_model.torch_model import CRDModel
    from crd_model.train import TrainOptions, fit

    config = CRDConfig(image_size=64)
    train = load_split(tiny_data, TINY_CATEGORY, "train", config)

    def trained(**options) -> dict[str, float]:
        torch.manual_seed(0)
        model = CRDModel(config, teacher_weights=True)
        return fit(model, train, TrainOptions(epochs=2, batch_size=8, progress=False, seed=0, **options),
                   torch.device("cpu"))  # fmt: skip

    return trained


def test_augmented_training_trains_the_same_from_cached_or_fresh_teacher_features(tiny_data: Path):
    """The cache of (symmetry, image) teacher features and the per-batch path see the same turned inputs."""
    trained = _trainer(tiny_data)
    cached, fresh, plain = trained(augment="d4"), trained(augment="d4", cache_budget_mb=0), trained()
    # Adam turns float rounding into visible parameter differences: compare the losses. Cached and fresh
    # differ by float rounding alone (up to 1.6e-4 relative with one intra-op thread, where the reductions
    # sum in another order); training without the turns moves the 3D branch's loss by 7.8e-3.
    for name in cached:
        assert cached[name] == pytest.approx(fresh[name], rel=5e-4)
        assert cached[name] != pytest.approx(plain[name], rel=2e-3)  # the turned images were trained on


def test_shifted_or_recoloured_training_trains_on_changed_images(tiny_data: Path):
    """`shift` / `gain` move / recolour the images per batch (teacher run per batch); at 0 the cached recipe."""
    trained = _trainer(tiny_data)
    plain, fresh, shifted, recoloured = trained(), trained(cache_budget_mb=0), trained(shift=4), trained(gain=0.2)
    for name in plain:
        assert plain[name] == pytest.approx(fresh[name], rel=1e-4)
        assert shifted[name] != pytest.approx(plain[name], rel=1e-3)
    assert recoloured["rgb"] != pytest.approx(plain["rgb"], rel=1e-3)


@pytest.mark.parametrize("augment", ["none", "d4"])
def test_denoising_training_reconstructs_the_clean_features_from_corrupted_ones(
    tiny_data: Path, monkeypatch, augment: str
):
    """`noise`: each branch gets the teacher features of images with a noise patch, and its loss is taken
    against the same images' clean features (the cached ones), not against what it was shown."""
    import torch

    from crd_model import augment as pose
    from crd_model.config import CRDConfig
    from crd_model.dataset import load_split
    from crd_model.torch_model import CRDModel
    from crd_model.train import TrainOptions, fit

    config = CRDConfig(image_size=64)
    train = load_split(tiny_data, TINY_CATEGORY, "train", config)
    torch.manual_seed(0)
    model = CRDModel(config, teacher_weights=True)
    rgb, x3d = torch.from_numpy(train.stack("rgb")), torch.from_numpy(train.stack("x3d"))
    with torch.inference_mode():  # every (symmetry, image) the training can draw, clean
        clean = [
            model.encode(pose.transform(rgb, sym), pose.transform(x3d, sym, normals=True))["rgb"]
            for sym in pose.variants(augment)
        ]
    shallow, deep = torch.cat([c[0] for c in clean]), torch.cat([c[-1] for c in clean])
    calls = []
    run_branch = model.run_branch

    def recording(feats, name, targets=None):
        calls.append((feats, targets))
        return run_branch(feats, name, targets)

    monkeypatch.setattr(model, "run_branch", recording)
    options = TrainOptions(epochs=1, batch_size=8, progress=False, seed=0, noise=0.2, augment=augment)
    fit(model, train, options, torch.device("cpu"))
    assert calls
    for shown, targets in calls:
        assert targets is not None
        for i, target in enumerate(targets["rgb"][-1]):
            # The target is one (symmetry, image)'s clean features ...
            row = int((deep - target).flatten(1).abs().amax(1).argmin())
            torch.testing.assert_close(target, deep[row], rtol=1e-4, atol=1e-4)
            # ... and what the branch saw is that same image, corrupted: closest to it, yet not it.
            assert int((shallow - shown["rgb"][0][i]).flatten(1).abs().mean(1).argmin()) == row
            assert not torch.allclose(shown["rgb"][-1][i], target, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"shift": -2}, "shift=-2"),
        ({"gain": -0.1}, "gain=-0.1"),
        ({"gain": 1.5}, "gain=1.5"),
        ({"noise": -0.2}, "noise=-0.2"),
        ({"epochs": 0}, "epochs=0"),
        ({"lr_decay": 0.0}, "lr_decay=0.0"),
        ({"loss": "cosine"}, "unknown loss 'cosine'"),
        ({"augment": "rot90"}, "unknown augment 'rot90'"),
    ],
)
def test_training_options_refuse_values_that_would_train_something_else(options: dict, named: str):
    """A negative shift or gain used to train as if it were off; now every bad option is refused up front."""
    from crd_model.train import TrainOptions

    with pytest.raises(ValueError, match=named.replace("(", r"\(")) as caught:
        TrainOptions(**options)
    print(caught.value)
    TrainOptions(shift=3, gain=0.2, augment="d4", loss="global")  # valid ones still construct
