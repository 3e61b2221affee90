"""Recovery: `kill -9` of the listener with 500 sessions in flight, then a restart; the time until
every session is ready and every invariant holds again.

Run: python -m bench.bench_recovery [--sessions 500] [--kill-after 100] [--out FILE]

500 sessions are inserted in one transaction; once `--kill-after` of them have a machine id
written back, the listener gets SIGKILL (no drain, no hand-back: its claims stay leased) and a
new one starts at once. Recovery = restart -> all 500 `ready` with no orphan, duplicate or
machine-less row (tests/e2e/harness.invariant_violations). A claim of the dead process is
taken over only when its lease lapses, so recovery is bounded below by LISTENER_LEASE_S (10 s
here; production default 120 s). Rate limits are lifted (not under test: 500 creates at 1/s
would take 500 s) and machines take 0.5 s to start, so many are mid-boot at the kill. It runs
twice, with the production poll interval (5 s) and with 0.5 s: the sessions the dead process
had only queued send no new events, so the catch-up scan is what finds them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    LOG_DIR,
    RESULTS_DIR,
    UNLIMITED,
    BenchStack,
    ListenerChild,
    bench_user,
    insert_sessions,
    quiet_logs,
    state_counts,
    write_result,
)
from tests.e2e.harness import invariant_violations, machines

LEASE_S = 10
START_DELAY_S = 0.5
CONVERGE_TIMEOUT_S = 240.0
SETTINGS = {**UNLIMITED, "LISTENER_LEASE_S": str(LEASE_S)}
# The catch-up scan claims at most 2 x LISTENER_CONCURRENCY rows per poll, so after a restart
# the poll interval caps how fast the queued sessions are picked up (see docs/PERFORMANCE.md).
VARIANTS = {
    "poll_5s": SETTINGS,
    "poll_0.5s": {**SETTINGS, "LISTENER_POLL_INTERVAL_S": "0.5"},
}


def recorded(db_url: str, ids: list[str]) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select count(sandbox_id) from coding_sessions where id = any(%s::uuid[])", (ids,)
        ).fetchone()
    return int(row[0]) if row else 0


def in_flight(db_url: str) -> dict[str, int]:
    """What the kill interrupted: rows by state, and how many held a claim."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select count(*) filter (where sandbox_claimed_by is not null),"
            " count(*) filter (where sandbox_state = 'provisioning' and sandbox_id is null)"
            " from coding_sessions"
        ).fetchone()
    assert row is not None
    return {"claimed": row[0], "provisioning_without_machine_id": row[1]}


def kill_and_restart(
    sessions: int, kill_after: int, name: str, settings: dict[str, str]
) -> dict[str, Any]:
    """One run: insert, kill -9 after `kill_after` machine ids are written back, restart."""
    stack = BenchStack.start(rate_limits=False, start_delay_s=START_DELAY_S)
    log = LOG_DIR / f"recovery-{name}.log"
    try:
        first = ListenerChild(stack.info, log, settings)
        try:
            first.wait_ready(timeout_s=60)
            ids, _, committed = insert_sessions(stack.db_url, bench_user(stack.db_url), sessions)
            while recorded(stack.db_url, ids) < kill_after:
                time.sleep(0.02)
            first.kill()
            killed = time.perf_counter()
        finally:
            first.close()
        at_kill: dict[str, Any] = {
            "states": state_counts(stack.db_url, ids),
            **in_flight(stack.db_url),
            "machines": len(machines(stack.thread)),
            "seconds_after_insert": round(killed - committed, 2),
        }
        second = ListenerChild(stack.info, log, settings)
        restarted = time.perf_counter()
        try:
            second.wait_ready(timeout_s=60)
            subscribed_s = time.perf_counter() - restarted
            violations = ["not converged"]
            states: dict[str, int] = {}
            while time.perf_counter() < restarted + CONVERGE_TIMEOUT_S:
                states = state_counts(stack.db_url, ids)
                if states == {"ready": sessions}:
                    violations = invariant_violations(stack.thread)
                    if not violations:
                        break
                time.sleep(0.25)
            converged_s = time.perf_counter() - restarted
        finally:
            second.terminate()
            second.close()
        statuses = stack.status_counts()
        calls = stack.call_counts()
    finally:
        stack.close()
    return {
        "listener_settings": settings,
        "at_kill": at_kill,
        "restart_to_subscribed_s": round(subscribed_s, 2),
        "restart_to_invariants_hold_s": round(converged_s, 2),
        "converged": not violations,
        "final_states": states,
        "violations": violations[:20],
        "extra_creates": statuses.get("create 200", 0) - sessions,
        "fly_calls": calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--kill-after", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "recovery.json")
    args = parser.parse_args()
    quiet_logs()
    runs = {
        name: kill_and_restart(args.sessions, args.kill_after, name, settings)
        for name, settings in VARIANTS.items()
    }
    result = {
        "benchmark": "recovery",
        "settings": {
            "sessions": args.sessions,
            "kill_after_machine_ids_recorded": args.kill_after,
            "emulator": {"rate_limits": False, "start_delay_s": START_DELAY_S},
        },
        "runs": runs,
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
