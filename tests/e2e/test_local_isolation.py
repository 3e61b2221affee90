"""A user's commands on a dev stack cannot read the stack's secrets (issue 10 §5)."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest

from listener.local.stack import StackThread
from tests.e2e.harness import frontend_user, in_state, running_listener, wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="not root: commands run as the current user (documented)"
)


async def test_a_users_command_cannot_read_the_stack_process_environment(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    info = stack.info
    attacker = await frontend_user(info, http)
    attacks = [
        # The emulator's parent process runs the stack (and, in this test, the listener).
        ["sh", "-c", "cat /proc/$PPID/environ"],
        ["env"],
        ["id", "-u"],
    ]
    async with running_listener(info):
        session_id = await attacker.create_session()
        await wait_until(in_state(info.db_url, session_id, "ready"), what="ready")
        queued = (
            await attacker.client.table("sandbox_commands")
            .insert([{"session_id": session_id, "command": argv} for argv in attacks])
            .execute()
        )
        ids = [row["id"] for row in queued.data]

        async def results() -> list[dict[str, Any]] | None:
            found = (
                await attacker.client.table("sandbox_commands")
                .select("id,status,exit_code,stdout,stderr")
                .in_("id", ids)
                .execute()
            )
            by_id = {row["id"]: row for row in found.data}
            done = all(by_id[i]["status"] not in ("queued", "running") for i in ids)
            return [by_id[i] for i in ids] if done else None

        await wait_until(results, what="the attacker's commands finished")
        parent, env, uid = await results() or []

    assert parent["exit_code"] != 0 and parent["stdout"] == "", parent
    assert "Permission denied" in parent["stderr"]
    secrets = (info.service_role_key, info.fly_api_token, info.jwt_secret)
    seen = "".join(str(r["stdout"]) + str(r["stderr"]) for r in (parent, env, uid))
    assert not [s for s in secrets if s in seen]
    names = {line.split("=", 1)[0] for line in env["stdout"].splitlines()}
    assert names == {"PATH", "HOME", "SESSION_ID", "SANDBOX_DEADLINE_EPOCH_S"}
    assert uid["stdout"].strip() != "0"
