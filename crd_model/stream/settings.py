"""Settings of every daemon as one typed object (pydantic-settings; 12-factor: env vars).

Environment variables use the prefix `CRD_` and `__` for nesting, e.g.
`CRD_REDIS__URL=rediss://:secret@redis:6380/0`, `CRD_WORKER__MAX_BATCH=32`,
`CRD_STREAMS__PREFIX=plant7`. `REDIS_URL` (no prefix) is honoured too, as the
demo and the tests use it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password: SecretStr | None = None  # overrides one in the URL; keep it out of logs
    # TLS: a rediss:// URL turns it on; these add a private CA and client certificates (mTLS).
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_check_hostname: bool = True
    socket_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    health_check_interval_s: float = 15.0
    retry_attempts: int = 5  # per command, with exponential backoff, before an error surfaces


class StreamSettings(BaseModel):
    prefix: str = "crd"
    group: str = "inspectors"
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
    fps: float = Field(10.0, gt=0)
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
    consumer: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # Lines this worker serves (one consumer group per line's frames stream, read together, batched
    # across lines; results go to each line's own results stream). Empty: the top-level `line`.
    lines: list[str] = []
    max_batch: int = Field(16, ge=1, le=1024)
    max_wait_ms: int = Field(20, ge=0, description="longest a frame waits for its batch to fill")
    block_ms: int = Field(1000, ge=1)
    decode_threads: int = Field(2, ge=1, description="pool that decodes payloads and encodes results")
    prefetch_batches: int = Field(4, ge=1, description="frames in hand (read, in a stage, publishing), in batches")
    max_batch_decoded_mb: float = Field(
        512.0, gt=0, description="decoded bytes one batch may hold; a larger frame is inspected alone"
    )
    claim_idle_ms: int = Field(30_000, ge=100, description="pending this long = its worker is presumed dead")
    claim_every_s: float = Field(5.0, gt=0)
    max_deliveries: int = Field(3, ge=1)
    device: str | None = None
    bf16: bool | None = Field(None, description="bf16 autocast; None = on CUDA")
    compile: bool | None = Field(None, description="torch.compile with static batch shapes; None = on CUDA")
    time_stages: bool = Field(False, description="synchronise the device between stages to time each (benchmarks)")
    result_map_max_side: int = Field(256, ge=16)
    result_map_encoding: Literal["png8", "float16"] = "png8"
    region_min_area: int = Field(16, ge=1)
    # category -> checkpoint directory; one model per category, loaded once.
    models: dict[str, Path] = {}


class ObservabilitySettings(BaseModel):
    http_port: int | None = Field(None, description="serves /metrics, /healthz, /readyz; None = off")
    http_host: str = "0.0.0.0"
    log_json: bool = True
    log_level: str = "INFO"
    liveness_timeout_s: float = 60.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRD_", env_nested_delimiter="__", extra="ignore")

    line: str = "line1"
    redis: RedisSettings = RedisSettings()
    streams: StreamSettings = StreamSettings()
    producer: ProducerSettings = ProducerSettings()
    worker: WorkerSettings = WorkerSettings()
    observability: ObservabilitySettings = ObservabilitySettings()

    @model_validator(mode="after")
    def _plain_redis_url(self) -> Settings:
        # REDIS_URL is the de-facto standard variable; CRD_REDIS__URL wins when both are set.
        if "CRD_REDIS__URL" not in os.environ and os.environ.get("REDIS_URL"):
            self.redis = self.redis.model_copy(update={"url": os.environ["REDIS_URL"]})
        return self
