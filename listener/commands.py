"""Operator commands: status, one sweep, destroy, exec: the worker's own parts, run once."""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import datetime
from typing import Any, TextIO

import httpx
from supabase import AsyncClient

from listener.app import assemble
from listener.config import Settings
from listener.effects import utcnow
from listener.models import MANAGED_BY, Session, StopReason
from listener.reconciler import DestroyOrphan, Policy, RecoverLost, SweepAction, decide
from listener.store import connect
from listener.sweeper import LEASE_NAME


def _ago(then: datetime | None, now: datetime) -> str:
    if then is None:
        return "-"
    seconds = int((now - then).total_seconds())
    return _duration(seconds)


def _until(then: datetime | None, now: datetime) -> str:
    if then is None:
        return "-"
    seconds = int((then - now).total_seconds())
    return _duration(seconds) if seconds >= 0 else f"overdue {_duration(-seconds)}"


def _duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def describe(action: SweepAction) -> str:
    """One line per sweep action, as an operator reads it."""
    match action:
        case DestroyOrphan(machine_id, session_id, reason):
            return f"destroy orphan machine {machine_id} (session {session_id or '-'}: {reason})"
        case RecoverLost(session_id, machine_id):
            return f"recover session {session_id}: its machine {machine_id} is gone"


def session_table(sessions: list[Session], now: datetime) -> list[str]:
    """The `status` table: one row per session."""
    header = (
        "SESSION",
        "STATE",
        "STATUS",
        "MACHINE",
        "REGION",
        "AGE",
        "IDLE",
        "EXPIRES IN",
        "ERROR",
    )
    rows = [header] + [
        (
            s.id[:8],
            s.state.value,
            s.status.value,
            s.sandbox_id or "-",
            s.region or "-",
            _ago(s.created_at, now),
            _ago(s.last_activity_at, now),
            _until(s.expires_at, now),
            (s.error or "")[:60],
        )
        for s in sessions
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


async def status(settings: Settings, out: TextIO = sys.stdout) -> int:
    """Print sessions and the drift between rows and the Fly inventory."""
    async with assemble(settings) as parts:
        now = utcnow()
        sessions = await parts.store.recent_sessions()
        report = await parts.sweeper.sweep_once(dry_run=True)
        for line in session_table(sessions, now):
            print(line, file=out)
        print(
            f"\nFly inventory: {report.machines} machine(s) tagged managed_by={MANAGED_BY}.",
            file=out,
        )
        if report.actions:
            print("Drift:", file=out)
            for action in report.actions:
                print(f"  {describe(action)}", file=out)
        else:
            print(
                "No drift: every machine has a live session and every ready session a machine.",
                file=out,
            )
    return 0


async def sweep(settings: Settings, *, dry_run: bool, out: TextIO = sys.stdout) -> int:
    """One catch-up scan and one reconcile; print what would be / was done."""
    async with assemble(settings) as parts:
        if dry_run:
            policy = Policy.from_settings(settings)
            now = utcnow()
            for row in await parts.store.due_sessions():
                decision = type(decide(row, now, policy)).__name__.lower()
                print(
                    f"would {decision} session {row.id} ({row.state.value}, {row.status.value})",
                    file=out,
                )
        else:
            stop = asyncio.Event()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(parts.dispatcher.run(stop, settings.listener_shutdown_grace_s))
                claimed = await parts.scanner.scan_once()
                await parts.dispatcher.wait_idle()
                stop.set()
            print(f"handled {claimed} due session(s)", file=out)
        report = await parts.sweeper.sweep_once(dry_run=dry_run)
        if not dry_run:  # a one-off sweep must not keep running replicas from sweeping
            await parts.store.release_leader_lease(LEASE_NAME)
        if not report.leader:
            print("another listener holds the sweeper lease; nothing reconciled", file=out)
        verb = "would" if dry_run else "did"
        for action in report.actions:
            print(f"{verb} {describe(action)}", file=out)
        if report.leader and not report.actions:
            print(f"inventory ({report.machines} machine(s)) matches the rows", file=out)
    return 0


async def destroy(settings: Settings, session_id: str, out: TextIO = sys.stdout) -> int:
    """Tear one session's sandbox down now (reason `operator`)."""
    async with assemble(settings) as parts:
        row = await parts.store.claim(session_id, settings.listener_lease_s, force=True)
        if row is None:
            count = await parts.controller.bury_deleted(session_id)
            print(f"no such session; destroyed {count} machine(s) it left", file=out)
            return 0
        if row.state.is_final:  # never claimed: nothing left to tear down
            print(f"session {session_id} is already {row.state.value}", file=out)
            return 0
        if not row.claimed_by_me(parts.store.owner):
            print(
                f"session {session_id} is being handled by {row.claimed_by} until "
                f"{row.lease_expires_at}; try again after that",
                file=sys.stderr,
            )
            return 1
        await parts.controller.teardown(row, StopReason.OPERATOR)
        print(f"destroyed the sandbox of session {session_id}", file=out)
    return 0


EXIT_TIMED_OUT = 124  # as coreutils `timeout`
EXIT_NOT_RUN = 125  # rejected, or could not be run at all
FINAL = {"succeeded", "failed", "timed_out", "rejected"}
POLL_S = 0.1
WAIT_MARGIN_S = 300.0  # queueing and provisioning on top of the command's own timeout


async def exec_command(
    settings: Settings,
    session_id: str,
    argv: list[str],
    *,
    timeout_s: int,
    stdin: str | None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Queue a command for a session (on behalf of its owner, with the service key), wait,
    print the output, return its code."""
    async with httpx.AsyncClient(timeout=30) as http:
        client = await connect(
            str(settings.supabase_url), settings.supabase_service_role_key.get_secret_value(), http
        )
        found = (
            await client.table("coding_sessions").select("user_id").eq("id", session_id).execute()
        )
        owners = [r for r in found.data if isinstance(r, dict)]
        if not owners:
            print(f"error: no session {session_id}", file=err)
            return EXIT_NOT_RUN
        row = {
            "session_id": session_id,
            "user_id": owners[0]["user_id"],
            "command": argv,
            "timeout_s": timeout_s,
            "stdin": stdin,
        }
        inserted = await client.table("sandbox_commands").insert(row).execute()
        command_id = str(next(r for r in inserted.data if isinstance(r, dict))["id"])
        try:
            result = await _wait_for_result(client, command_id, err, timeout_s + WAIT_MARGIN_S)
        except (TimeoutError, LookupError) as exc:
            print(f"error: {exc}", file=err)
            return EXIT_NOT_RUN
    stdout, stderr = result.get("stdout") or "", result.get("stderr") or ""
    out.write(stdout)
    err.write(stderr)
    for stream in ("stdout", "stderr"):
        if result.get(f"{stream}_truncated"):
            print(
                f"[{stream} truncated to {settings.sandbox_command_output_limit_bytes} bytes]",
                file=err,
            )
    status = result["status"]
    if result.get("error"):
        print(f"{status}: {result['error']}", file=err)
    if status == "timed_out":
        return EXIT_TIMED_OUT
    if result.get("exit_code") is not None:
        return int(result["exit_code"])
    return EXIT_NOT_RUN


async def _wait_for_result(
    client: AsyncClient, command_id: str, err: TextIO, deadline_s: float
) -> dict[str, Any]:
    """Poll the command row until it is final, showing progress on a terminal."""
    started = time.monotonic()
    shown = ""
    while True:
        if time.monotonic() - started > deadline_s:
            raise TimeoutError(f"no result after {deadline_s:.0f} s; is a listener running?")
        found = await client.table("sandbox_commands").select("*").eq("id", command_id).execute()
        rows = [r for r in found.data if isinstance(r, dict)]
        if not rows:
            raise LookupError("the command is gone (its session was deleted)")
        row = rows[0]
        if row["status"] in FINAL:
            if shown and err.isatty():
                print(file=err)
            return row
        if err.isatty():
            waiting = "waiting for the sandbox" if row["status"] == "queued" else "running"
            shown = f"\r{waiting}... {time.monotonic() - started:.0f}s"
            print(shown, end="", file=err, flush=True)
        await asyncio.sleep(POLL_S)
