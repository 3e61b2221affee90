"""Sweeper scale: the database time of one sweep (plus the catch-up scan) with 1,000 live rows
among 100,000, then among 200,000, to show that its cost follows the live rows, not the ended.

Run: python -m bench.bench_sweeper [--live 1000] [--rows 100000] [--reps 30] [--out FILE]

Rows are inserted directly with SQL as the superuser: `live` ready rows whose machines exist in
the emulator (created through its API, with the listener's metadata), the rest destroyed and
ended. Then, per table size:
- database: the calls one sweep and one scan make (take_listener_lease, sandbox_sessions_by_ids
  with the inventory's 1,000 ids, sandbox_live_sessions, claim_sessions), timed over psycopg
  (round trip on loopback, rows transferred) and by EXPLAIN ANALYZE (server execution only);
- store: the same calls through SandboxStore over the REST gateway, as the listener makes them;
- sweep: Sweeper.sweep_once() as a whole against the emulator (list 1,000 machines, reconcile).
The stack shares this process (a background loop), so the REST and sweep figures include the
gateway's and the emulator's own CPU time; the database figures do not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.common import (
    RESULTS_DIR,
    BenchStack,
    bench_user,
    drain_realtime,
    listener_env,
    percentiles,
    quiet_logs,
    seed_ready_sessions,
    unlimited_fly,
    write_result,
)
from listener.config import Settings
from listener.effects import utcnow
from listener.reconciler import Policy
from listener.store import SandboxStore, connect
from listener.sweeper import Sweeper

OWNER = "bench-sweeper"
TARGET_SWEEP_DB_MS = 50.0


def insert_ended(db_url: str, user: uuid.UUID, n: int) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "insert into coding_sessions (user_id, status, sandbox_state, sandbox_attempts,"
            " sandbox_epoch, created_at, sandbox_destroyed_at, sandbox_stop_reason)"
            " select %s, 'ended', 'destroyed', 1, 3, now() - interval '1 day', now(), 'ended'"
            " from generate_series(1, %s)",
            (user, n),
        )
        conn.execute("analyze coding_sessions")


def database_calls(db_url: str, ids: list[str], reps: int) -> dict[str, Any]:
    """Round trip and server execution time of each call a sweep and a scan make."""
    calls: dict[str, tuple[str, tuple[Any, ...]]] = {
        "take_listener_lease": ("select take_listener_lease(%s, %s, 180)", ("sweeper", OWNER)),
        "sandbox_sessions_by_ids": ("select * from sandbox_sessions_by_ids(%s::uuid[])", (ids,)),
        "sandbox_live_sessions": ("select * from sandbox_live_sessions(10000)", ()),
        "claim_sessions": ("select * from claim_sessions(%s, 120, 32)", (OWNER,)),
    }
    out: dict[str, Any] = {}
    with psycopg.connect(db_url, autocommit=True) as conn:
        for name, (sql, params) in calls.items():
            rounds: list[float] = []
            server: list[float] = []
            rows = 0
            for _ in range(reps):
                started = time.perf_counter()
                rows = len(conn.execute(sql, params).fetchall())
                rounds.append((time.perf_counter() - started) * 1000)
                plan = conn.execute(f"explain (analyze, format json) {sql}", params).fetchone()
                assert plan is not None
                server.append(float(plan[0][0]["Execution Time"]))
            out[name] = {
                "rows": rows,
                "round_trip": percentiles(rounds),
                "server": percentiles(server),
            }
    return out


async def timed(call: Callable[[], Awaitable[object]], reps: int) -> dict[str, float]:
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    return percentiles(samples)


async def store_and_sweep(
    settings: Settings, ids: list[str], reps: int, sweep_reps: int
) -> dict[str, Any]:
    """The same calls through SandboxStore over REST, and whole sweeps against the emulator."""
    async with httpx.AsyncClient(timeout=60) as http, httpx.AsyncClient(timeout=60) as fly_http:
        client = await connect(
            str(settings.supabase_url), settings.supabase_service_role_key.get_secret_value(), http
        )
        store = SandboxStore(client, OWNER)
        sweeper = Sweeper(
            unlimited_fly(settings, fly_http),
            store,
            Policy.from_settings(settings),
            clock=utcnow,
            interval_s=60,
        )
        store_calls = {
            "take_leader_lease": await timed(lambda: store.take_leader_lease("sweeper", 180), reps),
            "sessions_by_ids": await timed(lambda: store.sessions_by_ids(ids), reps),
            "live_sessions": await timed(store.live_sessions, reps),
            "claim_due": await timed(lambda: store.claim_due(120, 32), reps),
        }
        report = await sweeper.sweep_once()
        sweep = await timed(sweeper.sweep_once, sweep_reps)
    return {
        "store": store_calls,
        "sweep": sweep,
        "sweep_found": {"machines": report.machines, "actions": len(report.actions)},
    }


def measure(stack: BenchStack, settings: Settings, ids: list[str], reps: int) -> dict[str, Any]:
    with psycopg.connect(stack.db_url) as conn:
        row = conn.execute(
            "select count(*), count(*) filter (where sandbox_state = 'ready') from coding_sessions"
        ).fetchone()
    assert row is not None
    db = database_calls(stack.db_url, ids, reps)
    rest = asyncio.run(store_and_sweep(settings, ids, reps, max(3, reps // 5)))
    sweep_db_ms = sum(
        db[name]["round_trip"]["p50_ms"]
        for name in ("take_listener_lease", "sandbox_sessions_by_ids", "sandbox_live_sessions")
    )
    return {
        "rows": row[0],
        "live": row[1],
        "database": db,
        "sweep_database_ms_p50": round(sweep_db_ms, 2),
        "sweep_and_scan_database_ms_p50": round(
            sweep_db_ms + db["claim_sessions"]["round_trip"]["p50_ms"], 2
        ),
        **rest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "sweeper.json")
    args = parser.parse_args()
    quiet_logs()
    stack = BenchStack.start(rate_limits=False)
    try:
        settings = Settings.from_env(listener_env(stack.info))
        user = bench_user(stack.db_url)
        sessions = seed_ready_sessions(stack, settings, user, args.live)
        sizes = []
        inserted = args.live
        for ended in (args.rows - args.live, args.rows):  # 100,000 rows, then 200,000
            insert_ended(stack.db_url, user, ended)
            inserted += ended
            drain_realtime(stack, inserted)
            sizes.append(measure(stack, settings, sessions, args.reps))
    finally:
        stack.close()
    small, large = sizes
    result = {
        "benchmark": "sweeper",
        "settings": {"live": args.live, "rows": [s["rows"] for s in sizes], "reps": args.reps},
        "sizes": sizes,
        "target_sweep_database_ms": TARGET_SWEEP_DB_MS,
        "met": small["sweep_database_ms_p50"] <= TARGET_SWEEP_DB_MS
        and large["sweep_database_ms_p50"] <= TARGET_SWEEP_DB_MS,
        "growth_ratio": round(large["sweep_database_ms_p50"] / small["sweep_database_ms_p50"], 3),
        "growth_ratio_sweep": round(large["sweep"]["p50_ms"] / small["sweep"]["p50_ms"], 3),
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
