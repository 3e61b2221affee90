"""Same faults, two designs: the chaos scenario (tests/chaos/scenario.py) run once against the
listener and once against bench/baseline.py, with the same seed, schedule and faults.

Run: python -m bench.bench_faults [--sessions 60] [--seed 20261126] [--out FILE]

Each design gets a fresh stack. Sessions arrive over `sessions / 4` seconds with random ends,
deletes and queued commands, while the emulator fails calls (5xx 10 %, 429 5 %, 408 after a
real create 2 %, capacity 2 %) and loses machines (1 % per machine-second), Realtime is dropped
every 3 s and the process is killed with kill -9 once and restarted. Then the faults stop and
each design gets up to `--settle` seconds to reach a clean audit. Reported: sessions lost,
duplicate and orphan machines, live rows without a machine, rows never settled, leaked
machine-seconds (machine time beyond one machine per wanted session).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from bench.common import (
    LOG_DIR,
    RESULTS_DIR,
    BenchStack,
    Child,
    ListenerChild,
    listener_env,
    quiet_logs,
    write_result,
)
from tests.chaos.scenario import FAULTS, LISTENER_SETTINGS, Plan, Worker, run
from tests.e2e.harness import FAST

SETTINGS = {**FAST, **LISTENER_SETTINGS}


def factory(design: str, stack: BenchStack) -> Any:
    """Start the design's process and return once it is subscribed to Realtime."""
    log = LOG_DIR / f"faults-{design}.log"

    def listener() -> Worker:
        child = ListenerChild(stack.info, log, SETTINGS)
        child.wait_ready(timeout_s=60)
        return child

    def baseline() -> Worker:
        child = Child(
            "bench.baseline", [], listener_env(stack.info, **SETTINGS), log, pipe_stdout=True
        )
        if (said := child.read_line(timeout_s=60)) != "subscribed":
            raise RuntimeError(f"baseline said {said!r}: see {log}")
        return child

    return listener if design == "listener" else baseline


def one(design: str, plan: Plan, settle_s: float) -> dict[str, Any]:
    stack = BenchStack.start()
    try:
        outcome = asyncio.run(
            run(
                stack.thread,
                plan,
                factory(design, stack),
                settle_timeout_s=settle_s,
                require_settled=design == "listener",
            )
        )
    finally:
        stack.close()
    return {**outcome.summary(), "clean": outcome.audit.clean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=60)
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--settle", type=float, default=45.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "faults.json")
    args = parser.parse_args()
    quiet_logs()
    plan = Plan(seed=args.seed, sessions=args.sessions, kills=1, span_s=max(8.0, args.sessions / 4))
    designs = {name: one(name, plan, args.settle) for name in ("listener", "baseline")}
    result = {
        "benchmark": "faults",
        "settings": {
            "sessions": args.sessions,
            "seed": args.seed,
            "kills": plan.kills,
            "span_s": plan.span_s,
            "realtime_drop_every_s": plan.drop_every_s,
            "faults": FAULTS,
            "settle_timeout_s": args.settle,
            "listener": SETTINGS,
        },
        "designs": designs,
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
