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
    ConfigDict,
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
    # Shown in CLIENT LIST (operators, fault injection); the daemons default it to their role and name.
    client_name: str | None = Field(None, pattern=r"^[A-Za-z0-9._:-]{1,64}$")
    # Redis Cluster: `url` names one node, or better a name that reaches any of them (a Service over
    # all nodes); the client discovers the others, sends each line's commands to the node that
    # holds its slot and follows the slot when it moves (MOVED/ASK). Cluster has database 0 only.
    cluster: bool = False

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
        if self.cluster:
            parts = urlsplit(self.url)
            if parts.scheme not in ("redis", "rediss"):
                raise ValueError(f"a cluster is reached over redis:// or rediss://, not {parts.scheme}://")
            if parts.path.strip("/") not in ("", "0"):
                raise ValueError(f"Redis Cluster has database 0 only, the URL asks for {parts.path.strip('/')!r}")
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
    # Results (docs/deploy.md, "Retention"): with consumer groups on the results stream (PLC bridges),
    # a result is trimmed only once every group has acknowledged it and it is older than
    # `results_retain_s` (kept for readers without a group: dashboards, `crd results`); without
    # groups, an approximate MAXLEN of `results_maxlen`. `results_hard_maxlen` bounds memory when a
    # group stops acknowledging (a PLC outage): above it the oldest results go, counted and alarmed
    # (crd_worker_results_overflow_total, a log error naming the lagging groups).
    results_maxlen: int = Field(10_000, ge=100)
    results_retain_s: float = Field(3600.0, ge=0)
    results_hard_maxlen: int = Field(100_000, ge=100)
    # Dead letters are for people: an approximate MAXLEN (each holds the whole frame, ~0.5-1.5 MB).
    dead_maxlen: int = Field(1_000, ge=100)
    # Frames are trimmed only below the oldest entry any consumer group still needs (MINID).
    frames_trim_every_s: float = Field(5.0, gt=0)
    # A frame id gets one result: a copy of a frame published within this window (a producer's retry
    # after a lost reply, a restarted producer) is acknowledged and dead-lettered as "duplicate".
    dedup_window_s: float = Field(900.0, gt=0)

    @model_validator(mode="after")
    def _hard_above_soft(self) -> StreamSettings:
        if self.results_hard_maxlen < self.results_maxlen:
            raise ValueError("results_hard_maxlen must be >= results_maxlen")
        return self

    def key(self, line: str, kind: Literal["frames", "results", "dead", "published"]) -> str:
        # `{line}` is a Redis Cluster hash tag: one line's keys share a slot, which the atomic
        # publish-and-ack script needs.
        return f"{self.prefix}:{{{line}}}:{kind}"

    def producer_key(self, line: str, camera: str) -> str:
        """Where a camera's producer keeps its sequence (epoch, last confirmed seq) across restarts."""
        return f"{self.prefix}:{{{line}}}:producer:{camera}"


class ProducerSettings(BaseModel):
    fps: float = Field(10.0, gt=0, allow_inf_nan=False)
    rgb_encoding: Literal["png", "jpeg", "raw"] = "png"
    xyz_dtype: Literal["float32", "float16"] = "float32"
    # Opt-in: shrink frames so their longer side is at most this before sending (docs/deploy.md).
    downscale_max_side: int | None = Field(None, ge=32)
    xyz_compression: Literal["zlib", "none"] = "zlib"
    max_outstanding: int = Field(200, ge=1, description="group lag + pending above which backpressure acts")
    backpressure: Literal["block", "slow"] = "block"
    backpressure_poll_s: float = Field(0.05, gt=0)
    reconnect_max_backoff_s: float = Field(10.0, gt=0)


class WorkerSettings(BaseModel):
    consumer: Identifier = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # Lines this worker serves (one consumer group per line's frames stream, read together, batched
    # across lines; results go to each line's own results stream). Empty: the top-level `line`.
    lines: list[Identifier] = []
    max_batch: int = Field(16, ge=1, le=1024)
    # The batch shapes the model runs (each compiled and warmed before ready); a batch is padded up to
    # the next one. Empty: powers of two up to max_batch on CUDA, unpadded on CPU. Fewer shapes start
    # faster (one compilation each) and pad more.
    batch_buckets: list[Annotated[int, Field(ge=1, le=1024)]] = []
    max_wait_ms: int = Field(20, ge=0, description="longest a frame waits for its batch to fill")
    block_ms: int = Field(1000, ge=1)
    decode_threads: int = Field(2, ge=1, description="pool that decodes payloads and encodes results")
    # Threads stop scaling near 900 frames/s (the GIL; bench/decode_scaling.py): a GPU worker decodes
    # and builds results in processes, through shared memory (/dev/shm holds 3 x max_batch_decoded_mb).
    # None: processes on a GPU (one per core, less two, at most 16), threads on a CPU (the model needs
    # the cores); 0: threads.
    decode_processes: int | None = Field(None, ge=0, le=256)
    # torch's intra-op threads while the worker runs (the model on a CPU). None: torch's default, one
    # per core. Fewer leave cores to other work at a cost in frames/s (BENCHMARKS.md, throughput notes).
    torch_threads: int | None = Field(None, ge=1, le=1024)
    # Freed frame buffers serve the next batch (glibc's mallopt thresholds, workers/allocator.py) instead of
    # the next batch faulting in fresh pages: the process's memory stays at its peak between batches.
    keep_freed_memory: bool = True
    # Everything alive once the models are loaded and warm is frozen out of Python's cyclic garbage
    # collector (gc.freeze, workers/collector.py): its full collections then walk only what serving
    # allocated, instead of pausing every thread for 100+ ms now and then.
    freeze_startup_objects: bool = True
    prefetch_batches: int = Field(4, ge=1, description="frames in hand (read, in a stage, publishing), in batches")
    # Bounds one frame's cost (decoding a 40 Mpx frame takes seconds and gigabytes): larger frames
    # become `too_large` error results before anything is decoded. The wire's own bound is Limits.
    max_frame_pixels: int = Field(4096 * 4096, ge=64)
    max_batch_decoded_mb: float = Field(
        512.0,
        gt=0,
        description="decoded bytes one batch may hold (with decode processes: encoded and "
        "decoded bytes, the size of one shared-memory slab); a larger frame is inspected alone",
    )
    claim_idle_ms: int = Field(30_000, ge=100, description="pending this long = its worker is presumed dead")
    claim_every_s: float = Field(5.0, gt=0)
    max_deliveries: int = Field(3, ge=1)
    device: str | None = None
    # Several devices (or ["all"]): one worker process per device under a supervisor (workers/supervisor.py).
    devices: list[str] = []
    # Worker processes per device (each its own consumer, device loop and GIL) under that supervisor: one
    # process's host-side work per batch caps what it can feed a fast GPU (BENCHMARKS.md, "Throughput on a GPU").
    processes_per_device: int = Field(1, ge=1, le=16)
    bf16: bool | None = Field(None, description="bf16 autocast; None = on CUDA")
    compile: bool | None = Field(None, description="torch.compile with static batch shapes; None = on CUDA")
    time_stages: bool = Field(False, description="synchronise the device between stages to time each (benchmarks)")
    result_map_max_side: int = Field(256, ge=16)
    result_map_encoding: Literal["png8", "float16"] = "png8"
    region_min_area: int = Field(16, ge=1)
    # category -> checkpoint directory; one model per category, loaded once.
    models: dict[str, Path] = {}
    # category -> candidate checkpoint scoring every frame beside the live model (shadow mode).
    shadow_models: dict[str, Path] = {}
    # Rollout without a stop: a JSON file {"models": {...}, "shadow_models": {...}} that, when it
    # changes (checked every `reload_check_s`, or at once on SIGHUP), is loaded and warmed beside the
    # live models and swapped in between two batches. Overrides `models` / `shadow_models` when set.
    models_file: Path | None = None
    reload_check_s: float = Field(5.0, gt=0)


PLC_VERDICT_CODES = {"ok": 1, "anomalous": 2, "error": 3}  # 0 = no result yet


class ModbusMap(BaseModel):
    """Where the bridge writes one line's result on a Modbus TCP PLC (addresses relative to the line's base).

    Holding registers are 16-bit; 32-bit values take two registers, high word first (big-endian).
    Coils are single bits. Defaults match the register map table in README.
    """

    model_config = ConfigDict(extra="forbid")

    sequence: int = Field(0, ge=0, description="uint32: the bridge's result sequence of the line, 1, 2, ...")
    verdict_code: int = Field(2, ge=0, description="uint16: 1 ok, 2 anomalous, 3 error")
    reject_register: int = Field(3, ge=0, description="uint16 0/1: the reject decision, for register-only PLCs")
    score: int = Field(4, ge=0, description="int32: score x score_scale")
    threshold: int = Field(6, ge=0, description="int32: threshold x score_scale")
    capture_seq: int = Field(8, ge=0, description="uint32: the camera's frame counter (low 32 bits)")
    part_id: int = Field(10, ge=0, description="part id from meta, ASCII, NUL-padded, part_id_registers long")
    part_id_registers: int = Field(16, ge=1, le=64)
    heartbeat: int = Field(30, ge=0, description="uint16 counter, +1 every heartbeat_s")
    status: int = Field(31, ge=0, description="uint16 bits: 0 ready, 1 alarm, 2 missing results reported")
    missing_count: int = Field(32, ge=0, description="uint16: results reported missing so far (wraps)")
    missing_capture_seq: int = Field(33, ge=0, description="uint32: capture seq of the last missing result")
    # coils
    result_valid_coil: int = Field(0, ge=0, description="bridge sets it once the result registers are written")
    reject_coil: int = Field(1, ge=0, description="set with result valid for a reject, cleared with it")
    heartbeat_coil: int = Field(2, ge=0, description="toggles every heartbeat_s")
    alarm_coil: int = Field(3, ge=0, description="set while the line is in alarm (PLC not acking, ...)")
    result_ack_coil: int = Field(8, ge=0, description="the PLC sets it after reading; the bridge clears both")

    @model_validator(mode="after")
    def _no_overlaps(self) -> ModbusMap:
        regs: dict[int, str] = {}
        spans = {
            "sequence": 2, "verdict_code": 1, "reject_register": 1, "score": 2, "threshold": 2, "capture_seq": 2,
            "part_id": self.part_id_registers, "heartbeat": 1, "status": 1, "missing_count": 1,
            "missing_capture_seq": 2,
        }  # fmt: skip
        for name, width in spans.items():
            for a in range(getattr(self, name), getattr(self, name) + width):
                if a in regs:
                    raise ValueError(f"register {a} is used by both {regs[a]} and {name}")
                regs[a] = name
        coils = [self.result_valid_coil, self.reject_coil, self.heartbeat_coil, self.alarm_coil, self.result_ack_coil]
        if len(set(coils)) != len(coils):
            raise ValueError("two coils share an address")
        return self


class ModbusSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(502, ge=1, le=65535)
    device_id: int = Field(1, ge=0, le=255, description="Modbus unit / slave id of the PLC")
    timeout_s: float = Field(2.0, gt=0)
    # Line i (in the order of plc.lines) uses registers register_base + i * line_register_stride + offset.
    register_base: int = Field(0, ge=0)
    line_register_stride: int = Field(100, ge=1)
    coil_base: int = Field(0, ge=0)
    line_coil_stride: int = Field(16, ge=1)
    map: ModbusMap = ModbusMap()
    handshake: bool = True  # result valid / result ack; False: a result is confirmed once its write is acknowledged
    poll_ms: int = Field(20, ge=1, description="how often the ack coil is read while waiting")


class OpcUaNodeMap(BaseModel):
    """Node ids in the PLC's own OPC UA server; `{line}` is replaced by the line id. Empty = not written."""

    model_config = ConfigDict(extra="forbid")

    sequence: str = "ns=2;s=Vision.{line}.Sequence"
    verdict_code: str = "ns=2;s=Vision.{line}.VerdictCode"
    reject: str = "ns=2;s=Vision.{line}.Reject"
    score: str = "ns=2;s=Vision.{line}.Score"
    part_id: str = "ns=2;s=Vision.{line}.PartId"
    frame_id: str = ""
    heartbeat: str = "ns=2;s=Vision.{line}.Heartbeat"
    alarm: str = ""
    missing_count: str = ""
    # Both set: the handshake (bridge sets result_valid, the PLC sets result_ack, the bridge clears both).
    result_valid: str = ""
    result_ack: str = ""

    @model_validator(mode="after")
    def _handshake_pair(self) -> OpcUaNodeMap:
        if bool(self.result_valid) != bool(self.result_ack):
            raise ValueError("result_valid and result_ack come as a pair (both set, or neither)")
        if not self.sequence:
            raise ValueError("sequence is required: it is how the PLC, and a restarted bridge, tell results apart")
        return self


class OpcUaClientSettings(BaseModel):
    endpoint: str = "opc.tcp://127.0.0.1:4840"
    username: str | None = None
    password: SecretStr | None = None
    # Basic256Sha256 with a client certificate: "Basic256Sha256,SignAndEncrypt,cert.pem,key.pem[,server.der]".
    security_string: SecretStr | None = None
    timeout_s: float = Field(4.0, gt=0)
    nodes: OpcUaNodeMap = OpcUaNodeMap()
    score_scale: int | None = Field(None, ge=1, description="integer score nodes get score x this (None: plc's)")
    poll_ms: int = Field(20, ge=1)


class OpcUaServerSettings(BaseModel):
    endpoint: str = "opc.tcp://0.0.0.0:4840/crd-inspect/"
    namespace_uri: str = "urn:crd-inspect:machine-vision"
    # "None" is plain TCP (a closed plant network); "Basic256Sha256_SignAndEncrypt" needs certificate + key.
    security_policies: list[Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"]] = ["None"]
    certificate_file: Path | None = None
    private_key_file: Path | None = None
    username: str | None = None  # set both: clients must log in with them (anonymous is then refused)
    password: SecretStr | None = None
    # True: a result counts as confirmed only once a client wrote its Sequence into <line>/Acknowledge.
    require_ack: bool = False

    @model_validator(mode="after")
    def _security(self) -> OpcUaServerSettings:
        if any(p != "None" for p in self.security_policies) and not (self.certificate_file and self.private_key_file):
            raise ValueError("Basic256Sha256 policies need certificate_file and private_key_file")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password come as a pair")
        return self


class PlcSettings(BaseModel):
    protocol: Literal["modbus", "opcua-client", "opcua-server"] = "modbus"
    lines: list[str] = Field(default_factory=list, description="lines to bridge; empty = [line]")
    # The bridge's own consumer group on the results stream: never the workers' group.
    group: str = "plc-bridge"
    consumer: str = Field("bridge", description="stable across restarts: pending results are resumed by name")
    error_is_reject: bool = True  # fail-safe: a frame that could not be inspected is rejected
    part_id_key: str = Field("part_id", description="meta key whose value is the part id shown to the PLC")
    score_scale: int = Field(1000, ge=1, description="integer registers carry round(score x score_scale)")
    buffer_depth: int = Field(32, ge=1, le=10_000, description="results read ahead while the PLC is busy")
    ack_timeout_s: float = Field(5.0, gt=0, description="no PLC confirmation for this long: alarm (never a skip)")
    heartbeat_s: float = Field(1.0, gt=0)
    missing_timeout_s: float = Field(10.0, gt=0, description="a gap in a camera's seq open this long is reported")
    block_ms: int = Field(500, ge=1)
    drain_timeout_s: float = Field(10.0, ge=0, description="SIGTERM: how long to finish the handshake in hand")
    reconnect_max_backoff_s: float = Field(5.0, gt=0)
    modbus: ModbusSettings = ModbusSettings()
    opcua_client: OpcUaClientSettings = OpcUaClientSettings()
    opcua_server: OpcUaServerSettings = OpcUaServerSettings()


class DashboardSettings(BaseModel):
    lines: list[str] = Field(default_factory=list, description="lines shown; empty = [line]")
    host: str = "127.0.0.1"  # localhost only unless deliberately opened
    port: int = Field(8080, ge=1, le=65535)
    # Optional auth (both may be set): a bearer token (header, or ?token= for the page and its event
    # stream) and/or HTTP basic auth. Secrets from the environment or a mounted file, never logged.
    auth_token: SecretStr | None = None
    auth_token_file: Path | None = None
    basic_username: str | None = None
    basic_password: SecretStr | None = None
    history: int = Field(500, ge=10, le=20_000, description="results kept per line for rates, latency, plot")
    window_s: float = Field(300.0, gt=0, description="reject rate and latency over this window")
    anomalies: int = Field(12, ge=1, le=200, description="recent anomalous frames kept with their images")
    frame_images: bool = True  # XREAD the frames stream (from $) to show the images of flagged frames
    frame_cache_mb: int = Field(64, ge=1, description="recent frames' RGB payloads kept until their result arrives")
    image_max_side: int = Field(1024, ge=64, le=8192, description="full images are shown at most this large")
    thumbnail_side: int = Field(200, ge=32, le=1024)
    dead_letters: int = Field(20, ge=1, le=500)
    refresh_s: float = Field(1.0, gt=0, description="how often the page gets a new snapshot")
    poll_s: float = Field(2.0, gt=0, description="group info and dead letters are polled this often")

    @model_validator(mode="after")
    def _basic_pair(self) -> DashboardSettings:
        if (self.basic_username is None) != (self.basic_password is None):
            raise ValueError("basic_username and basic_password come as a pair")
        return self

    def token(self) -> str | None:
        """The token from auth_token or auth_token_file (stripped); read at start, never logged."""
        if self.auth_token is not None:
            return self.auth_token.get_secret_value()
        if self.auth_token_file is not None:
            return self.auth_token_file.read_text().strip()
        return None


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
    plc: PlcSettings = PlcSettings()
    dashboard: DashboardSettings = DashboardSettings()
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

    @model_validator(mode="after")
    def _plant_group_is_not_the_workers(self) -> Settings:
        check_plc_group(self)
        return self

    def plc_lines(self) -> list[str]:
        return self.plc.lines or [self.line]

    def dashboard_lines(self) -> list[str]:
        return self.dashboard.lines or [self.line]


def _namer(overrides: Mapping[tuple[str, ...], tuple[str, Any]]) -> Any:
    """Where a value with this location came from: its flag, else its environment variable."""
    flags = {path: flag for path, (flag, _) in overrides.items()}

    def name_of(loc: tuple[str, ...]) -> str:
        if not loc:  # a check across sections (e.g. plc.group vs streams.group): the message says which
            return "settings"
        for n in range(len(loc), 0, -1):  # the flag itself, or one holding this item (a list's element)
            if tuple(loc[:n]) in flags:
                return flags[tuple(loc[:n])]
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


def check_plc_group(s: Settings) -> None:
    """The bridge's consumer group must be its own: sharing the workers' would steal their frames' acks."""
    if s.plc.group == s.streams.group:
        raise ValueError(f"plc.group {s.plc.group!r} is the workers' consumer group; give the bridge its own")
