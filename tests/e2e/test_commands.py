"""Commands in sandboxes through the queue, and the idle clock driven by real work."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from postgrest.exceptions import APIError

from listener.local.stack import StackThread
from tests.e2e.harness import (
    User,
    events,
    frontend_user,
    in_state,
    listener_env,
    rows,
    running_listener,
    session_row,
    wait_until,
)

FINAL = ("succeeded", "failed", "timed_out", "rejected")


async def queue(user: User, session_id: str, *commands: dict[str, Any]) -> list[str]:
    """Insert commands as the owner in one statement (as PostgREST does, keys missing from
    one object are NULL unless every object has them); return their ids in order."""
    result = (
        await user.client.table("sandbox_commands")
        .insert([{"session_id": session_id, **c} for c in commands])
        .execute()
    )
    data: Any = result.data
    return [str(r["id"]) for r in data]


def command(db: str, command_id: str) -> dict[str, Any]:
    (row,) = rows(db, "select * from sandbox_commands where id = %s", command_id)
    return row


def finished(db: str, *ids: str) -> Any:
    return lambda: all(command(db, i)["status"] in FINAL for i in ids)


async def ready_session(user: User, db: str) -> str:
    session_id = await user.create_session()
    await wait_until(in_state(db, session_id, "ready"), what="ready")
    return session_id


async def test_command_runs_and_its_result_is_written(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info):
        session_id = await ready_session(user, db)
        before = session_row(db, session_id)
        (cid,) = await queue(user, session_id, {"command": ["sh", "-c", "echo out; echo err >&2"]})
        await wait_until(finished(db, cid), what="command finished")
    row = command(db, cid)
    assert (row["status"], row["exit_code"], row["stdout"], row["stderr"]) == (
        "succeeded",
        0,
        "out\n",
        "err\n",
    )
    assert row["started_at"] <= row["finished_at"]
    assert not row["stdout_truncated"] and row["error"] is None
    after = session_row(db, session_id)
    assert before and after and after["last_activity_at"] > before["last_activity_at"]
    # the owner reads the result through RLS
    seen = await user.client.table("sandbox_commands").select("stdout").eq("id", cid).execute()
    assert seen.data == [{"stdout": "out\n"}]


async def test_burst_of_twenty_runs_in_fifo_order_one_at_a_time(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info):
        session_id = await ready_session(user, db)
        ids = await queue(
            user,
            session_id,
            *(
                {"command": ["sh", "-c", 'echo "$0" >> order.log; cat order.log', str(i)]}
                for i in range(20)
            ),
        )
        await wait_until(finished(db, *ids), timeout_s=30, what="20 commands")
    runs = [command(db, i) for i in ids]
    assert [r["status"] for r in runs] == ["succeeded"] * 20
    assert runs[-1]["stdout"].split() == [str(i) for i in range(20)], "not FIFO"
    for earlier, later in itertools.pairwise(runs):
        assert earlier["finished_at"] <= later["started_at"], "two ran at once"


async def test_commands_of_ten_sessions_run_in_parallel(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info):
        sessions = [await user.create_session() for _ in range(10)]
        for s in sessions:
            await wait_until(in_state(db, s, "ready"), what="ready")
        ids = [(await queue(user, s, {"command": ["sleep", "0.5"]}))[0] for s in sessions]
        await wait_until(finished(db, *ids), timeout_s=30, what="10 commands")
    runs = sorted((command(db, i) for i in ids), key=lambda r: r["started_at"])
    assert all(r["status"] == "succeeded" for r in runs)
    overlapping = sum(1 for a, b in itertools.pairwise(runs) if b["started_at"] < a["finished_at"])
    assert overlapping >= 5, "commands of different sessions ran one after another"


async def test_non_zero_exit_is_failed_with_the_code(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info):
        session_id = await ready_session(user, db)
        (cid,) = await queue(user, session_id, {"command": ["sh", "-c", "echo no >&2; exit 3"]})
        await wait_until(finished(db, cid), what="finished")
    row = command(db, cid)
    assert (row["status"], row["exit_code"], row["stderr"]) == ("failed", 3, "no\n")
    assert state_is(db, session_id, "ready"), "a failing command must not hurt the sandbox"


def state_is(db: str, session_id: str, state: str) -> bool:
    row = session_row(db, session_id)
    return bool(row and row["sandbox_state"] == state)


async def test_timeout_stdin_and_truncation(stack: StackThread, http: httpx.AsyncClient) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info, SANDBOX_COMMAND_OUTPUT_LIMIT_BYTES="1024"):
        session_id = await ready_session(user, db)
        slow, echo, loud = await queue(
            user,
            session_id,
            {"command": ["sleep", "30"], "timeout_s": 1, "stdin": None},
            {"command": ["cat"], "timeout_s": 10, "stdin": "hello from stdin"},
            {
                "command": ["sh", "-c", "head -c 5000 /dev/zero | tr '\\0' x"],
                "timeout_s": 10,
                "stdin": None,
            },
        )
        await wait_until(finished(db, slow, echo, loud), timeout_s=30, what="finished")
    timed_out = command(db, slow)
    assert timed_out["status"] == "timed_out"
    assert "longer than its timeout_s (1 s)" in timed_out["error"]
    assert command(db, echo)["stdout"] == "hello from stdin"
    truncated = command(db, loud)
    assert truncated["status"] == "succeeded"
    assert truncated["stdout"] == "x" * 1024 and truncated["stdout_truncated"] is True


async def test_timeout_above_the_setting_is_rejected(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info, SANDBOX_COMMAND_MAX_TIMEOUT_S="10"):
        session_id = await ready_session(user, db)
        (cid,) = await queue(user, session_id, {"command": ["true"], "timeout_s": 600})
        await wait_until(finished(db, cid), what="finished")
    row = command(db, cid)
    assert row["status"] == "rejected"
    assert "timeout_s 600 is outside 1..10" in row["error"]


async def test_commands_wait_while_provisioning_and_are_rejected_once_ended(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    session_id = await user.create_session()
    (early,) = await queue(user, session_id, {"command": ["echo", "early"]})
    assert command(db, early)["status"] == "queued"
    async with running_listener(stack.info):
        await wait_until(finished(db, early), what="the early command ran once ready")
        assert command(db, early)["stdout"] == "early\n"
        await user.end_session(session_id)
        await wait_until(in_state(db, session_id, "destroyed"), what="destroyed")
        (late,) = await queue(user, session_id, {"command": ["echo", "late"]})
        await wait_until(finished(db, late), what="late command settled")
    row = command(db, late)
    assert row["status"] == "rejected"
    assert row["error"] == "The session has ended; its sandbox is destroyed."


async def test_owner_cannot_run_in_another_users_session_or_forge_results(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    alice = await frontend_user(stack.info, http, "alice@example.com")
    mallory = await frontend_user(stack.info, http, "mallory@example.com")
    session_id = await alice.create_session()
    with pytest.raises(APIError) as denied:
        await queue(mallory, session_id, {"command": ["id"]})
    assert denied.value.code == "42501"
    (cid,) = await queue(alice, session_id, {"command": ["true"]})
    with pytest.raises(APIError):
        await (
            alice.client.table("sandbox_commands")
            .update({"status": "succeeded", "stdout": "forged"})
            .eq("id", cid)
            .execute()
        )
    stolen = await mallory.client.table("sandbox_commands").select("*").eq("id", cid).execute()
    assert stolen.data == []
    assert command(db, cid)["status"] == "queued"


async def test_a_running_command_keeps_the_sandbox_alive(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(
        stack.info, SANDBOX_IDLE_TIMEOUT_S="2", SANDBOX_IDLE_WARNING_S="0", LISTENER_LEASE_S="3"
    ):
        session_id = await ready_session(user, db)
        (cid,) = await queue(user, session_id, {"command": ["sleep", "4"], "timeout_s": 10})
        await wait_until(finished(db, cid), timeout_s=20, what="long command finished")
        assert command(db, cid)["status"] == "succeeded", "the sandbox was reaped mid-command"
        await wait_until(in_state(db, session_id, "destroyed"), timeout_s=20, what="idle reaping")
    row = session_row(db, session_id)
    assert row is not None and row["sandbox_stop_reason"] == "idle"


async def test_keepalive_moves_the_expiry_and_the_warning_comes_first(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(
        stack.info, SANDBOX_IDLE_TIMEOUT_S="60", SANDBOX_IDLE_WARNING_S="59"
    ):
        session_id = await ready_session(user, db)
        await wait_until(lambda: "idle_warning" in events(db, session_id), what="idle warning")
        warned = session_row(db, session_id)
        assert warned and warned["sandbox_idle_warning_at"] is not None
        await asyncio.sleep(0.01)  # a distinct timestamp for the keepalive, not synchronisation
        await (
            user.client.table("coding_sessions")
            .update({"last_activity_at": "now()"})
            .eq("id", session_id)
            .execute()
        )
        kept = session_row(db, session_id)
        assert kept and kept["sandbox_expires_at"] > warned["sandbox_expires_at"]
        rows(
            db,
            "update coding_sessions set last_activity_at = now() - interval '2 minutes', "
            "sandbox_ready_at = now() - interval '2 minutes' where id = %s returning id",
            session_id,
        )
        await wait_until(in_state(db, session_id, "destroyed"), what="reaped after the warning")
    names = events(db, session_id)
    assert names.index("idle_warning") < names.index("sandbox_stopping")


def test_exec_cli_runs_through_the_queue(stack: StackThread, tmp_path: Path) -> None:
    db = stack.info.db_url

    async def prepare() -> str:
        async with httpx.AsyncClient() as http:
            user = await frontend_user(stack.info, http)
            return await user.create_session()

    session_id = asyncio.run(prepare())
    env = {**os.environ, **listener_env(stack.info)}
    listener = subprocess.Popen(
        [sys.executable, "-m", "listener", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "listener",
                "exec",
                session_id,
                "--stdin",
                "--",
                "sh",
                "-c",
                "cat; echo bye >&2; exit 7",
            ],
            input="piped\n",
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        listener.terminate()
        listener.wait(timeout=30)
    assert done.returncode == 7
    assert done.stdout == "piped\n"
    assert "bye" in done.stderr
    assert rows(db, "select count(*) n from sandbox_commands")[0]["n"] == 1
