"""Database test helpers: connections, users, sessions, and blocks run as a Supabase API role."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row

from listener.local.postgres import EmbeddedPostgres

Row = dict[str, Any]
API_ROLES = ("anon", "authenticated", "service_role")
THREADS = 8
BARRIER_TIMEOUT_S = 10.0


@contextmanager
def connect(dsn: str) -> Iterator[psycopg.Connection[DictRow]]:
    """An autocommit connection returning dict rows; `conn.transaction()` opens a real one."""
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@contextmanager
def api_connection(pg: EmbeddedPostgres) -> Iterator[psycopg.Connection[DictRow]]:
    """A connection as `authenticator`, the login role PostgREST and Realtime use."""
    with connect(pg.role_dsn("authenticator")) as conn:
        yield conn


@contextmanager
def as_role(
    conn: psycopg.Connection[DictRow], role: str, user_id: uuid.UUID | None = None
) -> Iterator[psycopg.Connection[DictRow]]:
    """One transaction as `role` with JWT claims, as PostgREST runs a request; commits on exit."""
    assert role in API_ROLES, role
    claims: dict[str, str] = {"role": role}
    if user_id is not None:
        claims["sub"] = str(user_id)
    with conn.transaction():
        conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        yield conn


def create_user(db: psycopg.Connection[DictRow]) -> uuid.UUID:
    """A new auth.users row (as superuser); returns its id."""
    row = db.execute(
        "insert into auth.users (email) values (%s) returning id", (f"{uuid.uuid4()}@test.local",)
    ).fetchone()
    assert row is not None
    user_id: uuid.UUID = row["id"]
    return user_id


def insert_session(db: psycopg.Connection[DictRow], user_id: uuid.UUID, **columns: Any) -> Row:
    """Insert a coding_sessions row as superuser with any columns; returns it plus `tx_now`."""
    columns["user_id"] = user_id
    query = sql.SQL(
        "insert into coding_sessions ({}) values ({}) returning *, now() as tx_now"
    ).format(
        sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(", ").join([sql.Placeholder()] * len(columns)),
    )
    row = db.execute(query, list(columns.values())).fetchone()
    assert row is not None
    return dict(row)


def get_session(db: psycopg.Connection[DictRow], session_id: uuid.UUID) -> Row:
    """The coding_sessions row as it stands (superuser view)."""
    row = db.execute("select * from coding_sessions where id = %s", (session_id,)).fetchone()
    assert row is not None
    return dict(row)


def call(conn: psycopg.Connection[DictRow], function: str, *args: Any) -> list[Row]:
    """`select * from <function>(args...)`; returns every row."""
    query = sql.SQL("select * from {}({})").format(
        sql.Identifier(function), sql.SQL(", ").join([sql.Placeholder()] * len(args))
    )
    return [dict(row) for row in conn.execute(query, args).fetchall()]


def truncate_sandbox_tables(db: psycopg.Connection[DictRow]) -> None:
    """Empty every table the sandbox migrations own (for tests that look at a whole table)."""
    db.execute("set lock_timeout = '5s'")
    db.execute(
        "truncate coding_sessions, sandbox_commands, sandbox_events, listener_leases,"
        " sandbox_tombstones"
        " restart identity cascade"
    )


def svc(api: psycopg.Connection[DictRow], function: str, *args: Any) -> tuple[list[Row], datetime]:
    """Call a listener function as service_role; returns its rows and the transaction's now()."""
    with as_role(api, "service_role"):
        rows = call(api, function, *args)
        now = api.execute("select now() as now").fetchone()
    assert now is not None
    return rows, now["now"]


def svc_one(api: psycopg.Connection[DictRow], function: str, *args: Any) -> tuple[Row, datetime]:
    rows, now = svc(api, function, *args)
    assert len(rows) == 1, rows
    return rows[0], now


def in_threads(
    work: Callable[[psycopg.Connection[DictRow], int], Any], postgres: EmbeddedPostgres
) -> list[Any]:
    """Run work(conn, i) in THREADS threads, each on its own connection, released together."""
    barrier = threading.Barrier(THREADS, timeout=BARRIER_TIMEOUT_S)

    def run(i: int) -> Any:
        with api_connection(postgres) as conn:
            barrier.wait()
            return work(conn, i)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(run, range(THREADS)))
