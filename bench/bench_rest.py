"""REST gateway figures: latency of RPC calls made with supabase-py against the local stack.

Run: python bench/bench_rest.py [--calls 500] [--concurrency 8]

The stack runs in a child process (its own interpreter, as `local up` runs it); this process
holds one unmodified supabase AsyncClient with the service-role key, as the listener does, and
times calls one after another (p50/p99), then `--concurrency` callers at once (throughput):
- claim_session: VOLATILE, read-write transaction, returns the claimed coding_sessions row;
- sandbox_live_sessions(p_limit => 1): STABLE, read-only transaction, returns a set.

Client and stack share the machine's cores, so the figures include the client's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import httpx
import psycopg
import structlog
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from listener.local.stack import LocalStack, create_user

OWNER = "bench-rest"


def quiet() -> None:
    """Warnings only, as a deployment would log."""
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def run_stack(pipe: Connection) -> None:
    """Child process: the local stack until told to stop."""
    quiet()

    async def main() -> None:
        stack = LocalStack()
        info = await stack.start()
        pipe.send(info.env())
        await asyncio.to_thread(pipe.recv)  # "stop"
        await stack.stop()

    asyncio.run(main())


def summary(samples_ms: list[float], wall_s: float | None = None) -> dict[str, float]:
    ordered = sorted(samples_ms)
    out = {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "max_ms": round(ordered[-1], 2),
    }
    if wall_s is not None:
        out["calls_per_s"] = round(len(ordered) / wall_s, 1)
    return out


async def timed(call: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def series(
    call: Callable[[], Awaitable[Any]], calls: int, concurrency: int
) -> dict[str, dict[str, float]]:
    for _ in range(20):  # warm-up: schema cache, pool connections, prepared statements
        await call()
    sequential = [await timed(call) for _ in range(calls)]
    started = time.perf_counter()
    per_worker = calls // concurrency

    async def worker() -> list[float]:
        return [await timed(call) for _ in range(per_worker)]

    batches = await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "sequential": summary(sequential),
        f"concurrent_{concurrency}": summary([ms for batch in batches for ms in batch], wall),
    }


async def measure(url: str, env: dict[str, str], calls: int, concurrency: int) -> dict[str, Any]:
    db_url = env["SUPABASE_DB_URL"]
    user_id = await asyncio.to_thread(create_user, db_url, "bench-rest@example.com")
    session_id = str(uuid.uuid4())
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as db:
        await db.execute(
            "insert into coding_sessions (id, user_id) values (%s, %s)", (session_id, user_id)
        )
    async with httpx.AsyncClient(timeout=30) as http:
        options = AsyncClientOptions(httpx_client=http)
        client: AsyncClient = await acreate_client(
            url, env["SUPABASE_SERVICE_ROLE_KEY"], options=options
        )
        claim = {"p_id": session_id, "p_owner": OWNER, "p_lease_s": 60, "p_force": True}
        return {
            "claim_session": await series(
                lambda: client.rpc("claim_session", claim).execute(), calls, concurrency
            ),
            "sandbox_live_sessions": await series(
                lambda: client.rpc("sandbox_live_sessions", {"p_limit": 1}).execute(),
                calls,
                concurrency,
            ),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    quiet()

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=run_stack, args=(child,), daemon=True)
    process.start()
    try:
        env = parent.recv()
        results = asyncio.run(measure(env["SUPABASE_URL"], env, args.calls, args.concurrency))
    finally:
        parent.send("stop")
        process.join(timeout=30)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
