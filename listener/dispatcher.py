"""The work queue: one handler per session at a time, a cap on concurrency, a graceful drain."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog

from listener.metrics import Metrics
from listener.models import Session

log = structlog.get_logger(component="dispatcher")

SEEN_MAX = 100_000  # ids announced by Realtime, remembered for the missed-event count


class Handler(Protocol):
    """What the dispatcher runs (effects.Controller satisfies it)."""

    async def handle(self, session_id: str) -> None: ...
    async def act(self, row: Session) -> None: ...
    async def hand_back(self, row: Session) -> None:
        """Release a claim; never raises."""


Lane = Literal["session", "commands"]
LANES: tuple[Lane, ...] = ("session", "commands")


@dataclass(frozen=True, slots=True)
class Job:
    """Work for one session: a hint to claim it, a row a scan claimed, or its command queue."""

    session_id: str
    claimed: Session | None = None
    lane: Lane = "session"

    @property
    def key(self) -> tuple[Lane, str]:
        """Jobs with one key never run at the same time (commands never block a teardown)."""
        return (self.lane, self.session_id)


class Dispatcher:
    """Runs jobs so that one session is never handled twice at once in this process."""

    def __init__(
        self,
        handler: Handler,
        *,
        run_commands: Callable[[str], Awaitable[object]] | None = None,
        concurrency: int,
        metrics: Metrics | None = None,
        max_queued: int = 10_000,
    ) -> None:
        self._handler = handler
        self._run_commands = run_commands
        self._metrics = metrics or Metrics()
        self._queue: deque[Job] = deque()
        self._max_queued = max_queued
        self._queued = asyncio.Event()
        # one cap per lane: long-running commands never hold up provisioning or teardown
        self._slots = {lane: asyncio.Semaphore(concurrency) for lane in LANES}
        self._pending: dict[tuple[Lane, str], deque[Job]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False

    @property
    def backlog(self) -> int:
        """Jobs this process holds: queued, running, or waiting for their lane or a slot."""
        return len(self._queue) + sum(len(q) for q in self._pending.values())

    def submit(self, session_id: str, *, announced: bool = False) -> None:
        """Queue a hint without blocking (callbacks call this); if full, drop it: scans catch up."""
        if announced:
            self._seen[session_id] = None
            self._seen.move_to_end(session_id)
            while len(self._seen) > SEEN_MAX:
                self._seen.popitem(last=False)
        self._put(Job(session_id))

    def submit_claimed(self, row: Session) -> None:
        """Queue a row a scan has already claimed for this process."""
        self._put(Job(row.id, row))

    def submit_commands(self, session_id: str) -> None:
        """Queue a run of the session's command queue (ignored when nothing runs commands)."""
        if self._run_commands is not None:
            self._put(Job(session_id, lane="commands"))

    def was_announced(self, session_id: str) -> bool:
        """Whether a Realtime event named this session recently."""
        return session_id in self._seen

    async def wait_idle(self) -> None:
        """Return once nothing is queued or running (for `sweep --once` and tests)."""
        while self.backlog or self._tasks:
            self._idle.clear()
            await self._idle.wait()

    def _put(self, job: Job) -> None:
        if len(self._queue) >= self._max_queued:
            log.warning("job_dropped", session_id=job.session_id, reason="queue full")
            return
        self._queue.append(job)
        self._queued.set()
        self._idle.clear()
        self._metrics.queue_depth.set(self.backlog)

    async def run(self, stop: asyncio.Event, grace_s: float) -> None:
        """Start jobs until `stop`; then give running jobs `grace_s` before cancelling them."""
        async with asyncio.TaskGroup() as tg:
            stopped = tg.create_task(stop.wait(), name="dispatcher-stop")
            try:
                while not stop.is_set():
                    if not self._queue:
                        self._queued.clear()
                        queued = tg.create_task(self._queued.wait(), name="dispatcher-wait")
                        await asyncio.wait({queued, stopped}, return_when=asyncio.FIRST_COMPLETED)
                        queued.cancel()
                        continue
                    self._start(tg, self._queue.popleft())  # taken and registered in one step
            finally:
                stopped.cancel()
                await self._drain(grace_s)

    def _start(self, tg: asyncio.TaskGroup, job: Job) -> None:
        queue = self._pending.get(job.key)
        if queue is not None:
            if job.claimed is None and any(j.claimed is None for j in list(queue)[1:]):
                return  # a hint is already waiting behind the running job: one is enough
            queue.append(job)
            return
        self._pending[job.key] = deque([job])
        task = tg.create_task(self._run_key(job.key), name=f"{job.lane}-{job.session_id}")
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._metrics.queue_depth.set(self.backlog)
        if not self._tasks and not self.backlog:
            self._idle.set()

    async def _run_key(self, key: tuple[Lane, str]) -> None:
        queue = self._pending[key]
        try:
            while queue:
                job = queue[0]
                started = False
                try:
                    async with self._slots[job.lane]:
                        if not self._draining:  # no new work once stop is set
                            started = True
                            self._metrics.in_flight.inc()
                            try:
                                await self._run_job(job)
                            finally:
                                self._metrics.in_flight.dec()
                finally:
                    if not started and job.claimed is not None:
                        await self._handler.hand_back(job.claimed)
                queue.popleft()
        finally:
            del self._pending[key]

    async def _run_job(self, job: Job) -> None:
        """Run one job; a failure is logged with its traceback and never ends the loop."""
        try:
            if job.lane == "commands" and self._run_commands is not None:
                await self._run_commands(job.session_id)
            elif job.claimed is not None:
                await self._handler.act(job.claimed)
            else:
                await self._handler.handle(job.session_id)
        except Exception:
            log.exception("session_handling_failed", session_id=job.session_id, lane=job.lane)

    async def _drain(self, grace_s: float) -> None:
        """Hand back claimed rows nobody started; let running jobs finish within the grace."""
        self._draining = True
        waiting: list[Job] = list(self._queue)
        self._queue.clear()
        for queue in list(self._pending.values()):  # running jobs finish (and leave) meanwhile
            while len(queue) > 1:
                waiting.append(queue.pop())
        await self._hand_back_all(waiting)
        if not self._tasks:
            return
        log.info("drain_started", running=len(self._tasks), grace_s=grace_s)
        _, late = await asyncio.wait(self._tasks, timeout=grace_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        await self._hand_back_all(list(self._queue))  # claimed while draining
        self._queue.clear()
        log.info("drain_finished", cancelled=len(late))

    async def _hand_back_all(self, jobs: list[Job]) -> None:
        claimed = [job.claimed for job in jobs if job.claimed is not None]
        await asyncio.gather(*(self._handler.hand_back(row) for row in claimed))
