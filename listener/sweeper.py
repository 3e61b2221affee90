"""The sweeper: one leader at a time reconciles the rows against Fly's inventory."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog

from listener.errors import ClaimLostError, FlyNotFoundError
from listener.metrics import Metrics
from listener.models import MANAGED_BY, Machine, Session
from listener.reconciler import (
    DestroyOrphan,
    MachineLostError,
    Policy,
    RecoverLost,
    SweepAction,
    failure_message,
    is_machine_lost,
    reconcile,
    retry_delay_s,
)

log = structlog.get_logger(component="sweeper")

LEASE_NAME = "sweeper"


class Inventory(Protocol):
    """What the sweeper needs from Fly (FlyClient satisfies it)."""

    async def list_machines(
        self, *, metadata: Mapping[str, str] | None = None
    ) -> list[Machine]: ...
    async def get_machine(self, machine_id: str) -> Machine: ...
    async def destroy(self, machine_id: str, *, force: bool = True) -> None: ...


class SweepRepo(Protocol):
    """What the sweeper needs from the store (SandboxStore satisfies it)."""

    owner: str

    async def take_leader_lease(self, name: str, ttl_s: int) -> bool: ...
    async def release_leader_lease(self, name: str) -> None: ...
    async def release(self, s: Session) -> Session: ...
    async def sessions_by_ids(self, ids: Sequence[str]) -> dict[str, Session]: ...
    async def live_sessions(self, limit: int = ...) -> list[Session]: ...
    async def claim(
        self, session_id: str, lease_s: int, *, force: bool = False
    ) -> Session | None: ...
    async def mark_failed(self, s: Session, error: str, retry_after_s: float | None) -> Session: ...
    async def record_event(
        self,
        session_id: str,
        incarnation: str | None,
        epoch: int | None,
        event: str,
        detail: Mapping[str, Any],
    ) -> None: ...


def _is_uuid(value: str) -> bool:
    """Metadata is free text: an id that is not a UUID names no session (and would fail the
    lookup for every machine)."""
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one sweep found and did."""

    leader: bool
    machines: int = 0
    actions: list[SweepAction] = field(default_factory=list)
    applied: int = 0


@dataclass
class Sweeper:
    """Destroys orphan machines and recovers sessions whose machine vanished."""

    fly: Inventory
    store: SweepRepo
    policy: Policy
    clock: Callable[[], datetime]
    interval_s: float = 60.0
    lease_s: int = 120
    metrics: Metrics = field(default_factory=Metrics)

    async def sweep_once(self, *, dry_run: bool = False) -> SweepReport:
        """One reconcile if this process is the leader; `dry_run` decides without acting."""
        ttl = max(int(self.interval_s * 3), 10)
        if not dry_run and not await self.store.take_leader_lease(LEASE_NAME, ttl):
            return SweepReport(leader=False)
        machines = await self.fly.list_machines(metadata={"managed_by": MANAGED_BY})
        ids = sorted({m.session_id for m in machines if m.session_id and _is_uuid(m.session_id)})
        live = await self.store.live_sessions()
        sessions = {s.id: s for s in live}  # the rest (final or missing rows) by id
        sessions |= await self.store.sessions_by_ids([i for i in ids if i not in sessions])
        actions = reconcile(machines, sessions, live, self.clock(), self.policy)
        applied = 0
        if not dry_run:
            for action in actions:  # one failing action must not block the others, every sweep
                try:
                    applied += await self._apply(action)
                except Exception as exc:
                    self.metrics.sweep_actions.labels(action="failed").inc()
                    log.warning("sweep_action_failed", action=repr(action), error=str(exc))
        log.info(
            "sweep_finished",
            machines=len(machines),
            live=len(live),
            actions=len(actions),
            applied=applied,
            dry_run=dry_run,
        )
        return SweepReport(True, len(machines), actions, applied)

    async def _apply(self, action: SweepAction) -> int:
        match action:
            case DestroyOrphan(machine_id, session_id, reason, incarnation):
                await self.fly.destroy(machine_id, force=True)
                self.metrics.orphans_destroyed.inc()
                self.metrics.sweep_actions.labels(action="destroy_orphan").inc()
                log.info(
                    "orphan_destroyed", machine_id=machine_id, session_id=session_id, reason=reason
                )
                if session_id:
                    await self.store.record_event(
                        session_id,
                        incarnation if incarnation and _is_uuid(incarnation) else None,
                        None,
                        "orphan_destroyed",
                        {"machine_id": machine_id, "reason": reason},
                    )
                return 1
            case RecoverLost(session_id, machine_id):
                return await self._recover(session_id, machine_id)

    async def _recover(self, session_id: str, machine_id: str) -> int:
        """Confirm with a GET (lists lag), then re-provision or fail the session."""
        try:
            machine: Machine | None = await self.fly.get_machine(machine_id)
        except FlyNotFoundError:
            machine = None
        if not is_machine_lost(machine):
            return 0
        row = await self.store.claim(session_id, self.lease_s, force=True)
        if row is None or not row.claimed_by_me(self.store.owner):
            return 0
        if row.sandbox_id != machine_id:  # replaced meanwhile: nothing to recover
            with contextlib.suppress(ClaimLostError):
                await self.store.release(row)
            return 0
        error = MachineLostError(machine_id)
        delay = retry_delay_s(row.attempts, error, self.policy)
        message = failure_message(error)
        try:  # replace it at once (this is not Fly failing), unless out of attempts
            row = await self.store.mark_failed(row, message, None if delay is None else 1.0)
        except ClaimLostError:
            return 0
        if machine is not None:
            await self.fly.destroy(machine_id, force=True)
        self.metrics.sweep_actions.labels(action="recover_lost").inc()
        log.info(
            "sandbox_lost", session_id=session_id, machine_id=machine_id, state=row.state.value
        )
        await self.store.record_event(
            session_id,
            row.incarnation,
            row.epoch,
            "sandbox_lost",
            {"machine_id": machine_id, "error": message},
        )
        return 1

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every interval until `stop`; a failed sweep is logged and the next one runs."""
        try:
            while not stop.is_set():
                try:
                    report = await self.sweep_once()
                    self.metrics.sweeps.labels(
                        outcome="leader" if report.leader else "follower"
                    ).inc()
                except Exception:
                    self.metrics.sweeps.labels(outcome="failed").inc()
                    log.exception("sweep_failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.store.release_leader_lease(LEASE_NAME), timeout=3)
