"""Dispatcher sequencing with a recording handler: one job per session lane at a time, the
concurrency cap, coalescing, and the drain on stop (grace, cancellation, hand-back)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from listener.dispatcher import Dispatcher
from listener.models import SandboxState, Session, SessionStatus


def row(session_id: str) -> Session:
    return Session(
        session_id, f"inc-{session_id}", "u", SessionStatus.ACTIVE, SandboxState.REQUESTED, epoch=1
    )


class Recorder:
    """A handler that blocks until released and records what ran, concurrently or not."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started: list[str] = []
        self.handed_back: list[str] = []
        self.cancelled: list[str] = []
        self.running: Counter[str] = Counter()
        self.max_per_session = 0
        self.max_total = 0

    async def _work(self, key: str) -> None:
        self.started.append(key)
        self.running[key] += 1
        self.max_per_session = max(self.max_per_session, self.running[key])
        self.max_total = max(self.max_total, sum(self.running.values()))
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        finally:
            self.running[key] -= 1

    async def handle(self, session_id: str) -> None:
        await self._work(session_id)

    async def act(self, claimed: Session) -> None:
        await self._work(claimed.id)

    async def hand_back(self, claimed: Session) -> None:
        self.handed_back.append(claimed.id)

    async def run_commands(self, session_id: str) -> None:
        await self._work(f"cmd:{session_id}")


async def until(condition: Callable[[], bool], timeout_s: float = 5) -> None:
    """Let the loop run until `condition` holds (every task gets a turn between checks)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110  # no event to wait on: poll between turns
            await asyncio.sleep(0)


async def test_one_session_is_never_handled_twice_at_once_and_hints_coalesce() -> None:
    handler = Recorder()
    dispatcher = Dispatcher(handler, run_commands=handler.run_commands, concurrency=8)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop, grace_s=5))
    for _ in range(5):
        dispatcher.submit("s1")
    dispatcher.submit_commands("s1")  # another lane: may run alongside
    await until(lambda: len(handler.started) == 2)
    assert sorted(handler.started) == ["cmd:s1", "s1"]
    handler.release.set()
    await dispatcher.wait_idle()
    stop.set()
    await task
    assert handler.max_per_session == 1
    assert handler.started.count("s1") == 2  # the running hint plus one coalesced follow-up


async def test_concurrency_is_capped() -> None:
    handler = Recorder()
    dispatcher = Dispatcher(handler, concurrency=3)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop, grace_s=5))
    for i in range(10):
        dispatcher.submit(f"s{i}")
    await until(lambda: len(handler.started) == 3)
    assert dispatcher.backlog >= 0 and handler.max_total == 3
    handler.release.set()
    await dispatcher.wait_idle()
    stop.set()
    await task
    assert len(handler.started) == 10 and handler.max_total == 3


async def test_stop_hands_back_waiting_claims_and_cancels_work_past_the_grace() -> None:
    handler = Recorder()
    dispatcher = Dispatcher(handler, concurrency=2)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop, grace_s=0.05))
    dispatcher.submit_claimed(row("a"))
    dispatcher.submit_claimed(row("b"))
    await until(lambda: len(handler.started) == 2)
    dispatcher.submit_claimed(row("a"))  # waits behind the running "a"
    dispatcher.submit_claimed(row("c"))  # waits for a free slot
    await until(lambda: dispatcher.backlog == 4)  # two running, two waiting
    stop.set()
    await task
    assert sorted(handler.cancelled) == ["a", "b"]
    assert sorted(handler.handed_back) == ["a", "c"]
    assert sorted(handler.started) == ["a", "b"]


async def test_jobs_finishing_during_the_drain_do_not_break_it() -> None:
    handler = Recorder()
    dispatcher = Dispatcher(handler, concurrency=4)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop, grace_s=5))
    for name in ("a", "b", "c"):
        dispatcher.submit_claimed(row(name))
    await until(lambda: len(handler.started) == 3)
    for name in ("a", "b", "c"):
        dispatcher.submit_claimed(row(name))

    async def slow_hand_back(claimed: Session) -> None:
        handler.release.set()  # running jobs finish and leave while the drain awaits
        await asyncio.sleep(0)
        handler.handed_back.append(claimed.id)

    handler.hand_back = slow_hand_back  # type: ignore[method-assign]
    await until(lambda: dispatcher.backlog == 6)  # three running, three waiting
    stop.set()
    await task
    assert sorted(handler.handed_back) == ["a", "b", "c"]
    assert handler.cancelled == []
