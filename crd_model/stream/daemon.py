"""The lifecycle every daemon shares: stop event, signal handling, health and metrics endpoints.

    class Producer(Daemon):
        def run(self):
            with self.running():                 # /metrics, /healthz, /readyz while the body runs
                while not self.stopping.is_set():
                    ...                            # work; self.health.beat() each round
                ...                                # drain: finish what is in hand

SIGTERM and SIGINT set `stopping`; the main loop notices it, finishes (drains) what it holds and
returns, so a rolling update or Ctrl-C loses nothing. SIGHUP calls `reload()` (the worker re-reads its
models file).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import structlog
from prometheus_client import CollectorRegistry

from crd_model.stream.observability import Health, serve_http
from crd_model.stream.settings import ObservabilitySettings


class Daemon:
    """Base of `crd produce`, `crd work` and the plant consumers."""

    def __init__(self, observability: ObservabilitySettings, log: structlog.typing.FilteringBoundLogger):
        self.observability = observability
        self.stopping = threading.Event()
        self.registry = CollectorRegistry()
        self.health = Health(observability.liveness_timeout_s)
        self.http_server = None
        self.log = log

    def stop(self, *_: object) -> None:
        """Ask the main loop to finish what it holds and return (signal-handler compatible)."""
        if not self.stopping.is_set():
            self.log.info("stopping", reason="signal")
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGHUP, self.reload)

    def reload(self, *_: object) -> None:
        """SIGHUP: re-read what can change without a restart (the worker's models); default: nothing."""
        self.log.info("reload_ignored", reason="nothing to reload in this daemon")

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Serve the health and metrics endpoints (if a port is set) for as long as the body runs."""
        obs = self.observability
        if obs.http_port is not None:
            self.http_server = serve_http(obs.http_host, obs.http_port, self.health, self.registry)
        try:
            yield
        finally:
            if self.http_server is not None:
                self.http_server.shutdown()
                self.http_server.server_close()
