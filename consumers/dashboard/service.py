"""The dashboard daemon: per line, read-only pollers of Redis feed a `LineState`; uvicorn serves the app.

Redis commands used (all reads): XREVRANGE and XREAD on results and dead letters, XREAD from '$' on
frames (never a consumer group, which would hold back the workers' trimming), XINFO GROUPS and XINFO
CONSUMERS. Nothing is written.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis
import redis.asyncio
import structlog
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge

from consumers.dashboard.app import create_app
from consumers.dashboard.state import GroupInfo, LineState
from crd_model.stream import Limits
from crd_model.stream.daemon import Daemon
from crd_model.stream.redis_streams import TRANSIENT_ERRORS, connect_async
from crd_model.stream.settings import Settings

log = structlog.get_logger("crd.dashboard")
# ClusterError (Redis Cluster): redis-py gave up following a slot that is being migrated ("TTL
# exhausted") or the cluster is failing over: as transient as a dropped connection, so retried alike.
REDIS_ERRORS = TRANSIENT_ERRORS  # back off and retry
ACTIVE_MS = 60_000  # a worker that touched the group within a minute counts as running


class DashboardMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.clients = Gauge("crd_dashboard_clients", "Open event streams (pages)", registry=registry)
        self.results = Counter("crd_dashboard_results_total", "Results read", ["line"], registry=registry)
        self.frames = Counter("crd_dashboard_frames_total", "Frames read for images", ["line"], registry=registry)
        self.read_errors = Counter("crd_dashboard_read_errors_total", "Failed Redis reads", registry=registry)


def _entries(resp: object) -> list[tuple[str, dict]]:
    if not resp:
        return []
    entries = resp[0][1] if isinstance(resp, list) else next(iter(resp.values()))[0]  # type: ignore[index]
    return [(eid.decode() if isinstance(eid, bytes) else str(eid), fields) for eid, fields in entries]


class Dashboard(Daemon):
    def __init__(self, settings: Settings):
        self.s = settings
        self.lines = settings.dashboard_lines()
        super().__init__(settings.observability, log.bind(lines=self.lines))
        self.states = {line: LineState(line, settings.dashboard) for line in self.lines}
        self.metrics = DashboardMetrics(self.registry)
        self.limits = Limits()
        self.port: int | None = None

    def run(self) -> None:
        with self.running():
            asyncio.run(self._main())

    async def _main(self) -> None:
        cfg = self.s.dashboard
        self.shutdown = asyncio.Event()
        self.r = connect_async(self.s.redis)
        config = uvicorn.Config(create_app(self), host=cfg.host, port=cfg.port, log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=3)  # fmt: skip
        server = uvicorn.Server(config)
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # the Daemon handles them
        tasks = [asyncio.create_task(self._watch_signal(server))]
        for line in self.lines:
            tasks += [
                asyncio.create_task(self._results(line)),
                asyncio.create_task(self._poll(line)),
            ]
            if cfg.frame_images:
                tasks.append(asyncio.create_task(self._frames(line)))
        try:
            serving = asyncio.create_task(server.serve())
            while not server.started and not serving.done():
                await asyncio.sleep(0.02)
            if server.started:
                self.port = server.servers[0].sockets[0].getsockname()[1]
                self.health.set_ready(True)
                auth = bool(cfg.token() or cfg.basic_username)
                self.log.info("serving", url=f"http://{cfg.host}:{self.port}/", auth=auth)
            await serving
        finally:
            self.shutdown.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.r.aclose()
            self.log.info("stopped")

    async def _watch_signal(self, server: uvicorn.Server) -> None:
        while not self.stopping.is_set():
            self.health.beat()
            await asyncio.sleep(0.1)
        self.shutdown.set()  # ends the event streams, so the graceful shutdown is quick
        server.should_exit = True

    async def _retrying(self, what: str, line: str, coro_fn):
        """Run a read; on a Redis outage report it on the page and retry (the page keeps its last data)."""
        delay = 0.2
        while True:
            try:
                out = await coro_fn()
                self.states[line].read_error = ""
                return out
            except REDIS_ERRORS as exc:
                self.metrics.read_errors.inc()
                self.states[line].read_error = f"redis unreachable ({what})"
                self.health.set_ready(False, "redis unreachable")
                self.log.warning("redis_unavailable", during=what, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except redis.ResponseError as exc:  # e.g. NOPERM from a too narrow ACL user: visible, not fatal
                self.metrics.read_errors.inc()
                self.states[line].read_error = f"{what}: {exc}"
                self.log.error("redis_refused", during=what, error=str(exc))
                await asyncio.sleep(5.0)
                return None

    async def _results(self, line: str) -> None:
        st, key = self.states[line], self.s.streams.key(line, "results")
        history = await self._retrying("results history", line,
                                       lambda: self.r.xrevrange(key, count=self.s.dashboard.history))  # fmt: skip
        for eid, fields in reversed(history or []):
            st.add_result(eid.decode(), fields)
        last = st.last_result_id or "$"
        while True:
            resp = await self._retrying("results", line, lambda c=last: self.r.xread({key: c}, count=200, block=1000))
            for eid, fields in _entries(resp):
                st.add_result(eid, fields)
                self.metrics.results.labels(line).inc()
                last = eid

    async def _frames(self, line: str) -> None:
        """XREAD (no group) from '$': only frames published from now on, and no effect on trimming."""
        st, key, last = self.states[line], self.s.streams.key(line, "frames"), "$"
        while True:
            resp = await self._retrying("frames", line, lambda c=last: self.r.xread({key: c}, count=8, block=1000))
            for eid, fields in _entries(resp):
                st.add_frame(fields)
                self.metrics.frames.labels(line).inc()
                last = eid

    async def _groups(self, key: str) -> list[dict]:
        try:
            return await self.r.xinfo_groups(key)
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return []  # the line has not started yet
            raise

    async def _poll(self, line: str) -> None:
        st = self.states[line]
        frames, results, dead = (self.s.streams.key(line, k) for k in ("frames", "results", "dead"))
        group = self.s.streams.group
        first = True
        while True:
            groups = await self._retrying("frames groups", line, lambda: self._groups(frames))
            info = next((g for g in groups or [] if _s(g["name"]) == group), None)
            if info is not None:
                consumers = await self._retrying("consumers", line, lambda: self.r.xinfo_consumers(frames, group))
                active = sum(1 for c in consumers or [] if int(c.get("idle", ACTIVE_MS)) < ACTIVE_MS)
                st.workers_group = GroupInfo(group, _int(info.get("lag")), int(info["pending"]), len(consumers or []),
                                             active)  # fmt: skip
            plant = await self._retrying("results groups", line, lambda: self._groups(results))
            st.plant_groups = [GroupInfo(_s(g["name"]), _int(g.get("lag")), int(g["pending"])) for g in plant or []]
            if first:
                entries = await self._retrying(
                    "dead letters", line, lambda: self.r.xrevrange(dead, count=self.s.dashboard.dead_letters)
                )
                for eid, fields in reversed(entries or []):
                    st.add_dead(eid.decode(), fields)
                first = False
            else:
                since = st.last_dead_id or "0-0"
                resp = await self._retrying("dead letters", line, lambda c=since: self.r.xread({dead: c}, count=50))
                for eid, fields in _entries(resp):
                    st.add_dead(eid, fields)
            if not st.read_error and not self.health.ready and self.port is not None:
                self.health.set_ready(True)
            await asyncio.sleep(self.s.dashboard.poll_s)


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _int(v: object) -> int | None:
    return None if v is None else int(v)  # type: ignore[call-overload]
