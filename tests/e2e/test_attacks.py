"""The listener as an attacker with a valid user JWT meets it: session-id reuse, poison rows,
unstorable output and limits, driven through the unmodified supabase client on the local stack."""

from __future__ import annotations

from typing import Any

import httpx
import psycopg
import pytest
from postgrest.exceptions import APIError

from listener.fly import FlyClient, machine_config
from listener.local.stack import StackThread
from tests.e2e.harness import (
    converged,
    events,
    frontend_user,
    in_state,
    machines,
    rows,
    running_listener,
    session_row,
    set_faults,
    wait_until,
)
from tests.e2e.test_commands import command, finished, queue


def sql(db: str, statement: str, *args: Any) -> None:
    """A write as the superuser: the trusted side (the app's own service code, an operator)."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(statement, args)  # type: ignore[arg-type]


async def test_a_reused_session_id_never_reaches_the_first_users_machine(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    alice = await frontend_user(stack.info, http, "alice@example.com")
    mallory = await frontend_user(stack.info, http, "mallory@example.com")
    # Every create is answered 408 after the machine was made: the listener must adopt.
    set_faults(stack, p_408_after_create=1.0)
    # The sweeper's grace is long: what destroys alice's machine below is her delete, not it.
    quiet = {"LISTENER_ORPHAN_GRACE_S": "3600"}

    session_id = await alice.create_session()
    sql(db, "update coding_sessions set sandbox_epoch = 1 where id = %s", session_id)  # attempt 2
    async with running_listener(stack.info, **quiet):
        await wait_until(in_state(db, session_id, "ready"), what="alice's sandbox ready")
        (write,) = await queue(alice, session_id, {"command": ["sh", "-c", "echo s3cret > f"]})
        await wait_until(finished(db, write), what="alice's secret written")
    alices_machine = session_row(db, session_id)["sandbox_id"]  # type: ignore[index]
    alices_events = events(db, session_id)

    # The listener lags: alice deletes her row while no listener runs.
    await alice.delete_session(session_id)
    # Mallory learnt the id from the DELETE event; the API will not let her choose it.
    with pytest.raises(APIError) as refused:
        await mallory.client.table("coding_sessions").insert({"id": session_id}).execute()
    assert refused.value.code == "42501"
    # Even if the trusted side reuses the id for her, it is a new incarnation.
    sql(db, "insert into coding_sessions (id, user_id) values (%s, %s)", session_id, mallory.id)

    async with running_listener(stack.info, **quiet):
        await wait_until(in_state(db, session_id, "ready"), what="mallory's sandbox ready")
        await wait_until(
            lambda: alices_machine not in {m.id for m in machines(stack)},
            what="alice's machine destroyed by her delete",
        )
        mallorys_machine = session_row(db, session_id)["sandbox_id"]  # type: ignore[index]
        assert mallorys_machine != alices_machine
        (read,) = await queue(mallory, session_id, {"command": ["cat", "f"]})
        await wait_until(finished(db, read), what="mallory's read finished")
        result = command(db, read)
        assert result["status"] == "failed" and "s3cret" not in (result["stdout"] or "")

    row = session_row(db, session_id)
    assert row is not None
    hers = rows(
        db, "select id from sandbox_events where incarnation = %s", row["sandbox_incarnation"]
    )
    seen = await mallory.client.table("sandbox_events").select("id").execute()
    assert sorted(e["id"] for e in seen.data) == sorted(r["id"] for r in hers) != []
    mine = await alice.client.table("sandbox_events").select("event").execute()
    assert sorted(e["event"] for e in mine.data) == sorted([*alices_events, "sandbox_destroyed"]), (
        "alice keeps her history, with the teardown her delete caused"
    )
    await converged(stack)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"last_activity_at": "infinity"}, "must be a finite time"),
        ({"last_activity_at": "10000-01-01T00:00:00Z"}, "may not be in the future"),
        ({"last_activity_at": "1999-01-01T00:00:00Z"}, "before the session was created"),
    ],
)
async def test_an_owner_cannot_poison_their_row(
    stack: StackThread, http: httpx.AsyncClient, update: dict[str, str], message: str
) -> None:
    user = await frontend_user(stack.info, http)
    session_id = await user.create_session()
    with pytest.raises(APIError) as refused:
        await user.client.table("coding_sessions").update(update).eq("id", session_id).execute()
    assert refused.value.code == "23514" and message in str(refused.value.message)
    with pytest.raises(APIError):
        await (
            user.client.table("coding_sessions")
            .insert({"requested_region": "x" * 200_000})
            .execute()
        )


async def test_one_unreadable_row_fails_alone(stack: StackThread, http: httpx.AsyncClient) -> None:
    db = stack.info.db_url
    info = stack.info
    user = await frontend_user(info, http)
    poisoned = await user.create_session()
    # A value past the owner's checks, written by the trusted side: Python cannot hold it.
    sql(db, "update coding_sessions set created_at = 'infinity' where id = %s", poisoned)
    sql(db, "update coding_sessions set sandbox_due_at = now() where id = %s", poisoned)
    good = [await user.create_session() for _ in range(5)]

    def outcome() -> tuple[str, str]:  # not select *: psycopg cannot read that row either
        (row,) = rows(
            db, "select sandbox_state, sandbox_error from coding_sessions where id = %s", poisoned
        )
        return str(row["sandbox_state"]), str(row["sandbox_error"])

    fly = FlyClient(
        http, base_url=info.fly_api_hostname, app_name=info.fly_app_name, token=info.fly_api_token
    )
    tag = {"managed_by": "sandbox-listener", "session_id": poisoned, "epoch": "9"}
    orphan = await fly.create_machine(machine_config("img", metadata=tag), region="iad")
    async with running_listener(info, LISTENER_ORPHAN_GRACE_S="0"):
        for session_id in good:
            await wait_until(in_state(db, session_id, "ready"), what="the good rows ready")
        await wait_until(lambda: outcome()[0] == "failed", what="the bad row failed")
        await wait_until(
            lambda: orphan.id not in {m.id for m in machines(stack)},
            what="the sweeper still reaps",
        )
    _, error = outcome()
    assert "could not read this session" in error and len(error) < 400


async def test_output_postgres_text_cannot_hold_is_stored_replaced(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    session_id = await user.create_session()
    async with running_listener(stack.info):
        await wait_until(in_state(db, session_id, "ready"), what="ready")
        nul, after = await queue(
            user,
            session_id,
            {"command": ["sh", "-c", "printf 'a\\0b'; exit 3"]},
            {"command": ["echo", "next"]},
        )
        await wait_until(finished(db, nul, after), what="both commands finished")
    stored = command(db, nul)
    assert (stored["status"], stored["exit_code"]) == ("failed", 3)
    assert stored["stdout"] == "a\ufffdb" and stored["output_replaced"] is True
    assert command(db, after)["status"] == "succeeded", "the queue moved on"


async def test_a_user_over_the_live_limit_gets_a_sentence_not_a_sandbox(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    other = await frontend_user(stack.info, http, "other@example.com")
    async with running_listener(stack.info, SANDBOX_MAX_LIVE_PER_USER="2"):
        ids = [await user.create_session() for _ in range(4)]
        theirs = await other.create_session()
        await wait_until(
            lambda: (
                sorted(
                    r["sandbox_state"]
                    for r in rows(db, "select * from coding_sessions where id = any(%s)", ids)
                )
                == ["failed", "failed", "ready", "ready"]
            ),
            what="two ready, two refused",
        )
        await wait_until(in_state(db, theirs, "ready"), what="another user is unaffected")
    refused = rows(db, "select sandbox_error from coding_sessions where sandbox_state = 'failed'")
    assert all("live sandboxes" in r["sandbox_error"] for r in refused)
