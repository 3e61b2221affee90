"""The chaos scenario: sessions with random ends and commands while Fly fails, Realtime drops and
the worker dies by kill -9; then an audit of the rows against the Fly inventory and the leaked
machine-seconds. Shared by tests/chaos (the listener) and bench/bench_faults (listener vs
baseline); every random choice comes from the plan's seed, so a run can be replayed."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from postgrest.exceptions import APIError

from listener.local.fly_emulator import MachineSnapshot
from listener.local.stack import StackThread
from tests.e2e.harness import LIVE_STATES, User, frontend_user, rows, set_faults, wait_until

# What Fly does to every call (and, for vanish, to every live machine each second).
FAULTS: dict[str, float] = {
    "p_5xx": 0.10,
    "p_429": 0.05,
    "p_408_after_create": 0.02,
    "p_capacity": 0.02,
    "p_vanish": 0.01,
}
NO_FAULTS = dict.fromkeys(FAULTS, 0.0)
# Fly's create limit (1/s per app) would make the run last minutes; 429s are injected anyway.
EMULATOR_RATES: dict[str, Any] = {"action_rate_per_s": 50.0, "action_burst": 50}
# Listener settings on top of the e2e harness's fast intervals: machines younger than the orphan
# grace are never reaped, so a short grace lets the audit run soon after the faults stop.
LISTENER_SETTINGS = {
    "FLY_RATE_PER_S": "50",
    "FLY_BURST": "50",
    "LISTENER_ORPHAN_GRACE_S": "5",
    "SANDBOX_MAX_LIVE_PER_USER": "0",  # one chaos user owns every session
}
SWEEP_INTERVAL_S = 1.0  # the e2e harness's LISTENER_SWEEP_INTERVAL_S
GONE = ("destroying", "destroyed")


class Worker(Protocol):
    """A running listener (or baseline) process."""

    def kill(self) -> None: ...
    def close(self) -> None: ...


WorkerFactory = Callable[[], Worker]


@dataclass(frozen=True, slots=True)
class Step:
    """One thing the scenario does at `at_s` seconds after its start."""

    at_s: float
    action: str  # create | end | delete | command | drop | kill
    session: int = -1


@dataclass(frozen=True, slots=True)
class Plan:
    """How big and how rough a run is; `steps()` is a pure function of it."""

    seed: int
    sessions: int
    kills: int
    span_s: float  # sessions are created over this long
    drop_every_s: float = 3.0
    p_end: float = 0.35
    p_delete: float = 0.10
    p_command: float = 0.5
    restart_after_s: float = 0.5

    def steps(self) -> list[Step]:
        dice = random.Random(self.seed)
        steps: list[Step] = []
        for i in range(self.sessions):
            born = dice.uniform(0, self.span_s)
            steps.append(Step(born, "create", i))
            if dice.random() < self.p_command:
                steps.append(Step(born + dice.uniform(0.1, 2.0), "command", i))
            roll = dice.random()
            if roll < self.p_end + self.p_delete:
                action = "end" if roll < self.p_end else "delete"
                steps.append(Step(born + dice.uniform(0.2, self.span_s / 2), action, i))
        steps += [
            Step(t * self.drop_every_s, "drop")
            for t in range(1, int(self.span_s / self.drop_every_s) + 1)
        ]
        steps += [Step(dice.uniform(0.2, 0.9) * self.span_s, "kill") for _ in range(self.kills)]
        return sorted(steps, key=lambda s: (s.at_s, s.action, s.session))


@dataclass
class Audit:
    """Rows against the inventory: every list should be empty once the listener has settled."""

    duplicates: list[str] = field(default_factory=list)  # sessions with >1 active machine
    orphans: list[str] = field(default_factory=list)  # active machines without a live row
    live_without_machine: list[str] = field(default_factory=list)  # ready rows, no machine
    unsettled: list[str] = field(default_factory=list)  # in flight, or ended but not torn down

    @property
    def clean(self) -> bool:
        return not (self.duplicates or self.orphans or self.live_without_machine or self.unsettled)

    def counts(self) -> dict[str, int]:
        return {
            "duplicates": len(self.duplicates),
            "orphans": len(self.orphans),
            "live_without_machine": len(self.live_without_machine),
            "unsettled": len(self.unsettled),
        }


@dataclass
class Outcome:
    """What a run did and left behind."""

    seed: int
    duration_s: float
    steps: dict[str, int]
    states: dict[str, int]
    commands: dict[str, int]  # sandbox_commands by status (reported, not audited)
    audit: Audit
    lost_sessions: int  # wanted at the end, but neither ready nor failed with a reason
    leaked_machine_s: float
    machine_s: float
    machines_created: int
    unwanted_running: int  # machines still running at the end that no wanted session needs
    fly_calls: dict[str, int]

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "duration_s": round(self.duration_s, 1),
            "steps": self.steps,
            "states": self.states,
            "commands": self.commands,
            "audit": self.audit.counts(),
            "lost_sessions": self.lost_sessions,
            "leaked_machine_s": round(self.leaked_machine_s, 1),
            "machine_s": round(self.machine_s, 1),
            "machines_created": self.machines_created,
            "unwanted_running": self.unwanted_running,
            "fly_calls": self.fly_calls,
        }


@dataclass
class Ledger:
    """The driver's record: session ids by index, when each was created and ended (wall clock)."""

    ids: dict[int, str] = field(default_factory=dict)
    born: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    commands: int = 0


def inventory(stack: StackThread) -> list[MachineSnapshot]:
    """Every machine the emulator ever had (read on the stack's own loop)."""
    fly = stack.stack.fly
    assert fly is not None

    async def read() -> list[MachineSnapshot]:
        return fly.machines(include_deleted=True)

    return stack.call(read)


def list_calls(stack: StackThread) -> int:
    """List Machines calls the emulator answered (one per sweep, plus the adopt path's)."""
    fly = stack.stack.fly
    assert fly is not None
    return fly.calls("list")


def audit(stack: StackThread) -> Audit:
    found = Audit()
    by_id = {str(r["id"]): r for r in rows(stack.info.db_url)}
    active = [m for m in inventory(stack) if m.state not in GONE]
    per_session: dict[str, list[str]] = {}
    for m in active:
        session_id = m.metadata.get("session_id") or ""
        per_session.setdefault(session_id, []).append(m.id)
        row = by_id.get(session_id)
        if row is None or row["sandbox_state"] not in LIVE_STATES:
            state = row["sandbox_state"] if row else "no row"
            found.orphans.append(f"machine {m.id} ({m.state}) of session {session_id} ({state})")
    found.duplicates = [f"{s}: {ids}" for s, ids in per_session.items() if len(ids) > 1]
    started = {m.id: m.metadata.get("session_id") for m in active if m.state == "started"}
    for row in by_id.values():
        session_id, state = str(row["id"]), row["sandbox_state"]
        if state in LIVE_STATES and (state != "ready" or row["status"] == "ended"):
            found.unsettled.append(f"{session_id} ({row['status']}, {state})")
        elif state == "ready" and started.get(row["sandbox_id"]) != session_id:
            found.live_without_machine.append(f"{session_id} ({row['sandbox_id']})")
    return found


def lifetime(m: MachineSnapshot, now: float) -> tuple[float, float]:
    """When the machine existed: created -> destroying/destroyed (or now)."""
    gone = [e["timestamp"] / 1000 for e in m.events if e.get("status") in GONE]
    return m.created_at, min(gone) if gone else now


def leaked_seconds(
    machines: list[MachineSnapshot], windows: Mapping[str, tuple[float, float]], now: float
) -> tuple[float, float]:
    """(total machine-seconds, seconds not attributable to a wanted session). Per session,
    at most one machine at a time counts, and only within the session's wanted window."""
    total = 0.0
    spans: dict[str, list[tuple[float, float]]] = {}
    for m in machines:
        start, end = lifetime(m, now)
        total += max(0.0, end - start)
        spans.setdefault(m.metadata.get("session_id") or "", []).append((start, end))
    attributable = 0.0
    for session_id, intervals in spans.items():
        if session_id not in windows:
            continue
        lo, hi = windows[session_id]
        covered_to = lo
        for start, end in sorted(intervals):
            start, end = max(start, covered_to), min(end, hi)
            if end > start:
                attributable += end - start
                covered_to = end
    return total, total - attributable


def unwanted_running(
    machines: list[MachineSnapshot], windows: Mapping[str, tuple[float, float]], now: float
) -> int:
    """Machines running at the end beyond one per still-wanted session: they leak on."""
    running: dict[str, int] = {}
    for m in machines:
        if m.state not in GONE:
            session_id = m.metadata.get("session_id") or ""
            running[session_id] = running.get(session_id, 0) + 1
    wanted = {s for s, (_, end) in windows.items() if end >= now}
    return sum(n - (1 if s in wanted else 0) for s, n in running.items())


def wanted_windows(
    ledger: Ledger, states: Mapping[str, Mapping[str, Any]], now: float
) -> dict[str, tuple[float, float]]:
    """From creation until the user ended or deleted it, or it failed for good, or now."""
    windows = {}
    for session_id, born in ledger.born.items():
        end = ledger.ended.get(session_id, now)
        row = states.get(session_id)
        if row is not None and row["sandbox_state"] == "failed":
            end = min(end, row["updated_at"].timestamp())
        windows[session_id] = (born, end)
    return windows


async def act(step: Step, user: User, stack: StackThread, ledger: Ledger) -> None:
    """Do one user step (create, end, delete, command) or one Realtime drop."""
    if step.action == "drop":
        gateway = stack.stack.realtime
        assert gateway is not None
        await asyncio.to_thread(stack.call, gateway.drop_all_connections)
        return
    if step.action == "create":
        session_id = await user.create_session()
        ledger.ids[step.session], ledger.born[session_id] = session_id, time.time()
        return
    session_id = ledger.ids.get(step.session, "")
    if not session_id or session_id in ledger.ended:
        return
    if step.action == "command":
        with contextlib.suppress(APIError):  # the session may be gone already
            await (
                user.client.table("sandbox_commands")
                .insert({"session_id": session_id, "command": ["echo", "chaos"]})
                .execute()
            )
            ledger.commands += 1
        return
    ledger.ended[session_id] = time.time()
    if step.action == "end":
        await user.end_session(session_id)
    else:
        await user.delete_session(session_id)


async def run(
    stack: StackThread,
    plan: Plan,
    start_worker: WorkerFactory,
    *,
    settle_timeout_s: float,
    require_settled: bool = True,
) -> Outcome:
    """Drive the plan against a worker, then stop the faults and wait for the audit to come out
    clean (a listener), or for `settle_timeout_s` (a baseline, which may never settle)."""
    set_faults(stack, **FAULTS, **EMULATOR_RATES, seed=plan.seed)
    ledger = Ledger()
    done: dict[str, int] = {}
    started = time.monotonic()
    worker = await asyncio.to_thread(start_worker)
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            user = await frontend_user(stack.info, http, email=f"chaos-{plan.seed}@example.com")
            for step in plan.steps():
                await asyncio.sleep(max(0.0, started + step.at_s - time.monotonic()))
                if step.action == "kill":
                    worker.kill()
                    worker.close()
                    await asyncio.sleep(plan.restart_after_s)
                    worker = await asyncio.to_thread(start_worker)
                else:
                    await act(step, user, stack, ledger)
                done[step.action] = done.get(step.action, 0) + 1
        set_faults(stack, **NO_FAULTS)
        with contextlib.suppress(AssertionError):
            await wait_until(
                lambda: audit(stack).clean,
                timeout_s=settle_timeout_s,
                what="a clean audit",
                interval_s=0.25,
            )
        final = audit(stack)
        if require_settled and final.clean:
            # Two more sweeps (each lists the managed machines) over the settled state must
            # change nothing.
            lists = list_calls(stack)
            await wait_until(
                lambda: list_calls(stack) >= lists + 2,
                timeout_s=10 * SWEEP_INTERVAL_S,
                what="two more sweeps",
            )
            final = audit(stack)
    finally:
        worker.close()
    return outcome(stack, plan, ledger, done, final, time.monotonic() - started)


def outcome(
    stack: StackThread,
    plan: Plan,
    ledger: Ledger,
    done: dict[str, int],
    final: Audit,
    duration_s: float,
) -> Outcome:
    now = time.time()
    by_id = {str(r["id"]): r for r in rows(stack.info.db_url)}
    states: dict[str, int] = {}
    for r in by_id.values():
        states[r["sandbox_state"]] = states.get(r["sandbox_state"], 0) + 1
    wanted = [s for s in ledger.born if s not in ledger.ended]
    lost = sum(
        1
        for s in wanted
        if s not in by_id
        or by_id[s]["sandbox_state"] not in ("ready", "failed")
        or (by_id[s]["sandbox_state"] == "failed" and not by_id[s]["sandbox_error"])
    )
    machines = inventory(stack)
    windows = wanted_windows(ledger, by_id, now)
    total, leaked = leaked_seconds(machines, windows, now)
    unwanted = unwanted_running(machines, windows, now)
    commands = {
        str(r["status"]): int(r["n"])
        for r in rows(
            stack.info.db_url, "select status, count(*) as n from sandbox_commands group by 1"
        )
    }
    fly = stack.stack.fly
    assert fly is not None
    calls = {f"{op} {st}": n for (op, st), n in sorted(fly.call_counts().items())}
    return Outcome(
        seed=plan.seed,
        duration_s=duration_s,
        steps={**done, "commands_queued": ledger.commands},
        states=dict(sorted(states.items())),
        commands=commands,
        audit=final,
        lost_sessions=lost,
        leaked_machine_s=leaked,
        machine_s=total,
        machines_created=len(machines),
        unwanted_running=unwanted,
        fly_calls=calls,
    )
