"""Shared fixtures: a clean environment and one embedded Postgres for the session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from listener.local.stack import StackThread

from listener.local.postgres import EmbeddedPostgres

_PREFIXES = ("LISTENER_", "FLY_", "SUPABASE_", "SANDBOX_")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's real settings."""
    for key in list(os.environ):
        if key.startswith(_PREFIXES) or key in {"PORT", "LOG_LEVEL", "LOG_FORMAT"}:
            monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    """One embedded Postgres with the Supabase bootstrap and the project's migrations."""
    pg = EmbeddedPostgres()
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def stack(postgres: EmbeddedPostgres) -> Iterator[StackThread]:
    """The whole local stack (REST, Realtime, Fly emulator) on its own loop, sharing `postgres`."""
    from listener.local.stack import LocalStack, StackThread

    running = StackThread(LocalStack(postgres=postgres))
    try:
        yield running
    finally:
        running.close()
