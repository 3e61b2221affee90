"""Chaos: Fly faults, Realtime drops and kill -9 lose nothing (`pytest -m chaos`).

The small size (30 sessions, one kill) runs in the normal test run; LISTENER_CHAOS_SIZE=200
runs the large one (two kills), LISTENER_CHAOS_SEED=<n> replays a run. The seed is printed at
the start and is part of every assertion message.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from listener.local.stack import StackThread
from tests.chaos.scenario import LISTENER_SETTINGS, Outcome, Plan, run
from tests.e2e.harness import ListenerProcess

SMALL = 30
# Read at import: the autouse clean_env fixture removes LISTENER_* variables before each test.
SIZE = int(os.environ.get("LISTENER_CHAOS_SIZE") or SMALL)
SEED = int(os.environ.get("LISTENER_CHAOS_SEED") or secrets.randbelow(1_000_000))
SETTLE_TIMEOUT_S = 30 + SIZE * 0.2

pytestmark = pytest.mark.chaos


def plan_for(size: int, seed: int) -> Plan:
    """Sessions arrive at ~4/s; one kill for the small size, two for larger ones."""
    return Plan(
        seed=seed, sessions=size, kills=1 if size <= SMALL else 2, span_s=max(8.0, size / 4)
    )


def faults_injected(outcome: Outcome) -> dict[str, int]:
    by_status: dict[str, int] = {}
    for key, n in outcome.fly_calls.items():
        status = key.rsplit(" ", 1)[1]
        by_status[status] = by_status.get(status, 0) + n
    return by_status


@pytest.mark.timeout(90 + SIZE * 2)
async def test_chaos_loses_nothing(chaos_stack: StackThread, tmp_path: Path) -> None:
    plan = plan_for(SIZE, SEED)
    print(f"chaos: LISTENER_CHAOS_SEED={plan.seed} LISTENER_CHAOS_SIZE={plan.sessions}")
    log = tmp_path / "listener.log"

    def start() -> ListenerProcess:
        return ListenerProcess(chaos_stack.info, log, **LISTENER_SETTINGS)

    outcome = await run(chaos_stack, plan, start, settle_timeout_s=SETTLE_TIMEOUT_S)
    summary = outcome.summary()
    print(f"chaos outcome: {summary}")
    why = f"replay with LISTENER_CHAOS_SEED={plan.seed} LISTENER_CHAOS_SIZE={plan.sessions}"
    context = f"{why}; listener log {log}; {summary}"
    statuses = faults_injected(outcome)
    assert outcome.steps.get("kill") == plan.kills, f"the kills did not happen ({context})"
    assert outcome.steps.get("drop", 0) >= 2, f"Realtime was not dropped ({context})"
    assert statuses.get("429", 0) and statuses.get("500", 0) + statuses.get("503", 0), (
        f"no faults were injected ({context})"
    )
    assert outcome.audit.duplicates == [], f"duplicate machines ({context})"
    assert outcome.audit.orphans == [], f"orphan machines ({context})"
    assert outcome.audit.live_without_machine == [], f"live rows without a machine ({context})"
    assert outcome.audit.unsettled == [], f"rows never settled ({context})"
    assert outcome.lost_sessions == 0, f"sessions lost ({context})"
    print(
        f"chaos: seed {plan.seed}: leaked {outcome.leaked_machine_s:.1f} of "
        f"{outcome.machine_s:.1f} machine-seconds"
    )
