"""Database fixtures shared by the schema, function and view tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.rows import DictRow

from listener.local.postgres import EmbeddedPostgres
from tests.integration.db_helpers import (
    api_connection,
    connect,
    create_user,
    truncate_sandbox_tables,
)

Conn = psycopg.Connection[DictRow]


@pytest.fixture
def db(postgres: EmbeddedPostgres) -> Iterator[Conn]:
    """A superuser connection (autocommit, dict rows)."""
    with connect(postgres.dsn) as conn:
        yield conn


@pytest.fixture
def api(postgres: EmbeddedPostgres) -> Iterator[Conn]:
    """A connection as `authenticator`, as PostgREST and Realtime connect."""
    with api_connection(postgres) as conn:
        yield conn


@pytest.fixture
def owner(db: Conn) -> uuid.UUID:
    """A new user who owns what the test creates."""
    return create_user(db)


@pytest.fixture
def empty(db: Conn) -> Iterator[None]:
    """For tests that look at whole tables: start and leave them empty."""
    truncate_sandbox_tables(db)
    yield
    truncate_sandbox_tables(db)
