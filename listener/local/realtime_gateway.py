"""Supabase Realtime stand-in: the Phoenix V1 websocket protocol, postgres_changes from the WAL."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from listener.local.realtime_db import RealtimeDatabase
from listener.local.realtime_protocol import (
    TOPIC_PREFIX,
    Binding,
    TokenError,
    frame,
    reply,
    system,
    verify_token,
)
from listener.local.wal import RowChange, Transaction, WalStream

log = structlog.get_logger(component="realtime")

IDLE_TIMEOUT_S = 60.0  # Phoenix closes a websocket that sent nothing for this long
TICK_S = 1.0  # how often idle sockets and expired tokens are looked for


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
        self._db = RealtimeDatabase(dsn)
        self._stream: WalStream | None = None
        self._dispatcher: asyncio.Task[None] | None = None

    # -- lifecycle and fault hooks ---------------------------------------------------------

    async def start(self) -> None:
        """Open the database pool, create the slot and start streaming."""
        loop = asyncio.get_running_loop()
        await self._db.open()

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
        await self._db.close()

    @property
    def connection_count(self) -> int:
        """Open websockets."""
        return len(self._connections)

    @property
    def subscription_count(self) -> int:
        """Live postgres_changes bindings over all sockets (safe to read from other threads)."""
        channels = [ch for c in list(self._connections) for ch in list(c.channels.values())]
        return sum(len(ch.bindings) for ch in channels if ch.live)

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
        """Counters for tests and chaos runs (frames sent, changes handled, held back...)."""
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
        """Deliver the held changes, in commit order, and go on delivering."""
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
            error = await self._db.check_bindings(channel.bindings, channel.role)
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
        verdicts = await self._db.evaluate(change, filters)
        views: dict[tuple[str, str], str | None] = {}
        for conn, channel, bindings in targets:
            ids = list(
                dict.fromkeys(b.id for b in bindings if b.filter is None or verdicts[b.filter])
            )
            if not ids:
                continue
            key = (channel.role, channel.claims_json)
            if key not in views:
                views[key] = await self._db.view(change, txn, *key)
            data = views[key]
            if data is not None:
                payload = f'{{"ids":{json.dumps(ids)},"data":{data}}}'
                conn.send(
                    f'{{"topic":{json.dumps(channel.topic)},"event":"postgres_changes",'
                    f'"payload":{payload},"ref":null}}'
                )


def _abort(websocket: WebSocket) -> None:
    """Drop the TCP connection under a uvicorn websocket (no close frame is sent)."""
    protocol = getattr(websocket._receive, "__self__", None)  # uvicorn's protocol object
    transport = getattr(protocol, "transport", None)
    if not isinstance(transport, asyncio.Transport):
        raise RuntimeError("drop_all_connections needs the uvicorn server of the local stack")
    transport.abort()
