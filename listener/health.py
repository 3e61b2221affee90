"""Health and metrics over HTTP: /healthz (alive), /readyz (subscribed, Supabase up), /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import httpx
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from listener.server import AsgiServer, bind_socket
from listener.store import connect

if TYPE_CHECKING:
    from supabase import AsyncClient

    from listener.app import Listener

log = structlog.get_logger(component="health")

STATS_VIEW = "sandbox_stats"
STATS_TIMEOUT_S = 3.0
SessionCounts = Callable[[], Awaitable[Mapping[str, int]]]


def create_health_app(parts: Listener, session_counts: SessionCounts | None = None) -> Starlette:
    """The ASGI app behind LISTENER_HTTP_PORT / PORT; `session_counts` feeds the sessions-by-state
    gauge on every scrape of /metrics."""

    async def healthz(_: Request) -> Response:
        return JSONResponse({"ok": True, "scans": parts.scanner.scans})

    async def readyz(_: Request) -> Response:
        checks = {"realtime_subscribed": parts.intake.confirmed, "supabase": await _supabase_up()}
        status = 200 if all(checks.values()) else 503
        return JSONResponse({"ok": status == 200, **checks}, status_code=status)

    async def metrics(_: Request) -> Response:
        if session_counts is not None:
            await _count_sessions(session_counts)
        return Response(generate_latest(parts.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _count_sessions(count: SessionCounts) -> None:
        try:
            counts = await asyncio.wait_for(count(), timeout=STATS_TIMEOUT_S)
        except Exception as exc:  # a scrape still answers; the gauge keeps its last counts
            log.warning("session_count_failed", error=f"{type(exc).__name__}: {exc}")
            return
        parts.metrics.set_sessions_by_state(counts)

    async def _supabase_up() -> bool:
        try:
            await asyncio.wait_for(parts.store.take_leader_lease("readyz-probe", 1), timeout=3)
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


async def read_session_counts(client: AsyncClient) -> dict[str, int]:
    """Sessions by sandbox state, from the sandbox_stats view (one query)."""
    response = await client.table(STATS_VIEW).select("sessions_by_state").execute()
    rows: Any = response.data  # one row: the view aggregates
    counts: Mapping[str, Any] = rows[0]["sessions_by_state"] if rows else {}
    return {str(state): int(n) for state, n in counts.items()}


async def serve_health(parts: Listener, port: int, stop: asyncio.Event) -> None:
    """Serve the health app on all interfaces at `port` until `stop` (platform checks call it)."""
    settings = parts.settings
    async with httpx.AsyncClient(timeout=httpx.Timeout(STATS_TIMEOUT_S)) as http:
        supabase = await connect(
            str(settings.supabase_url), settings.supabase_service_role_key.get_secret_value(), http
        )
        app = create_health_app(parts, lambda: read_session_counts(supabase))
        server = AsgiServer(app, bind_socket(port, host="0.0.0.0"))
        await server.start()
        log.info("http_started", port=server.port)
        try:
            await stop.wait()
        finally:
            await server.stop()
