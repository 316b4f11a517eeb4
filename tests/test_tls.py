"""TLS for real: a throwaway CA, Debian's redis-server with --tls-port, producer -> worker -> results over rediss://.

Needs `redis-server` (Debian/Ubuntu package `redis-server`, built with TLS) on PATH; skipped without it,
except under CI=1 (.ci/run), where it fails. Independent of REDIS_URL.
"""

from __future__ import annotations

import ssl
import time
import uuid
from pathlib import Path

import pytest
import redis

from crd_model.stream import unpack_result
from crd_model.stream.redis_streams import TLSVerificationError, connect
from crd_model.stream.settings import RedisSettings, Settings, SettingsError
from tests.servers import PKI, make_pki, tls_redis_server

pytestmark = pytest.mark.timeout(120)  # a regression that hangs fails instead of blocking the suite


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    # The server certificate names 127.0.0.1 only, so "localhost" is a host-name mismatch.
    return make_pki(tmp_path_factory.mktemp("pki"), server_names=("127.0.0.1",))


@pytest.fixture(scope="module")
def tls_port(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> int:
    with tls_redis_server(pki, tmp_path_factory.mktemp("redis-tls")) as port:
        yield port


@pytest.fixture(scope="module")
def mtls_port(pki: PKI, tmp_path_factory: pytest.TempPathFactory) -> int:
    with tls_redis_server(pki, tmp_path_factory.mktemp("redis-mtls"), require_client_cert=True) as port:
        yield port


def _settings(redis_settings: RedisSettings) -> Settings:
    return Settings.model_validate(
        {
            "line": f"tls{uuid.uuid4().hex[:8]}",
            "redis": redis_settings.model_dump(),
            "producer": {"fps": 200},
            "worker": {"max_wait_ms": 0, "claim_every_s": 1},
        }
    )


def _run_line(s: Settings, frames: int = 4) -> list:
    """Producer -> worker -> results, in this process; returns the decoded results."""
    from producers.producer import Producer
    from producers.sources import SyntheticSource
    from workers.models import ModelRegistry, StandInInspector
    from workers.worker import Worker

    sent = Producer(s, camera="cam-tls").run(SyntheticSource("disc", seed=1), max_frames=frames)
    assert sent == frames
    worker = Worker(s, ModelRegistry({"disc": StandInInspector(5)}))
    assert worker.run(max_frames=frames, idle_exit_s=20) == frames
    r = connect(s.redis)
    return [unpack_result(fields[b"payload"]) for _, fields in r.xrange(s.streams.key(s.line, "results"))]


def test_producer_worker_results_over_verified_tls(pki: PKI, tls_port: int) -> None:
    s = _settings(RedisSettings(url=f"rediss://127.0.0.1:{tls_port}/0", tls_ca_file=pki.ca))
    kwargs = connect(s.redis).connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED and kwargs["ssl_check_hostname"] is True
    results = _run_line(s)
    assert len(results) == 4 and {res.verdict for res in results} == {"ok"}
    assert len({res.frame_id for res in results}) == 4 and all(res.camera == "cam-tls" for res in results)
    # The server speaks TLS only (--port 0): the same port without TLS does not work.
    plain = RedisSettings(url=f"redis://127.0.0.1:{tls_port}/0", retry_attempts=0, socket_timeout_s=3)
    with pytest.raises(redis.ConnectionError):
        connect(plain).ping()


def test_wrong_ca_fails_at_once_with_a_readable_error(
    pki: PKI, tls_port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from producers.producer import Producer
    from producers.sources import SyntheticSource
    from workers.models import ModelRegistry, StandInInspector
    from workers.worker import Worker

    s = _settings(RedisSettings(url=f"rediss://127.0.0.1:{tls_port}/0", tls_ca_file=pki.other_ca))
    t0 = time.monotonic()
    with pytest.raises(TLSVerificationError) as ei:
        connect(s.redis).ping()
    message = str(ei.value)
    assert "other-ca.crt" in message and f"127.0.0.1:{tls_port}" in message and "CRD_REDIS__TLS_CA_FILE" in message
    # The daemons stop instead of retrying forever: a CA file does not fix itself.
    with pytest.raises(TLSVerificationError):
        Producer(s, camera="cam").run(SyntheticSource("disc"), max_frames=1)
    with pytest.raises(TLSVerificationError):
        Worker(s, ModelRegistry({"disc": StandInInspector(1)})).run(max_frames=1, idle_exit_s=5)
    assert time.monotonic() - t0 < 10
    # From the command line: one error line, exit code 2.
    from crd_model.cli import main

    monkeypatch.setenv("CRD_REDIS__TLS_CA_FILE", str(pki.other_ca))
    capsys.readouterr()  # what the daemons above logged
    rc = main(["results", "--redis-url", s.redis.url, "--line", s.line, "--count", "1", "--timeout-s", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("crd results: error: TLS: the certificate of") and "Traceback" not in err


def test_asyncio_clients_verify_the_same_way(pki: PKI, tls_port: int) -> None:
    """The plant consumers (PLC bridge, dashboard) use the asyncio client: same checks, same error."""
    import asyncio

    from crd_model.stream.redis_streams import connect_async

    async def ping(cfg: RedisSettings) -> bool:
        client = connect_async(cfg)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    url = f"rediss://127.0.0.1:{tls_port}/0"
    assert asyncio.run(ping(RedisSettings(url=url, tls_ca_file=pki.ca)))
    t0 = time.monotonic()
    with pytest.raises(TLSVerificationError, match=r"other-ca\.crt"):
        asyncio.run(ping(RedisSettings(url=url, tls_ca_file=pki.other_ca)))
    with pytest.raises(TLSVerificationError, match="Hostname mismatch"):
        asyncio.run(ping(RedisSettings(url=f"rediss://localhost:{tls_port}/0", tls_ca_file=pki.ca)))
    assert time.monotonic() - t0 < 10


def test_host_name_is_verified(pki: PKI, tls_port: int) -> None:
    by_name = RedisSettings(url=f"rediss://localhost:{tls_port}/0", tls_ca_file=pki.ca)
    with pytest.raises(TLSVerificationError, match="Hostname mismatch"):
        connect(by_name).ping()
    # The documented escape hatch turns off the name check only: the CA is still verified.
    assert connect(by_name.model_copy(update={"tls_check_hostname": False})).ping()
    unverified = by_name.model_copy(update={"tls_check_hostname": False, "tls_ca_file": pki.other_ca})
    with pytest.raises(TLSVerificationError):
        connect(unverified).ping()


def test_mutual_tls_needs_the_client_certificate(pki: PKI, mtls_port: int) -> None:
    url = f"rediss://127.0.0.1:{mtls_port}/0"
    with_cert = RedisSettings(url=url, tls_ca_file=pki.ca, tls_cert_file=pki.client_cert, tls_key_file=pki.client_key)
    results = _run_line(_settings(with_cert), frames=2)
    assert [res.verdict for res in results] == ["ok", "ok"]
    without = RedisSettings(url=url, tls_ca_file=pki.ca, retry_attempts=0)
    t0 = time.monotonic()
    with pytest.raises(redis.ConnectionError, match="TLS_CERT_FILE"):
        connect(without).ping()
    assert time.monotonic() - t0 < 5
    # A certificate without its key (or the reverse) is a settings error, before any connection.
    with pytest.raises(ValueError, match="tls_key_file"):
        RedisSettings(url=url, tls_ca_file=pki.ca, tls_cert_file=pki.client_cert)
    # A CA file that is not there is named at once, not retried as a connection error.
    with pytest.raises(FileNotFoundError, match="CRD_REDIS__TLS_CA_FILE"):
        connect(RedisSettings(url=url, tls_ca_file=Path("/nonexistent/ca.crt")))
    # TLS files with a plain redis:// URL would silently mean no TLS at all: refused.
    with pytest.raises(ValueError, match="rediss://"):
        RedisSettings(url=f"redis://127.0.0.1:{mtls_port}/0", tls_ca_file=pki.ca)
    with pytest.raises(SettingsError, match="--redis-url"):
        _settings(RedisSettings(url=url, tls_ca_file=pki.ca)).with_overrides(
            {("redis", "url"): ("--redis-url", f"redis://127.0.0.1:{mtls_port}/0")}
        )
