"""One session at a time: Realtime delivery to the listener, the listener's own time around its
Fly calls, and insert committed -> row ready, with the emulator's delays at zero.

Run: python -m bench.bench_latency [--sessions 100] [--out FILE]

The stack runs on a background loop of this process; the listener is `python -m bench.probe`
(the production listener plus a timeline on stdout) in its own process. Each session is
inserted by the superuser in its own transaction, and the next one only after the listener
said it was ready. Clocks: every stamp is perf_counter (CLOCK_MONOTONIC), taken in three places:
- the bench, when the insert's commit returned;
- the listener (probe), when a Realtime event reached the dispatcher and around each store
  and Fly-client call;
- the emulator's ASGI app (the Fly request log), when a request arrived and its answer began.
Rate limits are lifted (latency is not a rate-limit test; see bench_burst for those).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import (
    LOG_DIR,
    RESULTS_DIR,
    UNLIMITED,
    BenchStack,
    FlyRequest,
    ListenerChild,
    bench_user,
    insert_sessions,
    percentiles,
    quiet_logs,
    write_result,
)

WARMUP = 10
READY_TIMEOUT_S = 15.0
TARGETS = {
    "event_to_create_p50_ms": 5.0,
    "event_to_create_p99_ms": 25.0,
    "wait_to_ready_p50_ms": 10.0,
    "commit_to_ready_p50_ms": 150.0,
}

Timeline = dict[str, dict[str, Any]]  # kind -> first stamp {"t0", "t1"?}


def run_sessions(listener: ListenerChild, db_url: str, n: int) -> dict[str, Timeline]:
    """Insert `n` sessions one after another; each session's timeline from the probe."""
    user = bench_user(db_url)
    timelines: dict[str, Timeline] = defaultdict(dict)
    for _ in range(n):
        (session_id,), _, committed = insert_sessions(db_url, user, 1)
        timelines[session_id]["commit"] = {"t0": committed}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "store.mark_ready" not in timelines[session_id]:
            line = json.loads(listener.read_line(max(0.01, deadline - time.monotonic())))
            stamps = timelines[line["id"]]
            stamps.setdefault(line["kind"], line)  # the first of each kind
    return {k: t for k, t in timelines.items() if "commit" in t}  # not earlier runs' hints


def add_fly_requests(timelines: dict[str, Timeline], requests: list[FlyRequest]) -> None:
    """Add the emulator's view of each session's create, wait and exec."""
    for r in requests:
        if r.session_id in timelines:
            stamps = timelines[r.session_id]
            key = f"emulator.{r.operation}"
            if key not in stamps or r.operation == "wait":  # the last wait is the one that ended
                stamps[key] = {"t0": r.arrived, "t1": r.answered, "status": r.status}
            stamps.setdefault("fly_calls", {"t0": 0})
            stamps["fly_calls"]["t0"] += 1


NEEDED = ("event", "store.claim", "emulator.create", "emulator.wait", "emulator.exec")


def missing(t: Timeline) -> list[str]:
    """Stamps a session lacks for the figures. A session the catch-up scan claimed before its
    Realtime event arrived has no `store.claim` (scans claim in a batch): counted apart."""
    return [k for k in NEEDED if k not in t]


def intervals(t: Timeline) -> dict[str, float]:
    """The figures of one session, in ms."""

    def ms(a: float, b: float) -> float:
        return (b - a) * 1000

    wait_answered = t["emulator.wait"]["t1"]
    exec_ = t["emulator.exec"]
    ready = t["store.mark_ready"]
    own_after_wait = ms(wait_answered, exec_["t0"]) + ms(exec_["t1"], ready["t1"])
    return {
        "commit_to_event": ms(t["commit"]["t0"], t["event"]["t0"]),
        "event_to_create": ms(t["event"]["t0"], t["emulator.create"]["t0"]),
        "wait_to_ready": own_after_wait,
        "wait_to_ready_incl_smoke_exec": ms(wait_answered, ready["t1"]),
        "commit_to_ready": ms(t["commit"]["t0"], ready["t1"]),
        # where the event -> create time goes
        "event_to_claim_call": ms(t["event"]["t0"], t["store.claim"]["t0"]),
        "claim_rpc": ms(t["store.claim"]["t0"], t["store.claim"]["t1"]),
        "begin_provision_rpc": ms(
            t["store.begin_provision"]["t0"], t["store.begin_provision"]["t1"]
        ),
        # the provisioning_started audit write, while it was awaited before the create
        "provisioning_started_event_rpc": ms(
            t["store.begin_provision"]["t1"], t["fly.create_machine"]["t0"]
        ),
        "create_call_to_arrival": ms(t["fly.create_machine"]["t0"], t["emulator.create"]["t0"]),
        # after the wait
        "wait_answer_to_exec_arrival": ms(wait_answered, exec_["t0"]),
        "smoke_exec_in_emulator": ms(exec_["t0"], exec_["t1"]),
        "exec_answer_to_mark_ready_call": ms(exec_["t1"], ready["t0"]),
        "mark_ready_rpc": ms(ready["t0"], ready["t1"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "latency.json")
    args = parser.parse_args()
    quiet_logs()
    knobs: dict[str, Any] = {
        "latency_s": {},
        "launch_delay_s": 0.0,
        "start_delay_s": 0.0,
        "rate_limits": False,
    }
    stack = BenchStack.start(**knobs)
    listener = ListenerChild(
        stack.info,
        LOG_DIR / "latency-listener.log",
        UNLIMITED,
        module="bench.probe",
        pipe_stdout=True,
    )
    try:
        listener.wait_ready()
        run_sessions(listener, stack.db_url, WARMUP)
        stack.requests.clear()
        timelines = run_sessions(listener, stack.db_url, args.sessions)
        add_fly_requests(timelines, list(stack.requests))
    finally:
        listener.close()
        stack.close()
    samples: dict[str, list[float]] = defaultdict(list)
    incomplete: dict[str, list[str]] = {}
    for session_id, t in timelines.items():
        if gaps := missing(t):
            incomplete[session_id] = gaps
            continue
        for name, value in intervals(t).items():
            samples[name].append(value)
    calls = [t["fly_calls"]["t0"] for t in timelines.values() if "fly_calls" in t]
    figures = {name: percentiles(values) for name, values in samples.items()}
    result = {
        "benchmark": "latency",
        "settings": {
            "sessions": args.sessions,
            "warmup_sessions": WARMUP,
            "emulator": knobs,
            "listener": "production defaults, FLY_RATE_PER_S/FLY_BURST lifted, smoke command on",
        },
        "figures": figures,
        "fly_calls_per_provisioning": sum(calls) / len(calls),
        "sessions_without_full_timeline": incomplete,
        "targets": TARGETS,
        "met": {
            "event_to_create_p50_ms": figures["event_to_create"]["p50_ms"]
            <= TARGETS["event_to_create_p50_ms"],
            "event_to_create_p99_ms": figures["event_to_create"]["p99_ms"]
            <= TARGETS["event_to_create_p99_ms"],
            "wait_to_ready_p50_ms": figures["wait_to_ready"]["p50_ms"]
            <= TARGETS["wait_to_ready_p50_ms"],
            "commit_to_ready_p50_ms": figures["commit_to_ready"]["p50_ms"]
            <= TARGETS["commit_to_ready_p50_ms"],
        },
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
