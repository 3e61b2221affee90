"""Realtime gateway figures: `local up` readiness and commit -> event latency; prints JSON.

Run: python bench/bench_realtime.py [--commits 500] [--up-runs 3]

- readiness: a fresh LocalStack (new data dir: initdb, bootstrap, migrations, slot, servers)
  is started in a child process, timing `start()` until it returns; targets <= 5 s.
- latency: the stack keeps running in that child process (its own interpreter, like a real
  deployment); this process holds two unmodified supabase clients on coding_sessions, one with
  the service-role key and one with a user's token (RLS check per change), and commits
  single-row inserts one at a time, timing commit start -> callback. Targets: p50 <= 30 ms,
  p99 <= 100 ms. The series is run with the writer's session at the server's default
  synchronous_commit and with synchronous_commit=on (see the note in the output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

import psycopg
import structlog
from supabase import acreate_client

from listener.local import keys
from listener.local.stack import LocalStack, create_user

TIMEOUT_S = 10.0


def quiet() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def run_stack(pipe: Connection, up_runs: int) -> None:
    """Child process: time `up_runs` fresh starts, keep the last stack up until told to stop."""
    quiet()

    async def main() -> None:
        times = []
        for run in range(up_runs):
            stack = LocalStack()
            started = time.perf_counter()
            info = await stack.start()
            times.append(time.perf_counter() - started)
            if run < up_runs - 1:
                await stack.stop()
        pipe.send({"up_s": times, "info": info.env()})
        await asyncio.to_thread(pipe.recv)  # "stop"
        await stack.stop()

    asyncio.run(main())


def summary(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "max_ms": round(ordered[-1], 2),
    }


async def measure(env: dict[str, str], commits: int, default_commits: int) -> dict[str, Any]:
    url, db_url = env["SUPABASE_URL"], env["SUPABASE_DB_URL"]
    user = await asyncio.to_thread(create_user, db_url, "bench@example.com")
    user_token = keys.user_token(env["SUPABASE_JWT_SECRET"], user, ttl_s=3600)
    received: dict[str, dict[str, float]] = {"service_role": {}, "user_rls": {}}
    arrived: dict[str, asyncio.Event] = {}

    def on_change(who: str) -> Any:
        def callback(payload: dict[str, Any]) -> None:
            row_id = payload["data"]["record"]["id"]
            received[who][row_id] = time.perf_counter()
            if all(row_id in got for got in received.values()) and row_id in arrived:
                arrived[row_id].set()

        return callback

    clients = []
    for who, key, token in (
        ("service_role", env["SUPABASE_SERVICE_ROLE_KEY"], None),
        ("user_rls", env["SUPABASE_ANON_KEY"], user_token),
    ):
        client = await acreate_client(url, key)
        if token:
            await client.realtime.set_auth(token)
        ready = asyncio.Event()
        channel = client.channel(f"bench-{who}")
        channel.on_postgres_changes("INSERT", on_change(who), table="coding_sessions")
        channel.on_system(lambda status, ready=ready: ready.set())
        await channel.subscribe()
        await asyncio.wait_for(ready.wait(), TIMEOUT_S)
        clients.append(client)

    async def series(n: int, options: str) -> dict[str, dict[str, float]]:
        started: dict[str, float] = {}
        async with await psycopg.AsyncConnection.connect(
            db_url, autocommit=True, options=options
        ) as db:
            for _ in range(n):
                row_id = await (await db.execute("select gen_random_uuid()::text")).fetchone()
                assert row_id is not None
                arrived[row_id[0]] = asyncio.Event()
                started[row_id[0]] = time.perf_counter()
                await db.execute(
                    "insert into public.coding_sessions (id, user_id) values (%s, %s)",
                    (row_id[0], user),
                )
                await asyncio.wait_for(arrived[row_id[0]].wait(), TIMEOUT_S)
        return {
            who: summary([(got[r] - t) * 1000 for r, t in started.items()])
            for who, got in received.items()
        }

    await series(20, "")  # warm-up: first-use catalog lookups and connection setup
    results = {
        "synchronous_commit_on": await series(commits, "-c synchronous_commit=on"),
        "server_default_commit": await series(default_commits, ""),
    }
    for client in clients:
        await client.realtime.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=500)
    parser.add_argument("--default-commits", type=int, default=100)
    parser.add_argument("--up-runs", type=int, default=3)
    args = parser.parse_args()
    quiet()

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=run_stack, args=(child, args.up_runs), daemon=True)
    process.start()
    try:
        started = parent.recv()
        with psycopg.connect(started["info"]["SUPABASE_DB_URL"]) as db:
            server_commit = db.execute("show synchronous_commit").fetchone()
        latency = asyncio.run(measure(started["info"], args.commits, args.default_commits))
    finally:
        parent.send("stop")
        process.join(timeout=30)
    up = started["up_s"]
    print(
        json.dumps(
            {
                "local_up_s": {
                    "runs": [round(s, 3) for s in up],
                    "median": round(statistics.median(up), 3),
                    "target": 5.0,
                },
                "commit_to_event": latency,
                "targets_ms": {"p50": 30, "p99": 100},
                "server_synchronous_commit": server_commit[0] if server_commit else None,
                "note": (
                    "With synchronous_commit=off a commit reaches the walsender only when the WAL "
                    "writer flushes it (wal_writer_delay, 200 ms by default), which bounds the "
                    "latency of server_default_commit when the server runs with it off."
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
