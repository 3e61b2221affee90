"""`sandbox-listener dev`: the local stack and a listener in one process, with a live view."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx
import structlog
from realtime.types import RealtimePostgresChangesListenEvent
from supabase import AsyncClient

from listener.app import run
from listener.config import Settings
from listener.local import keys
from listener.local.stack import LocalStack, StackInfo, create_user
from listener.logs import configure_logging
from listener.store import connect

log = structlog.get_logger(component="dev")

DEMO_EMAIL = "demo@example.com"
DEMO_TIMEOUT_S = 60.0
EVENT_TIMEOUT_S = 5.0
EVENT_POLL_S = 0.05
DEV_SETTINGS = {
    "SANDBOX_IMAGE": "registry.fly.io/sandbox-listener-sandbox:dev",
    "LISTENER_SWEEP_INTERVAL_S": "10",
    "LISTENER_POLL_INTERVAL_S": "2",
    "LISTENER_SHUTDOWN_GRACE_S": "5",
    "SANDBOX_IDLE_TIMEOUT_S": "600",
}


@dataclass
class Transitions:
    """Prints each session's state change once, and lets the demo wait for one."""

    out: TextIO = sys.stdout
    states: dict[str, str] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, payload: Any) -> None:
        """postgres_changes callback (service role): print state changes as they happen."""
        data = payload.get("data", {})
        row = data.get("record") or data.get("old_record") or {}
        session_id = str(row.get("id", "?"))
        deleted = data.get("type") == "DELETE"
        state = "deleted" if deleted else str(row.get("sandbox_state"))
        if self.states.get(session_id) == state:
            return
        before = self.states.get(session_id, "new")
        self.states[session_id] = state
        extra = ""
        if row.get("sandbox_id"):
            extra += f"  machine={row['sandbox_id']}"
        if row.get("sandbox_error"):
            extra += f"  error={row['sandbox_error']!r}"
        stamp = time.strftime("%H:%M:%S")
        print(
            f"{stamp}  session {session_id[:8]}  {before} -> {state}{extra}",
            file=self.out,
            flush=True,
        )
        self.changed.set()

    async def wait_for(self, session_id: str, *states: str, timeout_s: float) -> str:
        """Wait until the session reaches one of `states`; return it (TimeoutError otherwise)."""
        async with asyncio.timeout(timeout_s):
            while self.states.get(session_id) not in states:
                self.changed.clear()  # no await since the check: record() cannot slip between
                await self.changed.wait()
        return self.states[session_id]


async def watch(info: StackInfo, transitions: Transitions, http: httpx.AsyncClient) -> AsyncClient:
    """Subscribe (as service role) to coding_sessions changes; return once live."""
    client = await connect(info.supabase_url, info.service_role_key, http)
    live = asyncio.Event()
    channel = client.channel("dev-view")
    channel.on_postgres_changes(
        RealtimePostgresChangesListenEvent.All,
        schema="public",
        table="coding_sessions",
        callback=transitions.record,
    )
    channel.on_system(lambda p: live.set() if p.extension == "postgres_changes" else None)
    await channel.subscribe()
    await asyncio.wait_for(live.wait(), timeout=10)
    return client


async def user_client(info: StackInfo, email: str, http: httpx.AsyncClient) -> AsyncClient:
    """A supabase client acting as a (created if needed) test user, with their JWT."""
    user_id = create_user(info.db_url, email)
    token = keys.user_token(info.jwt_secret, user_id, email)
    return await connect(info.supabase_url, info.anon_key, http, access_token=token)


async def demo(
    info: StackInfo, transitions: Transitions, out: TextIO, http: httpx.AsyncClient
) -> bool:
    """One session end to end as a user would drive it; True if every step happened."""
    user = await user_client(info, DEMO_EMAIL, http)
    inserted = await user.table("coding_sessions").insert({}).execute()
    session_id = str(_rows(inserted.data)[0]["id"])
    print(f"demo: inserted session {session_id} as {DEMO_EMAIL}", file=out, flush=True)
    state = await transitions.wait_for(session_id, "ready", "failed", timeout_s=DEMO_TIMEOUT_S)
    if state != "ready":
        print(f"demo: session {state}; see sandbox_events", file=out)
        return False
    smoke = await _smoke_output(user, session_id)
    print(f"demo: smoke command said: {smoke!r}", file=out, flush=True)
    await user.table("coding_sessions").update({"status": "ended"}).eq("id", session_id).execute()
    print("demo: ended the session", file=out, flush=True)
    state = await transitions.wait_for(session_id, "destroyed", timeout_s=DEMO_TIMEOUT_S)
    print(f"demo: sandbox {state}; done.", file=out, flush=True)
    return True


async def dev(
    *,
    demo_mode: bool,
    api_port: int,
    fly_port: int,
    data_dir: Path | None,
    env_file: Path | None,
    stop: asyncio.Event,
    out: TextIO = sys.stdout,
) -> int:
    """Run the stack and a listener until `stop` (or until the demo finishes)."""
    configure_logging("warning", "console")
    started = time.monotonic()
    async with (
        LocalStack(data_dir=data_dir, api_port=api_port, fly_port=fly_port) as info,
        httpx.AsyncClient(timeout=30) as http,
    ):
        if env_file:
            info.write_env_file(env_file)
        settings = Settings.from_env({**info.env(), **DEV_SETTINGS})
        transitions = Transitions(out)
        viewer = await watch(info, transitions, http)
        print(_banner(info, time.monotonic() - started), file=out, flush=True)
        ok = True
        async with asyncio.TaskGroup() as tg:
            tg.create_task(run(settings, stop), name="listener")
            if demo_mode:
                try:
                    ok = await demo(info, transitions, out, http)
                except TimeoutError:
                    print(f"demo: no progress within {DEMO_TIMEOUT_S:.0f} s", file=out)
                    ok = False
                stop.set()
        with contextlib.suppress(Exception):
            await viewer.realtime.close()
    return 0 if ok else 1


async def _smoke_output(user: AsyncClient, session_id: str) -> str:
    """The smoke command's output from the session's `sandbox_ready` event, which the listener
    records just after the row turns ready: wait for it (briefly) rather than race it."""
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        while True:
            events = (
                await user.table("sandbox_events")
                .select("detail")
                .eq("session_id", session_id)
                .eq("event", "sandbox_ready")
                .execute()
            )
            rows = _rows(events.data)
            if rows:
                return str(rows[0]["detail"].get("smoke_output", ""))
            await asyncio.sleep(EVENT_POLL_S)


def _rows(data: object) -> list[dict[str, Any]]:
    """PostgREST's JSON array of rows, typed."""
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def _banner(info: StackInfo, elapsed_s: float) -> str:
    token = keys.user_token(
        info.jwt_secret, create_user(info.db_url, "dev@example.com"), "dev@example.com", ttl_s=86400
    )
    return f"""Local stack and listener up in {elapsed_s:.1f} s.
  Supabase API   {info.supabase_url}   (anon key and JWTs below; DB {info.db_url})
  Fly emulator   {info.fly_api_hostname}   app {info.fly_app_name}

Create a session as dev@example.com (another terminal):
  curl -s {info.supabase_url}/rest/v1/coding_sessions \\
    -H "apikey: {info.anon_key}" \\
    -H "Authorization: Bearer {token}" \\
    -H "Content-Type: application/json" -H "Prefer: return=representation" -d '{{}}'
End it: PATCH the same URL with ?id=eq.<id> and '{{"status":"ended"}}'.
Transitions of every session appear below. Ctrl-C stops everything.
"""
