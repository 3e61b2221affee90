"""Realtime's questions to Postgres: may bindings subscribe, do filters pass, who sees what."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from listener.local.realtime_protocol import OPERATORS, Binding, Filter, change_data
from listener.local.wal import PUBLICATION, RowChange, Table, Transaction

log = structlog.get_logger(component="realtime")

MAX_IN_VALUES = 100
VISIBILITY_TIMEOUT_S = 1.0  # how long a decoded commit may take to become visible to others


@dataclass(frozen=True, slots=True)
class _Access:
    columns: frozenset[str]  # columns the role may SELECT
    bypass_rls: bool


_ACCESS_SQL = """
select r.rolbypassrls or r.rolsuper,
       array(select a.attname::text from pg_attribute a
             where a.attrelid = %(rel)s and a.attnum > 0 and not a.attisdropped
               and has_column_privilege(r.oid, a.attrelid, a.attnum, 'SELECT'))
from pg_roles r where r.rolname = %(role)s
"""
# Is the (32-bit) xid visible to a new snapshot? Its epoch is taken from the snapshot's xmax.
_VISIBLE_SQL = """
select pg_visible_in_snapshot(((pg_snapshot_xmax(s)::text::int8 >> 32 << 32) | %s)::text::xid8, s)
from pg_current_snapshot() s
"""
_CLAIMS_SQL = "select set_config('role', %s, true), set_config('request.jwt.claims', %s, true)"
_COLUMN_SQL = """
select format_type(a.atttypid, null), has_column_privilege(%(role)s, a.attrelid, a.attnum, 'SELECT')
from pg_attribute a
where a.attrelid = (quote_ident(%(schema)s) || '.' || quote_ident(%(table)s))::regclass
  and a.attname = %(column)s and a.attnum > 0 and not a.attisdropped
"""


class RealtimeDatabase:
    """Binding checks, typed filter verdicts and per-role views of a change, over a small pool.

    Runs as the superuser and switches to the subscriber's role and claims for RLS checks,
    as Realtime does; per-role column privileges are cached until the relation changes.
    """

    def __init__(self, dsn: str) -> None:
        self._pool = AsyncConnectionPool(
            dsn, min_size=2, max_size=4, open=False, kwargs={"autocommit": True}
        )
        self._access_cache: dict[tuple[int, str], tuple[int, _Access | None]] = {}
        self._visible_xid: int | None = None  # the last transaction known visible to others

    async def open(self) -> None:
        await self._pool.open(wait=True, timeout=10)

    async def close(self) -> None:
        await self._pool.close()

    async def check_bindings(self, bindings: list[Binding], role: str) -> str | None:
        """Why the bindings cannot be subscribed for `role` (Realtime's message), or None."""
        try:
            return await self._check_bindings(bindings, role)
        except psycopg.Error as exc:
            return f"Unable to subscribe to changes with given parameters: {_sql_error(exc)}"

    async def _check_bindings(self, bindings: list[Binding], role: str) -> str | None:
        async with self._pool.connection() as db:
            published = await (
                await db.execute(
                    "select schemaname::text, tablename::text from pg_publication_tables"
                    " where pubname = %s",
                    (PUBLICATION,),
                )
            ).fetchall()
            for binding in bindings:
                if binding.filter_error is not None:
                    return binding.filter_error
                tables = [
                    (s, t)
                    for s, t in published
                    if binding.schema in ("*", s) and binding.table in (None, t)
                ]
                if not tables:
                    return (
                        "Unable to subscribe to changes with given parameters. Please check"
                        " Realtime is enabled for the given connect parameters:"
                        f" {binding.describe()}"
                    )
                if binding.filter is not None:
                    problem = await _check_filter(db, role, tables, binding.filter)
                    if problem is not None:
                        return (
                            "Unable to subscribe to changes with given parameters. An exception "
                            "happened so please check your connect parameters: "
                            f"{binding.describe()}. Exception: {problem}"
                        )
        return None

    async def evaluate(self, change: RowChange, filters: Iterable[Filter]) -> dict[Filter, bool]:
        """Typed filter verdicts (values cast to the column type in Postgres); absent -> False."""
        verdicts: dict[Filter, bool] = {}
        exprs: list[sql.Composable] = []
        params: list[str] = []
        judged: list[Filter] = []
        for f in filters:
            column = change.table.column(f.column)
            value = change.text.get(f.column)
            if column is None or value is None:
                verdicts[f] = False
                continue
            typ = sql.SQL(column.sql_type)
            if f.op == "in":
                expr = sql.SQL("cast(%s::text as {t}) = any(cast(%s::text as {t}[]))").format(t=typ)
            else:
                expr = sql.SQL("cast(%s::text as {t}) {op} cast(%s::text as {t})").format(
                    t=typ, op=sql.SQL(OPERATORS[f.op])
                )
            exprs.append(sql.SQL("coalesce({}, false)").format(expr))
            params += [value, f.value]
            judged.append(f)
        if judged:
            query = sql.SQL("select {}").format(sql.SQL(", ").join(exprs))
            async with self._pool.connection() as db:
                row = await (await db.execute(query, params)).fetchone()
            assert row is not None
            verdicts.update(zip(judged, (bool(v) for v in row), strict=True))
        return verdicts

    async def view(
        self, change: RowChange, txn: Transaction, role: str, claims_json: str
    ) -> str | None:
        """The serialized `data` one role (with these claims) may see, or None if invisible."""
        table = change.table
        access = await self._access(table, role)
        if access is None or not table.primary_key:  # Realtime: Error 401 / Error 400, which
            return None  # realtime-py drops (commit_timestamp null), so nothing is sent
        if not set(table.primary_key) <= access.columns:
            return None
        needs_rls = table.rls_enabled and not access.bypass_rls and change.type != "DELETE"
        if needs_rls:
            await self._await_visible(txn.xid)
            if not await self._row_visible(change, role, claims_json):
                return None
        return json.dumps(change_data(change, txn.commit_timestamp, access.columns))

    async def _await_visible(self, xid: int) -> None:
        """Wait until other sessions see transaction `xid` (decoding can deliver it earlier)."""
        if xid == self._visible_xid:
            return
        deadline = time.monotonic() + VISIBILITY_TIMEOUT_S
        async with self._pool.connection() as db:
            while not (await (await db.execute(_VISIBLE_SQL, (xid,))).fetchone() or (False,))[0]:
                if time.monotonic() > deadline:
                    log.warning("realtime_commit_not_visible", xid=xid)
                    return
                await asyncio.sleep(0.001)
        self._visible_xid = xid

    async def _access(self, table: Table, role: str) -> _Access | None:
        """The role's selectable columns and RLS bypass, cached until the relation changes."""
        cached = self._access_cache.get((table.relation_id, role))
        if cached is not None and cached[0] == table.version:
            return cached[1]
        async with self._pool.connection() as db:
            row = await (
                await db.execute(_ACCESS_SQL, {"rel": table.relation_id, "role": role})
            ).fetchone()
        access = _Access(frozenset(row[1]), bool(row[0])) if row is not None else None
        self._access_cache[(table.relation_id, role)] = (table.version, access)
        return access

    async def _row_visible(self, change: RowChange, role: str, claims_json: str) -> bool:
        """Realtime's RLS check: as the subscriber, can the row be selected by its key?"""
        table = change.table
        values = [change.text.get(k) for k in table.primary_key]
        if any(v is None for v in values):
            return False
        matches: list[sql.Composable] = [
            sql.SQL("{} = cast(%s::text as {})").format(
                sql.Identifier(k),
                sql.SQL(table.column(k).sql_type),  # type: ignore[union-attr]  # pk columns exist
            )
            for k in table.primary_key
        ]
        condition = sql.SQL(" and ").join(matches)
        query = sql.SQL("select exists(select 1 from {}.{} where {})").format(
            sql.Identifier(table.schema), sql.Identifier(table.name), condition
        )
        try:
            async with self._pool.connection() as db, db.transaction():
                await db.execute(_CLAIMS_SQL, (role, claims_json))
                row = await (await db.execute(query, values)).fetchone()
        except psycopg.Error as exc:
            log.warning("realtime_rls_check_failed", table=table.name, role=role, error=str(exc))
            return False
        return bool(row and row[0])


async def _check_filter(
    db: psycopg.AsyncConnection[Any], role: str, tables: list[tuple[str, str]], f: Filter
) -> str | None:
    """Realtime's subscription_check_filters: a selectable column and a castable value."""
    for schema, table in tables:
        row = await (
            await db.execute(
                _COLUMN_SQL, {"role": role, "schema": schema, "table": table, "column": f.column}
            )
        ).fetchone()
        if row is None or not row[1]:
            return f"ERROR P0001 (raise_exception) invalid column for filter {f.column}"
        typ = sql.SQL(row[0] + ("[]" if f.op == "in" else ""))
        try:
            async with db.transaction():
                cast = await (
                    await db.execute(sql.SQL("select cast(%s::text as {})").format(typ), (f.value,))
                ).fetchone()
        except psycopg.Error as exc:
            return _sql_error(exc)
        if f.op == "in" and cast is not None and len(cast[0]) > MAX_IN_VALUES:
            return (
                f"ERROR P0001 (raise_exception) too many values for `in` filter ({MAX_IN_VALUES})"
            )
    return None


def _sql_error(exc: psycopg.Error) -> str:
    """Postgrex's rendering of a database error: `ERROR 22P02 (invalid_text_representation) ...`."""
    condition = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
    message = exc.diag.message_primary or str(exc)
    return f"ERROR {exc.sqlstate} ({condition}) {message}"
