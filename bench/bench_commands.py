"""Commands through the queue: queue-to-start latency and the listener's overhead per command.

Run: python bench/bench_commands.py [-n 200]. Prints JSON.

A listener runs in this process against the local stack (emulator latencies at zero), with
the FlyClient's exec and the store's command calls wrapped to timestamp them. An owner inserts
commands one at a time, waiting for each to finish, into one ready session.

- queue_to_start: the owner's insert returned (so it is committed) -> the exec request is sent
  (issue 7 target: p50 <= 30 ms, p99 <= 100 ms).
- overhead: claim_next_command called -> finish_command returned, minus the exec call itself:
  claim RPC, the session read, lease keeper start, result write (target p50 <= 10 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import structlog

from listener.app import assemble
from listener.config import Settings
from listener.local import keys
from listener.local.fly_emulator import EmulatorOptions
from listener.local.stack import LocalStack, StackInfo, create_user
from listener.store import connect

T = TypeVar("T")
FAST = {
    "LISTENER_POLL_INTERVAL_S": "0.5",
    "LISTENER_SWEEP_INTERVAL_S": "5",
    "FLY_RATE_PER_S": "100000",
    "FLY_BURST": "100000",
    "SANDBOX_MAX_LIVE_PER_USER": "0",  # one simulated user owns every session
    "LOG_LEVEL": "warning",
}


def pct(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p * len(ordered)) - 1)], 2)

    return {"n": len(ordered), "p50_ms": rank(0.5), "p99_ms": rank(0.99), "max_ms": ordered[-1]}


def timed(record: list[tuple[str, float]], name: str, fn: Callable[..., Awaitable[T]]) -> Any:
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        record.append((f"{name}:start", time.perf_counter()))
        try:
            return await fn(*args, **kwargs)
        finally:
            record.append((f"{name}:end", time.perf_counter()))

    return wrapper


async def measure(info: StackInfo, n: int) -> dict[str, Any]:
    settings = Settings.from_env({**info.env(), **FAST})
    marks: list[tuple[str, float]] = []
    stop = asyncio.Event()
    async with assemble(settings) as parts, httpx.AsyncClient(timeout=30) as http:
        fly, store = parts.fly, parts.store
        fly.exec = timed(marks, "exec", fly.exec)  # type: ignore[method-assign]
        store.claim_next_command = timed(  # type: ignore[method-assign]
            marks, "claim", store.claim_next_command
        )
        store.finish_command = timed(marks, "finish", store.finish_command)  # type: ignore[method-assign]
        user_id = create_user(info.db_url, "bench-commands@example.com")
        token = keys.user_token(info.jwt_secret, user_id)
        user = await connect(info.supabase_url, info.anon_key, http, access_token=token)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(parts.intake.run(stop))
            tg.create_task(parts.scanner.run(stop))
            tg.create_task(parts.dispatcher.run(stop, 5))
            session_id = await _ready_session(user)
            queue_to_start: list[float] = []
            overhead: list[float] = []
            for i in range(n):
                marks.clear()
                inserted = (
                    await user.table("sandbox_commands")
                    .insert({"session_id": session_id, "command": ["echo", str(i)]})
                    .execute()
                )
                committed = time.perf_counter()
                command_id = inserted.data[0]["id"]  # type: ignore[index]
                await _finished(user, command_id)
                at: dict[str, float] = {}
                for name, when in marks:  # the runner's second claim (finding none) comes last
                    at.setdefault(name, when)
                queue_to_start.append((at["exec:start"] - committed) * 1000)
                total = at["finish:end"] - at["claim:start"]
                overhead.append((total - (at["exec:end"] - at["exec:start"])) * 1000)
            stop.set()
    return {
        "commands": n,
        "queue_to_start": pct(queue_to_start),
        "overhead_per_command": pct(overhead),
        "targets": {
            "queue_to_start_p50_ms": 30,
            "queue_to_start_p99_ms": 100,
            "overhead_p50_ms": 10,
        },
    }


async def _ready_session(user: Any) -> str:
    inserted = await user.table("coding_sessions").insert({}).execute()
    session_id = str(inserted.data[0]["id"])
    async with asyncio.timeout(30):
        while True:
            found = (
                await user.table("coding_sessions")
                .select("sandbox_state")
                .eq("id", session_id)
                .execute()
            )
            if found.data[0]["sandbox_state"] == "ready":
                return session_id
            await asyncio.sleep(0.02)


async def _finished(user: Any, command_id: str) -> None:
    async with asyncio.timeout(30):
        while True:
            found = (
                await user.table("sandbox_commands").select("status").eq("id", command_id).execute()
            )
            if found.data[0]["status"] not in ("queued", "running"):
                return
            await asyncio.sleep(0.005)


async def main_async(n: int) -> dict[str, Any]:
    unlimited = EmulatorOptions(  # Fly's 1 exec/s per machine would measure the limit, not us
        token=keys.new_secret(), action_rate_per_s=1e5, action_burst=10**5
    )
    async with LocalStack(fly_options=unlimited) as info:
        return await measure(info, n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="commands (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(json.dumps(asyncio.run(main_async(args.n)), indent=2))


if __name__ == "__main__":
    main()
