"""The catch-up scan's pacing, sequenced with a fake store: claims fit free capacity, a full
batch is followed by another scan soon (not a whole poll later), and rows claimed after stop
are handed straight back."""

from __future__ import annotations

import asyncio

from listener.dispatcher import Dispatcher
from listener.models import SandboxState, Session, SessionStatus
from listener.scanner import Scanner


def row(n: int) -> Session:
    return Session(f"s{n}", f"inc-{n}", "u", SessionStatus.ACTIVE, SandboxState.REQUESTED, epoch=1)


class DueStore:
    """Always has more due rows than asked for; counts the batches it hands out."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.second_batch = asyncio.Event()
        self.next = 0

    async def claim_due(self, lease_s: int, limit: int) -> list[Session]:
        self.batches.append(limit)
        if len(self.batches) >= 2:
            self.second_batch.set()
        rows = [row(self.next + i) for i in range(limit)]
        self.next += limit
        return rows

    async def sessions_with_pending_commands(self, limit: int = 1000) -> list[str]:
        return []


class Instant:
    def __init__(self) -> None:
        self.handed_back: list[str] = []

    async def handle(self, session_id: str) -> None:
        return None

    async def act(self, claimed: Session) -> None:
        return None

    async def hand_back(self, claimed: Session) -> None:
        self.handed_back.append(claimed.id)


async def test_a_full_batch_is_followed_by_another_scan_long_before_the_poll() -> None:
    store, handler = DueStore(), Instant()
    dispatcher = Dispatcher(handler, concurrency=4)
    scanner = Scanner(
        store, dispatcher, interval_s=60, lease_s=30, capacity=4, release=handler.hand_back
    )
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(dispatcher.run(stop, grace_s=1))
        tg.create_task(scanner.run(stop))
        await asyncio.wait_for(store.second_batch.wait(), timeout=5)  # a 60 s poll would miss
        stop.set()
    assert store.batches[0] == 4, "the first batch is sized to free capacity"


async def test_rows_claimed_after_stop_are_handed_back() -> None:
    store, handler = DueStore(), Instant()
    dispatcher = Dispatcher(handler, concurrency=4)
    scanner = Scanner(
        store, dispatcher, interval_s=60, lease_s=30, capacity=4, release=handler.hand_back
    )
    stop = asyncio.Event()
    claim = store.claim_due

    async def claim_then_stop(lease_s: int, limit: int) -> list[Session]:
        rows = await claim(lease_s, limit)
        stop.set()  # stop arrives while the claim is in flight
        return rows

    store.claim_due = claim_then_stop  # type: ignore[method-assign]
    await scanner.run(stop)
    assert handler.handed_back == ["s0", "s1", "s2", "s3"]
    assert dispatcher.backlog == 0
