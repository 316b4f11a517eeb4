"""Health endpoints and Prometheus metrics for the daemons (torch-free).

One small HTTP server per process serves `/metrics` (Prometheus text format), `/healthz`
(liveness: the main loop beat recently) and `/readyz` (readiness: models loaded, Redis reachable).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class Health:
    def __init__(self, liveness_timeout_s: float = 60.0):
        self.liveness_timeout_s = liveness_timeout_s
        self._last_beat = time.monotonic()
        self._ready = False
        self._reason = "starting"

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self._ready, self._reason = ready, reason

    @property
    def alive(self) -> bool:
        return time.monotonic() - self._last_beat < self.liveness_timeout_s

    @property
    def ready(self) -> bool:
        return self._ready and self.alive

    @property
    def reason(self) -> str:
        return self._reason


def serve_http(host: str, port: int, health: Health, registry: CollectorRegistry) -> ThreadingHTTPServer:
    """Start the endpoints on a daemon thread; returns the server (call .shutdown() to stop)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
            elif self.path == "/healthz":
                code = 200 if health.alive else 503
                body, ctype = (b"ok\n" if code == 200 else b"stalled\n"), "text/plain"
            elif self.path == "/readyz":
                code = 200 if health.ready else 503
                body = b"ready\n" if code == 200 else f"not ready: {health.reason}\n".encode()
                ctype = "text/plain"
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # probes every few seconds: keep logs quiet
            return

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
