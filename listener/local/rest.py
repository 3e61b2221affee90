"""PostgREST subset at /rest/v1: tables and RPC with JWT role switching (stub until written)."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette


def create_rest_app(pool: AsyncConnectionPool, jwt_secret: str) -> Starlette:
    """The REST gateway's ASGI app (mounted at /rest/v1)."""
    del pool, jwt_secret
    return Starlette()
