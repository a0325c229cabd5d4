"""The dashboard's web app (Starlette, served by uvicorn): the page, its event stream, its actions.

The browser gets the state pushed as server-sent events (``/events``); the
page never reloads. Actions (pause, unpause, migrate, evacuate, activate) are
offered only to an admin's credentials, and each POST must carry the token
written into the page and name this server's own address in its Host header,
so another site open in the same browser can neither act (CSRF) nor read the
cluster through a name it points at 127.0.0.1 (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import secrets
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ferry.dashboard.actions import ActionError, perform
from ferry.dashboard.cluster_view import ClusterView

log = logging.getLogger("ferry.dashboard")

POLL_S = 0.5
HEARTBEAT_S = 15.0
ASSETS = ("dashboard.js", "dashboard.css")


class Broadcaster:
    """Polls the cluster; every subscriber gets each new state once."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view
        self.latest: dict[str, Any] = {}
        self.changed = asyncio.Condition()
        self.version = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="dashboard poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        state = await self.view.snapshot()
        same = {k: v for k, v in state.items() if k != "at"} == {
            k: v for k, v in self.latest.items() if k != "at"
        }
        if same and self.latest:
            return
        async with self.changed:
            self.latest = state
            self.version += 1
            self.changed.notify_all()

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("dashboard: reading the cluster failed")
            await asyncio.sleep(POLL_S)

    async def updates(self) -> AsyncIterator[dict[str, Any]]:
        seen = -1
        while True:
            async with self.changed:
                if self.version == seen:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), HEARTBEAT_S)
                if self.version == seen:
                    yield {}
                    continue
                seen = self.version
                state = self.latest
            yield state


def build_app(view: ClusterView, port_of: Any) -> Starlette:
    """``port_of()``: the port the server listens on (known once it has started)."""
    token = secrets.token_urlsafe(24)
    hub = Broadcaster(view)

    def ours(request: Request) -> bool:
        port = port_of()
        allowed = {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")}
        return request.headers.get("host", "") in allowed

    async def page(request: Request) -> Response:
        if not ours(request):
            return Response("wrong Host", 421)
        if not hub.latest:
            await hub.refresh()
        text = _asset("index.html")
        state = json.dumps(hub.latest).replace("</", "<\\/")
        text = text.replace("__STATE__", state).replace("__TOKEN__", html.escape(token))
        return HTMLResponse(text, headers=_SECURITY_HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return Response("not found", 404)
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return Response(_asset(name), media_type=kind, headers=_SECURITY_HEADERS)

    async def events(request: Request) -> Response:
        if not ours(request):
            return Response("wrong Host", 421)

        async def stream() -> AsyncIterator[str]:
            async for state in hub.updates():
                if await request.is_disconnected():
                    return
                yield f"data: {json.dumps(state)}\n\n" if state else ": still here\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})  # fmt: skip

    async def action(request: Request) -> Response:
        if not ours(request) or request.headers.get("x-ferry-token") != token:
            return JSONResponse({"error": "not from this dashboard's page"}, 403)
        if view.source.role != "admin":
            return JSONResponse({"error": "these credentials are a viewer's: no actions"}, 403)
        try:
            body = await request.json()
            message = await perform(view, hub.latest, body)
        except (ActionError, ValueError) as err:
            return JSONResponse({"error": str(err)}, 400)
        await hub.refresh()
        return JSONResponse({"ok": True, "message": message})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub.start()
        try:
            yield
        finally:
            await hub.stop()

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/static/{name}", asset),
            Route("/events", events),
            Route("/api/action", action, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.state.hub = hub
    app.state.token = token
    return app


_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def _asset(name: str) -> str:
    return resources.files("ferry.dashboard").joinpath("static", name).read_text()
