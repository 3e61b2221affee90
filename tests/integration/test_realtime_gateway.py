"""The Realtime gateway against the unmodified supabase/realtime clients, over real sockets."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
import websockets
from psycopg import sql
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from supabase import AsyncClient, acreate_client

from listener.local import keys
from listener.local.postgres import EmbeddedPostgres
from listener.local.realtime_gateway import RealtimeGateway
from listener.local.stack import StackThread, create_user
from listener.local.wal import SESSION_OPTIONS, Codec
from listener.server import AsgiServer, bind_socket

WAIT_S = 5.0
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# Test writers commit synchronously so the walsender sees each commit at once (the local
# stack's Postgres runs with synchronous_commit=off, which delays decoding by up to ~200 ms).
WRITER_OPTIONS = "-c synchronous_commit=on -c TimeZone=UTC"


# -- fixtures and helpers ----------------------------------------------------------------------


def gateway(stack: StackThread) -> RealtimeGateway:
    assert stack.stack.realtime is not None
    return stack.stack.realtime


def ws_url(stack: StackThread, apikey: str | None) -> str:
    base = stack.info.supabase_url.replace("http://", "ws://") + "/realtime/v1/websocket"
    return base + (f"?apikey={apikey}&vsn=1.0.0" if apikey is not None else "?vsn=1.0.0")


@pytest.fixture
def table(stack: StackThread) -> Iterator[str]:
    """A fresh published table with RLS (owner reads own rows) and a column users cannot read."""
    name = f"rt_{uuid.uuid4().hex[:10]}"
    ident = sql.Identifier(name)
    with psycopg.connect(stack.info.db_url, autocommit=True) as db:
        for statement in (
            """create table {t} (
                id uuid primary key default gen_random_uuid(),
                user_id uuid not null,
                label text,
                n int,
                big bigint,
                ok bool,
                meta jsonb,
                tags text[],
                at timestamptz not null default now(),
                secret text)""",
            "alter table {t} enable row level security",
            "create policy own on {t} for select to authenticated using (user_id = auth.uid())",
            "revoke all on {t} from anon, authenticated",
            "grant select (id, user_id, label, n, big, ok, meta, tags, at) on {t} to authenticated",
            "grant all on {t} to service_role",
            "alter publication supabase_realtime add table {t}",
        ):
            db.execute(sql.SQL(statement).format(t=ident))
    yield name
    with psycopg.connect(stack.info.db_url, autocommit=True) as db:
        db.execute(sql.SQL("drop table {t}").format(t=ident))


@pytest.fixture
async def db(stack: StackThread) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    conn = await psycopg.AsyncConnection.connect(
        stack.info.db_url, autocommit=True, options=WRITER_OPTIONS
    )
    yield conn
    await conn.close()


async def insert(db: psycopg.AsyncConnection[Any], table: str, **values: Any) -> str:
    """Insert a row as superuser; return its id."""
    values = {"user_id": str(uuid.uuid4()), **values}
    query = sql.SQL("insert into {} ({}) values ({}) returning id::text").format(
        sql.Identifier(table),
        sql.SQL(", ").join(map(sql.Identifier, values)),
        sql.SQL(", ").join(sql.Placeholder() * len(values)),
    )
    row = await (await db.execute(query, [_adapt(v) for v in values.values()])).fetchone()
    assert row is not None
    return str(row[0])


def _adapt(value: Any) -> Any:
    return psycopg.types.json.Jsonb(value) if isinstance(value, dict) else value


class Feed:
    """Everything one channel reports, as queues (callbacks only put_nowait)."""

    def __init__(self) -> None:
        self.changes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.system: asyncio.Queue[Any] = asyncio.Queue()
        self.states: asyncio.Queue[tuple[RealtimeSubscribeStates, str | None]] = asyncio.Queue()

    def on_change(self, payload: dict[str, Any]) -> None:
        self.changes.put_nowait(payload)

    def on_state(self, state: RealtimeSubscribeStates, error: Exception | None) -> None:
        self.states.put_nowait((state, str(error) if error else None))

    async def change(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.changes.get(), WAIT_S)

    async def state(self) -> tuple[RealtimeSubscribeStates, str | None]:
        return await asyncio.wait_for(self.states.get(), WAIT_S)

    async def ready(self) -> None:
        """SUBSCRIBED, then the 'Subscribed to PostgreSQL' system message."""
        assert await self.state() == (RealtimeSubscribeStates.SUBSCRIBED, None)
        status = await asyncio.wait_for(self.system.get(), WAIT_S)
        assert (status.extension, status.status, status.message) == (
            "postgres_changes",
            "ok",
            "Subscribed to PostgreSQL",
        )


async def subscribe(
    client: AsyncClient | AsyncRealtimeClient,
    name: str,
    bindings: list[dict[str, Any]],
    wait: bool = True,
) -> Feed:
    """One channel with the given bindings, every binding feeding the same queue."""
    feed = Feed()
    channel = client.channel(name)
    for binding in bindings:
        channel.on_postgres_changes(callback=feed.on_change, **binding)
    channel.on_system(feed.system.put_nowait)
    await channel.subscribe(feed.on_state)
    if wait:
        await feed.ready()
    return feed


@pytest.fixture
async def clients(stack: StackThread) -> AsyncIterator[Callable[..., Awaitable[AsyncClient]]]:
    """Factory of supabase clients (service role, or a user's token); all closed at the end."""
    made: list[AsyncClient] = []

    async def make(user_id: uuid.UUID | None = None) -> AsyncClient:
        info = stack.info
        client = await acreate_client(
            info.supabase_url, info.anon_key if user_id else info.service_role_key
        )
        if user_id:
            await client.realtime.set_auth(keys.user_token(info.jwt_secret, user_id))
        made.append(client)
        return client

    yield make
    for client in made:
        await client.realtime.close()


async def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# -- payloads ----------------------------------------------------------------------------------


async def test_insert_update_delete_payloads(
    stack: StackThread, table: str, db: Any, clients: Any
) -> None:
    service = await clients()
    feed = await subscribe(service, "shapes", [{"event": "*", "table": table}])
    columns = [
        {"name": "id", "type": "uuid"},
        {"name": "user_id", "type": "uuid"},
        {"name": "label", "type": "text"},
        {"name": "n", "type": "int4"},
        {"name": "big", "type": "int8"},
        {"name": "ok", "type": "bool"},
        {"name": "meta", "type": "jsonb"},
        {"name": "tags", "type": "_text"},
        {"name": "at", "type": "timestamptz"},
        {"name": "secret", "type": "text"},
    ]
    owner = str(uuid.uuid4())
    row_id = await insert(
        db,
        table,
        user_id=owner,
        label='quote " and ü',
        n=7,
        big=2**40,
        ok=True,
        meta={"a": [1, None], "b": {"c": "d"}},
        tags=["x", "y z", None],
        secret="s",
    )
    at = await (
        await db.execute(
            sql.SQL("select to_jsonb(at) #>> '{{}}' from {} where id = %s").format(
                sql.Identifier(table)
            ),
            (row_id,),
        )
    ).fetchone()

    payload = await feed.change()
    data = payload["data"]
    assert set(data) == {
        "schema",
        "table",
        "commit_timestamp",
        "type",
        "errors",
        "columns",
        "record",
    }
    assert (data["schema"], data["table"], data["type"], data["errors"]) == (
        "public",
        table,
        "INSERT",
        None,
    )
    assert TIMESTAMP.match(data["commit_timestamp"])
    assert data["columns"] == columns
    assert data["record"] == {
        "id": row_id,
        "user_id": owner,
        "label": 'quote " and ü',
        "n": 7,
        "big": 2**40,
        "ok": True,
        "meta": {"a": [1, None], "b": {"c": "d"}},
        "tags": ["x", "y z", None],
        "at": at[0],
        "secret": "s",
    }
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00$", data["record"]["at"])
    assert len(payload["ids"]) == 1

    await db.execute(
        sql.SQL("update {} set n = 8, ok = false, tags = '{{}}' where id = %s").format(
            sql.Identifier(table)
        ),
        (row_id,),
    )
    data = (await feed.change())["data"]
    assert set(data) == {
        "schema",
        "table",
        "commit_timestamp",
        "type",
        "errors",
        "columns",
        "record",
        "old_record",
    }
    assert data["type"] == "UPDATE"
    assert (data["record"]["n"], data["record"]["ok"], data["record"]["tags"]) == (8, False, [])
    assert data["old_record"] == {"id": row_id}  # REPLICA IDENTITY DEFAULT: the key

    await db.execute(
        sql.SQL("delete from {} where id = %s").format(sql.Identifier(table)), (row_id,)
    )
    data = (await feed.change())["data"]
    assert set(data) == {
        "schema",
        "table",
        "commit_timestamp",
        "type",
        "errors",
        "columns",
        "old_record",
    }
    assert data["type"] == "DELETE"
    assert data["old_record"] == {"id": row_id}
    assert data["columns"] == columns


async def test_replica_identity_full_sends_the_whole_old_row(
    stack: StackThread, table: str, db: Any, clients: Any
) -> None:
    await db.execute(sql.SQL("alter table {} replica identity full").format(sql.Identifier(table)))
    service = await clients()
    feed = await subscribe(service, "full", [{"event": "UPDATE", "table": table}])
    row_id = await insert(db, table, label="before", n=1)
    await db.execute(
        sql.SQL("update {} set label = 'after' where id = %s").format(sql.Identifier(table)),
        (row_id,),
    )
    data = (await feed.change())["data"]
    assert data["old_record"]["label"] == "before"
    assert data["record"]["label"] == "after"
    assert data["old_record"]["n"] == data["record"]["n"] == 1


# -- security ------------------------------------------------------------------------------------


async def test_users_see_only_their_rows_and_service_role_sees_all(
    stack: StackThread, table: str, db: Any, clients: Any
) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    binding = [{"event": "*", "table": table}]
    alice_feed = await subscribe(await clients(alice), "mine", binding)
    bob_feed = await subscribe(await clients(bob), "mine", binding)
    service_feed = await subscribe(await clients(), "all", binding)

    alice_row = await insert(db, table, user_id=str(alice), label="a", secret="hidden")
    bob_row = await insert(db, table, user_id=str(bob), label="b", secret="hidden")

    # Each socket is an ordered stream: bob's first event being his own row proves that
    # alice's earlier row never reached him.
    alice_data = (await alice_feed.change())["data"]
    assert alice_data["record"]["id"] == alice_row
    assert "secret" not in alice_data["record"]  # authenticated may not select it
    assert "secret" not in [c["name"] for c in alice_data["columns"]]
    assert (await bob_feed.change())["data"]["record"]["id"] == bob_row
    service_records = [(await service_feed.change())["data"]["record"] for _ in range(2)]
    assert [r["id"] for r in service_records] == [alice_row, bob_row]
    assert service_records[0]["secret"] == "hidden"

    # DELETE skips RLS (as Realtime does): everyone subscribed hears it, with the key only.
    await db.execute(
        sql.SQL("delete from {} where id = %s").format(sql.Identifier(table)), (alice_row,)
    )
    for feed in (alice_feed, bob_feed, service_feed):
        data = (await feed.change())["data"]
        assert (data["type"], data["old_record"]) == ("DELETE", {"id": alice_row})


async def test_update_that_hides_a_row_is_not_sent_to_its_former_owner(
    stack: StackThread, table: str, db: Any, clients: Any
) -> None:
    alice = uuid.uuid4()
    feed = await subscribe(await clients(alice), "moves", [{"event": "*", "table": table}])
    row_id = await insert(db, table, user_id=str(alice), label="mine")
    assert (await feed.change())["data"]["type"] == "INSERT"
    await db.execute(
        sql.SQL("update {} set user_id = %s where id = %s").format(sql.Identifier(table)),
        (str(uuid.uuid4()), row_id),
    )
    sentinel = await insert(db, table, user_id=str(alice), label="next")
    assert (await feed.change())["data"]["record"]["id"] == sentinel


async def test_user_on_the_coding_sessions_table(stack: StackThread, db: Any, clients: Any) -> None:
    user = create_user(stack.info.db_url, f"rt-{uuid.uuid4().hex[:8]}@example.com")
    try:
        feed = await subscribe(
            await clients(user), "sessions", [{"event": "*", "table": "coding_sessions"}]
        )
        row = await (
            await db.execute(
                "insert into public.coding_sessions (user_id) values (%s) returning id::text",
                (user,),
            )
        ).fetchone()
        assert row is not None
        data = (await feed.change())["data"]
        assert (data["type"], data["record"]["id"], data["record"]["user_id"]) == (
            "INSERT",
            row[0],
            str(user),
        )
        assert data["record"]["status"] == "active"
        await db.execute(
            "update public.coding_sessions set status = 'ended' where id = %s", (row[0],)
        )
        data = (await feed.change())["data"]
        assert (data["type"], data["record"]["status"], data["old_record"]) == (
            "UPDATE",
            "ended",
            {"id": row[0]},
        )
        await db.execute("delete from auth.users where id = %s", (user,))  # cascades
        data = (await feed.change())["data"]
        assert (data["type"], data["old_record"]) == ("DELETE", {"id": row[0]})
    finally:  # the database is shared by the whole test session
        await db.execute("delete from auth.users where id = %s", (user,))


# -- filters -------------------------------------------------------------------------------------


async def test_filters_compare_typed_values_and_ids_list_every_match(
    stack: StackThread, table: str, db: Any, clients: Any
) -> None:
    service = await clients()
    filters = {
        "eq": "n=eq.9",
        "neq": "n=neq.9",
        "lt": "n=lt.10",  # typed: as text, '9' < '10' would be false
        "lte": "n=lte.9",
        "gt": "n=gt.9",
        "gte": "n=gte.10",
        "in": "n=in.(1,9,100)",
        "text": "label=eq.two words",
        "in_text": 'label=in.("a,b",c)',
        "time": "at=gt.2000-01-01T00:00:00Z",
    }
    feeds = {name: Feed() for name in filters}
    channel = service.channel("filters")
    for name, text in filters.items():
        channel.on_postgres_changes("INSERT", feeds[name].on_change, table=table, filter=text)
    status = Feed()
    channel.on_system(status.system.put_nowait)
    await channel.subscribe(status.on_state)
    await status.ready()

    rows = [
        ({"n": 9, "label": "two words"}, {"eq", "lt", "lte", "in", "text", "time"}),
        ({"n": 10, "label": "a,b"}, {"neq", "gt", "gte", "in_text", "time"}),
        ({"n": 100, "label": "c"}, {"neq", "gt", "gte", "in", "in_text", "time"}),
    ]
    for values, _ in rows:
        await insert(db, table, **values)
    for values, expected in rows:
        for name, feed in feeds.items():
            if name in expected:
                data = (await feed.change())["data"]
                assert data["record"]["n"] == values["n"], name
    # All three rows' frames have been handled, so no binding got a row it should not have.
    assert all(feed.changes.empty() for feed in feeds.values())


async def test_one_frame_carries_all_matching_ids(
    stack: StackThread, table: str, db: Any, clients: Any
) -> None:
    service = await clients()
    frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    channel = service.channel("ids")
    channel.on_postgres_changes("*", frames.put_nowait, table=table)
    channel.on_postgres_changes("INSERT", lambda p: None, table=table, filter="n=eq.1")
    channel.on_postgres_changes("INSERT", lambda p: None, table=table, filter="n=eq.2")
    status = Feed()
    channel.on_system(status.system.put_nowait)
    await channel.subscribe(status.on_state)
    await status.ready()
    await insert(db, table, n=1)
    payload = await asyncio.wait_for(frames.get(), WAIT_S)
    callbacks = channel.postgres_changes_callbacks
    assert payload["ids"] == [callbacks[0].id, callbacks[1].id]


async def test_delete_filter_on_a_non_key_column_fails_closed(
    stack: StackThread, table: str, db: Any, clients: Any
) -> None:
    service = await clients()
    first = await insert(db, table, n=5)
    second = await insert(db, table, n=5)
    feed = await subscribe(
        service,
        "deletes",
        [
            {"event": "DELETE", "table": table, "filter": "n=eq.5"},
            {"event": "DELETE", "table": table, "filter": f"id=eq.{second}"},
        ],
    )
    for row_id in (first, second):
        await db.execute(
            sql.SQL("delete from {} where id = %s").format(sql.Identifier(table)), (row_id,)
        )
    # The old row holds only the key, so `n=eq.5` cannot be judged and the first delete is dropped.
    assert (await feed.change())["data"]["old_record"] == {"id": second}


@pytest.mark.parametrize(
    ("binding", "message"),
    [
        pytest.param(
            {"filter": "wrong"}, 'Error parsing `filter` params: ["wrong"]', id="unparsable"
        ),
        pytest.param(
            {"filter": "n=like.1"},
            'Error parsing `filter` params: ["n", "like", "1"]',
            id="operator",
        ),
        pytest.param(
            {"filter": "nope=eq.1"},
            "Unable to subscribe to changes with given parameters. An exception happened so "
            "please check your connect parameters: [event: *, schema: public, table: {table}, "
            'filters: [{{"nope", "eq", "1", false}}], select: nil]. Exception: ERROR P0001 '
            "(raise_exception) invalid column for filter nope",
            id="unknown-column",
        ),
        pytest.param(
            {"filter": "n=eq.abc"},
            "Unable to subscribe to changes with given parameters. An exception happened so "
            "please check your connect parameters: [event: *, schema: public, table: {table}, "
            'filters: [{{"n", "eq", "abc", false}}], select: nil]. Exception: ERROR 22P02 '
            '(invalid_text_representation) invalid input syntax for type integer: "abc"',
            id="bad-value",
        ),
        pytest.param(
            {"table": "rt_not_published"},
            "Unable to subscribe to changes with given parameters. Please check Realtime is "
            "enabled for the given connect parameters: [event: *, schema: public, "
            "table: rt_not_published, filters: [], select: nil]",
            id="not-published",
        ),
    ],
)
async def test_bad_bindings_report_a_system_error_and_the_socket_keeps_working(
    stack: StackThread, table: str, db: Any, clients: Any, binding: dict[str, str], message: str
) -> None:
    service = await clients()
    good = await subscribe(service, "good", [{"event": "*", "table": table}])
    bad = await subscribe(service, "bad", [{"event": "*", "table": table, **binding}], wait=False)
    assert await bad.state() == (RealtimeSubscribeStates.SUBSCRIBED, None)
    state, error = await bad.state()
    assert state == RealtimeSubscribeStates.CHANNEL_ERROR
    assert error is not None
    assert json.loads(error) == {
        "channel": "bad",
        "extension": "postgres_changes",
        "status": "error",
        "message": message.format(table=table),
    }
    row_id = await insert(db, table, n=1)
    assert (await good.change())["data"]["record"]["id"] == row_id


async def test_an_invisible_column_cannot_be_filtered_by_a_user(
    stack: StackThread, table: str, clients: Any
) -> None:
    user = await clients(uuid.uuid4())
    feed = await subscribe(
        user, "f", [{"event": "*", "table": table, "filter": "secret=eq.x"}], wait=False
    )
    assert (await feed.state())[0] == RealtimeSubscribeStates.SUBSCRIBED
    state, error = await feed.state()
    assert state == RealtimeSubscribeStates.CHANNEL_ERROR
    assert error is not None and "invalid column for filter secret" in error


async def test_a_role_that_does_not_exist_cannot_subscribe_with_a_filter(
    stack: StackThread, raw: Raw, table: str
) -> None:
    token = keys.sign(stack.info.jwt_secret, {"role": "nobody", "exp": int(time.time()) + 60})
    binding = {"event": "*", "schema": "public", "table": table, "filter": "n=eq.1"}
    await raw.send("realtime:who", "phx_join", join_payload([binding], token), "1", "1")
    assert (await raw.recv())["payload"]["status"] == "ok"
    system = (await raw.recv())["payload"]
    assert (system["extension"], system["status"]) == ("postgres_changes", "error")
    assert system["message"] == (
        "Unable to subscribe to changes with given parameters: "
        'ERROR 42704 (undefined_object) role "nobody" does not exist'
    )


async def test_a_failing_rls_policy_hides_the_row(
    stack: StackThread, table: str, db: Any, clients: Any
) -> None:
    alice = uuid.uuid4()
    feed = await subscribe(await clients(alice), "boom", [{"event": "INSERT", "table": table}])
    ident = sql.Identifier(table)
    await db.execute(sql.SQL("alter policy own on {} using ((1 / 0) = 1)").format(ident))
    seen = gateway(stack).changes_seen
    await insert(db, table, user_id=str(alice), label="hidden by an error")
    # Realtime checks RLS when it handles the change, so keep the policy until then.
    await eventually(lambda: gateway(stack).changes_seen > seen, "the change to be handled")
    await db.execute(sql.SQL("alter policy own on {} using (user_id = auth.uid())").format(ident))
    sentinel = await insert(db, table, user_id=str(alice), label="visible")
    assert (await feed.change())["data"]["record"]["id"] == sentinel


# -- protocol, over a raw websocket ---------------------------------------------------------------


class Raw:
    """A bare Phoenix V1 client: send frames, read frames."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws

    async def send(
        self, topic: str, event: str, payload: Any, ref: Any, join_ref: Any = None
    ) -> None:
        await self.ws.send(
            json.dumps(
                {
                    "event": event,
                    "payload": payload,
                    "topic": topic,
                    "ref": ref,
                    "join_ref": join_ref,
                }
            )
        )

    async def recv(self) -> dict[str, Any]:
        message = json.loads(await asyncio.wait_for(self.ws.recv(), WAIT_S))
        assert set(message) == {"topic", "event", "payload", "ref"}
        return message


@pytest.fixture
async def raw(stack: StackThread) -> AsyncIterator[Raw]:
    async with websockets.connect(ws_url(stack, stack.info.service_role_key)) as ws:
        yield Raw(ws)


def join_payload(bindings: list[dict[str, Any]], token: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "config": {
            "broadcast": {"ack": False, "self": False},
            "presence": {"key": "", "enabled": False},
            "private": False,
            "postgres_changes": bindings,
        }
    }
    if token is not None:
        payload["access_token"] = token
    return payload


async def test_heartbeat_is_answered_with_its_ref(raw: Raw) -> None:
    for ref in (None, "7"):
        await raw.send("phoenix", "heartbeat", {}, ref)
        assert await raw.recv() == {
            "topic": "phoenix",
            "event": "phx_reply",
            "payload": {"status": "ok", "response": {}},
            "ref": ref,
        }


async def test_malformed_frames_are_ignored(raw: Raw, table: str) -> None:
    await raw.send(
        "realtime:ok",
        "phx_join",
        join_payload([{"event": "*", "schema": "public", "table": table}]),
        "1",
        "1",
    )
    assert (await raw.recv())["event"] == "phx_reply"
    assert (await raw.recv())["event"] == "system"
    for junk in (
        "not json",
        "[]",
        '{"topic": "phoenix"}',
        '{"topic": 1, "event": "x", "payload": {}, "ref": null}',
        json.dumps(
            {
                "topic": "realtime:ok",
                "event": "phx_join",
                "payload": {"config": {"broadcast": "yes"}},
                "ref": "2",
            }
        ),
    ):
        await raw.ws.send(junk)
    await raw.ws.send(b"\x00binary")
    await raw.send("phoenix", "heartbeat", {}, "3")
    refused = await raw.recv()  # the join with a bad config is refused, not fatal
    assert (refused["ref"], refused["payload"]["status"]) == ("2", "error")
    assert refused["payload"]["response"]["reason"].startswith("InvalidJoinPayload")
    assert (await raw.recv())["ref"] == "3"


async def test_pushes_on_unknown_topics(raw: Raw) -> None:
    await raw.send("realtime:never", "broadcast", {}, "1")
    assert await raw.recv() == {
        "topic": "realtime:never",
        "event": "phx_reply",
        "payload": {"status": "error", "response": {"reason": "unmatched topic"}},
        "ref": "1",
    }
    await raw.send("elsewhere", "phx_join", {}, "2")
    assert (await raw.recv())["payload"]["response"] == {"reason": "unmatched topic"}
    await raw.send("realtime:never", "phx_leave", {}, "3")  # Phoenix answers ok
    assert (await raw.recv())["payload"] == {"status": "ok", "response": {}}


@pytest.mark.parametrize(
    ("topic", "token", "reason"),
    [
        pytest.param(
            "realtime:", None, "TopicNameRequired: You must provide a topic name", id="no-name"
        ),
        pytest.param(
            "realtime:x",
            "garbage",
            "MalformedJWT: The token provided is not a valid JWT",
            id="malformed",
        ),
        pytest.param(
            "realtime:x",
            "forged",
            "JwtSignatureError: Failed to validate JWT signature",
            id="forged",
        ),
        pytest.param("realtime:x", "expired", "InvalidJWTToken: Token has expired", id="expired"),
    ],
)
async def test_join_errors(
    stack: StackThread, raw: Raw, topic: str, token: str | None, reason: str
) -> None:
    secret = stack.info.jwt_secret
    tokens = {
        "forged": keys.api_key("f" * 48, "anon"),
        "expired": keys.sign(secret, {"role": "anon", "exp": int(time.time()) - 30}),
    }
    await raw.send(topic, "phx_join", join_payload([], tokens.get(token or "", token)), "1", "1")
    message = await raw.recv()
    assert message["event"] == "phx_reply"
    assert message["payload"]["status"] == "error"
    assert message["payload"]["response"]["reason"].startswith(reason)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ("yes", "InvalidJoinPayload: config must be an object"),
        (
            {"postgres_changes": {"event": "*"}},
            "InvalidJoinPayload: config.postgres_changes must be a list of objects",
        ),
        (
            {"postgres_changes": ["*"]},
            "InvalidJoinPayload: config.postgres_changes must be a list of objects",
        ),
        ({"broadcast": "yes"}, "InvalidJoinPayload: config.broadcast must be an object"),
    ],
)
async def test_join_with_a_malformed_config_is_refused(raw: Raw, config: Any, reason: str) -> None:
    await raw.send("realtime:bad", "phx_join", {"config": config}, "1", "1")
    assert (await raw.recv())["payload"] == {"status": "error", "response": {"reason": reason}}


async def test_join_reply_echoes_bindings_with_stable_ids(raw: Raw, table: str) -> None:
    bindings = [
        {"event": "*", "schema": "public", "table": table},
        {"event": "INSERT", "schema": "public", "table": table, "filter": "n=eq.1"},
        {"event": "*", "schema": "public", "table": table},
    ]
    await raw.send("realtime:echo", "phx_join", join_payload(bindings), "1", "1")
    message = await raw.recv()
    entries = message["payload"]["response"]["postgres_changes"]
    assert [{k: v for k, v in e.items() if k != "id"} for e in entries] == bindings
    ids = [e["id"] for e in entries]
    assert ids[0] == ids[2] != ids[1]
    assert all(isinstance(i, int) and 0 < i < 2**27 for i in ids)
    system = await raw.recv()
    assert system == {
        "topic": "realtime:echo",
        "event": "system",
        "payload": {
            "extension": "postgres_changes",
            "status": "ok",
            "message": "Subscribed to PostgreSQL",
            "channel": "echo",
        },
        "ref": None,
    }


async def test_join_without_bindings_sends_no_system_message(raw: Raw) -> None:
    await raw.send("realtime:empty", "phx_join", join_payload([]), "1", "1")
    assert (await raw.recv())["payload"] == {"status": "ok", "response": {"postgres_changes": []}}
    await raw.send("phoenix", "heartbeat", {}, "2")
    assert (await raw.recv())["ref"] == "2"


async def test_duplicate_join_replies_then_closes_the_old_join(raw: Raw) -> None:
    await raw.send("realtime:dup", "phx_join", join_payload([]), "1", "1")
    assert (await raw.recv())["ref"] == "1"
    await raw.send("realtime:dup", "phx_join", join_payload([]), "2", "2")
    first, second = await raw.recv(), await raw.recv()
    assert (first["event"], first["ref"], first["payload"]["status"]) == ("phx_reply", "2", "ok")
    assert (second["event"], second["ref"], second["payload"]) == ("phx_close", "1", {})


async def test_leave_replies_then_closes(raw: Raw) -> None:
    await raw.send("realtime:bye", "phx_join", join_payload([]), "1", "1")
    await raw.recv()
    await raw.send("realtime:bye", "phx_leave", {}, "2", "1")
    assert await raw.recv() == {
        "topic": "realtime:bye",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {}},
        "ref": "2",
    }
    assert await raw.recv() == {
        "topic": "realtime:bye",
        "event": "phx_close",
        "payload": {},
        "ref": "1",
    }
    await raw.send("realtime:bye", "broadcast", {}, "3")
    assert (await raw.recv())["payload"]["response"] == {"reason": "unmatched topic"}


async def test_access_token_refresh_resubscribes_and_a_bad_one_closes(
    stack: StackThread, raw: Raw, table: str
) -> None:
    secret = stack.info.jwt_secret
    user_token = keys.user_token(secret, uuid.uuid4())
    await raw.send(
        "realtime:tok",
        "phx_join",
        join_payload([{"event": "*", "schema": "public", "table": table}], user_token),
        "1",
        "1",
    )
    assert (await raw.recv())["payload"]["status"] == "ok"
    assert (await raw.recv())["payload"]["status"] == "ok"  # Subscribed to PostgreSQL
    await raw.send(
        "realtime:tok", "access_token", {"access_token": user_token}, "2", "1"
    )  # same: ignored
    fresh = keys.user_token(secret, uuid.uuid4(), ttl_s=120)
    await raw.send("realtime:tok", "access_token", {"access_token": fresh}, "3", "1")
    message = await raw.recv()
    assert (message["event"], message["payload"]["message"]) == (
        "system",
        "Subscribed to PostgreSQL",
    )
    await raw.send("realtime:tok", "access_token", {"access_token": "garbage"}, "4", "1")
    assert await raw.recv() == {
        "topic": "realtime:tok",
        "event": "system",
        "payload": {
            "extension": "system",
            "status": "error",
            "message": "The token provided is not a valid JWT",
            "channel": "tok",
        },
        "ref": None,
    }
    assert await raw.recv() == {
        "topic": "realtime:tok",
        "event": "phx_close",
        "payload": {},
        "ref": "1",
    }


async def test_channel_closes_when_its_token_expires(stack: StackThread, raw: Raw) -> None:
    token = keys.sign(stack.info.jwt_secret, {"role": "authenticated", "exp": int(time.time()) + 1})
    await raw.send("realtime:short", "phx_join", join_payload([], token), "1", "1")
    assert (await raw.recv())["payload"]["status"] == "ok"
    system = await raw.recv()
    assert (system["event"], system["payload"]["extension"], system["payload"]["status"]) == (
        "system",
        "system",
        "error",
    )
    assert system["payload"]["message"].startswith("Token has expired")
    assert (await raw.recv())["event"] == "phx_close"


async def test_broadcast_reaches_other_sockets_and_self_when_asked(
    stack: StackThread, raw: Raw
) -> None:
    async with websockets.connect(ws_url(stack, stack.info.anon_key)) as other_ws:
        other = Raw(other_ws)
        payload = join_payload([])
        payload["config"]["broadcast"] = {"ack": True, "self": True}
        await raw.send("realtime:room", "phx_join", payload, "1", "1")
        await other.send("realtime:room", "phx_join", join_payload([]), "1", "1")
        await raw.recv(), await other.recv()
        message = {"type": "broadcast", "event": "hi", "payload": {"n": 1}}
        await raw.send("realtime:room", "broadcast", message, "2", "1")
        expected = {"topic": "realtime:room", "event": "broadcast", "payload": message, "ref": None}
        assert await other.recv() == expected
        got = [await raw.recv(), await raw.recv()]
        assert expected in got
        await other.send("realtime:room", "presence", {"event": "track", "payload": {}}, "2", "1")
        assert (await other.recv())["payload"] == {"status": "ok", "response": {}}
        assert {
            "topic": "realtime:room",
            "event": "phx_reply",
            "payload": {"status": "ok", "response": {}},
            "ref": "2",
        } in got


async def test_silent_sockets_are_closed(stack: StackThread) -> None:
    gw = gateway(stack)

    async def shorten() -> None:
        gw.idle_timeout_s = 0.3

    async def restore() -> None:
        gw.idle_timeout_s = 60.0

    stack.call(shorten)
    try:
        async with websockets.connect(ws_url(stack, stack.info.anon_key)) as ws:
            with pytest.raises(websockets.ConnectionClosedOK) as info:
                await asyncio.wait_for(ws.recv(), WAIT_S)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1000
    finally:
        stack.call(restore)


# -- handshake -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("apikey", "error"),
    [
        pytest.param(None, "API key is missing", id="missing"),
        pytest.param("expired", "Token has expired", id="expired"),
        pytest.param("forged", "Failed to validate JWT signature", id="forged"),
        pytest.param("garbage", "The token provided is not a valid JWT", id="malformed"),
    ],
)
async def test_handshake_rejects_bad_apikeys_with_401(
    stack: StackThread, apikey: str | None, error: str
) -> None:
    tokens = {
        "expired": keys.sign(stack.info.jwt_secret, {"role": "anon", "exp": int(time.time()) - 5}),
        "forged": keys.api_key("f" * 48, "anon"),
    }
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(ws_url(stack, tokens.get(apikey or "", apikey))):
            pass
    response = info.value.response
    assert response.status_code == 401
    assert json.loads(response.body)["error"].startswith(error)


async def test_handshake_accepts_the_key_in_the_x_api_key_header(stack: StackThread) -> None:
    headers = {"x-api-key": stack.info.anon_key}
    async with websockets.connect(ws_url(stack, None), additional_headers=headers) as ws:
        raw = Raw(ws)
        await raw.send("phoenix", "heartbeat", {}, "1")
        assert (await raw.recv())["payload"]["status"] == "ok"


async def test_realtime_client_fails_to_connect_with_an_expired_key(stack: StackThread) -> None:
    expired = keys.sign(stack.info.jwt_secret, {"role": "anon", "exp": int(time.time()) - 5})
    client = AsyncRealtimeClient(stack.info.supabase_url + "/realtime/v1", expired, max_retries=1)
    with pytest.raises(websockets.InvalidStatus):
        await client.connect()


# -- faults --------------------------------------------------------------------------------------


async def test_clients_reconnect_and_resubscribe_after_a_drop(
    stack: StackThread, table: str, db: Any, clients: Any
) -> None:
    gw = gateway(stack)
    service = await clients()
    feed = await subscribe(service, "blip", [{"event": "*", "table": table}])
    assert gw.connection_count >= 1 and gw.subscription_count >= 1
    dropped = stack.call(gw.drop_all_connections)
    assert dropped >= 1
    state, _ = await feed.state()
    assert state == RealtimeSubscribeStates.CHANNEL_ERROR
    await feed.ready()  # SUBSCRIBED again, then Subscribed to PostgreSQL
    row_id = await insert(db, table)
    change = (await feed.change())["data"]
    assert change["record"]["id"] == row_id


async def test_changes_while_disconnected_are_not_replayed(
    stack: StackThread, table: str, db: Any
) -> None:
    gw = gateway(stack)
    client = AsyncRealtimeClient(
        stack.info.supabase_url + "/realtime/v1", stack.info.service_role_key, auto_reconnect=False
    )
    try:
        feed = await subscribe(client, "gap", [{"event": "INSERT", "table": table}])
        stack.call(gw.drop_all_connections)
        assert (await feed.state())[0] == RealtimeSubscribeStates.CHANNEL_ERROR
        seen = gw.changes_seen
        await insert(db, table, label="missed")
        await eventually(lambda: gw.changes_seen > seen, "the gateway to process the change")
        await client.connect()  # rejoins the errored channel
        await feed.ready()
        await insert(db, table, label="after")
        assert (await feed.change())["data"]["record"]["label"] == "after"
    finally:
        await client.close()


async def test_paused_delivery_holds_changes_until_resumed(
    stack: StackThread, table: str, db: Any, clients: Any
) -> None:
    gw = gateway(stack)
    feed = await subscribe(await clients(), "pause", [{"event": "INSERT", "table": table}])
    stack.call(gw.pause_delivery)
    try:
        await insert(db, table, label="held")
        await eventually(lambda: gw.stats["pending"] > 0, "the change to be held")
        assert feed.changes.empty()
    finally:
        stack.call(gw.resume_delivery)
    assert (await feed.change())["data"]["record"]["label"] == "held"


async def test_stream_recovers_when_the_replication_connection_breaks(
    stack: StackThread, table: str, db: Any, clients: Any
) -> None:
    gw = gateway(stack)
    feed = await subscribe(await clients(), "walbreak", [{"event": "INSERT", "table": table}])
    old_pid = gw.wal_backend_pid
    await db.execute("select pg_terminate_backend(%s)", (old_pid,))
    await eventually(lambda: gw.wal_backend_pid not in (None, old_pid), "a new walsender")
    row_id = await insert(db, table)
    assert (await feed.change())["data"]["record"]["id"] == row_id


async def test_stop_closes_sockets_and_drops_the_slot(postgres: EmbeddedPostgres) -> None:
    secret = keys.new_secret()
    gw = RealtimeGateway(postgres.dsn, secret)
    await gw.start()
    server = AsgiServer(Starlette(routes=[WebSocketRoute("/ws", gw.endpoint)]), bind_socket(0))
    await server.start()
    try:
        url = f"ws://127.0.0.1:{server.port}/ws?apikey={keys.api_key(secret, 'anon')}"
        async with websockets.connect(url) as ws:
            await eventually(lambda: gw.connection_count == 1, "the connection")
            slot = gw.slot_name
            await gw.stop()
            with pytest.raises(websockets.ConnectionClosedOK) as info:
                await asyncio.wait_for(ws.recv(), WAIT_S)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    finally:
        await server.stop()
    assert gw.slot_name is None
    with psycopg.connect(postgres.dsn) as conn:
        query = "select count(*) from pg_replication_slots where slot_name = %s"
        assert conn.execute(query, (slot,)).fetchone() == (0,)


# -- values ----------------------------------------------------------------------------------------

VALUES = [
    ("int2", "-3"),
    ("int4", "2147483647"),
    ("int8", "9007199254740993"),
    ("float4", "1.1"),
    ("float8", "0.1"),
    ("float8", "1e+100"),
    ("float8", "1.5e-07"),
    ("float4", "-1.25e+20"),
    ("float8", "NaN"),
    ("float8", "-Infinity"),
    ("numeric", "12.30"),
    ("numeric", "123456789012345678901234567890"),
    ("numeric", "NaN"),
    ("bool", "t"),
    ("json", '{"b": 1, "a": [true, null]}'),
    ("jsonb", '{"b": 1, "a": [true, null]}'),
    ("timestamptz", "2026-03-01 10:15:30.120471+00"),
    ("timestamptz", "infinity"),
    ("timestamp", "2026-03-01 10:15:30"),
    ("date", "2026-03-01"),
    ("time", "10:15:30"),
    ("timetz", "10:15:30+02"),
    ("uuid", "5F0C8F7E-3A51-4C9E-9A41-0B3A9E7D2C11"),
    ("text", 'a "quoted" \\ back'),
    ("varchar(5)", "abc"),
    ("bytea", "\\x00ff"),
    ("interval", "1 day 02:00:00"),
    ("inet", "10.0.0.1/8"),
    ("text[]", '{a,"b c",NULL,"",x\\\\y,"q\\"u"}'),
    ("int4[]", "{{1,2},{3,NULL}}"),
    ("jsonb[]", '{"{\\"a\\": 1}",NULL}'),
    ("bool[]", "{t,f}"),
    ("timestamptz[]", '{"2026-03-01 10:15:30+00"}'),
    ("numeric[]", "{1.5,2}"),
    ("box[]", "{(1,1),(0,0);(2,2),(1,1)}"),
]


def test_values_convert_like_to_jsonb(postgres: EmbeddedPostgres) -> None:
    """Codec(output-function text, as pgoutput sends it) == to_jsonb(value)."""
    types_sql = """
        select b.typname, b.typcategory, e.typname, b.typdelim
        from pg_type t
        join pg_type b on b.oid = case when t.typtype = 'd' then t.typbasetype else t.oid end
        left join pg_type e on e.oid = b.typelem and b.typcategory = 'A'
        where t.oid = %s::regtype
    """
    with psycopg.connect(postgres.dsn, options=SESSION_OPTIONS) as conn:
        for type_name, literal in VALUES:
            base, category, element, delim = conn.execute(types_sql, (type_name,)).fetchone()  # type: ignore[misc]  # one row
            text, expected = conn.execute(
                sql.SQL(
                    "select format('%%s', v), to_jsonb(v)::text from (select %s::{} as v) s"
                ).format(sql.SQL(type_name)),
                (literal,),
            ).fetchone()  # type: ignore[misc]  # one row
            codec = Codec.for_type(base, category, element, delim)
            assert codec.decode(text) == json.loads(expected), (type_name, literal)
