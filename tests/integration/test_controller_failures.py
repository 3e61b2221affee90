"""Failure paths of the controller and sweeper, sequenced with fakes (the real gateways are
tested end to end): a lost claim never destroys a machine, store blips never cancel work,
audit writes are best-effort, hand-backs never raise, one bad sweep action blocks nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from listener.effects import Controller
from listener.errors import ClaimLostError, FlyCapacityError, FlyServerError, StoreError
from listener.models import (
    ExecResult,
    Machine,
    MachineSpec,
    MachineState,
    SandboxState,
    Session,
    SessionStatus,
)
from listener.reconciler import Policy
from listener.sweeper import Sweeper

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)
POLICY = Policy(
    default_region="iad",
    allowed_regions=frozenset({"iad"}),
    cpu_kind="shared",
    cpus=1,
    memory_mb=1024,
    max_memory_mb=4096,
    max_cpus=4,
    max_attempts=3,
    idle_timeout_s=1800,
    max_lifetime_s=3600,
    orphan_grace_s=0,
)
SPEC = MachineSpec("iad", "shared", 1, 1024)


def session(**kw: Any) -> Session:
    base = Session(
        "s1",
        "inc-s1",
        "u1",
        SessionStatus.ACTIVE,
        SandboxState.REQUESTED,
        epoch=5,
        claimed_by="me",
        deadline_at=NOW + timedelta(hours=1),
    )
    return replace(base, **kw)


class FakeFly:
    """Records calls; `fail_wait` makes the wait fail (a provisioning failure)."""

    def __init__(
        self,
        fail_wait: bool = False,
        fail_destroy: set[str] | None = None,
        fail_create: Exception | None = None,
    ) -> None:
        self.fail_wait = fail_wait
        self.fail_create = fail_create
        self.fail_destroy = fail_destroy or set()
        self.destroyed: list[str] = []
        self.machines: list[Machine] = []

    async def create_machine(self, config: Mapping[str, object], *, region: str | None) -> Machine:
        if self.fail_create is not None:
            raise self.fail_create
        machine = Machine("m1", MachineState.CREATED, "iad", "v1", created_at=NOW)
        self.machines.append(machine)
        return machine

    async def get_machine(self, machine_id: str) -> Machine:
        return Machine(machine_id, MachineState.DESTROYED, "iad", "v1")

    async def list_machines(self, *, metadata: Mapping[str, str] | None = None) -> list[Machine]:
        return list(self.machines)

    async def wait_for_state(
        self,
        machine_id: str,
        state: str = "started",
        *,
        timeout_s: float,
        known: Machine | None = None,
    ) -> Machine:
        if self.fail_wait:
            raise FlyServerError("boom", status=500)
        return Machine(machine_id, MachineState.STARTED, "iad", "v1")

    async def destroy(self, machine_id: str, *, force: bool = True) -> None:
        if machine_id in self.fail_destroy:
            raise FlyServerError("destroy refused", status=500)
        self.destroyed.append(machine_id)

    async def exec(
        self, machine_id: str, argv: Sequence[str], *, stdin: str | None = None, timeout_s: int
    ) -> ExecResult:
        return ExecResult(0, "ok\n")


class FakeStore:
    """Applies transitions to one row; knobs make chosen calls fail."""

    owner = "me"

    def __init__(
        self,
        row: Session,
        *,
        lose_on: str = "",
        fail_events: bool = False,
        fail_release: bool = False,
        fail_renew: bool = False,
    ) -> None:
        self.row = row
        self.lose_on = lose_on
        self.fail_events = fail_events
        self.fail_release = fail_release
        self.fail_renew = fail_renew
        self.calls: list[str] = []
        self.renewals = 0
        self.renewed_twice = asyncio.Event()

    def _step(self, name: str, **changes: Any) -> Session:
        self.calls.append(name)
        if name == self.lose_on:
            raise ClaimLostError(self.row.id, self.row.epoch)
        self.row = replace(self.row, **changes)
        return self.row

    async def claim(self, session_id: str, lease_s: int, *, force: bool = False) -> Session | None:
        return self._step("claim", claimed_by="me")

    async def renew(self, s: Session, lease_s: int) -> Session:
        self.renewals += 1
        if self.renewals >= 2:
            self.renewed_twice.set()
        if self.fail_renew:
            raise StoreError("renew: 503")
        return self.row

    async def release(self, s: Session) -> Session:
        if self.fail_release:
            raise StoreError("release: connection refused")
        return self._step("release", claimed_by=None)

    async def begin_provision(
        self, s: Session, max_lifetime_s: int, max_live_per_user: int = 0
    ) -> Session:
        return self._step("begin_provision", state=SandboxState.PROVISIONING, attempts=1)

    async def set_machine(self, s: Session, machine_id: str, region: str) -> Session:
        return self._step("set_machine", sandbox_id=machine_id)

    async def mark_ready(self, s: Session, idle_timeout_s: int, idle_warning_s: int = 0) -> Session:
        return self._step("mark_ready", state=SandboxState.READY, claimed_by=None)

    async def mark_idle_warning(self, s: Session) -> Session:
        return self._step("mark_idle_warning", idle_warning_at=NOW)

    async def mark_failed(self, s: Session, error: str, retry_after_s: float | None) -> Session:
        state = SandboxState.REQUESTED if retry_after_s is not None else SandboxState.FAILED
        return self._step("mark_failed", state=state, sandbox_id=None, claimed_by=None, error=error)

    async def begin_stop(self, s: Session, reason: str) -> Session:
        return self._step("begin_stop", state=SandboxState.STOPPING)

    async def mark_destroyed(self, s: Session) -> Session:
        return self._step("mark_destroyed", state=SandboxState.DESTROYED, claimed_by=None)

    async def record_event(
        self,
        session_id: str,
        incarnation: str | None,
        epoch: int | None,
        event: str,
        detail: Mapping[str, Any],
    ) -> None:
        self.calls.append(f"event:{event}")
        if self.fail_events:
            raise StoreError("record_event: 503")


def controller(fly: FakeFly, store: FakeStore, lease_s: int = 120) -> Controller:
    return Controller(fly, store, POLICY, image="img", lease_s=lease_s, clock=lambda: NOW)


async def test_a_claim_lost_during_a_failed_provision_leaves_the_machine_alone() -> None:
    fly, store = FakeFly(fail_wait=True), FakeStore(session(), lose_on="mark_failed")
    await controller(fly, store).act(store.row)
    assert "set_machine" in store.calls  # the machine id was written back at once
    assert fly.destroyed == [], "a deposed worker destroyed a machine the new owner may use"


async def test_a_failed_provision_destroys_its_machine_once_the_failure_is_recorded() -> None:
    fly, store = FakeFly(fail_wait=True), FakeStore(session())
    await controller(fly, store).act(store.row)
    assert store.row.state is SandboxState.REQUESTED  # retry with backoff
    assert fly.destroyed == ["m1"]
    assert store.calls.index("mark_failed") < len(store.calls)


async def test_a_failed_create_becomes_a_readable_retry() -> None:
    fly = FakeFly(fail_create=FlyCapacityError("no capacity", status=422))
    store = FakeStore(session())
    await controller(fly, store).act(store.row)
    assert store.row.state is SandboxState.REQUESTED
    assert store.row.error and "Fly has no capacity for this sandbox" in store.row.error


async def test_a_claim_lost_while_creating_stops_the_work() -> None:
    fly = FakeFly(fail_create=ClaimLostError("s1", 5))
    store = FakeStore(session())
    await controller(fly, store).act(store.row)
    assert "mark_failed" not in store.calls


async def test_audit_failures_never_undo_or_fail_a_transition() -> None:
    fly, store = FakeFly(), FakeStore(session(), fail_events=True)
    await controller(fly, store).act(store.row)
    assert store.row.state is SandboxState.READY
    assert "event:sandbox_ready" in store.calls


async def test_hand_back_never_raises() -> None:
    store = FakeStore(session(), fail_release=True)
    await controller(FakeFly(), store).hand_back(store.row)  # logged, the lease lapses instead


async def test_a_store_blip_during_renewal_does_not_cancel_the_work() -> None:
    fly, store = FakeFly(), FakeStore(session(), fail_renew=True)
    gate = asyncio.Event()
    original = fly.wait_for_state

    async def slow_wait(*args: Any, **kwargs: Any) -> Machine:
        await asyncio.wait_for(store.renewed_twice.wait(), 5)  # two failed renewals meanwhile
        gate.set()
        return await original(*args, **kwargs)

    fly.wait_for_state = slow_wait  # type: ignore[method-assign]
    await controller(fly, store, lease_s=0.03).act(store.row)  # type: ignore[arg-type]
    assert gate.is_set() and store.row.state is SandboxState.READY


async def test_a_teardown_fly_refuses_is_recorded_and_kept_for_the_lease_retry() -> None:
    fly = FakeFly(fail_destroy={"m1"})
    store = FakeStore(
        session(state=SandboxState.READY, status=SessionStatus.ENDED, sandbox_id="m1")
    )
    await controller(fly, store).act(store.row)
    assert store.row.state is SandboxState.STOPPING
    assert "event:teardown_failed" in store.calls and "mark_destroyed" not in store.calls


class SweepStore:
    owner = "me"

    def __init__(self) -> None:
        self.events: list[str] = []
        self.looked_up: list[list[str]] = []

    async def take_leader_lease(self, name: str, ttl_s: int) -> bool:
        return True

    async def release_leader_lease(self, name: str) -> None:
        return None

    async def sessions_by_ids(self, ids: Sequence[str]) -> dict[str, Session]:
        self.looked_up.append(list(ids))
        return {}

    async def live_sessions(self, limit: int = 10000) -> list[Session]:
        return []

    async def claim(self, session_id: str, lease_s: int, *, force: bool = False) -> Session | None:
        return None

    async def release(self, s: Session) -> Session:
        return s

    async def mark_failed(self, s: Session, error: str, retry_after_s: float | None) -> Session:
        return s

    async def record_event(
        self,
        session_id: str,
        incarnation: str | None,
        epoch: int | None,
        event: str,
        detail: Mapping[str, Any],
    ) -> None:
        self.events.append(event)


@pytest.mark.parametrize("bad_id", ["not-a-uuid", ""])
async def test_one_failing_orphan_does_not_block_the_others_and_bad_ids_are_orphans(
    bad_id: str,
) -> None:
    old = NOW - timedelta(hours=1)
    meta = {"managed_by": "sandbox-listener", "epoch": "1"}
    fly = FakeFly(fail_destroy={"stuck"})
    fly.machines = [
        Machine(
            "stuck",
            MachineState.STARTED,
            "iad",
            "v",
            {**meta, "session_id": "0" * 8 + "-0000-0000-0000-" + "0" * 12},
            created_at=old,
        ),
        Machine(
            "odd", MachineState.STARTED, "iad", "v", {**meta, "session_id": bad_id}, created_at=old
        ),
    ]
    store = SweepStore()
    report = await Sweeper(fly, store, POLICY, clock=lambda: NOW).sweep_once()
    assert [a.machine_id for a in report.actions] == ["stuck", "odd"]  # type: ignore[union-attr]
    assert fly.destroyed == ["odd"], "the failing destroy blocked the next action"
    assert all("not-a-uuid" not in ids for ids in store.looked_up)
