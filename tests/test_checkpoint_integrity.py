"""Checkpoints that are not what they claim are refused with a message naming the file (real files, no training)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from crd_model.checkpoint import META, WEIGHTS, CheckpointError, load_checkpoint, save_checkpoint, weights_digest
from crd_model.config import BranchStats, Calibration, CheckpointMeta, ScaleErrorMoments


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], torch.nn.Module]:
    """A real (untrained) CRD model at 64 px saved as a checkpoint, its state, and the model itself."""
    from crd_model.torch_model import create_model

    torch.manual_seed(0)
    model = create_model(image_size=64, teacher_weights=None)
    widths = model.teacher.channels
    calibration = Calibration(
        branch_stats={"rgb": BranchStats(mean=0.5, std=2.0), "3d": BranchStats(mean=-0.25, std=0.5)},
        threshold=1.5,
        false_reject_rate=0.01,
        n_validation=4,
        validation_score_max=1.4,
        validation_score_median=0.2,
        error_moments={  # the default scoring is "whitened": per branch and scale, each channel's error moments
            b: [ScaleErrorMoments(mean=[0.01] * c, whitener=torch.eye(c).flatten().mul(3.0).tolist()) for c in widths]
            for b in ("rgb", "3d")
        },
    )
    out = tmp_path_factory.mktemp("ckpt") / "good"
    save_checkpoint(out, model, CheckpointMeta(model_id="pending", config=model.config, calibration=calibration))
    model.set_calibration(calibration.statistics(), calibration.moments())
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}, model.eval()


@pytest.fixture
def ckpt(saved: tuple[Path, dict[str, torch.Tensor], torch.nn.Module], tmp_path: Path) -> Path:
    """A fresh copy of the good checkpoint, for one test to break."""
    return Path(shutil.copytree(saved[0], tmp_path / "ckpt"))


def test_config_json_reads_back_what_was_saved_with_each_list_of_numbers_on_one_line(saved) -> None:  # type: ignore[no-untyped-def]
    """The whitening matrices (C x C numbers per scale) would take one line per number with plain `indent=2`."""
    from crd_model.checkpoint import read_meta, write_meta

    meta = read_meta(saved[0])
    text = (saved[0] / META).read_text()
    assert json.loads(text) == json.loads(meta.model_dump_json())  # the same document, every digit
    whitener = meta.calibration.error_moments["3d"][-1].whitener
    assert len(whitener) > 1000
    assert text.count("\n") < 120  # nested objects indented; a list of numbers is one line
    assert '"feature_indices": [1, 2, 3],' in text
    copy = saved[0].parent / "rewritten"
    copy.mkdir()
    write_meta(copy, meta)  # what `crd calibrate` writes
    assert (copy / META).read_text() == text and read_meta(copy) == meta


def _refused(ckpt_dir: Path, *needles: str) -> str:
    """Load must fail naming the file; returns the message without the directory (whose name is the test's)."""
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(ckpt_dir)
    message = str(ei.value)
    assert message.startswith(str(ckpt_dir)), message  # the file comes first
    words = message.replace(str(ckpt_dir), "<ckpt>")
    for needle in needles:
        if needle.startswith(str(ckpt_dir)):
            assert message.startswith(needle), message
        else:
            assert needle in words, message
    return words


def _resave(ckpt_dir: Path, state: dict[str, torch.Tensor]) -> None:
    """Write `state` as the weights and make model_id claim them (a corruption that is not a mere swap)."""
    save_file(state, str(ckpt_dir / WEIGHTS))
    meta = json.loads((ckpt_dir / META).read_text())
    meta["model_id"] = meta["model_id"][:-12] + weights_digest(ckpt_dir / WEIGHTS)
    (ckpt_dir / META).write_text(json.dumps(meta))


def test_round_trip_gives_back_exactly_the_saved_model(saved) -> None:  # type: ignore[no-untyped-def]
    ckpt_dir, original, original_model = saved
    model, meta = load_checkpoint(ckpt_dir)
    loaded = model.state_dict()
    assert set(loaded) == set(original)
    assert [n for n, t in original.items() if not torch.equal(loaded[n], t)] == []
    assert meta.model_id == f"model-crd-{weights_digest(ckpt_dir / WEIGHTS)}"
    assert meta.calibration is not None and meta.calibration.threshold == 1.5
    # The same maps and scores as the model that was saved, calibration included.
    torch.manual_seed(1)
    rgb, x3d = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        before, after = original_model(rgb, x3d), model(rgb, x3d)
    assert torch.equal(before.pred_score, after.pred_score) and torch.equal(before.anomaly_map, after.anomaly_map)


@pytest.mark.parametrize("keep", [5, 100, 0.5], ids=["in-length-prefix", "in-header", "in-tensor-data"])
def test_truncated_weights(ckpt: Path, keep: float) -> None:
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    message = _refused(ckpt, str(ckpt / WEIGHTS))
    assert "truncated" in message


def test_weights_that_are_a_torch_zip(ckpt: Path, saved: tuple[Path, dict[str, torch.Tensor], torch.nn.Module]) -> None:
    torch.save(saved[1], ckpt / WEIGHTS)  # what `torch.save` writes, under the safetensors name
    _refused(ckpt, str(ckpt / WEIGHTS), "zip (torch.save)", "without unpickling")


class _Explode:
    """Unpickling this would create a marker file: proof that nothing was unpickled."""

    marker: Path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_weights_that_are_a_pickle_are_never_unpickled(ckpt: Path, tmp_path: Path) -> None:
    bomb = _Explode()
    bomb.marker = tmp_path / "code-ran"
    for protocol in (2, 4, 5):
        (ckpt / WEIGHTS).write_bytes(pickle.dumps(bomb, protocol=protocol))
        _refused(ckpt, str(ckpt / WEIGHTS), "a pickle")
    assert not bomb.marker.exists()
    # A checkpoint folder with a .pth instead of model.safetensors: named, not read.
    (ckpt / WEIGHTS).unlink()
    (ckpt / "model.pth").write_bytes(pickle.dumps(bomb, protocol=2))
    _refused(ckpt, "model.pth", "never unpickled")
    assert not bomb.marker.exists()


def test_weights_of_another_architecture(ckpt: Path) -> None:
    meta = json.loads((ckpt / META).read_text())
    meta["config"]["amplifier_expansion"] = 3  # same tensor names, other shapes
    (ckpt / META).write_text(json.dumps(meta))
    _refused(ckpt, str(ckpt / WEIGHTS), "has shape", "needs")
    meta["config"]["amplifier_expansion"] = 2
    meta["config"]["architecture"] = "rgb"  # a 3D branch too many
    (ckpt / META).write_text(json.dumps(meta))
    _refused(ckpt, str(ckpt / WEIGHTS), "unexpected")


def test_wrong_tensor_shape_or_dtype_in_the_weights(
    ckpt: Path, saved: tuple[Path, dict[str, torch.Tensor], torch.nn.Module]
) -> None:
    state = dict(saved[1])
    name = next(n for n, t in state.items() if t.ndim == 4 and not n.startswith("teacher"))
    state[name] = state[name][:1].clone()
    _resave(ckpt, state)
    _refused(ckpt, repr(name), "has shape")
    state = dict(saved[1])
    state[name] = state[name].half()
    _resave(ckpt, state)
    _refused(ckpt, repr(name), "F16")
    state = {n: t for n, t in saved[1].items() if n != name}
    _resave(ckpt, state)
    _refused(ckpt, "missing", name)


def test_weights_with_nan(ckpt: Path, saved: tuple[Path, dict[str, torch.Tensor], torch.nn.Module]) -> None:
    state = dict(saved[1])
    name = next(n for n, t in state.items() if t.is_floating_point() and not n.startswith("teacher"))
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    _resave(ckpt, state)
    _refused(ckpt, str(ckpt / WEIGHTS), "NaN")


def test_weights_swapped_after_saving(ckpt: Path, saved: tuple[Path, dict[str, torch.Tensor], torch.nn.Module]) -> None:
    state = {n: (t + 1 if t.is_floating_point() else t) for n, t in saved[1].items()}
    save_file(state, str(ckpt / WEIGHTS))  # model_id still names the old weights
    _refused(ckpt, str(ckpt / WEIGHTS), "sha256", "names other weights")
    meta = json.loads((ckpt / META).read_text())
    meta["model_id"] = "my-hand-made-name"
    (ckpt / META).write_text(json.dumps(meta))
    _refused(ckpt, str(ckpt / META), "does not end in the weights' sha256 prefix")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: "\xff" + text, "not valid JSON"),
        (lambda text: json.dumps({**json.loads(text), "owner": "me"}), "owner"),
        (lambda text: json.dumps({**json.loads(text), "config": {**json.loads(text)["config"], "depth": 3}}), "depth"),
        (lambda text: json.dumps({**json.loads(text), "format_version": 2}), "format_version"),
        (lambda text: text.replace('"threshold": 1.5', '"threshold": NaN'), "NaN"),
    ],
    ids=["truncated", "binary", "unknown-field", "unknown-nested-field", "future-format", "nan-threshold"],
)
def test_broken_config_json(ckpt: Path, edit, needle: str) -> None:  # type: ignore[no-untyped-def]
    text = (ckpt / META).read_text()
    (ckpt / META).write_text(edit(text))
    _refused(ckpt, str(ckpt / META), needle)


def test_bad_utf8_config(ckpt: Path) -> None:
    (ckpt / META).write_bytes(b'{"model_id": "\xff"}')
    _refused(ckpt, str(ckpt / META), "UTF-8")


def test_cli_prints_one_error_line_and_exits_2(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from crd_model.cli import main

    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[: len(data) // 2])
    argv = ["work", "--model", f"disc={ckpt}", "--redis-url", "redis://127.0.0.1:9/0", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"crd work: error: {ckpt / WEIGHTS}: truncated") and "Traceback" not in err


def _edit_meta(ckpt_dir: Path, edit) -> None:  # type: ignore[no-untyped-def]
    meta = json.loads((ckpt_dir / META).read_text())
    edit(meta)
    (ckpt_dir / META).write_text(json.dumps(meta))


def test_whitened_scoring_without_its_error_moments(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: m["calibration"].pop("error_moments"))
    _refused(ckpt, str(ckpt / META), "scoring 'whitened' but the calibration lacks error moments", "crd calibrate")


def test_error_moments_with_a_cosine_scoring(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: m["config"].update(scoring="cosine"))
    _refused(ckpt, str(ckpt / META), "scoring 'cosine' but the calibration holds error moments")


def test_error_moments_that_do_not_fit_the_network(ckpt: Path) -> None:
    def drop_a_channel(m: dict) -> None:
        scale = m["calibration"]["error_moments"]["3d"][1]
        scale["mean"], scale["whitener"] = scale["mean"][:-1], torch.eye(39).flatten().tolist()

    _edit_meta(ckpt, drop_a_channel)
    _refused(ckpt, str(ckpt / META), "branch '3d', scale 1: expected 40 channels")


def test_error_moments_with_nan_or_a_whitener_that_is_not_square(ckpt: Path) -> None:
    _edit_meta(ckpt, lambda m: m["calibration"]["error_moments"]["rgb"][0]["whitener"].__setitem__(3, float("nan")))
    _refused(ckpt, str(ckpt / META), "NaN or infinite")
    _edit_meta(ckpt, lambda m: m["calibration"]["error_moments"]["rgb"][0].update(mean=[0.0] * 24, whitener=[1.0] * 24))
    _refused(ckpt, str(ckpt / META), "C x C values for C channel means")


def test_a_config_without_a_scoring_is_one_written_before_it_and_scores_cosine(ckpt: Path) -> None:
    def as_before(m: dict) -> None:
        m["config"].pop("scoring")
        m["calibration"].pop("error_moments")

    _edit_meta(ckpt, as_before)
    model, meta = load_checkpoint(ckpt)
    assert meta.config.scoring == "cosine" and model.error_whitening is None
