"""Listener memory with 10,000 live sessions: the RSS of `python -m listener run` after a few
sweeps over 10,000 ready rows whose 10,000 machines exist in the emulator.

Run: python -m bench.bench_memory [--sessions 10000] [--sweeps 3] [--out FILE]

First an idle listener on the empty stack gives the floor; then the rows and machines are
seeded (machines through the emulator's API, rows with SQL) and a second listener runs until
its sweeper has led `--sweeps` sweeps (LISTENER_SWEEP_INTERVAL_S=5, otherwise production
defaults). VmRSS and VmHWM (peak) come from /proc/<pid>/status.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.common import (
    LOG_DIR,
    RESULTS_DIR,
    BenchStack,
    ListenerChild,
    bench_user,
    drain_realtime,
    listener_env,
    metric,
    quiet_logs,
    seed_ready_sessions,
    write_result,
)
from listener.config import Settings

TARGET_RSS_MB = 150.0
SWEEP_INTERVAL_S = 5


def after_sweeps(stack: BenchStack, name: str, sweeps: int) -> dict[str, Any]:
    """Run a listener until it has led `sweeps` sweeps; its memory then, in MB."""
    listener = ListenerChild(
        stack.info,
        LOG_DIR / f"memory-{name}.log",
        {"LISTENER_SWEEP_INTERVAL_S": str(SWEEP_INTERVAL_S)},
    )
    try:
        listener.wait_ready(timeout_s=60)
        deadline = time.monotonic() + sweeps * SWEEP_INTERVAL_S * 4 + 60
        while metric(listener.metrics(), "sweeper_runs_total", outcome="leader") < sweeps:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {sweeps} sweeps: see {listener.log_path}")
            time.sleep(0.5)
        memory = listener.rss_kb()
        metrics = listener.metrics()
    finally:
        listener.terminate()
        listener.close()
    return {
        "rss_mb": round(memory["VmRSS"] / 1024, 1),
        "peak_rss_mb": round(memory["VmHWM"] / 1024, 1),
        "sweeps": metric(metrics, "sweeper_runs_total", outcome="leader"),
        "failed_sweeps": metric(metrics, "sweeper_runs_total", outcome="failed"),
        "sweep_actions": metric(metrics, "sweeper_actions_total"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--sweeps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "memory.json")
    args = parser.parse_args()
    quiet_logs()
    stack = BenchStack.start()
    try:
        empty = after_sweeps(stack, "empty", args.sweeps)
        settings = Settings.from_env(listener_env(stack.info))
        started = time.perf_counter()
        seed_ready_sessions(stack, settings, bench_user(stack.db_url), args.sessions)
        seeded_s = time.perf_counter() - started
        stack.set_knobs(rate_limits=True)  # Fly's limits again while the listener runs
        drain_realtime(stack, args.sessions)
        loaded = after_sweeps(stack, "loaded", args.sweeps)
    finally:
        stack.close()
    result = {
        "benchmark": "memory",
        "settings": {
            "sessions": args.sessions,
            "sweeps": args.sweeps,
            "listener": f"production defaults, LISTENER_SWEEP_INTERVAL_S={SWEEP_INTERVAL_S}",
            "seeding_s": round(seeded_s, 1),
        },
        "empty": empty,
        "loaded": loaded,
        "target_rss_mb": TARGET_RSS_MB,
        "met": loaded["rss_mb"] <= TARGET_RSS_MB,
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
