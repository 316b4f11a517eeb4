"""Command-line flags go through the settings' validation: a clean `crd <cmd>: error: ...` and exit code 2."""

from __future__ import annotations

import pytest

from crd_model.cli import main
from crd_model.stream.settings import Settings, SettingsError

# A flag that slips through would start a daemon that waits for work: fail instead of blocking the suite.
pytestmark = pytest.mark.timeout(60)


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run `crd argv`, expect exit code 2 and exactly one clean error line; return stderr."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"crd {argv[0]}: error: " in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["produce", "--fps", "0"], "--fps"),
        (["produce", "--fps", "-2.5"], "--fps"),
        (["produce", "--fps", "nan"], "--fps"),
        (["produce", "--max-outstanding", "0"], "--max-outstanding"),
        (["produce", "--line", "line 1"], "--line"),
        (["produce", "--line", ""], "--line"),
        (["produce", "--redis-url", "http://cache:6379"], "--redis-url"),
        (["work", "--stand-in-latency-ms", "1", "--max-batch", "0"], "--max-batch"),
        (["work", "--stand-in-latency-ms", "1", "--max-batch", "5000"], "--max-batch"),
        (["work", "--stand-in-latency-ms", "1", "--max-wait-ms", "-1"], "--max-wait-ms"),
        (["work", "--stand-in-latency-ms", "1", "--claim-idle-ms", "5"], "--claim-idle-ms"),
        (["work", "--stand-in-latency-ms", "1", "--batch-buckets", "0,64"], "--batch-buckets"),
        (["work", "--stand-in-latency-ms", "1", "--batch-buckets", "16,many"], "--batch-buckets"),
        (["work", "--stand-in-latency-ms", "1", "--consumer", "gpu 0"], "--consumer"),
        (["work", "--stand-in-latency-ms", "1", "--metrics-port", "70000"], "--metrics-port"),
        (["results", "--line", "a{b}"], "--line"),
        (
            ["train", "--data", ".", "--category", "x", "--out", "o", "--teacher-input-weight", "-1"],
            "--teacher-input-weight",
        ),
    ],
)
def test_bad_setting_flags_are_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    err = _fails(capsys, argv)
    assert named in err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["produce", "--count", "0"], "--count"),
        (["produce", "--anomaly-rate", "1.5"], "--anomaly-rate"),
        (["work", "--max-frames", "0"], "--max-frames"),
        (["work", "--idle-exit-s", "0"], "--idle-exit-s"),
        (["work", "--stand-in-latency-ms", "-1"], "--stand-in-latency-ms"),
        (["results", "--timeout-s", "inf"], "--timeout-s"),
        (["demo", "--fps", "0"], "--fps"),
        (["train", "--data", "d", "--category", "c", "--out", "o", "--epochs", "0"], "--epochs"),
        (["train", "--data", "d", "--category", "c", "--out", "o", "--false-reject-rate", "2"], "--false-reject-rate"),
    ],
)
def test_bad_plain_flags_are_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], named: str) -> None:
    assert named in _fails(capsys, argv)


def test_environment_errors_name_the_variable_and_never_echo_secrets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRD_WORKER__MAX_BATCH", "0")
    assert "CRD_WORKER__MAX_BATCH" in _fails(capsys, ["work", "--stand-in-latency-ms", "1"])
    monkeypatch.delenv("CRD_WORKER__MAX_BATCH")
    monkeypatch.setenv("CRD_REDIS__PASSWORD", "env-secret-1")
    err = _fails(capsys, ["produce", "--redis-url", "http://user:url-secret-2@cache:6379", "--fps", "0"])
    assert "--redis-url" in err and "--fps" in err
    assert "env-secret-1" not in err and "url-secret-2" not in err


def test_flags_win_over_the_environment_and_are_validated_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://from-env:6379/0")
    monkeypatch.setenv("CRD_WORKER__MAX_BATCH", "8")
    monkeypatch.delenv("CRD_REDIS__URL", raising=False)
    base = Settings.from_env()
    assert base.redis.url == "redis://from-env:6379/0" and base.worker.max_batch == 8
    s = base.with_overrides({("redis", "url"): ("--redis-url", "rediss://from-flag:6380/1")})
    assert s.redis.url == "rediss://from-flag:6380/1"  # REDIS_URL is not re-applied on top of the flag
    assert s.worker.max_batch == 8 and s.worker.consumer == base.worker.consumer
    with pytest.raises(SettingsError, match="--max-batch"):
        base.with_overrides({("worker", "max_batch"): ("--max-batch", 0)})
    monkeypatch.setenv("CRD_OBSERVABILITY__LOG_LEVEL", "debug")  # any case, as logging takes it
    assert Settings.from_env().observability.log_level == "DEBUG"
    monkeypatch.setenv("CRD_OBSERVABILITY__LOG_LEVEL", "chatty")
    with pytest.raises(SettingsError, match="CRD_OBSERVABILITY__LOG_LEVEL"):
        Settings.from_env()


def test_good_flags_reach_the_running_producer(settings, r, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["produce", "--redis-url", settings.redis.url, "--line", settings.line, "--source", "synthetic"]
    rc = main([*argv, "--count", "2", "--fps", "200", "--rgb-encoding", "raw", "--max-outstanding", "50",
               "--xyz-compression", "none"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    key = settings.streams.key(settings.line, "frames")
    assert r.xlen(key) == 2
    from crd_model.stream import unpack_frame

    first = unpack_frame(r.xrange(key)[0][1][b"payload"])
    assert first.rgb.encoding == "raw" and first.line == settings.line
    assert first.xyz.compression == "none"


@pytest.mark.parametrize("argv", [["work", "--batch", "8"], ["train", "--data", "d", "--category", "c", "--out", "o",
                                  "--epoch", "3"]])  # fmt: skip
def test_abbreviated_flags_are_refused_not_guessed(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    # `--batch` would otherwise be taken for `--batch-buckets`, and `--epoch` for `--epochs`.
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
