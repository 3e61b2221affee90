"""End-to-end helpers: the invariant checker, condition waits, a frontend user, listener runners."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row
from supabase import AsyncClient

from listener.app import run
from listener.config import Settings
from listener.local import keys
from listener.local.stack import StackInfo, StackThread, create_user
from listener.store import connect

LIVE_STATES = ("requested", "provisioning", "ready", "stopping")
FAST = {
    "LISTENER_POLL_INTERVAL_S": "0.5",
    "LISTENER_SWEEP_INTERVAL_S": "1",
    "LISTENER_LEASE_S": "6",
    "LISTENER_SHUTDOWN_GRACE_S": "5",
    "LISTENER_CONCURRENCY": "16",
    "LISTENER_RETRY_BASE_S": "0.2",
    "FLY_RATE_PER_S": "1000",
    "FLY_BURST": "1000",
    "FLY_GET_RATE_PER_S": "1000",
    "FLY_GET_BURST": "1000",
    "LISTENER_RETRY_MAX_S": "2",
    "SANDBOX_IMAGE": "registry.fly.io/sandbox:test",
    "SANDBOX_MAX_LIVE_PER_USER": "0",  # one test user often owns dozens of sessions
    "LOG_LEVEL": "warning",
    "LOG_FORMAT": "json",
}


async def wait_until(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout_s: float = 20.0,
    what: str = "condition",
    interval_s: float = 0.05,
) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval_s)


def rows(
    db_url: str, sql: str = "select * from coding_sessions", *args: Any
) -> list[dict[str, Any]]:
    """Rows as dicts, read as the superuser."""
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        return list(conn.execute(sql, args).fetchall())  # type: ignore[arg-type]


def session_row(db_url: str, session_id: str) -> dict[str, Any] | None:
    """One coding_sessions row, or None."""
    found = rows(db_url, "select * from coding_sessions where id = %s", session_id)
    return found[0] if found else None


def machines(stack: StackThread) -> list[Any]:
    """The emulator's active machines (not destroying or destroyed, as fly-go's IsActive)."""
    fly = stack.stack.fly
    assert fly is not None
    return [m for m in fly.machines() if m.state not in ("destroying", "destroyed")]


def invariant_violations(stack: StackThread) -> list[str]:
    """No machine without a live row, no ready row without a started machine, one per session."""
    problems: list[str] = []
    by_id = {str(r["id"]): r for r in rows(stack.info.db_url)}
    live = machines(stack)
    per_session: dict[str, list[str]] = {}
    for m in live:
        session_id = m.metadata.get("session_id")
        per_session.setdefault(session_id or "", []).append(m.id)
        row = by_id.get(session_id or "")
        if row is None or row["sandbox_state"] not in LIVE_STATES:
            state = row["sandbox_state"] if row else "missing"
            problems.append(f"machine {m.id} ({m.state}) has no live row (session {state})")
    for session_id, ids in per_session.items():
        if len(ids) > 1:
            problems.append(f"session {session_id} has {len(ids)} machines: {ids}")
    started = {m.id for m in live if m.state == "started"}
    for row in by_id.values():
        if row["sandbox_state"] == "ready" and row["sandbox_id"] not in started:
            problems.append(f"ready session {row['id']} has no started machine {row['sandbox_id']}")
    return problems


async def converged(stack: StackThread, *, timeout_s: float = 30.0) -> None:
    """Wait until every row is settled and the invariants hold."""

    def settled() -> bool:
        states = {r["sandbox_state"] for r in rows(stack.info.db_url)}
        return not states & {"requested", "provisioning", "stopping"} and not invariant_violations(
            stack
        )

    try:
        await wait_until(settled, timeout_s=timeout_s, what="convergence")
    except AssertionError:
        raise AssertionError(f"not converged: {invariant_violations(stack)}") from None


@dataclass
class User:
    """A frontend user: the unmodified supabase client with the user's JWT."""

    id: str
    client: AsyncClient

    async def create_session(self, **fields: Any) -> str:
        """Insert a coding_sessions row as this user; return its id."""
        result = await self.client.table("coding_sessions").insert(fields).execute()
        data: Any = result.data
        return str(data[0]["id"])

    async def end_session(self, session_id: str) -> None:
        """Set status = ended, as the frontend does."""
        await (
            self.client.table("coding_sessions")
            .update({"status": "ended"})
            .eq("id", session_id)
            .execute()
        )

    async def delete_session(self, session_id: str) -> None:
        """Delete the row, as the frontend may."""
        await self.client.table("coding_sessions").delete().eq("id", session_id).execute()


async def frontend_user(
    info: StackInfo, http: httpx.AsyncClient, email: str = "user@example.com"
) -> User:
    """A signed-in user of the app, acting through REST with their own JWT."""
    user_id = create_user(info.db_url, email)
    token = keys.user_token(info.jwt_secret, user_id, email)
    return User(
        str(user_id), await connect(info.supabase_url, info.anon_key, http, access_token=token)
    )


def listener_env(info: StackInfo, **overrides: str) -> dict[str, str]:
    """The environment a listener needs against this stack, with fast test intervals."""
    return {**info.env(), **FAST, **overrides}


@contextlib.asynccontextmanager
async def running_listener(
    info: StackInfo, *, owner: str = "test-listener", **overrides: str
) -> AsyncIterator[asyncio.Event]:
    """A listener in this process (real sockets to the stack); stopped gracefully on exit."""
    settings = Settings.from_env(listener_env(info, **overrides))
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop, owner=owner), name=f"listener-{owner}")
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


class ListenerProcess:
    """`python -m listener run` as a child process, for crashes (kill -9) and signals."""

    def __init__(self, info: StackInfo, log_path: Path, **overrides: str) -> None:
        env = {**os.environ, **listener_env(info, **overrides)}
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "listener", "run"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self, timeout_s: float) -> int:
        """SIGTERM and wait for the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> None:
        """Make sure the child is gone."""
        if self.proc.poll() is None:
            self.kill()
        self._log.close()


def events(db_url: str, session_id: str) -> list[str]:
    """The session's sandbox_events, oldest first."""
    return [
        str(r["event"])
        for r in rows(
            db_url,
            "select event from sandbox_events where session_id = %s order by id",
            session_id,
        )
    ]


def state_of(db_url: str, session_id: str) -> str | None:
    """The session's sandbox_state (None if the row is gone)."""
    row = session_row(db_url, session_id)
    return None if row is None else str(row["sandbox_state"])


def in_state(db_url: str, session_id: str, *states: str) -> Callable[[], bool]:
    """A condition: the session is in one of `states`."""
    return lambda: state_of(db_url, session_id) in states


def fly_calls(stack: StackThread) -> Mapping[tuple[str, int], int]:
    """Calls the emulator answered, by (operation, status)."""
    fly = stack.stack.fly
    assert fly is not None
    return fly.call_counts()


def set_faults(stack: StackThread, **knobs: object) -> None:
    """Change the emulator's latency and fault knobs at runtime (on the stack's own loop)."""
    fly = stack.stack.fly
    assert fly is not None

    async def apply() -> None:
        fly.set_options(**knobs)

    stack.call(apply)


def vanish(stack: StackThread, machine_id: str) -> None:
    """Host failure: the machine disappears without any API call."""
    fly = stack.stack.fly
    assert fly is not None

    async def apply() -> None:
        fly.vanish(machine_id)

    stack.call(apply)
