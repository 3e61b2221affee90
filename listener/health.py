"""Health and metrics over HTTP: /healthz (alive), /readyz (subscribed, Supabase up), /metrics."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from listener.server import AsgiServer, bind_socket

if TYPE_CHECKING:
    from listener.app import Listener

log = structlog.get_logger(component="health")

TIMEOUT_S = 3.0


def create_health_app(parts: Listener) -> Starlette:
    """The ASGI app behind LISTENER_HTTP_PORT / PORT."""

    async def healthz(_: Request) -> Response:
        return JSONResponse({"ok": True, "scans": parts.scanner.scans})

    async def readyz(_: Request) -> Response:
        checks = {"realtime_subscribed": parts.intake.confirmed, "supabase": await _supabase_up()}
        status = 200 if all(checks.values()) else 503
        return JSONResponse({"ok": status == 200, **checks}, status_code=status)

    async def metrics(_: Request) -> Response:
        try:
            counts = await asyncio.wait_for(parts.store.session_counts(), timeout=TIMEOUT_S)
        except Exception as exc:  # a scrape still answers; the gauge keeps its last counts
            log.warning("session_count_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            parts.metrics.set_sessions_by_state(counts)
        return Response(generate_latest(parts.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _supabase_up() -> bool:
        try:
            await asyncio.wait_for(parts.store.ping(), timeout=TIMEOUT_S)
        except Exception:
            return False
        return True

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ]
    )


async def serve_health(parts: Listener, port: int, stop: asyncio.Event) -> None:
    """Serve the health app on all interfaces at `port` until `stop` (platform checks call it)."""
    server = AsgiServer(create_health_app(parts), bind_socket(port, host="0.0.0.0"))
    await server.start()
    log.info("http_started", port=server.port)
    try:
        await stop.wait()
    finally:
        await server.stop()
