"""Realtime protocol decisions: tokens, bindings, filters, frames and change payloads."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from starlette.websockets import WebSocket

from listener.local import keys, realtime_gateway, wal
from listener.local.realtime_protocol import (
    ID_SPACE,
    Binding,
    Filter,
    FilterError,
    TokenError,
    binding_id,
    change_data,
    frame,
    parse_filter,
    reply,
    system,
    verify_token,
)

SECRET = "s" * 40
FORGED = "x" * 40

Mint = Callable[[float], str | None]


def test_verify_token_returns_claims() -> None:
    now = time.time()
    assert verify_token(SECRET, keys.api_key(SECRET, "anon", now=now), now)["role"] == "anon"


@pytest.mark.parametrize(
    ("mint", "code", "message"),
    [
        pytest.param(lambda now: None, "MissingApiKey", "API key is missing", id="missing"),
        pytest.param(lambda now: "", "MissingApiKey", "API key is missing", id="empty"),
        pytest.param(
            lambda now: "not-a-jwt",
            "MalformedJWT",
            "The token provided is not a valid JWT",
            id="malformed",
        ),
        pytest.param(
            lambda now: keys.api_key(FORGED, "anon", now=now),
            "JwtSignatureError",
            "Failed to validate JWT signature",
            id="forged",
        ),
        pytest.param(
            lambda now: keys.sign(SECRET, {"role": "anon", "exp": int(now) - 12}),
            "InvalidJWTToken",
            "Token has expired 12 seconds ago",
            id="expired",
        ),
        pytest.param(
            lambda now: keys.sign(SECRET, {"exp": int(now) + 60}),
            "InvalidJWTToken",
            "Fields `role` and `exp` are required in JWT",
            id="no-role",
        ),
        pytest.param(
            lambda now: keys.sign(SECRET, {"role": "anon"}),
            "InvalidJWTToken",
            "Fields `role` and `exp` are required in JWT",
            id="no-exp",
        ),
        pytest.param(
            lambda now: keys.sign(SECRET, {"role": "anon", "exp": now + 60, "nbf": now + 30}),
            "InvalidJWTToken",
            "The token is not yet valid (nbf)",
            id="not-yet-valid",
        ),
    ],
)
def test_verify_token_errors_carry_realtime_codes(mint: Mint, code: str, message: str) -> None:
    now = float(int(time.time()))
    with pytest.raises(TokenError) as info:
        verify_token(SECRET, mint(now), now)
    assert (info.value.code, info.value.message) == (code, message)
    assert str(info.value) == f"{code}: {message}"


def test_binding_ids_are_stable_non_zero_and_distinct() -> None:
    a = {"event": "*", "schema": "public", "table": "t"}
    assert binding_id(a) == binding_id(dict(reversed(a.items())))
    assert 1 <= binding_id(a) <= ID_SPACE
    assert binding_id(a) != binding_id({**a, "filter": "id=eq.1"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("status=eq.pending", Filter("status", "eq", "pending")),
        ("n=neq.1", Filter("n", "neq", "1")),
        ("n=lt.1", Filter("n", "lt", "1")),
        ("n=lte.1", Filter("n", "lte", "1")),
        ("n=gt.1.5", Filter("n", "gt", "1.5")),
        ("n=gte.1", Filter("n", "gte", "1")),
        ("at=gt.2026-01-01T00:00:00.000Z", Filter("at", "gt", "2026-01-01T00:00:00.000Z")),
        ("label=eq.a=b", Filter("label", "eq", "a=b")),
        ("status=in.(a,b,c)", Filter("status", "in", "{a,b,c}")),
        ('status=in.("a,b",c)', Filter("status", "in", '{"a,b",c}')),
    ],
)
def test_parse_filter(text: str, expected: Filter) -> None:
    assert parse_filter(text) == expected


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("wrong", '["wrong"]'),
        ("n=eq", '["n", "eq"]'),
        ("n=like.%a%", '["n", "like", "%a%"]'),
        ("n=in.a,b", '["n", "in", "a,b"]'),
        ("=eq.1", '["", "eq", "1"]'),
        ("t.col=eq.1", '["t", "col", "eq.1"]'),  # Realtime splits on the first `=` or `.`
    ],
)
def test_parse_filter_errors_quote_the_parts(text: str, parts: str) -> None:
    with pytest.raises(FilterError) as info:
        parse_filter(text)
    assert str(info.value) == f"Error parsing `filter` params: {parts}"


def test_binding_defaults_and_normalisation() -> None:
    b = Binding.parse({"event": "insert", "table": "*", "filter": "  "})
    assert (b.event, b.schema, b.table, b.filter, b.filter_error) == (
        "INSERT",
        "public",
        None,
        None,
        None,
    )
    assert Binding.parse({"event": "upsert", "schema": "app"}).event == "*"
    bad = Binding.parse({"event": "*", "table": "t", "filter": "wrong"})
    assert bad.filter is None
    assert bad.filter_error == 'Error parsing `filter` params: ["wrong"]'


def _table(schema: str = "public", name: str = "t", rls: bool = True) -> wal.Table:
    text = wal.Codec(wal.Kind.TEXT)
    columns = tuple(
        wal.Column(n, "text", "text", text, is_key=n == "id") for n in ("id", "owner", "secret")
    )
    return wal.Table(1, schema, name, columns, ("id",), rls, 1)


@pytest.mark.parametrize(
    ("raw", "schema", "table", "change", "expected"),
    [
        ({"event": "*", "schema": "public", "table": "t"}, "public", "t", "DELETE", True),
        ({"event": "INSERT", "schema": "public", "table": "t"}, "public", "t", "UPDATE", False),
        ({"event": "*", "schema": "public"}, "public", "other", "INSERT", True),
        ({"event": "*", "schema": "public"}, "app", "t", "INSERT", False),
        ({"event": "*", "schema": "*"}, "app", "t", "INSERT", True),
        ({"event": "*", "schema": "public", "table": "u"}, "public", "t", "INSERT", False),
    ],
)
def test_binding_matches_schema_table_and_event(
    raw: dict[str, str], schema: str, table: str, change: str, expected: bool
) -> None:
    assert Binding.parse(raw).matches(_table(schema, table), change) is expected


def test_binding_describe_and_reply_entry() -> None:
    raw = {"schema": "public", "event": "*", "table": "t", "filter": "n=in.(1,2)"}
    b = Binding.parse(raw)
    assert b.describe() == (
        '[event: *, schema: public, table: t, filters: [{"n", "in", "{1,2}", false}], select: nil]'
    )
    entry = b.reply_entry()
    assert list(entry) == ["id", "event", "filter", "schema", "table"]
    assert entry == {**raw, "id": b.id}
    assert Binding.parse({"event": "*", "select": ["id"]}).describe() == (
        '[event: *, schema: public, table: *, filters: [], select: ["id"]]'
    )


def test_frames_have_exactly_the_v1_keys() -> None:
    assert json.loads(frame("t", "e", {"a": 1})) == {
        "topic": "t",
        "event": "e",
        "payload": {"a": 1},
        "ref": None,
    }
    assert json.loads(reply("realtime:x", "3", "ok", {})) == {
        "topic": "realtime:x",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": "3",
    }
    assert json.loads(system("realtime:a:b", "postgres_changes", "ok", "m"))["payload"] == {
        "extension": "postgres_changes",
        "status": "ok",
        "message": "m",
        "channel": "a:b",
    }


def _change(change_type: wal.ChangeType, rls: bool = True) -> wal.RowChange:
    row = {"id": "1", "owner": "u", "secret": "s"}
    return wal.RowChange(
        _table(rls=rls),
        change_type,
        row if change_type != "DELETE" else None,
        row if change_type != "INSERT" else None,
        row,
    )


def test_change_data_insert_shape_and_hidden_columns() -> None:
    data = change_data(_change("INSERT"), "2026-01-01T00:00:00.000Z", frozenset({"id", "owner"}))
    assert data == {
        "type": "INSERT",
        "schema": "public",
        "table": "t",
        "commit_timestamp": "2026-01-01T00:00:00.000Z",
        "errors": None,
        "columns": [{"name": "id", "type": "text"}, {"name": "owner", "type": "text"}],
        "record": {"id": "1", "owner": "u"},
    }


def test_change_data_update_has_both_records() -> None:
    data = change_data(_change("UPDATE"), "ts", frozenset({"id", "owner", "secret"}))
    assert data["record"] == data["old_record"] == {"id": "1", "owner": "u", "secret": "s"}


@pytest.mark.parametrize(
    ("rls", "old"),
    [(True, {"id": "1"}), (False, {"id": "1", "owner": "u", "secret": "s"})],
)
def test_change_data_delete_under_rls_keeps_only_the_key(rls: bool, old: dict[str, str]) -> None:
    data = change_data(_change("DELETE", rls), "ts", frozenset({"id", "owner", "secret"}))
    assert "record" not in data
    assert data["old_record"] == old


def test_dropping_connections_needs_the_uvicorn_transport() -> None:
    async def receive() -> dict[str, str]:
        return {"type": "websocket.connect"}

    async def send(message: object) -> None:
        del message

    websocket = WebSocket({"type": "websocket", "path": "/"}, receive, send)
    with pytest.raises(RuntimeError, match="uvicorn"):
        realtime_gateway._abort(websocket)
