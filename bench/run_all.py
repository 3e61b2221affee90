"""Run every benchmark, each in its own process, then regenerate docs/PERFORMANCE.md.

Run: python bench/run_all.py [--full] [--only NAME ...]   (or: python -m bench ...)

Results go to bench/results/<name>.json, logs to bench/results/logs/. About 10 minutes on
2 cores; --full bursts 1,000 sessions instead of 200 (~1,000 s more, see bench_burst.py).
The listener and baseline bursts run side by side, each on its own stack: both spend nearly
all their time waiting on Fly's create limit, so they do not compete for the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"
LOGS = RESULTS / "logs"
BURST = 200
FULL_BURST = 1000
REALTIME_ARGS = [
    "bench/bench_realtime.py",
    "--commits",
    "300",
    "--default-commits",
    "50",
    "--up-runs",
    "1",
]
FACTS = "import json; from bench.report import machine_facts; print(json.dumps(machine_facts()))"


@dataclass(frozen=True)
class Bench:
    """One benchmark process. `output`: "file" (it writes the --out JSON), "json" (it prints
    its JSON) or "text" (it prints a report, kept as <name>.txt)."""

    name: str
    args: list[str]
    timeout_s: float
    output: str = "file"
    retries: int = 0  # a failed run is repeated (and the attempts recorded) this many times

    def command(self) -> list[str]:
        if self.output != "file":
            return [sys.executable, *self.args]
        return [sys.executable, *self.args, "--out", str(RESULTS / f"{self.name}.json")]


def benches(burst: int) -> list[list[Bench]]:
    """Groups run one after another; the benchmarks within a group run side by side."""
    burst_timeout = 3 * burst + 600
    return [
        [Bench("realtime", REALTIME_ARGS, 300, output="json", retries=1)],
        [Bench("latency", ["-m", "bench.bench_latency"], 300)],
        [Bench("sweeper", ["-m", "bench.bench_sweeper"], 400)],
        [Bench("memory", ["-m", "bench.bench_memory"], 500)],
        [Bench("exec-output", ["-m", "bench.bench_exec_output"], 300)],
        [Bench("recovery", ["-m", "bench.bench_recovery"], 700)],
        [Bench("faults", ["-m", "bench.bench_faults"], 400)],
        [
            Bench(
                f"burst-{design}",
                ["-m", "bench.bench_burst", "--design", design, "--sessions", str(burst)],
                burst_timeout,
            )
            for design in ("listener", "baseline")
        ],
        # The component benchmarks of the earlier issues, kept as they print them.
        [Bench("rest", ["bench/bench_rest.py", "--calls", "300"], 300, output="json")],
        [Bench("fly-burst", ["bench/bench_fly_burst.py", "-n", "200"], 120, output="json")],
        [Bench("commands", ["bench/bench_commands.py", "-n", "100"], 300, output="json")],
        [Bench("fly-client", ["bench/bench_fly_client.py", "-n", "3000"], 300, output="text")],
    ]


def run_group(group: list[Bench], env: dict[str, str]) -> dict[str, dict[str, object]]:
    """Start every benchmark of the group, wait for all; their status, time and log."""
    started = time.monotonic()
    running = []
    for bench in group:
        out = (LOGS / f"{bench.name}.out").open("wb")
        err = (LOGS / f"{bench.name}.log").open("wb")
        proc = subprocess.Popen(bench.command(), cwd=REPO_ROOT, env=env, stdout=out, stderr=err)
        running.append((bench, proc, out, err))
    statuses: dict[str, dict[str, object]] = {}
    for bench, proc, out, err in running:
        try:
            code = proc.wait(timeout=max(1.0, bench.timeout_s - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        out.close()
        err.close()
        ok = code == 0 and save_printed(bench)
        statuses[bench.name] = {
            "status": "ok" if ok else "failed",
            "returncode": code,
            "seconds": round(time.monotonic() - started, 1),
            "log": str((LOGS / f"{bench.name}.log").relative_to(REPO_ROOT)),
        }
    return statuses


def save_printed(bench: Bench) -> bool:
    """For a benchmark that prints its result: keep it in bench/results (JSON if it parses)."""
    text = (LOGS / f"{bench.name}.out").read_text()
    if bench.output == "text":
        (RESULTS / f"{bench.name}.txt").write_text(text)
        return True
    if bench.output != "json":
        return True
    start = text.rfind("\n{\n") + 1  # the printed document; any log lines come before it
    try:
        result, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return False
    (RESULTS / f"{bench.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return True


def python(*args: str, env: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help=f"burst {FULL_BURST} sessions")
    parser.add_argument("--only", nargs="*", help="run only these benchmarks (by name)")
    args = parser.parse_args(argv)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    LOGS.mkdir(parents=True, exist_ok=True)
    groups = [
        [b for b in group if not args.only or b.name in args.only]
        for group in benches(FULL_BURST if args.full else BURST)
    ]
    if not args.only:  # a full run replaces every result
        for stale in RESULTS.glob("*.json"):
            stale.unlink()
    facts = json.loads(python("-c", FACTS, env=env))
    began, started = datetime.now(UTC), time.monotonic()
    statuses: dict[str, dict[str, object]] = {}
    for group in filter(None, groups):
        names = ", ".join(b.name for b in group)
        print(f"running {names} ...", flush=True)
        done = run_group(group, env)
        for bench in group:
            for attempt in range(2, bench.retries + 2):
                if done[bench.name]["status"] == "ok":
                    break
                print(f"  {bench.name} failed, attempt {attempt} ...", flush=True)
                done |= run_group([bench], env)
                done[bench.name]["attempts"] = attempt
        statuses |= done
        for name, status in done.items():
            print(f"  {name}: {status['status']} in {status['seconds']} s", flush=True)
    command = "python -m bench" + (" --full" if args.full else "")
    run = {
        "command": command + (f" --only {' '.join(args.only)}" if args.only else ""),
        "started": began.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "burst_sessions": FULL_BURST if args.full else BURST,
        "machine": facts,
        "benches": statuses,
    }
    (RESULTS / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(python("-m", "bench.report", env=env).strip())
    failed = [name for name, s in statuses.items() if s["status"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)} (see bench/results/logs/)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
