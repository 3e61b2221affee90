"""E2E fixtures: a fresh local stack per test over one Postgres whose tables are emptied."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest

from listener.local import keys
from listener.local.fly_emulator import EmulatorOptions
from listener.local.postgres import EmbeddedPostgres
from listener.local.stack import LocalStack, StackThread

TABLES = "coding_sessions, sandbox_events, sandbox_commands, listener_leases"


@pytest.fixture(scope="module")
def e2e_postgres() -> Iterator[EmbeddedPostgres]:
    """Postgres for this module only: e2e listeners sweep every row they can see."""
    pg = EmbeddedPostgres()
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def stack(e2e_postgres: EmbeddedPostgres) -> Iterator[StackThread]:
    """Empty tables, then a new REST/Realtime/Fly-emulator stack for this test."""
    with psycopg.connect(e2e_postgres.dsn, autocommit=True) as conn:
        conn.execute(f"truncate {TABLES} cascade")
        conn.execute("delete from auth.users")
    # Fly's documented limits (1 req/s per action) would make these tests slow, not better:
    # the limiter and the emulator's 429s have their own tests and the burst benchmark.
    unlimited = EmulatorOptions(
        token=keys.new_secret(),
        action_rate_per_s=1000.0,
        action_burst=1000,
        get_rate_per_s=1000.0,
        get_burst=1000,
    )
    running = StackThread(LocalStack(postgres=e2e_postgres, fly_options=unlimited))
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the test's frontend users."""
    async with httpx.AsyncClient(timeout=30) as client:
        yield client
