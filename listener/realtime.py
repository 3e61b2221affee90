"""Realtime intake: changes to sessions and new commands as hints, with a watchdog that rebuilds."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from realtime import RealtimeSubscribeStates
from realtime.message import SuccessSystemPayload
from realtime.types import PostgresChangesPayload, RealtimePostgresChangesListenEvent
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from listener.metrics import Metrics

log = structlog.get_logger(component="realtime")

TABLE = "coding_sessions"
COMMANDS_TABLE = "sandbox_commands"
PUBLISHED_TABLES = (TABLE, COMMANDS_TABLE)  # must be in the supabase_realtime publication
ALL = RealtimePostgresChangesListenEvent.All
CHANNEL = "sandbox-listener"
WATCHDOG_TICK_S = 1.0
UNHEALTHY_AFTER_S = 30.0  # disconnected, errored or unconfirmed this long: rebuild the client
SUBSCRIBE_TIMEOUT_S = 30.0  # realtime-py's own connect retries can take ~65 s
MAX_REBUILD_PAUSE_S = 30.0


def session_id_of(payload: Mapping[str, Any] | PostgresChangesPayload) -> str | None:
    """The session a postgres_changes payload is about: a session row's id (record, else
    old_record), or a command row's session_id."""
    data = payload.get("data")
    if not isinstance(data, Mapping):
        return None
    key = "session_id" if data.get("table") == COMMANDS_TABLE else "id"
    for part in ("record", "old_record"):
        record = data.get(part)
        if isinstance(record, Mapping) and isinstance(record.get(key), str):
            return str(record[key])
    return None


def is_confirmation(payload: SuccessSystemPayload) -> bool:
    """The ok `system` message that says the database subscription is live."""
    return payload.extension == "postgres_changes" and payload.status == "ok"


class RealtimeIntake:
    """Subscribes to coding_sessions changes; each change only submits a session id."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        on_change: Callable[[str], None],
        on_command: Callable[[str], None],
        on_confirmed: Callable[[], None],
        on_unreadable: Callable[[], None],
        metrics: Metrics | None = None,
        unhealthy_after_s: float = UNHEALTHY_AFTER_S,
    ) -> None:
        self._url = url
        self._key = key
        self._on_change = on_change
        self._on_command = on_command
        self._on_confirmed = on_confirmed
        self._on_unreadable = on_unreadable
        self._metrics = metrics or Metrics()
        self._unhealthy_after_s = unhealthy_after_s
        self.confirmed = False
        self.rebuilds = 0
        self._healthy_since = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        """Keep one confirmed subscription until `stop`, rebuilding the client when it fails."""
        failures = 0
        while not stop.is_set():
            client = await acreate_client(
                self._url,
                self._key,
                options=AsyncClientOptions(realtime={"max_retries": 5, "hb_interval": 20}),
            )
            try:
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
                    await self._subscribe(client)
                failures = 0
                await self._watch(client, stop)
            except Exception as exc:  # the socket or the join failed: rebuild after a pause
                failures += 1
                log.warning("realtime_subscribe_failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                self._set_confirmed(False)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.realtime.close(), timeout=5)
            if not stop.is_set():
                pause = min(WATCHDOG_TICK_S * 2**failures, MAX_REBUILD_PAUSE_S) if failures else 0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=pause)
                self.rebuilds += 1
                log.info("realtime_rebuilding", rebuilds=self.rebuilds)

    async def _subscribe(self, client: AsyncClient) -> None:
        channel = client.channel(CHANNEL)
        channel.on_postgres_changes(ALL, schema="public", table=TABLE, callback=self._changed)
        channel.on_postgres_changes(
            RealtimePostgresChangesListenEvent.Insert,
            schema="public",
            table=COMMANDS_TABLE,
            callback=self._command_queued,
        )
        channel.on_system(self._system)
        self._healthy_since = time.monotonic()
        await channel.subscribe(self._state)

    async def _watch(self, client: AsyncClient, stop: asyncio.Event) -> None:
        """Return when the subscription has been unhealthy too long (or on stop)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=WATCHDOG_TICK_S)
            channels = client.realtime.get_channels()
            if not channels:  # CLOSED by the server: realtime-py never rejoins such a channel
                log.warning("realtime_channel_closed")
                return
            healthy = (
                client.realtime.is_connected
                and all(c.is_joined for c in channels)
                and self.confirmed
            )
            now = time.monotonic()
            if healthy:
                self._healthy_since = now
            elif now - self._healthy_since > self._unhealthy_after_s:
                log.warning("realtime_unhealthy", seconds=round(now - self._healthy_since, 1))
                return

    # -- callbacks: tiny and synchronous (they run inside the client's receive loop) --------

    def _changed(self, payload: PostgresChangesPayload) -> None:
        session_id = session_id_of(payload)
        if session_id is None:
            log.warning("realtime_event_unreadable")
            self._on_unreadable()
            return
        self._metrics.intake.labels(source="realtime").inc()
        self._on_change(session_id)

    def _command_queued(self, payload: PostgresChangesPayload) -> None:
        session_id = session_id_of(payload)
        if session_id is None:
            log.warning("realtime_event_unreadable")
            self._on_unreadable()
            return
        self._on_command(session_id)

    def _system(self, payload: SuccessSystemPayload) -> None:
        if is_confirmation(payload):
            log.info("realtime_subscribed")
            self._set_confirmed(True)
            self._on_confirmed()

    def _state(self, state: RealtimeSubscribeStates, error: Exception | None) -> None:
        if state is not RealtimeSubscribeStates.SUBSCRIBED:
            log.warning("realtime_channel_state", state=state.value, error=str(error or ""))
            self._set_confirmed(False)

    def _set_confirmed(self, value: bool) -> None:
        self.confirmed = value
        self._metrics.realtime_subscribed.set(1 if value else 0)
