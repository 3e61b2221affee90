"""Supabase Realtime (Phoenix vsn 1.0.0) gateway fed from the WAL (stub until written)."""

from __future__ import annotations

from starlette.websockets import WebSocket


class RealtimeGateway:
    """Serves /realtime/v1/websocket; streams postgres_changes from a logical slot."""

    def __init__(self, dsn: str, jwt_secret: str) -> None:
        self.dsn = dsn
        self.jwt_secret = jwt_secret

    async def start(self) -> None:
        """Create the slot and start streaming."""

    async def stop(self) -> None:
        """Close every socket and drop the slot."""

    async def endpoint(self, websocket: WebSocket) -> None:
        """Serve one websocket connection."""
        await websocket.close()
