"""Chaos fixtures: a local stack over its own Postgres (a listener sweeps every row it sees)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from listener.local.postgres import EmbeddedPostgres
from listener.local.stack import LocalStack, StackThread


@pytest.fixture
def chaos_stack() -> Iterator[StackThread]:
    """A fresh Postgres, REST/Realtime gateways and Fly emulator for one chaos run."""
    pg = EmbeddedPostgres()
    pg.start()
    try:
        running = StackThread(LocalStack(postgres=pg))
        try:
            yield running
        finally:
            running.close()
    finally:
        pg.stop()
