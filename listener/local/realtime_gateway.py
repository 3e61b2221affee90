"""Supabase Realtime stand-in: the Phoenix V1 websocket protocol, postgres_changes from the WAL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

import jwt
import psycopg
import structlog
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from listener.local import keys
from listener.local.wal import PUBLICATION, RowChange, Table, Transaction, WalStream

log = structlog.get_logger(component="realtime")

IDLE_TIMEOUT_S = 60.0  # Phoenix closes a websocket that sent nothing for this long
TICK_S = 1.0  # how often idle sockets and expired tokens are looked for
ID_SPACE = 2**27 - 1  # :erlang.phash2/1 range; ids are 1..ID_SPACE
MAX_IN_VALUES = 100
VISIBILITY_TIMEOUT_S = 1.0  # how long a decoded commit may take to become visible to others
TOPIC_PREFIX = "realtime:"
EVENTS = frozenset({"*", "INSERT", "UPDATE", "DELETE"})
OPERATORS = {"eq": "=", "neq": "<>", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}


# -- pure: tokens, bindings, filters, frames ---------------------------------------------------


class TokenError(Exception):
    """A token Realtime would refuse; `code` prefixes join errors, `message` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def verify_token(secret: str, token: object, now: float) -> dict[str, Any]:
    """Verify an apikey/access token as Realtime does (HS256, `role` and `exp` required)."""
    if not isinstance(token, str) or not token:
        raise TokenError("MissingApiKey", "API key is missing")
    try:
        return keys.verify(secret, token)
    except jwt.ExpiredSignatureError as exc:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp", now)
        ago = max(0, int(now - float(exp)))
        raise TokenError("InvalidJWTToken", f"Token has expired {ago} seconds ago") from exc
    except jwt.MissingRequiredClaimError as exc:
        message = "Fields `role` and `exp` are required in JWT"
        raise TokenError("InvalidJWTToken", message) from exc
    except jwt.InvalidSignatureError as exc:
        raise TokenError("JwtSignatureError", "Failed to validate JWT signature") from exc
    except jwt.DecodeError as exc:
        raise TokenError("MalformedJWT", "The token provided is not a valid JWT") from exc
    except jwt.InvalidTokenError as exc:
        raise TokenError("InvalidJWTToken", str(exc)) from exc


def binding_id(raw: dict[str, Any]) -> int:
    """A stable id in 1..2^27-1 for a binding map (equal bindings get equal ids)."""
    digest = hashlib.blake2b(json.dumps(raw, sort_keys=True).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % ID_SPACE + 1


@dataclass(frozen=True, slots=True)
class Filter:
    column: str
    op: str  # eq neq lt lte gt gte in
    value: str  # for `in`: an array literal '{a,b}'

    def describe(self) -> str:
        """Elixir's inspect of Realtime's filter tuple, as its error messages show it."""
        return (
            f"{{{json.dumps(self.column)}, {json.dumps(self.op)}, {json.dumps(self.value)}, false}}"
        )


class FilterError(ValueError):
    """`filter` could not be parsed; the message is Realtime's."""


def parse_filter(text: str) -> Filter:
    """Parse `column=op.value` the way Realtime splits it (on the first two `=` or `.`)."""
    parts = re.split(r"[=.]", text, maxsplit=2)
    error = FilterError(f"Error parsing `filter` params: {json.dumps(parts, ensure_ascii=False)}")
    if len(parts) != 3 or not parts[0]:
        raise error
    column, op, value = parts
    if op == "in":
        inner = re.fullmatch(r"\((.*)\)", value, flags=re.DOTALL)
        if inner is None:
            raise error
        return Filter(column, op, "{" + inner.group(1) + "}")
    if op not in OPERATORS:
        raise error
    return Filter(column, op, value)


@dataclass(frozen=True, slots=True)
class Binding:
    """One postgres_changes entry of a join, normalised the way Realtime reads it."""

    id: int
    raw: dict[str, Any]
    event: str
    schema: str
    table: str | None
    filter: Filter | None
    filter_error: str | None

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Binding:
        event = str(raw.get("event", "*")).upper()
        table = raw.get("table")
        text = raw.get("filter")
        parsed, error = None, None
        if isinstance(text, str) and text.strip():
            try:
                parsed = parse_filter(text)
            except FilterError as exc:
                error = str(exc)
        return cls(
            id=binding_id(raw),
            raw=raw,
            event=event if event in EVENTS else "*",
            schema=str(raw.get("schema") or "public"),
            table=str(table) if table and table != "*" else None,
            filter=parsed,
            filter_error=error,
        )

    def matches(self, table: Table, change_type: str) -> bool:
        """Whether a change of `table` is in scope (schema, table, event; not the filter)."""
        return (
            self.schema in ("*", table.schema)
            and self.table in (None, table.name)
            and self.event in ("*", change_type)
        )

    def describe(self) -> str:
        """Realtime's rendering of the subscription params in its error messages."""
        filters = f"[{self.filter.describe()}]" if self.filter else "[]"
        select = self.raw.get("select")
        selected = json.dumps(select) if isinstance(select, list) else "nil"
        return (
            f"[event: {self.event}, schema: {self.schema}, table: {self.table or '*'}, "
            f"filters: {filters}, select: {selected}]"
        )

    def reply_entry(self) -> dict[str, Any]:
        """The binding echoed verbatim with its id (an Elixir map: atom key first, then sorted)."""
        return {"id": self.id, **dict(sorted(self.raw.items()))}


def frame(topic: str, event: str, payload: Any, ref: Any = None) -> str:
    """A Phoenix V1 server frame: exactly topic, event, payload, ref."""
    return json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref})


def reply(topic: str, ref: Any, status: str, response: dict[str, Any]) -> str:
    return frame(topic, "phx_reply", {"status": status, "response": response}, ref)


def system(topic: str, extension: str, status: str, message: str) -> str:
    name = topic.removeprefix(TOPIC_PREFIX)
    payload = {"extension": extension, "status": status, "message": message, "channel": name}
    return frame(topic, "system", payload)


def change_data(
    change: RowChange, commit_timestamp: str, visible: frozenset[str]
) -> dict[str, Any]:
    """The `data` of a postgres_changes frame for a role that can select `visible` columns."""
    table = change.table
    data: dict[str, Any] = {
        "type": change.type,
        "schema": table.schema,
        "table": table.name,
        "commit_timestamp": commit_timestamp,
        "errors": None,
        "columns": [
            {"name": c.name, "type": c.type_name} for c in table.columns if c.name in visible
        ],
    }
    if change.record is not None:
        data["record"] = {k: v for k, v in change.record.items() if k in visible}
    if change.old_record is not None:
        old = {k: v for k, v in change.old_record.items() if k in visible}
        if change.type == "DELETE" and table.rls_enabled:  # DELETE skips RLS: only the key goes out
            old = {k: v for k, v in old.items() if k in table.primary_key}
        data["old_record"] = old
    return data


def _sql_error(exc: psycopg.Error) -> str:
    """Postgrex's rendering of a database error: `ERROR 22P02 (invalid_text_representation) ...`."""
    condition = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
    message = exc.diag.message_primary or str(exc)
    return f"ERROR {exc.sqlstate} ({condition}) {message}"


# -- connection state --------------------------------------------------------------------------


@dataclass(eq=False)
class _Channel:
    topic: str
    join_ref: Any
    bindings: list[Binding]
    token: str
    claims: dict[str, Any]
    broadcast_self: bool
    broadcast_ack: bool
    live: bool = False  # the postgres_changes subscription is active
    generation: int = 0  # bumped on every (re)subscribe, so stale checks do not apply

    @property
    def role(self) -> str:
        return str(self.claims.get("role"))

    @property
    def claims_json(self) -> str:
        return json.dumps(self.claims, sort_keys=True)


@dataclass(eq=False)
class _Close:
    code: int
    reason: str


@dataclass(eq=False)
class _Connection:
    websocket: WebSocket
    token: str
    channels: dict[str, _Channel] = field(default_factory=dict)
    outbox: asyncio.Queue[str | _Close] = field(default_factory=asyncio.Queue)
    last_seen: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    group: asyncio.TaskGroup | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the connection's task group (cancelled when the socket ends)."""
        assert self.group is not None
        task = self.group.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def send(self, text: str) -> None:
        self.outbox.put_nowait(text)


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


class RealtimeGateway:
    """Serves /realtime/v1/websocket; streams postgres_changes from a logical slot."""

    def __init__(
        self, dsn: str, jwt_secret: str, *, idle_timeout_s: float = IDLE_TIMEOUT_S
    ) -> None:
        self.dsn = dsn
        self.jwt_secret = jwt_secret
        self.idle_timeout_s = idle_timeout_s
        self.frames_sent = 0
        self.changes_seen = 0
        self.pending = 0  # transactions received from the WAL and not yet dispatched
        self._connections: set[_Connection] = set()
        self._queue: asyncio.Queue[Transaction] = asyncio.Queue()
        self._delivering = asyncio.Event()
        self._delivering.set()
        self._access_cache: dict[tuple[int, str], tuple[int, _Access | None]] = {}
        self._visible_xid: int | None = None  # the last transaction known visible to others
        self._pool: AsyncConnectionPool | None = None
        self._stream: WalStream | None = None
        self._dispatcher: asyncio.Task[None] | None = None

    # -- lifecycle and fault hooks ---------------------------------------------------------

    async def start(self) -> None:
        """Open the database pool, create the slot and start streaming."""
        loop = asyncio.get_running_loop()
        self._pool = AsyncConnectionPool(
            self.dsn, min_size=2, max_size=4, open=False, kwargs={"autocommit": True}
        )
        await self._pool.open(wait=True, timeout=10)

        def on_transaction(txn: Transaction) -> None:  # called on the WAL thread
            loop.call_soon_threadsafe(self._enqueue, txn)

        self._stream = WalStream(self.dsn, on_transaction)
        await asyncio.to_thread(self._stream.start)
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="realtime-dispatch")
        log.info("realtime_started", slot=self._stream.slot_name)

    async def stop(self) -> None:
        """Close every socket, stop streaming (the temporary slot is dropped) and the pool."""
        for conn in list(self._connections):
            conn.outbox.put_nowait(_Close(1001, "server shutting down"))
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
            self._dispatcher = None
        if self._stream is not None:
            await asyncio.to_thread(self._stream.stop)
            self._stream = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def subscription_count(self) -> int:
        """Live postgres_changes bindings over all sockets."""
        return sum(
            len(ch.bindings) for c in self._connections for ch in c.channels.values() if ch.live
        )

    @property
    def slot_name(self) -> str | None:
        """The temporary replication slot while streaming."""
        return self._stream.slot_name if self._stream else None

    @property
    def wal_backend_pid(self) -> int | None:
        """The walsender's backend pid (to break the replication connection in tests)."""
        return self._stream.backend_pid if self._stream else None

    @property
    def stats(self) -> dict[str, int]:
        return {
            "connections": self.connection_count,
            "subscriptions": self.subscription_count,
            "frames_sent": self.frames_sent,
            "changes_seen": self.changes_seen,
            "pending": self.pending,
        }

    async def drop_all_connections(self) -> int:
        """Abort every socket without a close handshake (a network blip); return how many."""
        conns = list(self._connections)
        for conn in conns:
            _abort(conn.websocket)
        log.info("realtime_connections_dropped", count=len(conns))
        return len(conns)

    async def pause_delivery(self) -> None:
        """Hold changes (they queue up) until resume_delivery()."""
        self._delivering.clear()

    async def resume_delivery(self) -> None:
        self._delivering.set()

    # -- websocket ---------------------------------------------------------------------------

    async def endpoint(self, websocket: WebSocket) -> None:
        """Serve one websocket connection."""
        token = websocket.headers.get("x-api-key") or websocket.query_params.get("apikey")
        try:
            verify_token(self.jwt_secret, token, time.time())
        except TokenError as exc:
            log.info("realtime_connection_rejected", reason=exc.message)
            await websocket.send_denial_response(JSONResponse({"error": exc.message}, 401))
            return
        assert token is not None
        await websocket.accept()
        conn = _Connection(websocket, token)
        self._connections.add(conn)
        log.info("realtime_connected", connections=len(self._connections))
        try:
            async with asyncio.TaskGroup() as conn.group:
                for work in (self._read(conn), self._write(conn), self._watch(conn)):
                    conn.spawn(work)
                await conn.done.wait()
                for task in conn.tasks:
                    task.cancel()
        finally:
            self._connections.discard(conn)
            log.info("realtime_disconnected", connections=len(self._connections))

    async def _read(self, conn: _Connection) -> None:
        try:
            while True:
                message = await conn.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                conn.last_seen = time.monotonic()
                text = message.get("text")
                if text is None:
                    continue
                try:
                    self._handle(conn, text)
                except Exception:  # one bad frame must not end the socket
                    log.exception("realtime_frame_failed")
        finally:
            conn.done.set()

    async def _write(self, conn: _Connection) -> None:
        try:
            while True:
                item = await conn.outbox.get()
                if isinstance(item, _Close):
                    await conn.websocket.close(item.code, item.reason)
                    return
                await conn.websocket.send_text(item)
                self.frames_sent += 1
        except (WebSocketDisconnect, OSError, RuntimeError):  # the peer is gone
            return
        finally:
            conn.done.set()

    async def _watch(self, conn: _Connection) -> None:
        """Close sockets silent for too long; end channels whose token expired."""
        while True:
            await asyncio.sleep(min(TICK_S, self.idle_timeout_s / 4))
            if time.monotonic() - conn.last_seen > self.idle_timeout_s:
                log.info("realtime_idle_socket_closed")
                conn.outbox.put_nowait(_Close(1000, "idle timeout"))
                return
            now = time.time()
            for channel in list(conn.channels.values()):
                if float(channel.claims.get("exp", now + 1)) <= now:
                    try:
                        verify_token(self.jwt_secret, channel.token, now)
                    except TokenError as exc:
                        self._shut_channel(conn, channel, exc.message)

    # -- protocol ------------------------------------------------------------------------------

    def _handle(self, conn: _Connection, text: str) -> None:
        try:
            msg = json.loads(text)
            topic, event, payload, ref = msg["topic"], msg["event"], msg["payload"], msg["ref"]
            if not (
                isinstance(topic, str) and isinstance(event, str) and isinstance(payload, dict)
            ):
                raise TypeError("topic and event must be strings, payload an object")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("realtime_frame_ignored", error=str(exc))
            return
        channel = conn.channels.get(topic)
        if topic == "phoenix" and event == "heartbeat":
            conn.send(reply(topic, ref, "ok", {}))
        elif event == "phx_join" and topic.startswith(TOPIC_PREFIX):
            self._join(conn, topic, payload, ref, msg.get("join_ref") or ref)
        elif channel is not None:
            self._channel_event(conn, channel, event, payload, ref)
        elif event == "phx_leave":
            conn.send(reply(topic, ref, "ok", {}))
        else:
            conn.send(reply(topic, ref, "error", {"reason": "unmatched topic"}))

    def _join(
        self, conn: _Connection, topic: str, payload: dict[str, Any], ref: Any, join_ref: Any
    ) -> None:
        def refuse(reason: str) -> None:
            log.info("realtime_join_refused", topic=topic, reason=reason)
            conn.send(reply(topic, ref, "error", {"reason": reason}))

        if topic == TOPIC_PREFIX:
            return refuse("TopicNameRequired: You must provide a topic name")
        token = payload.get("access_token") or payload.get("user_token")
        if not isinstance(token, str) or token.startswith("sb_"):
            token = conn.token
        try:
            claims = verify_token(self.jwt_secret, token, time.time())
        except TokenError as exc:
            return refuse(str(exc))
        config = payload.get("config") or {}
        if not isinstance(config, dict):
            return refuse("InvalidJoinPayload: config must be an object")
        raw_bindings = config.get("postgres_changes") or []
        if not isinstance(raw_bindings, list) or not all(isinstance(b, dict) for b in raw_bindings):
            return refuse("InvalidJoinPayload: config.postgres_changes must be a list of objects")
        broadcast = config.get("broadcast") or {}
        if not isinstance(broadcast, dict):
            return refuse("InvalidJoinPayload: config.broadcast must be an object")
        channel = _Channel(
            topic,
            join_ref,
            [Binding.parse(b) for b in raw_bindings],
            token,
            claims,
            broadcast_self=bool(broadcast.get("self")),
            broadcast_ack=bool(broadcast.get("ack")),
        )
        old = conn.channels.get(topic)
        conn.channels[topic] = channel
        entries = [b.reply_entry() for b in channel.bindings]
        conn.send(reply(topic, ref, "ok", {"postgres_changes": entries}))
        if old is not None:  # Phoenix: the new reply, then the old channel's close
            conn.send(frame(topic, "phx_close", {}, old.join_ref))
        log.info("realtime_channel_joined", topic=topic, role=channel.role, bindings=len(entries))
        self._subscribe(conn, channel)

    def _channel_event(
        self, conn: _Connection, channel: _Channel, event: str, payload: dict[str, Any], ref: Any
    ) -> None:
        if event == "phx_leave":
            del conn.channels[channel.topic]
            conn.send(reply(channel.topic, ref, "ok", {}))
            conn.send(frame(channel.topic, "phx_close", {}, channel.join_ref))
            log.info("realtime_channel_left", topic=channel.topic)
        elif event == "access_token":
            self._refresh_token(conn, channel, payload.get("access_token"))
        elif event == "broadcast":
            self._broadcast(conn, channel, payload, ref)
        elif event == "presence":
            conn.send(reply(channel.topic, ref, "ok", {}))

    def _refresh_token(self, conn: _Connection, channel: _Channel, token: object) -> None:
        if not isinstance(token, str) or token.startswith("sb_") or token == channel.token:
            return
        try:
            claims = verify_token(self.jwt_secret, token, time.time())
        except TokenError as exc:
            return self._shut_channel(conn, channel, exc.message)
        channel.token, channel.claims = token, claims
        self._subscribe(conn, channel)

    def _shut_channel(self, conn: _Connection, channel: _Channel, message: str) -> None:
        """Realtime's shutdown: a `system` error, then phx_close; the channel is gone."""
        conn.channels.pop(channel.topic, None)
        conn.send(system(channel.topic, "system", "error", message))
        conn.send(frame(channel.topic, "phx_close", {}, channel.join_ref))
        log.info("realtime_channel_shut", topic=channel.topic, reason=message)

    def _broadcast(
        self, conn: _Connection, channel: _Channel, payload: dict[str, Any], ref: Any
    ) -> None:
        text = frame(channel.topic, "broadcast", payload)
        for other in self._connections:
            if channel.topic in other.channels and (other is not conn or channel.broadcast_self):
                other.send(text)
        if channel.broadcast_ack:
            conn.send(reply(channel.topic, ref, "ok", {}))

    def _subscribe(self, conn: _Connection, channel: _Channel) -> None:
        """Check the bindings against the database, then report with a `system` message."""
        if not channel.bindings:
            return
        channel.generation += 1
        generation = channel.generation

        async def check() -> None:
            try:
                error = await self._check_bindings(channel)
            except psycopg.Error as exc:
                error = f"Unable to subscribe to changes with given parameters: {_sql_error(exc)}"
            if channel.generation != generation or conn.channels.get(channel.topic) is not channel:
                return
            channel.live = error is None
            if error is None:
                conn.send(
                    system(channel.topic, "postgres_changes", "ok", "Subscribed to PostgreSQL")
                )
            else:
                log.info("realtime_subscription_failed", topic=channel.topic, reason=error)
                conn.send(system(channel.topic, "postgres_changes", "error", error))

        conn.spawn(check())

    async def _check_bindings(self, channel: _Channel) -> str | None:
        """Why the channel's bindings cannot be subscribed (Realtime's message), or None."""
        assert self._pool is not None
        async with self._pool.connection() as db:
            published = await (
                await db.execute(
                    "select schemaname::text, tablename::text from pg_publication_tables"
                    " where pubname = %s",
                    (PUBLICATION,),
                )
            ).fetchall()
            for binding in channel.bindings:
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
                    problem = await _check_filter(db, channel.role, tables, binding.filter)
                    if problem is not None:
                        return (
                            "Unable to subscribe to changes with given parameters. An exception "
                            "happened so please check your connect parameters: "
                            f"{binding.describe()}. Exception: {problem}"
                        )
        return None

    # -- postgres_changes delivery -------------------------------------------------------------

    def _enqueue(self, txn: Transaction) -> None:
        self.pending += 1
        self._queue.put_nowait(txn)

    async def _dispatch_loop(self) -> None:
        while True:
            txn = await self._queue.get()
            await self._delivering.wait()
            self.pending -= 1
            for change in txn.changes:
                try:
                    await self._dispatch(change, txn)
                except Exception:  # one change must not stop delivery
                    log.exception("realtime_dispatch_failed", table=change.table.name)
                self.changes_seen += 1  # handled: sent, filtered out or failed

    async def _dispatch(self, change: RowChange, txn: Transaction) -> None:
        """Send one frame per channel that may see `change`, with all its matching binding ids."""
        targets = [
            (conn, channel, [b for b in channel.bindings if b.matches(change.table, change.type)])
            for conn in self._connections
            for channel in conn.channels.values()
            if channel.live
        ]
        targets = [t for t in targets if t[2]]
        if not targets:
            return
        filters = {b.filter for _, _, bindings in targets for b in bindings if b.filter}
        verdicts = await self._evaluate(change, filters)
        views: dict[tuple[str, str], str | None] = {}
        for conn, channel, bindings in targets:
            ids = list(
                dict.fromkeys(b.id for b in bindings if b.filter is None or verdicts[b.filter])
            )
            if not ids:
                continue
            key = (channel.role, channel.claims_json)
            if key not in views:
                views[key] = await self._view(change, txn, *key)
            data = views[key]
            if data is not None:
                payload = f'{{"ids":{json.dumps(ids)},"data":{data}}}'
                conn.send(
                    f'{{"topic":{json.dumps(channel.topic)},"event":"postgres_changes",'
                    f'"payload":{payload},"ref":null}}'
                )

    async def _evaluate(self, change: RowChange, filters: Iterable[Filter]) -> dict[Filter, bool]:
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
            assert self._pool is not None
            query = sql.SQL("select {}").format(sql.SQL(", ").join(exprs))
            async with self._pool.connection() as db:
                row = await (await db.execute(query, params)).fetchone()
            assert row is not None
            verdicts.update(zip(judged, (bool(v) for v in row), strict=True))
        return verdicts

    async def _view(
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
        assert self._pool is not None
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
        assert self._pool is not None
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
        assert self._pool is not None
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


def _abort(websocket: WebSocket) -> None:
    """Drop the TCP connection under a uvicorn websocket (no close frame is sent)."""
    protocol = getattr(websocket._receive, "__self__", None)  # uvicorn's protocol object
    transport = getattr(protocol, "transport", None)
    if not isinstance(transport, asyncio.Transport):
        raise RuntimeError("drop_all_connections needs the uvicorn server of the local stack")
    transport.abort()
