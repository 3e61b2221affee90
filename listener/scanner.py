"""The catch-up scan: claim due rows the events missed, at start, on confirmation and on a poll."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from listener.dispatcher import Dispatcher
from listener.metrics import Metrics
from listener.models import SandboxState, Session

log = structlog.get_logger(component="scanner")

FULL_RESCAN_S = 0.5  # after a full batch more rows are likely due: look again soon


class DueRows(Protocol):
    """What the scanner needs from the store (SandboxStore satisfies it)."""

    async def claim_due(self, lease_s: int, limit: int) -> list[Session]: ...
    async def sessions_with_pending_commands(self, limit: int = ...) -> list[str]: ...


def is_missed_insert(row: Session, announced: bool) -> bool:
    """A brand-new session the scan reached before any Realtime event named it."""
    return not announced and row.state is SandboxState.REQUESTED and row.attempts == 0


class Scanner:
    """Claims due rows in batches sized to free capacity and hands them to the dispatcher."""

    def __init__(
        self,
        store: DueRows,
        dispatcher: Dispatcher,
        *,
        interval_s: float,
        lease_s: int,
        capacity: int,
        release: Callable[[Session], Awaitable[None]],
        bury_deleted: Callable[[], Awaitable[int]] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._interval_s = interval_s
        self._lease_s = lease_s
        self._capacity = capacity
        self._release = release
        self._bury_deleted = bury_deleted
        self._stop = asyncio.Event()
        self.more_due = False  # the last scan stopped for lack of room, not of due rows
        self._metrics = metrics or Metrics()
        self._wake = asyncio.Event()
        self.scans = 0

    def trigger(self) -> None:
        """Scan now (after a confirmed subscription or an unreadable event)."""
        self._wake.set()

    async def scan_once(self) -> int:
        """Claim what is due, up to free capacity, and queue pending commands; return the
        number of rows claimed."""
        claimed = 0
        self.more_due = False
        while (room := self._capacity - self._dispatcher.backlog) > 0:
            rows = await self._store.claim_due(self._lease_s, room)
            if self._stop.is_set():  # stop came while claiming: nobody will work on these
                await asyncio.gather(*(self._release(row) for row in rows))
                return claimed
            for row in rows:
                if is_missed_insert(row, self._dispatcher.was_announced(row.id)):
                    self._metrics.missed_events.inc()
                    log.info("missed_event_caught", session_id=row.id)
                self._metrics.intake.labels(source="scan").inc()
                self._dispatcher.submit_claimed(row)
            claimed += len(rows)
            if len(rows) < room:
                break
        else:
            self.more_due = True
        for session_id in await self._store.sessions_with_pending_commands():
            self._dispatcher.submit_commands(session_id)
        if self._bury_deleted is not None:  # deleted rows' machines, even if the id lives again
            await self._bury_deleted()
        self.scans += 1
        return claimed

    async def run(self, stop: asyncio.Event) -> None:
        """Scan at start, whenever triggered, and every interval, until `stop`."""
        self._stop = stop
        while not stop.is_set():
            self._wake.clear()
            try:
                claimed = await self.scan_once()
                log.debug("scan_finished", claimed=claimed)
            except Exception:
                log.exception("scan_failed")
            async with asyncio.TaskGroup() as tg:
                woken = tg.create_task(self._wake.wait())
                stopped = tg.create_task(stop.wait())
                pause = FULL_RESCAN_S if self.more_due else self._interval_s
                await asyncio.wait(
                    {woken, stopped}, timeout=pause, return_when=asyncio.FIRST_COMPLETED
                )
                woken.cancel()
                stopped.cancel()
