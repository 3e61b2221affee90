"""The operator's commands as a person runs them: status, sweep --once [--dry-run], destroy, and
`dev --demo`, each a real process against the local stack."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from listener.fly import FlyClient, machine_config
from listener.local.stack import StackThread
from tests.e2e.harness import (
    frontend_user,
    in_state,
    listener_env,
    machines,
    running_listener,
    session_row,
    wait_until,
)

ORPHAN_SESSION = "00000000-0000-0000-0000-00000000dead"


def cli(stack: StackThread, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "listener", *args],
        env={**os.environ, **listener_env(stack.info, **env)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def orphan(stack: StackThread, http: httpx.AsyncClient) -> str:
    info = stack.info
    fly = FlyClient(
        http, base_url=info.fly_api_hostname, app_name=info.fly_app_name, token=info.fly_api_token
    )
    meta = {"managed_by": "sandbox-listener", "session_id": ORPHAN_SESSION, "epoch": "1"}
    return (await fly.create_machine(machine_config("img", metadata=meta), region=None)).id


async def test_status_lists_sessions_and_the_drift(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info):
        session_id = await user.create_session()
        await wait_until(in_state(db, session_id, "ready"), what="ready")
    stray = await orphan(stack, http)
    done = cli(stack, "status", LISTENER_ORPHAN_GRACE_S="0")
    assert done.returncode == 0, done.stderr
    header, first = done.stdout.splitlines()[:2]
    assert header.split()[:4] == ["SESSION", "STATE", "STATUS", "MACHINE"]
    row = session_row(db, session_id)
    assert row is not None
    assert first.split()[:4] == [session_id[:8], "ready", "active", row["sandbox_id"]]
    assert f"destroy orphan machine {stray} (session {ORPHAN_SESSION}: session missing)" in (
        done.stdout
    )
    assert stray in [m.id for m in machines(stack)], "status must not act"


async def test_sweep_dry_run_then_sweep_once(stack: StackThread, http: httpx.AsyncClient) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    waiting = await user.create_session()  # no listener runs: it stays requested, due
    stray = await orphan(stack, http)

    dry = cli(stack, "sweep", "--once", "--dry-run", LISTENER_ORPHAN_GRACE_S="0")
    assert dry.returncode == 0, dry.stderr
    assert f"would provision session {waiting} (requested, active)" in dry.stdout
    assert f"would destroy orphan machine {stray}" in dry.stdout
    assert session_row(db, waiting)["sandbox_state"] == "requested"  # type: ignore[index]
    assert stray in [m.id for m in machines(stack)]

    wet = cli(stack, "sweep", "--once", LISTENER_ORPHAN_GRACE_S="0")
    assert wet.returncode == 0, wet.stderr
    assert "handled 1 due session(s)" in wet.stdout
    assert f"did destroy orphan machine {stray}" in wet.stdout
    assert session_row(db, waiting)["sandbox_state"] == "ready"  # type: ignore[index]
    assert [m.id for m in machines(stack)] == [session_row(db, waiting)["sandbox_id"]]  # type: ignore[index]


async def test_destroy_tears_one_session_down(stack: StackThread, http: httpx.AsyncClient) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info):
        keep = await user.create_session()
        gone = await user.create_session()
        await wait_until(in_state(db, keep, "ready"), what="ready")
        await wait_until(in_state(db, gone, "ready"), what="ready")
    done = cli(stack, "destroy", gone)
    assert done.returncode == 0, done.stderr
    assert f"destroyed the sandbox of session {gone}" in done.stdout
    row = session_row(db, gone)
    assert row is not None and row["sandbox_state"] == "destroyed"
    assert row["sandbox_stop_reason"] == "operator"
    assert [m.id for m in machines(stack)] == [session_row(db, keep)["sandbox_id"]]  # type: ignore[index]
    again = cli(stack, "destroy", gone)
    assert again.returncode == 0 and "already destroyed" in again.stdout


def test_operator_commands_report_bad_configuration(stack: StackThread) -> None:
    done = cli(stack, "status", SUPABASE_URL="not a url", FLY_API_TOKEN="")
    assert done.returncode == 2
    assert "SUPABASE_URL" in done.stderr and "FLY_API_TOKEN" in done.stderr
    assert stack.info.service_role_key not in done.stderr


def test_dev_demo_shows_a_session_through_its_life() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "listener", "dev", "--demo", "--port", "0", "--fly-port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for line in (
        "new -> requested",
        "provisioning -> ready",
        "demo: smoke command said: 'Hello from sandbox'",
        "ready -> stopping",
        "stopping -> destroyed",
        "demo: sandbox destroyed; done.",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
