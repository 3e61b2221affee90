"""A burst: N sessions inserted in one transaction, Fly's documented rate limits on and a 300 ms
create latency; time to all ready against the minimum those limits allow, Fly calls per
session lifecycle, and (for the listener) the missed-event count.

Run: python -m bench.bench_burst [--design listener|baseline] [--sessions 200] [--out FILE]

Fly allows 1 create per second per app with a burst of 3 (the emulator refuses more with 429,
the client queues to stay under it), so N sessions cannot all be ready sooner than
(N - 3) / 1 s + the create latency + the boot delays. 1,000 sessions need ~1,000 s: the default
size is 200 (~200 s) and `--sessions 1000` runs the full burst. Afterwards every session is ended
in one transaction and the run waits for every machine to be destroyed, so the Fly calls cover
whole lifecycles (create, wait, exec, destroy, plus the sweeper's and the adopt path's lists).
The listener runs with production defaults; `baseline` runs bench/baseline.py instead, on the
same stack settings and burst.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.common import (
    FLY_BURST,
    FLY_RATE_PER_S,
    LOG_DIR,
    RESULTS_DIR,
    BenchStack,
    Child,
    ListenerChild,
    bench_user,
    function_calls,
    insert_sessions,
    listener_env,
    metric,
    quiet_logs,
    state_counts,
    track_function_calls,
    write_result,
)

CREATE_LATENCY_S = 0.3
LAUNCH_DELAY_S = 0.05
START_DELAY_S = 0.05
TARGET_RATIO = 1.15
TARGET_CALLS_PER_SESSION = 5.0
POLL_S = 0.5


def minimum_s(sessions: int) -> float:
    """The least time to all ready that the create limit allows (one create at a time after
    the burst, then the last machine's create latency and boot)."""
    return max(0, sessions - FLY_BURST) / FLY_RATE_PER_S + (
        CREATE_LATENCY_S + LAUNCH_DELAY_S + START_DELAY_S
    )


def wait_states(db_url: str, ids: list[str], done: set[str], timeout_s: float) -> dict[str, int]:
    """Poll until every session is in one of `done`; the final counts either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = state_counts(db_url, ids)
        if set(counts) <= done or time.monotonic() > deadline:
            return counts
        time.sleep(POLL_S)


def all_ready_s(db_url: str, ids: list[str], committed_wall: float) -> float | None:
    """Seconds from the commit to the last sandbox_ready_at, if every session became ready."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select count(*) filter (where sandbox_state = 'ready'), max(sandbox_ready_at)"
            " from coding_sessions where id = any(%s::uuid[])",
            (ids,),
        ).fetchone()
    assert row is not None
    ready, last = row
    return None if ready != len(ids) else last.timestamp() - committed_wall


def end_all(db_url: str, ids: list[str]) -> None:
    with psycopg.connect(db_url, options="-c synchronous_commit=on") as conn:
        conn.execute(
            "update coding_sessions set status = 'ended' where id = any(%s::uuid[])", (ids,)
        )


def start_design(design: str, stack: BenchStack) -> tuple[Child, Any]:
    """The program under test, once it is subscribed; and how to read its metrics."""
    log = LOG_DIR / f"burst-{design}.log"
    if design == "listener":
        listener = ListenerChild(stack.info, log)
        listener.wait_ready(timeout_s=60)
        return listener, listener.metrics
    baseline = Child("bench.baseline", [], listener_env(stack.info), log, pipe_stdout=True)
    line = baseline.read_line(timeout_s=60)
    if line != "subscribed":
        raise RuntimeError(f"baseline said {line!r}: see {log}")
    return baseline, None


def burst(design: str, sessions: int) -> dict[str, Any]:
    knobs = {
        "latency_s": {"create": CREATE_LATENCY_S},
        "launch_delay_s": LAUNCH_DELAY_S,
        "start_delay_s": START_DELAY_S,
        "rate_limits": True,
        "action_rate_per_s": FLY_RATE_PER_S,
        "action_burst": FLY_BURST,
    }
    stack = BenchStack.start(**knobs)
    least = minimum_s(sessions)
    try:
        track_function_calls(stack.db_url)
        child, read_metrics = start_design(design, stack)
        try:
            ids, committed_wall, committed = insert_sessions(
                stack.db_url, bench_user(stack.db_url), sessions
            )
            settled = wait_states(stack.db_url, ids, {"ready", "failed"}, 3 * least + 120)
            took = all_ready_s(stack.db_url, ids, committed_wall)
            settled_s = time.perf_counter() - committed
            metrics = read_metrics() if read_metrics else {}
            end_all(stack.db_url, ids)
            ended = wait_states(stack.db_url, ids, {"destroyed", "failed"}, 120)
            calls = stack.call_counts()
            statuses = stack.status_counts()
            if read_metrics:
                metrics = read_metrics()
        finally:
            child.terminate()
            child.close()
        rpcs = function_calls(stack.db_url)
    finally:
        stack.close()
    lifecycle_calls = sum(calls.values())
    return {
        "benchmark": f"burst-{design}",
        "design": design,
        "settings": {
            "sessions": sessions,
            "emulator": knobs,
            "client_rate_limit": f"{FLY_RATE_PER_S}/s, burst {FLY_BURST}",
            "listener": "production defaults" if design == "listener" else "bench/baseline.py",
        },
        "states_after_burst": settled,
        "states_after_end": ended,
        "time_to_all_ready_s": None if took is None else round(took, 2),
        "time_to_settled_s": round(settled_s, 2),
        "minimum_s": round(least, 2),
        "ratio_to_minimum": None if took is None else round(took / least, 3),
        "target_ratio": TARGET_RATIO,
        "fly_calls": calls,
        "fly_calls_by_status": statuses,
        "fly_calls_per_session": round(lifecycle_calls / sessions, 2),
        "fly_calls_per_session_without_429": round(
            (lifecycle_calls - sum(n for k, n in statuses.items() if k.endswith(" 429")))
            / sessions,
            2,
        ),
        "target_calls_per_session": TARGET_CALLS_PER_SESSION,
        "store_rpcs_per_session": round(sum(rpcs.values()) / sessions, 2),
        "store_rpcs": rpcs,
        "missed_events": metric(metrics, "sandbox_missed_events_total") if metrics else None,
        "intake": {
            "realtime": metric(metrics, "sandbox_intake_total", source="realtime"),
            "scan": metric(metrics, "sandbox_intake_total", source="scan"),
        }
        if metrics
        else None,
        "listener_fly_retries": metric(metrics, "fly_api_retries_total") if metrics else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--design", choices=("listener", "baseline"), default="listener")
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    quiet_logs()
    result = burst(args.design, args.sessions)
    write_result(args.out or RESULTS_DIR / f"burst-{args.design}.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
