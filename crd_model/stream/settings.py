"""Settings of every daemon as one typed object (pydantic-settings; 12-factor: env vars).

Environment variables use the prefix `CRD_` and `__` for nesting, e.g.
`CRD_REDIS__URL=rediss://redis:6380/0`, `CRD_WORKER__MAX_BATCH=32`,
`CRD_STREAMS__PREFIX=plant7`. `REDIS_URL` (no prefix) is honoured too, as the
demo and the tests use it. Secrets come from the environment or from files
(`CRD_REDIS__PASSWORD_FILE`, e.g. a Kubernetes Secret mount) and never appear in
a repr or a log line. Command-line flags are applied with `with_overrides`, which
validates them exactly like the environment.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from crd_model.stream.messages import is_ident


class SettingsError(ValueError):
    """Settings that do not validate; the message names each offending flag or variable, never its value."""


def _identifier(v: str) -> str:
    # Line, prefix, group and consumer names end up in Redis keys and in every Result (wire identifiers).
    if not is_ident(v, 128):
        raise ValueError("must be 1-128 characters from [A-Za-z0-9._:-]")
    return v


Identifier = Annotated[str, AfterValidator(_identifier)]


def redact_url(url: str) -> str:
    """The URL with any password in it replaced by ***, for messages and reprs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        userinfo = f"{parts.username or ''}:***"
        host = parts.hostname or ""
        netloc = f"{userinfo}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparseable url>"


def _read_secret_file(path: Path) -> SecretStr:
    # Files written by `echo`, editors and `kubectl create secret --from-file` often end in one newline.
    text = path.read_text(encoding="utf-8")
    return SecretStr(text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text)


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password: SecretStr | None = None  # overrides one in the URL; keep it out of logs
    # Or the password in a file (a Kubernetes Secret mount, a Docker secret), read when connecting (so
    # settings validate where the file is not mounted, e.g. in CI); one trailing newline is dropped.
    password_file: Path | None = None
    # TLS: a rediss:// URL turns it on; these add a private CA and client certificates (mTLS). Checked to
    # exist when connecting.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_check_hostname: bool = True
    socket_timeout_s: float = Field(10.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    health_check_interval_s: float = Field(15.0, ge=0)
    retry_attempts: int = Field(5, ge=0)  # per command, with exponential backoff, before an error surfaces

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"must start with redis://, rediss:// or unix://, not {scheme or 'nothing'}")
        return url

    @model_validator(mode="after")
    def _check(self) -> RedisSettings:
        tls_files = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if any(f is not None for f in tls_files) and not self.url.startswith("rediss://"):
            # Without this, a redis:// URL would silently talk plain text although a CA is configured.
            raise ValueError("TLS files are set but the url is not rediss://: use rediss:// to turn TLS on")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together (mutual TLS needs both)")
        if self.password is not None and self.password_file is not None:
            raise ValueError("password and password_file are both set: set one")
        return self

    def resolved_password(self) -> SecretStr | None:
        """The password, from `password_file` if set (read now); a missing file names the setting only."""
        if self.password_file is None:
            return self.password
        try:
            return _read_secret_file(self.password_file)
        except OSError as exc:
            raise FileNotFoundError(
                f"CRD_REDIS__PASSWORD_FILE: cannot read {self.password_file}: {exc.strerror or exc}"
            ) from None

    def __repr_args__(self) -> Any:
        # A password inside the URL (discouraged, but possible) stays out of reprs and logs too.
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "url" else value


class StreamSettings(BaseModel):
    prefix: Identifier = "crd"
    group: Identifier = "inspectors"
    # Results and dead letters are read by others: keep a bounded history (approximate MAXLEN).
    # Sized for memory: a result is ~40 kB (its map), a dead letter holds the whole frame (~0.5 MB).
    results_maxlen: int = Field(10_000, ge=100)
    dead_maxlen: int = Field(1_000, ge=100)
    # Frames are trimmed only below the oldest entry any consumer group still needs (MINID);
    # this is a hard cap on top for runaway lines, applied only when nothing unprocessed is lost.
    frames_trim_every_s: float = Field(5.0, gt=0)

    def key(self, line: str, kind: Literal["frames", "results", "dead"]) -> str:
        # `{line}` is a Redis Cluster hash tag: one line's three streams share a slot, which the
        # atomic publish-and-ack script needs.
        return f"{self.prefix}:{{{line}}}:{kind}"


class ProducerSettings(BaseModel):
    fps: float = Field(10.0, gt=0, allow_inf_nan=False)
    rgb_encoding: Literal["png", "jpeg", "raw"] = "png"
    xyz_dtype: Literal["float32", "float16"] = "float32"
    xyz_compression: Literal["zlib", "none"] = "zlib"
    max_outstanding: int = Field(200, ge=1, description="group lag + pending above which backpressure acts")
    backpressure: Literal["block", "slow"] = "block"
    backpressure_poll_s: float = Field(0.05, gt=0)
    reconnect_max_backoff_s: float = Field(10.0, gt=0)


class WorkerSettings(BaseModel):
    consumer: Identifier = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    max_batch: int = Field(16, ge=1, le=1024)
    max_wait_ms: int = Field(20, ge=0, description="time to wait for a batch to fill")
    block_ms: int = Field(1000, ge=1)
    decode_threads: int = Field(2, ge=1)
    claim_idle_ms: int = Field(30_000, ge=100, description="pending this long = its worker is presumed dead")
    claim_every_s: float = Field(5.0, gt=0)
    max_deliveries: int = Field(3, ge=1)
    device: str | None = None
    bf16: bool = False
    compile: bool = False
    result_map_max_side: int = Field(256, ge=16)
    result_map_encoding: Literal["png8", "float16"] = "png8"
    region_min_area: int = Field(16, ge=1)
    # category -> checkpoint directory; one model per category, loaded once.
    models: dict[str, Path] = {}


class ObservabilitySettings(BaseModel):
    http_port: int | None = Field(None, ge=0, le=65535, description="serves /metrics, /healthz, /readyz; None = off")
    http_host: str = "0.0.0.0"
    log_json: bool = True
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),  # "debug" works too
    ] = "INFO"
    liveness_timeout_s: float = Field(60.0, gt=0)


class _PlainRedisUrl(PydanticBaseSettingsSource):
    """`REDIS_URL` (no prefix), the de-facto standard variable; below every CRD_* variable in priority."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        url = os.environ.get("REDIS_URL")
        return {"redis": {"url": url}} if url else {}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRD_", env_nested_delimiter="__", extra="ignore")

    line: Identifier = "line1"
    redis: RedisSettings = RedisSettings()
    streams: StreamSettings = StreamSettings()
    producer: ProducerSettings = ProducerSettings()
    worker: WorkerSettings = WorkerSettings()
    observability: ObservabilitySettings = ObservabilitySettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Sources are deep-merged, earlier ones winning: CRD_REDIS__URL beats REDIS_URL, and a
        # CRD_REDIS__USERNAME still applies when the URL comes from REDIS_URL.
        return init_settings, env_settings, _PlainRedisUrl(settings_cls), dotenv_settings, file_secret_settings

    @classmethod
    def load(cls, overrides: Mapping[tuple[str, ...], tuple[str, Any]] | None = None) -> Settings:
        """Settings from the environment with command-line values on top, validated once, together.

        `overrides` maps a settings path, e.g. ("producer", "fps"), to (flag name, value). Together
        matters: a CA file from the environment and a rediss:// URL from a flag are valid only as a
        pair. A value that does not validate is a SettingsError naming its flag or variable.
        """
        overrides = dict(overrides or {})
        nested: dict[str, Any] = {}
        for path, (_, value) in overrides.items():
            target = nested
            for key in path[:-1]:
                target = target.setdefault(key, {})
            target[path[-1]] = value
        try:
            return cls(**nested)  # init values win over the environment, merged key by key
        except ValidationError as exc:
            raise SettingsError(describe_errors(exc, _namer(overrides))) from None

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from the environment; a bad variable is a SettingsError naming it (not its value)."""
        return cls.load()

    def with_overrides(self, overrides: Mapping[tuple[str, ...], tuple[str, Any]]) -> Settings:
        """These settings with command-line values on top, validated like everything else."""
        data = self.model_dump()
        for path, (_, value) in overrides.items():
            target = data
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        try:
            # model_validate reads no environment: only the merged values are validated.
            return type(self).model_validate(data)
        except ValidationError as exc:
            raise SettingsError(describe_errors(exc, _namer(overrides))) from None


def _namer(overrides: Mapping[tuple[str, ...], tuple[str, Any]]) -> Any:
    """Where a value with this location came from: its flag, else its environment variable."""
    flags = {path: flag for path, (flag, _) in overrides.items()}

    def name_of(loc: tuple[str, ...]) -> str:
        if loc in flags:
            return flags[loc]
        inside = [flag for path, flag in flags.items() if path[: len(loc)] == loc]  # a section-level error
        return " / ".join([*inside, _env_name(loc) + ("__*" if len(loc) == 1 and loc[0] != "line" else "")])

    return name_of


def _env_name(loc: tuple[str, ...]) -> str:
    return "CRD_" + "__".join(part.upper() for part in loc) if loc else "settings"


def describe_errors(exc: ValidationError, name_of: Any) -> str:
    """One line per error: where it came from and what is wrong, never the input (it may be a secret)."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = tuple(str(p) for p in error["loc"])
        dotted = ".".join(loc) or "settings"
        lines.append(f"{name_of(loc)} ({dotted}): {error['msg']}")
    return "; ".join(lines)
