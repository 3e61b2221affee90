"""Shared fixtures: a clean environment and one embedded Postgres for the session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

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
