"""pgoutput decoding of hand-built protocol messages (layout from the PostgreSQL docs, v1)."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta, timezone

import pytest

from listener.local import pgoutput, wal
from listener.local.pgoutput import PgoutputError, Toast

COMMIT_US = 830_000_000_123_456  # microseconds after 2000-01-01
COMMIT_TIME = datetime(2026, 4, 20, 11, 33, 20, 123456, tzinfo=UTC)


def s(text: str) -> bytes:
    return text.encode() + b"\x00"


def tup(*values: str | Toast | None) -> bytes:
    out = struct.pack("!h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is Toast.UNCHANGED:
            out += b"u"
        else:
            assert isinstance(value, str)
            raw = value.encode()
            out += b"t" + struct.pack("!i", len(raw)) + raw
    return out


def test_commit_time_constant_matches_pg_epoch() -> None:
    assert pgoutput.PG_EPOCH.timestamp() + COMMIT_US / 1e6 == COMMIT_TIME.timestamp()


def test_begin() -> None:
    msg = pgoutput.decode(b"B" + struct.pack("!QqI", 0x16B3748, COMMIT_US, 4242))
    assert msg == pgoutput.Begin(final_lsn=0x16B3748, commit_time=COMMIT_TIME, xid=4242)


def test_commit() -> None:
    msg = pgoutput.decode(b"C" + struct.pack("!bQQq", 0, 0x10, 0x20, COMMIT_US))
    assert msg == pgoutput.Commit(flags=0, commit_lsn=0x10, end_lsn=0x20, commit_time=COMMIT_TIME)


def test_origin() -> None:
    msg = pgoutput.decode(b"O" + struct.pack("!Q", 0x99) + s("pg_16390"))
    assert msg == pgoutput.Origin(commit_lsn=0x99, name="pg_16390")


def test_relation_with_key_flags_and_identity() -> None:
    body = struct.pack("!I", 16385) + s("public") + s("coding_sessions") + b"d"
    body += struct.pack("!h", 3)
    body += struct.pack("!b", 1) + s("id") + struct.pack("!Ii", 2950, -1)
    body += struct.pack("!b", 0) + s("status") + struct.pack("!Ii", 25, -1)
    body += struct.pack("!b", 0) + s("name") + struct.pack("!Ii", 1043, 36)
    msg = pgoutput.decode(b"R" + body)
    assert msg == pgoutput.Relation(
        relation_id=16385,
        namespace="public",
        name="coding_sessions",
        replica_identity="d",
        columns=(
            pgoutput.RelationColumn("id", 2950, -1, is_key=True),
            pgoutput.RelationColumn("status", 25, -1, is_key=False),
            pgoutput.RelationColumn("name", 1043, 36, is_key=False),
        ),
    )


def test_relation_in_pg_catalog_has_empty_namespace_on_the_wire() -> None:
    body = struct.pack("!I", 1) + s("") + s("t") + b"f" + struct.pack("!h", 0)
    msg = pgoutput.decode(b"R" + body)
    assert isinstance(msg, pgoutput.Relation)
    assert msg.namespace == "pg_catalog"
    assert msg.replica_identity == "f"
    assert msg.columns == ()


def test_type() -> None:
    msg = pgoutput.decode(b"Y" + struct.pack("!I", 16400) + s("public") + s("mood"))
    assert msg == pgoutput.Type(type_oid=16400, namespace="public", name="mood")


def test_insert_with_text_null_and_utf8() -> None:
    msg = pgoutput.decode(b"I" + struct.pack("!I", 7) + b"N" + tup("1", None, "héllo"))
    assert msg == pgoutput.Insert(relation_id=7, new=("1", None, "héllo"))


def test_empty_text_value_is_not_null() -> None:
    msg = pgoutput.decode(b"I" + struct.pack("!I", 7) + b"N" + tup(""))
    assert msg == pgoutput.Insert(relation_id=7, new=("",))


def test_update_without_old_tuple() -> None:
    msg = pgoutput.decode(b"U" + struct.pack("!I", 7) + b"N" + tup("1", Toast.UNCHANGED))
    assert msg == pgoutput.Update(7, old_kind=None, old=None, new=("1", Toast.UNCHANGED))


@pytest.mark.parametrize("kind", ["K", "O"])
def test_update_with_old_tuple(kind: str) -> None:
    body = struct.pack("!I", 7) + kind.encode() + tup("1", "a") + b"N" + tup("2", "b")
    msg = pgoutput.decode(b"U" + body)
    assert msg == pgoutput.Update(7, old_kind=kind, old=("1", "a"), new=("2", "b"))  # type: ignore[arg-type]  # K or O


@pytest.mark.parametrize("kind", ["K", "O"])
def test_delete(kind: str) -> None:
    msg = pgoutput.decode(b"D" + struct.pack("!I", 7) + kind.encode() + tup("1", None))
    assert msg == pgoutput.Delete(7, old_kind=kind, old=("1", None))  # type: ignore[arg-type]  # K or O


def test_truncate_options() -> None:
    msg = pgoutput.decode(b"T" + struct.pack("!ibII", 2, 3, 10, 11))
    assert msg == pgoutput.Truncate((10, 11), cascade=True, restart_identity=True)
    msg = pgoutput.decode(b"T" + struct.pack("!ibI", 1, 0, 10))
    assert msg == pgoutput.Truncate((10,), cascade=False, restart_identity=False)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        pytest.param(b"", "truncated", id="empty"),
        pytest.param(b"Z\x00", "unknown pgoutput message type 'Z'", id="unknown-tag"),
        pytest.param(b"B" + struct.pack("!Q", 1), "truncated", id="short-begin"),
        pytest.param(b"O" + struct.pack("!Q", 1) + b"abc", "unterminated string", id="no-nul"),
        pytest.param(
            b"I" + struct.pack("!I", 7) + b"X" + tup("1"), "expected new tuple marker", id="bad-new"
        ),
        pytest.param(
            b"D" + struct.pack("!I", 7) + b"N" + tup("1"), "expected old tuple marker", id="bad-old"
        ),
        pytest.param(
            b"U" + struct.pack("!I", 7) + b"K" + tup("1") + b"Q" + tup("1"),
            "expected new tuple marker",
            id="update-bad-new",
        ),
        pytest.param(
            b"I" + struct.pack("!I", 7) + b"N" + struct.pack("!h", 1) + b"b" + struct.pack("!i", 0),
            "unsupported tuple column kind 'b'",
            id="binary-column",
        ),
        pytest.param(
            b"I" + struct.pack("!I", 7) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", 9),
            "bad column length 9",
            id="overlong-column",
        ),
        pytest.param(
            b"C" + struct.pack("!bQQq", 0, 1, 2, 3) + b"x", "1 trailing bytes", id="trailing"
        ),
    ],
)
def test_malformed_messages_raise(data: bytes, error: str) -> None:
    with pytest.raises(PgoutputError, match=error):
        pgoutput.decode(data)


# -- from decoded messages to transactions (wal.ChangeAssembler, wal.Codec) -------------------

TEXT = wal.Codec(wal.Kind.TEXT)
INT = wal.Codec(wal.Kind.INT)
RELATION = pgoutput.Relation(
    7,
    "public",
    "items",
    "d",
    (
        pgoutput.RelationColumn("id", 23, -1, is_key=True),
        pgoutput.RelationColumn("label", 25, -1, is_key=False),
        pgoutput.RelationColumn("body", 25, -1, is_key=False),
    ),
)


def describe(relation: pgoutput.Relation, version: int) -> wal.Table:
    codecs = {23: ("int4", "integer", INT), 25: ("text", "text", TEXT)}
    columns = tuple(
        wal.Column(c.name, *codecs[c.type_oid], is_key=c.is_key) for c in relation.columns
    )
    return wal.Table(
        relation.relation_id, relation.namespace, relation.name, columns, ("id",), True, version
    )


def run(*messages: pgoutput.Message) -> wal.Transaction | None:
    assembler = wal.ChangeAssembler(describe)
    result = None
    for message in messages:
        result = assembler.feed(message)
    return result


BEGIN = pgoutput.Begin(1, COMMIT_TIME, 9)
COMMIT = pgoutput.Commit(0, 1, 2, COMMIT_TIME)


def test_insert_becomes_a_record_with_typed_values() -> None:
    txn = run(BEGIN, RELATION, pgoutput.Insert(7, ("1", "a", None)), COMMIT)
    assert txn is not None
    assert (txn.xid, txn.commit_timestamp) == (9, "2026-04-20T11:33:20.123Z")
    (change,) = txn.changes
    assert (change.type, change.record, change.old_record) == (
        "INSERT",
        {"id": 1, "label": "a", "body": None},
        None,
    )
    assert change.text == {"id": "1", "label": "a", "body": None}
    assert change.table.version == 1


def test_update_without_old_tuple_reports_the_key_of_the_new_row() -> None:
    txn = run(BEGIN, RELATION, pgoutput.Update(7, None, None, ("1", "b", Toast.UNCHANGED)), COMMIT)
    assert txn is not None
    (change,) = txn.changes
    assert change.record == {"id": 1, "label": "b"}  # unchanged TOAST is left out
    assert change.old_record == {"id": 1}


def test_update_with_key_tuple_keeps_only_key_columns() -> None:
    update = pgoutput.Update(7, "K", ("1", None, None), ("2", "b", "x"))
    txn = run(BEGIN, RELATION, update, COMMIT)
    assert txn is not None
    assert txn.changes[0].old_record == {"id": 1}
    assert txn.changes[0].record == {"id": 2, "label": "b", "body": "x"}


def test_update_with_full_old_row_fills_unchanged_toast() -> None:
    update = pgoutput.Update(7, "O", ("1", "a", "big"), ("1", "b", Toast.UNCHANGED))
    txn = run(BEGIN, RELATION, update, COMMIT)
    assert txn is not None
    assert txn.changes[0].record == {"id": 1, "label": "b", "body": "big"}
    assert txn.changes[0].old_record == {"id": 1, "label": "a", "body": "big"}


@pytest.mark.parametrize(
    ("kind", "old", "record", "text"),
    [
        pytest.param("K", ("1", None, None), {"id": 1}, {"id": "1"}, id="key"),
        pytest.param(
            "O",
            ("1", "a", None),
            {"id": 1, "label": "a", "body": None},
            {"id": "1", "label": "a", "body": None},
            id="full",
        ),
    ],
)
def test_delete_reports_the_old_tuple(
    kind: str, old: pgoutput.Tuple, record: dict[str, object], text: dict[str, str | None]
) -> None:
    txn = run(BEGIN, RELATION, pgoutput.Delete(7, kind, old), COMMIT)  # type: ignore[arg-type]  # K or O
    assert txn is not None
    (change,) = txn.changes
    assert (change.type, change.record, change.old_record, change.text) == (
        "DELETE",
        None,
        record,
        text,
    )


def test_several_changes_share_one_commit_and_truncate_origin_type_are_skipped() -> None:
    txn = run(
        BEGIN,
        pgoutput.Origin(1, "o"),
        pgoutput.Type(99, "public", "mood"),
        RELATION,
        pgoutput.Insert(7, ("1", "a", None)),
        pgoutput.Truncate((7,), cascade=False, restart_identity=False),
        pgoutput.Insert(7, ("2", "b", None)),
        COMMIT,
    )
    assert txn is not None
    assert [c.record["id"] for c in txn.changes if c.record] == [1, 2]


def test_a_new_relation_message_bumps_the_table_version() -> None:
    assembler = wal.ChangeAssembler(describe)
    for message in (BEGIN, RELATION, RELATION, pgoutput.Insert(7, ("1", "a", None))):
        assert assembler.feed(message) is None
    txn = assembler.feed(COMMIT)
    assert txn is not None
    assert txn.changes[0].table.version == 2


def test_restart_forgets_relations_but_keeps_counting_versions() -> None:
    assembler = wal.ChangeAssembler(describe)
    for message in (BEGIN, RELATION, pgoutput.Insert(7, ("1", "a", None))):
        assembler.feed(message)
    assembler.restart()
    assert assembler.tables == {}
    assert assembler.feed(COMMIT) == wal.Transaction(9, "2026-04-20T11:33:20.123Z", ())
    assembler.feed(RELATION)
    assert assembler.tables[7].version == 2


def test_commit_timestamp_truncates_to_milliseconds_in_utc() -> None:
    moment = datetime(2026, 3, 1, 12, 15, 30, 999999, tzinfo=timezone(timedelta(hours=2)))
    assert wal.format_commit_timestamp(moment) == "2026-03-01T10:15:30.999Z"


@pytest.mark.parametrize(
    ("codec", "text", "expected"),
    [
        (INT, "-42", -42),
        (wal.Codec(wal.Kind.FLOAT), "1.5", 1.5),
        (wal.Codec(wal.Kind.FLOAT), "NaN", "NaN"),
        (wal.Codec(wal.Kind.FLOAT), "-Infinity", "-Infinity"),
        (wal.Codec(wal.Kind.NUMERIC), "12.30", 12.3),
        (wal.Codec(wal.Kind.FLOAT), "3", 3),
        (wal.Codec(wal.Kind.FLOAT), "1e+100", 10**100),
        (wal.Codec(wal.Kind.FLOAT), "1.5e-07", 1.5e-07),
        (
            wal.Codec(wal.Kind.NUMERIC),
            "123456789012345678901234567890",
            123456789012345678901234567890,
        ),
        (wal.Codec(wal.Kind.BOOL), "t", True),
        (wal.Codec(wal.Kind.BOOL), "f", False),
        (wal.Codec(wal.Kind.JSON), '{"a": [1, null]}', {"a": [1, None]}),
        (wal.Codec(wal.Kind.TIMESTAMP), "2026-03-01 10:15:30.5", "2026-03-01T10:15:30.5"),
        (
            wal.Codec(wal.Kind.TIMESTAMPTZ),
            "2026-03-01 10:15:30.5+00",
            "2026-03-01T10:15:30.5+00:00",
        ),
        (wal.Codec(wal.Kind.TIMESTAMPTZ), "2026-03-01 10:15:30-05", "2026-03-01T10:15:30-05:00"),
        (wal.Codec(wal.Kind.TIMESTAMPTZ), "2026-03-01 10:15:30+05:30", "2026-03-01T10:15:30+05:30"),
        (wal.Codec(wal.Kind.TIMESTAMPTZ), "infinity", "infinity"),
        (TEXT, "a b", "a b"),
    ],
)
def test_codec_scalars(codec: wal.Codec, text: str, expected: object) -> None:
    assert codec.decode(text) == expected


@pytest.mark.parametrize(
    ("element", "text", "expected"),
    [
        (TEXT, "{}", []),
        (
            TEXT,
            '{a,"b c",NULL,"NULL","",x\\y,"q\\"u\\\\o"}',
            ["a", "b c", None, "NULL", "", "x\\y", 'q"u\\o'],
        ),
        (INT, "{{1,2},{3,NULL}}", [[1, 2], [3, None]]),
        (INT, "[0:1]={7,8}", [7, 8]),
        (wal.Codec(wal.Kind.JSON), '{"{\\"a\\": 1}",null}', [{"a": 1}, None]),
    ],
)
def test_codec_arrays(element: wal.Codec, text: str, expected: object) -> None:
    assert wal.Codec(wal.Kind.ARRAY, element).decode(text) == expected


def test_codec_array_with_other_delimiter() -> None:
    codec = wal.Codec(wal.Kind.ARRAY, TEXT, ";")
    assert codec.decode("{(1,1),(0,0);(2,2),(1,1)}") == ["(1,1),(0,0)", "(2,2),(1,1)"]


@pytest.mark.parametrize(
    ("base", "category", "element", "expected"),
    [
        ("int8", "N", None, wal.Codec(wal.Kind.INT)),
        ("citext", "S", None, wal.Codec(wal.Kind.TEXT)),
        ("_int4", "A", "int4", wal.Codec(wal.Kind.ARRAY, INT)),
        ("_box", "A", "box", wal.Codec(wal.Kind.ARRAY, TEXT, ";")),
    ],
)
def test_codec_for_type(base: str, category: str, element: str | None, expected: wal.Codec) -> None:
    delimiter = ";" if base == "_box" else ","
    assert wal.Codec.for_type(base, category, element, delimiter) == expected
