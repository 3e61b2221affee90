"""The logical replication stream: committed row changes of publication supabase_realtime."""

from __future__ import annotations

import enum
import json
import os
import select
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import psycopg
import psycopg2
import psycopg2.extras
import structlog

from listener.local import pgoutput

log = structlog.get_logger(component="wal")

PUBLICATION = "supabase_realtime"
FEEDBACK_INTERVAL_S = 5.0
RETRY_DELAY_S = 1.0
# What pgoutput's text values look like depends on these session settings of the walsender.
SESSION_OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO,MDY -c extra_float_digits=1"

ChangeType = Literal["INSERT", "UPDATE", "DELETE"]


# -- values: Postgres text output -> what to_jsonb() would give (realtime.cast) ------------------


class Kind(enum.Enum):
    """How a column's text value becomes JSON, by the base type's name or category."""

    TEXT = "text"
    INT = "int"
    FLOAT = "float"
    NUMERIC = "numeric"
    BOOL = "bool"
    JSON = "json"
    TIMESTAMP = "timestamp"
    TIMESTAMPTZ = "timestamptz"
    ARRAY = "array"


_KINDS = {
    "int2": Kind.INT,
    "int4": Kind.INT,
    "int8": Kind.INT,
    "float4": Kind.FLOAT,
    "float8": Kind.FLOAT,
    "numeric": Kind.NUMERIC,
    "bool": Kind.BOOL,
    "json": Kind.JSON,
    "jsonb": Kind.JSON,
    "timestamp": Kind.TIMESTAMP,
    "timestamptz": Kind.TIMESTAMPTZ,
}
_NON_FINITE = {"NaN", "Infinity", "-Infinity"}


@dataclass(frozen=True, slots=True)
class Codec:
    """Text -> JSON conversion for one type (arrays carry their element codec)."""

    kind: Kind
    element: Codec | None = None
    delimiter: str = ","

    @classmethod
    def for_type(
        cls, base_name: str, category: str, element_name: str | None, delimiter: str = ","
    ) -> Codec:
        """The codec of a (domain-resolved) type from its pg_type name and category."""
        if category == "A" and element_name is not None:
            return cls(Kind.ARRAY, cls.for_type(element_name, "", None), delimiter)
        return cls(_KINDS.get(base_name, Kind.TEXT))

    def decode(self, text: str) -> Any:
        """Convert one text value as to_jsonb() would render it."""
        match self.kind:
            case Kind.TEXT:
                return text
            case Kind.INT:
                return int(text)
            case Kind.FLOAT | Kind.NUMERIC:
                return _number(text)
            case Kind.BOOL:
                return text == "t"
            case Kind.JSON:
                return json.loads(text)
            case Kind.TIMESTAMP:
                return text.replace(" ", "T", 1)
            case Kind.TIMESTAMPTZ:
                return _iso_offset(text.replace(" ", "T", 1))
            case Kind.ARRAY:
                assert self.element is not None
                return _parse_array(text, self.element, self.delimiter)


def _number(text: str) -> int | float | str:
    """A number as jsonb keeps it: exact decimal, so integral values stay integers."""
    if text in _NON_FINITE:
        return text  # jsonb has no NaN or infinity; to_jsonb writes them as strings
    if "." not in text and "e" not in text:
        return int(text)
    value = Decimal(text)
    return int(value) if "e" in text and value == value.to_integral_value() else float(text)


def _iso_offset(text: str) -> str:
    """'...+00' -> '...+00:00' (to_jsonb writes the offset with minutes)."""
    sign = max(text.rfind("+"), text.rfind("-"))
    if sign > 10 and len(text) - sign == 3:  # past the date's dashes, an hour-only offset
        return text + ":00"
    return text


def _parse_array(text: str, element: Codec, delimiter: str) -> list[Any]:
    """Parse an array literal ('{a,"b c",NULL}', nested, optional '[1:2]=' bounds)."""
    if text.startswith("["):
        text = text[text.index("=") + 1 :]
    pos = 0

    def parse() -> list[Any]:
        nonlocal pos
        assert text[pos] == "{"
        pos += 1
        items: list[Any] = []
        if text[pos] == "}":
            pos += 1
            return items
        while True:
            if text[pos] == "{":
                items.append(parse())
            elif text[pos] == '"':
                pos += 1
                chars = []
                while text[pos] != '"':
                    if text[pos] == "\\":
                        pos += 1
                    chars.append(text[pos])
                    pos += 1
                pos += 1
                items.append(element.decode("".join(chars)))
            else:
                end = pos
                while text[end] not in (delimiter, "}"):
                    end += 1
                raw = text[pos:end].strip()
                pos = end
                items.append(None if raw == "NULL" else element.decode(raw))
            if text[pos] == "}":
                pos += 1
                return items
            pos += 1  # the delimiter

    return parse()


def format_commit_timestamp(moment: datetime) -> str:
    """UTC, millisecond precision: 'YYYY-MM-DDTHH:MM:SS.mmmZ' as Realtime sends it."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


# -- the changes as the gateway sees them -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_name: str  # pg_type.typname, what Realtime puts in `columns`
    sql_type: str  # format_type(), usable in a cast
    codec: Codec
    is_key: bool  # part of the replica identity


@dataclass(frozen=True, slots=True)
class Table:
    relation_id: int
    schema: str
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    rls_enabled: bool
    version: int  # bumped on every Relation message (schema, grants or policies changed)

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)


@dataclass(frozen=True, slots=True)
class RowChange:
    """One row change: JSON-native records plus the raw text values filters are judged on."""

    table: Table
    type: ChangeType
    record: dict[str, Any] | None  # INSERT/UPDATE: the new row (unchanged TOAST omitted)
    old_record: dict[str, Any] | None  # UPDATE/DELETE: identity or whole old row
    text: dict[str, str | None]  # the new row (INSERT/UPDATE) or the old one (DELETE)


@dataclass(frozen=True, slots=True)
class Transaction:
    xid: int
    commit_timestamp: str
    changes: tuple[RowChange, ...]


Describe = Callable[[pgoutput.Relation, int], Table]


def _texts(table: Table, values: pgoutput.Tuple, keys_only: bool) -> dict[str, str | None]:
    """Column name -> text value, skipping unchanged TOAST and (for key tuples) non-key columns."""
    return {
        col.name: value
        for col, value in zip(table.columns, values, strict=True)
        if value is not pgoutput.Toast.UNCHANGED and (col.is_key or not keys_only)
    }


def _record(table: Table, texts: dict[str, str | None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for col in table.columns:
        if col.name in texts:
            text = texts[col.name]
            out[col.name] = None if text is None else col.codec.decode(text)
    return out


@dataclass
class ChangeAssembler:
    """Turns a pgoutput message sequence into committed transactions (pure; `describe` injected)."""

    describe: Describe
    tables: dict[int, Table] = field(default_factory=dict)
    _pending: list[RowChange] = field(default_factory=list)
    _xid: int = 0
    _versions: int = 0

    def feed(self, message: pgoutput.Message) -> Transaction | None:
        """Consume one message; return the transaction when `message` is its Commit."""
        match message:
            case pgoutput.Begin():
                self._pending, self._xid = [], message.xid
            case pgoutput.Relation():
                self._versions += 1
                self.tables[message.relation_id] = self.describe(message, self._versions)
            case pgoutput.Insert():
                table = self.tables[message.relation_id]
                new = _texts(table, message.new, keys_only=False)
                self._pending.append(RowChange(table, "INSERT", _record(table, new), None, new))
            case pgoutput.Update():
                self._pending.append(self._update(message))
            case pgoutput.Delete():
                table = self.tables[message.relation_id]
                old = _texts(table, message.old, keys_only=message.old_kind == "K")
                self._pending.append(RowChange(table, "DELETE", None, _record(table, old), old))
            case pgoutput.Commit():
                changes, self._pending = tuple(self._pending), []
                return Transaction(self._xid, format_commit_timestamp(message.commit_time), changes)
            case pgoutput.Origin() | pgoutput.Type() | pgoutput.Truncate():
                pass  # Realtime's postgres_changes carries no truncates; types come via describe
        return None

    def restart(self) -> None:
        """Forget relations and any open transaction (a new stream resends both); versions go on."""
        self.tables.clear()
        self._pending = []

    def _update(self, message: pgoutput.Update) -> RowChange:
        table = self.tables[message.relation_id]
        new = _texts(table, message.new, keys_only=False)
        if message.old is None:  # the identity is the new row's key (as wal2json reports it)
            keys = {c.name for c in table.columns if c.is_key}
            old = {name: value for name, value in new.items() if name in keys}
        else:
            old = _texts(table, message.old, keys_only=message.old_kind == "K")
            if message.old_kind == "O":  # unchanged TOAST values are in the whole old row
                new = {**{k: v for k, v in old.items() if k not in new}, **new}
        return RowChange(table, "UPDATE", _record(table, new), _record(table, old), new)


# -- catalog lookups and the replication thread ------------------------------------------------

_TYPES_SQL = """
select t.oid::int8, t.typname, format_type(t.oid, null), b.typname, b.typcategory, e.typname,
       b.typdelim
from pg_type t
join pg_type b on b.oid = case when t.typtype = 'd' then t.typbasetype else t.oid end
left join pg_type e on e.oid = b.typelem and b.typcategory = 'A'
where t.oid = any(%s)
"""
_TABLE_SQL = """
select c.relrowsecurity,
       array(select a.attname::text from pg_index i
             join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
             where i.indrelid = c.oid and i.indisprimary
             order by array_position(i.indkey, a.attnum))
from pg_class c where c.oid = %s
"""


class Catalog:
    """Describes relations from pg_catalog over a plain connection (types cached by oid)."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._types: dict[int, tuple[str, str, Codec]] = {}

    def describe(self, relation: pgoutput.Relation, version: int) -> Table:
        conn = self._connection()
        missing = [c.type_oid for c in relation.columns if c.type_oid not in self._types]
        if missing:
            for oid, name, sql_type, base, category, element, delim in conn.execute(
                _TYPES_SQL, (missing,)
            ):
                self._types[oid] = (name, sql_type, Codec.for_type(base, category, element, delim))
        row = conn.execute(_TABLE_SQL, (relation.relation_id,)).fetchone()
        rls_enabled, primary_key = row if row is not None else (False, [])
        columns = tuple(
            Column(c.name, *self._types[c.type_oid], is_key=c.is_key) for c in relation.columns
        )
        return Table(
            relation.relation_id,
            relation.namespace,
            relation.name,
            columns,
            tuple(primary_key),
            bool(rls_enabled),
            version,
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._dsn, autocommit=True)
        return self._conn


class WalStream:
    """Streams committed transactions from a temporary pgoutput slot on a dedicated thread.

    `start()` returns once the slot exists, so every transaction committed afterwards is
    delivered to `on_transaction` (called on the stream's thread). If the replication
    connection breaks, the stream reconnects with a new slot; what was committed in between
    is lost, as with Supabase Realtime.
    """

    def __init__(self, dsn: str, on_transaction: Callable[[Transaction], None]) -> None:
        self._dsn = dsn
        self._on_transaction = on_transaction
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._cursor: Any = None  # psycopg2 ReplicationCursor, streaming
        self.slot_name = f"realtime_{uuid.uuid4().hex[:16]}"
        self.backend_pid: int | None = None

    def start(self) -> None:
        """Create the slot and start streaming (blocking; call from a worker thread)."""
        self._cursor = self._open()
        self._thread = threading.Thread(target=self._run, name="wal-stream", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close the connection (the temporary slot goes with it)."""
        self._stopping.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _open(self) -> Any:
        conn = psycopg2.connect(
            self._dsn,
            connection_factory=psycopg2.extras.LogicalReplicationConnection,
            options=SESSION_OPTIONS,
        )
        cur = conn.cursor()
        try:
            cur.execute(f"CREATE_REPLICATION_SLOT {self.slot_name} TEMPORARY LOGICAL pgoutput")
            cur.start_replication(
                slot_name=self.slot_name,
                decode=False,
                options={"proto_version": "1", "publication_names": PUBLICATION},
            )
        except BaseException:
            conn.close()
            raise
        self.backend_pid = conn.get_backend_pid()
        log.info("wal_stream_started", slot=self.slot_name)
        return cur

    def _close(self) -> None:
        if self._cursor is not None:
            self._cursor.connection.close()
            self._cursor = None

    def _run(self) -> None:
        catalog = Catalog(self._dsn)
        assembler = ChangeAssembler(catalog.describe)
        try:
            while not self._stopping.is_set():
                try:
                    if self._cursor is None:
                        self._cursor = self._open()
                        assembler.restart()
                    self._consume(self._cursor, assembler)
                except Exception:  # reconnect with a new slot, whatever broke
                    log.exception("wal_stream_failed")
                    self._close()
                    catalog.close()
                    self._stopping.wait(RETRY_DELAY_S)
        finally:
            catalog.close()

    def _consume(self, cur: Any, assembler: ChangeAssembler) -> None:
        while not self._stopping.is_set():
            msg = cur.read_message()
            if msg is None:
                ready, _, _ = select.select(
                    [cur.connection, self._wake_r], [], [], FEEDBACK_INTERVAL_S
                )
                if not ready:
                    cur.send_feedback()
                continue
            message = pgoutput.decode(msg.payload)
            transaction = assembler.feed(message)
            if transaction is not None:
                if transaction.changes:
                    self._on_transaction(transaction)
                assert isinstance(message, pgoutput.Commit)
                cur.send_feedback(flush_lsn=message.end_lsn)
