"""The controller's hands: claim a session, then apply the decision through Fly and the store."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

from listener.errors import (
    ClaimLostError,
    FlyError,
    FlyNotFoundError,
    FlyOutcomeUnknownError,
    SessionGoneError,
    StoreError,
)
from listener.fly import machine_config
from listener.metrics import Metrics
from listener.models import (
    MANAGED_BY,
    ExecResult,
    Machine,
    MachineSpec,
    MachineState,
    SandboxState,
    Session,
    StopReason,
    Tombstone,
)
from listener.reconciler import (
    Policy,
    Provision,
    Reject,
    Release,
    SmokeTestError,
    Teardown,
    Warn,
    decide,
    failure_message,
    pick_machine,
    retry_delay_s,
)

log = structlog.get_logger(component="effects")

ADOPT_DELAYS_S = (0.5, 1.0, 2.0)  # Fly lists lag behind creates
SMOKE_TIMEOUT_S = 30
START_TIMEOUT_S = 300.0  # Fly: `created` can last minutes on a busy host
HAND_BACK_TIMEOUT_S = 3.0


class MachineApi(Protocol):
    """What the controller needs from Fly (FlyClient satisfies it)."""

    async def create_machine(
        self, config: Mapping[str, object], *, region: str | None
    ) -> Machine: ...
    async def get_machine(self, machine_id: str) -> Machine: ...
    async def list_machines(
        self, *, metadata: Mapping[str, str] | None = None
    ) -> list[Machine]: ...
    async def wait_for_state(
        self, machine_id: str, state: str = ..., *, timeout_s: float, known: Machine | None = None
    ) -> Machine: ...
    async def destroy(self, machine_id: str, *, force: bool = True) -> None: ...
    async def exec(
        self, machine_id: str, argv: Sequence[str], *, stdin: str | None = None, timeout_s: int
    ) -> ExecResult: ...


class SandboxRepo(Protocol):
    """What the controller needs from the store (SandboxStore satisfies it)."""

    owner: str

    async def claim(
        self, session_id: str, lease_s: int, *, force: bool = False
    ) -> Session | None: ...
    async def renew(self, s: Session, lease_s: int) -> Session: ...
    async def release(self, s: Session) -> Session: ...
    async def begin_provision(
        self, s: Session, max_lifetime_s: int, max_live_per_user: int = 0
    ) -> Session: ...
    async def set_machine(self, s: Session, machine_id: str, region: str) -> Session: ...
    async def mark_ready(
        self, s: Session, idle_timeout_s: int, idle_warning_s: int = 0
    ) -> Session: ...
    async def mark_idle_warning(self, s: Session) -> Session: ...
    async def mark_failed(self, s: Session, error: str, retry_after_s: float | None) -> Session: ...
    async def begin_stop(self, s: Session, reason: str) -> Session: ...
    async def mark_destroyed(self, s: Session) -> Session: ...
    async def record_event(
        self,
        session_id: str,
        incarnation: str | None,
        epoch: int | None,
        event: str,
        detail: Mapping[str, Any],
    ) -> None: ...
    async def claim_tombstones(
        self, lease_s: int, limit: int, session_id: str | None = None
    ) -> list[Tombstone]: ...
    async def bury(self, tombstone: Tombstone) -> bool: ...


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def utcnow() -> datetime:
    """The wall clock, timezone-aware."""
    return datetime.now(UTC)


@dataclass
class Controller:
    """Handles one session at a time per call: claim, decide, act, record; idempotent throughout."""

    fly: MachineApi
    store: SandboxRepo
    policy: Policy
    image: str
    smoke_command: str = "echo Hello from sandbox"
    lease_s: int = 120
    metrics: Metrics = field(default_factory=Metrics)
    clock: Callable[[], datetime] = utcnow
    on_settled: Callable[[str], None] = lambda session_id: None
    """Called when a session becomes ready or final: its queued commands can run or end."""

    async def handle(self, session_id: str) -> None:
        """React to a hint about a session: claim it if due, then act on what the row says."""
        row = await self.store.claim(session_id, self.lease_s)
        if row is None:  # deleted: destroy what its incarnations left (the id may live again)
            await self.bury_deleted(session_id)
        elif row.claimed_by_me(self.store.owner) and not row.state.is_final:
            await self.act(row)

    async def act(self, row: Session) -> None:
        """Apply the decision for a row this process has claimed, keeping the lease alive."""
        with structlog.contextvars.bound_contextvars(session_id=row.id, epoch=row.epoch):
            try:
                await self._act_keeping_lease(row)
            except asyncio.CancelledError:
                await self.hand_back(row)  # the next owner resumes at once, not after a lease
                raise

    async def _act_keeping_lease(self, row: Session) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                keeper = tg.create_task(self._keep_lease(row), name=f"lease-{row.id}")
                await self._apply(row)
                keeper.cancel()
        except* ClaimLostError as group:
            self.metrics.claims_lost.inc()
            gone = any(isinstance(e, SessionGoneError) for e in group.exceptions)
            log.info("claim_lost", gone=gone)
            if not gone:  # a precondition failed while the claim is still ours: free the row now
                await self.hand_back(row)

    async def hand_back(self, row: Session) -> None:
        """Release a claim this process will not finish; never raises (shutdown paths call it):
        if the release fails, the lease simply lapses."""
        try:
            async with asyncio.timeout(HAND_BACK_TIMEOUT_S):
                await self.store.release(row)
            log.info("claim_handed_back", session_id=row.id, state=row.state.value)
        except ClaimLostError:
            pass
        except Exception as exc:  # StoreError, timeout: the lease lapses instead
            log.warning("claim_hand_back_failed", session_id=row.id, error=str(exc))

    async def _apply(self, row: Session) -> None:
        match decide(row, self.clock(), self.policy):
            case Provision(spec):
                await self.provision(row, spec)
            case Teardown(reason):
                await self.teardown(row, reason)
            case Reject(error):
                row = await self.store.mark_failed(row, error, None)
                self.metrics.session_failed("rejected")
                self.on_settled(row.id)
                await self._event(row, "sandbox_rejected", error=error)
            case Warn():
                row = await self.store.mark_idle_warning(row)
                await self._event(row, "idle_warning", expires_at=_iso(row.expires_at))
            case Release():
                await self.store.release(row)

    # -- provisioning ---------------------------------------------------------------------

    async def provision(self, row: Session, spec: MachineSpec) -> None:
        """Create or adopt the machine, wait for it, smoke-test it, mark ready; or retry/fail."""
        resumed = row.state is SandboxState.PROVISIONING
        row = await self.store.begin_provision(
            row, self.policy.max_lifetime_s, self.policy.max_live_per_user
        )
        if row.state is SandboxState.FAILED:  # the owner is at the live-sandbox limit
            self.metrics.session_failed("limit")
            self.on_settled(row.id)
            await self._event(row, "sandbox_rejected", error=row.error)
            return
        started = time.monotonic()
        machine: Machine | None = None
        try:
            try:
                async with asyncio.TaskGroup() as tg:  # the audit write stays off the hot path
                    tg.create_task(
                        self._event(
                            row,
                            "provisioning_started",
                            attempt=row.attempts,
                            region=spec.region,
                            resumed=resumed,
                        )
                    )
                    machine, extras, created = await self._obtain_machine(row, spec, resumed)
            except ExceptionGroup as group:  # only obtaining the machine can fail in there
                raise group.exceptions[0] from None
            if row.sandbox_id != machine.id:  # written back before anything else can fail
                row = await self.store.set_machine(row, machine.id, machine.region)
            for duplicate in extras:  # only now, with the claim just confirmed
                await self._destroy_quietly(duplicate.id)
            if created:
                await self._event(
                    row, "machine_created", machine_id=machine.id, region=machine.region
                )
            with structlog.contextvars.bound_contextvars(machine_id=machine.id):
                machine = await self.fly.wait_for_state(
                    machine.id, MachineState.STARTED, timeout_s=START_TIMEOUT_S, known=machine
                )
                output = await self._smoke(machine)
                row = await self.store.mark_ready(
                    row, self.policy.idle_timeout_s, self.policy.idle_warning_s
                )
                elapsed = time.monotonic() - started
                self.metrics.provisioned(elapsed)
                self.on_settled(row.id)
                await self._event(
                    row,
                    "sandbox_ready",
                    machine_id=machine.id,
                    seconds=round(elapsed, 3),
                    smoke_output=output,
                )
        except SessionGoneError:
            if machine is not None:  # the row is gone: nobody else will want this machine
                await self._destroy_quietly(machine.id)
            raise
        except ClaimLostError:
            raise  # the machine may be the new owner's now: leave it alone
        except Exception as exc:  # any failure becomes the row's state, nothing is lost
            await self._provision_failed(row, spec, machine, exc)

    async def _obtain_machine(
        self, row: Session, spec: MachineSpec, resumed: bool
    ) -> tuple[Machine, list[Machine], bool]:
        """The machine to use (adopted when resuming, else created), duplicates, and whether
        it was created now."""
        if resumed:
            machine, extras = await self._existing_machine(row)
            if machine is not None:
                return machine, extras, False
        return await self._create(row, spec), [], True

    async def _provision_failed(
        self, row: Session, spec: MachineSpec, machine: Machine | None, exc: Exception
    ) -> None:
        delay = retry_delay_s(row.attempts, exc, self.policy)
        message = failure_message(exc, spec)
        log.warning(
            "provisioning_failed", error=str(exc), error_type=type(exc).__name__, retry_in_s=delay
        )
        row = await self.store.mark_failed(row, message, delay)  # fenced: raises if not ours
        if machine is not None:  # ours for sure now; the sweeper reaps it if this fails
            await self._destroy_quietly(machine.id)
        if delay is None:
            self.metrics.session_failed("provisioning")
            self.on_settled(row.id)
        await self._event(
            row,
            "provisioning_failed",
            error=message,
            retry_in_s=delay,
            error_type=type(exc).__name__,
        )

    async def _existing_machine(self, row: Session) -> tuple[Machine | None, list[Machine]]:
        """After a crash or a lost lease: the machine an earlier attempt made, if it lives, and
        any duplicates to destroy once the claim is confirmed."""
        if row.sandbox_id:
            with contextlib.suppress(FlyNotFoundError):
                machine = await self.fly.get_machine(row.sandbox_id)
                if not machine.state.is_gone:
                    return machine, []
        return await self._adopt(row, tries=1)

    async def _create(self, row: Session, spec: MachineSpec) -> Machine:
        assert row.deadline_at is not None, "begin_provision sets the deadline"
        config = machine_config(
            self.image,
            cpu_kind=spec.cpu_kind,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            env={
                "SESSION_ID": row.id,
                "SANDBOX_DEADLINE_EPOCH_S": str(int(row.deadline_at.timestamp())),
            },
            metadata={
                "session_id": row.id,
                "incarnation": row.incarnation,
                "epoch": str(row.epoch),
                "managed_by": MANAGED_BY,
            },
        )
        try:
            return await self.fly.create_machine(config, region=spec.region)
        except FlyOutcomeUnknownError:
            adopted, _older = await self._adopt(row, tries=len(ADOPT_DELAYS_S))
            if adopted is None:
                raise
            return adopted  # older-epoch leftovers are the sweeper's: one create per claim

    async def _adopt(self, row: Session, *, tries: int) -> tuple[Machine | None, list[Machine]]:
        """Find this row incarnation's live machines by metadata (never by the session id,
        which another row may have had): the one to keep and the extras."""
        for attempt in range(tries):
            found = await self.fly.list_machines(metadata={"incarnation": row.incarnation})
            keep, extras = pick_machine(found, row.incarnation)
            if keep is not None:
                log.info("machine_adopted", machine_id=keep.id, duplicates=len(extras))
                return keep, extras
            if attempt + 1 < tries:
                await asyncio.sleep(ADOPT_DELAYS_S[attempt])  # backoff for Fly's list lag
        return None, []

    async def _smoke(self, machine: Machine) -> str:
        if not self.smoke_command.strip():
            return ""
        result = await self.fly.exec(
            machine.id, shlex.split(self.smoke_command), timeout_s=SMOKE_TIMEOUT_S
        )
        if not result.ok:
            raise SmokeTestError(result.exit_code, result.stderr or result.stdout)
        return result.stdout.strip()[:500]

    # -- teardown ---------------------------------------------------------------------------

    async def teardown(self, row: Session, reason: StopReason) -> None:
        """Destroy the session's machine (force; 404 is done) and mark the row destroyed."""
        with structlog.contextvars.bound_contextvars(machine_id=row.sandbox_id):
            await self._teardown(row, reason)

    async def _teardown(self, row: Session, reason: StopReason) -> None:
        unrecorded = row.sandbox_id is None and row.state in {
            SandboxState.PROVISIONING,
            SandboxState.STOPPING,
        }
        if row.state is not SandboxState.STOPPING:
            row = await self.store.begin_stop(row, reason.value)
            await self._event(row, "sandbox_stopping", reason=reason.value)
        ids = {row.sandbox_id} if row.sandbox_id else set()
        if unrecorded:  # a crash between create and set_machine leaves the id only in Fly
            found = await self.fly.list_machines(metadata={"incarnation": row.incarnation})
            ids |= {m.id for m in found if m.incarnation == row.incarnation}
        try:
            for machine_id in sorted(ids):
                await self.fly.destroy(machine_id, force=True)
        except FlyError as exc:  # keep the claim: the row is retried when its lease lapses
            await self._event(row, "teardown_failed", error=str(exc), retry_in_s=self.lease_s)
            return
        row = await self.store.mark_destroyed(row)
        self.metrics.destroyed(reason.value)
        self.on_settled(row.id)
        await self._event(row, "sandbox_destroyed", reason=reason.value, machines=sorted(ids))

    async def bury_deleted(self, session_id: str | None = None, limit: int = 100) -> int:
        """Destroy the machines of deleted incarnations (of one session, when given) and
        forget their tombstones; returns how many machines were destroyed."""
        tombstones = await self.store.claim_tombstones(self.lease_s, limit, session_id)
        destroyed = 0
        for tombstone in tombstones:
            destroyed += await self.bury(tombstone, StopReason.DELETED)
        return destroyed

    async def bury(self, tombstone: Tombstone, reason: StopReason) -> int:
        """Destroy every machine of one deleted incarnation, then forget it."""
        found = await self.fly.list_machines(metadata={"incarnation": tombstone.incarnation})
        ids = {
            m.id for m in found if m.incarnation == tombstone.incarnation and not m.state.is_gone
        }
        if tombstone.sandbox_id:  # recorded before a list could show it
            ids.add(tombstone.sandbox_id)
        for machine_id in sorted(ids):
            await self.fly.destroy(machine_id, force=True)  # 404 is done
        if ids:
            self.metrics.destroyed(reason.value)
            await self._record(
                tombstone.session_id,
                tombstone.incarnation,
                None,
                "sandbox_destroyed",
                reason=reason.value,
                machines=sorted(ids),
            )
        await self.store.bury(tombstone)
        return len(ids)

    async def _destroy_quietly(self, machine_id: str) -> None:
        """Best-effort cleanup on a failure path; the sweeper reaps what this misses."""
        try:
            await self.fly.destroy(machine_id, force=True)
        except FlyError as exc:
            log.warning("machine_destroy_failed", machine_id=machine_id, error=str(exc))

    # -- lease and audit --------------------------------------------------------------------

    async def _keep_lease(self, row: Session) -> None:
        """Renew the claim every lease/3. A failed renewal is retried at the next tick; a lost
        (or released) claim ends renewal only: every write is fenced, so the work itself learns
        of a takeover at its next write and stops there."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.store.renew(row, self.lease_s)
            except ClaimLostError:
                return
            except StoreError as exc:
                log.warning("lease_renew_failed", error=str(exc))

    async def _event(self, row: Session, event: str, **detail: Any) -> None:
        """Log the transition and append it to sandbox_events for this row incarnation."""
        await self._record(row.id, row.incarnation, row.epoch, event, **detail)

    async def _record(
        self, session_id: str, incarnation: str, epoch: int | None, event: str, **detail: Any
    ) -> None:
        """The audit is best-effort: a failed write is logged, never undoes or fails the
        transition it describes."""
        log.info(event, **detail)
        try:
            await self.store.record_event(session_id, incarnation, epoch, event, detail)
        except Exception as exc:  # best-effort by design: never fail the work it describes
            log.warning("sandbox_event_failed", sandbox_event=event, error=str(exc))
