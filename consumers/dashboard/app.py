"""The dashboard's web app (Starlette): the page, its static assets, JSON snapshots, server-sent events, images.

Every asset comes from this package (no CDN, no build step). Optional auth: a bearer token (header, or
`?token=` for the page, its event stream and images) and/or HTTP basic auth, compared in constant time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from consumers.dashboard.render import render

if TYPE_CHECKING:
    from consumers.dashboard.service import Dashboard

STATIC = resources.files("consumers.dashboard") / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token may be in the URL
    "Cache-Control": "no-store",
}


class Auth:
    """Token and/or basic auth; with neither configured every request passes (localhost-only default)."""

    def __init__(self, token: str | None, basic: tuple[str, str] | None):
        self.token, self.basic = token, basic

    @property
    def enabled(self) -> bool:
        return self.token is not None or self.basic is not None

    def allows(self, scope: Scope) -> bool:
        if not self.enabled:
            return True
        request = Request(scope)
        header = request.headers.get("authorization", "")
        if self.token is not None:
            offered = request.query_params.get("token") or header.removeprefix("Bearer ").strip()
            if offered and hmac.compare_digest(offered.encode(), self.token.encode()):
                return True
        if self.basic is not None and header.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            ok_user = hmac.compare_digest(user.encode(), self.basic[0].encode())
            ok_password = hmac.compare_digest(password.encode(), self.basic[1].encode())
            return ok_user and ok_password
        return False


class AuthAndHeaders:
    """ASGI middleware (pure, so server-sent events stream unbuffered): auth first, then security headers."""

    def __init__(self, app: ASGIApp, auth: Auth):
        self.app, self.auth = app, auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The page's code and styles hold no data and cannot carry a token: they are public.
        public = scope["path"].startswith("/static/") or scope["path"] == "/favicon.ico"
        if not public and not self.auth.allows(scope):
            headers = {"WWW-Authenticate": 'Basic realm="crd-inspect"'} if self.auth.basic else {}
            await PlainTextResponse("unauthorized\n", 401, headers=headers | SECURITY_HEADERS)(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                         if k.lower().encode() not in present]  # fmt: skip
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(d: Dashboard) -> Starlette:
    cfg = d.s.dashboard
    image_cache: OrderedDict[tuple, bytes] = OrderedDict()

    def state_of(request: Request):
        line = request.path_params["line"]
        return d.states.get(line)

    async def index(_: Request) -> Response:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    async def lines(_: Request) -> Response:
        return JSONResponse({"lines": d.lines, "refresh_s": cfg.refresh_s})

    async def snapshot(request: Request) -> Response:
        st = state_of(request)
        return JSONResponse(st.snapshot()) if st else PlainTextResponse("no such line\n", 404)

    async def events(request: Request) -> Response:
        st = state_of(request)
        if st is None:
            return PlainTextResponse("no such line\n", 404)

        async def stream() -> AsyncIterator[str]:
            d.metrics.clients.inc()
            try:
                yield f"retry: {int(cfg.refresh_s * 2000)}\n\n"
                while not d.shutdown.is_set():
                    yield f"event: snapshot\ndata: {json.dumps(st.snapshot())}\n\n"
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(d.shutdown.wait(), cfg.refresh_s)
            finally:
                d.metrics.clients.dec()

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})

    async def frame_detail(request: Request) -> Response:
        st, fid = state_of(request), request.path_params["frame_id"]
        if st is None or fid not in st.flagged:
            return PlainTextResponse("not among the recent anomalous frames\n", 404)
        return JSONResponse(st.flagged_json(fid))

    async def frame_image(request: Request) -> Response:
        st, fid, kind = state_of(request), request.path_params["frame_id"], request.path_params["kind"]
        size = request.query_params.get("size", "thumb")
        known = st is not None and fid in st.flagged and kind in ("image", "map", "overlay")
        if not known or size not in ("thumb", "full"):
            return PlainTextResponse("not found\n", 404)
        assert st is not None
        flagged = st.flagged[fid]
        key = (st.line, fid, kind, size, flagged.rgb is not None)
        png = image_cache.get(key)
        if png is None:
            side = cfg.thumbnail_side if size == "thumb" else cfg.image_max_side
            # Decoding and drawing are CPU work: off the event loop, so the event streams keep flowing.
            png = await asyncio.to_thread(render, flagged, kind, side, d.limits)  # type: ignore[arg-type]
            image_cache[key] = png
            while len(image_cache) > 6 * cfg.anomalies:
                image_cache.popitem(last=False)
        return Response(png, media_type="image/png")

    routes = [
        Route("/", index),
        Route("/favicon.ico", lambda _: Response(status_code=204)),
        Route("/api/lines", lines),
        Route("/api/lines/{line}/snapshot", snapshot),
        Route("/api/lines/{line}/events", events),
        Route("/api/lines/{line}/frames/{frame_id}", frame_detail),
        Route("/api/lines/{line}/frames/{frame_id}/{kind}.png", frame_image),
        Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
    ]
    token = cfg.token()
    basic = (cfg.basic_username, cfg.basic_password.get_secret_value()) if cfg.basic_password is not None else None
    auth = Auth(token, basic)  # type: ignore[arg-type]
    return Starlette(routes=routes, middleware=[Middleware(AuthAndHeaders, auth=auth)])
