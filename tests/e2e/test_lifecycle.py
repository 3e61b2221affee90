"""A session's whole life as a user drives it: insert, ready, end, destroyed; and the reapers."""

from __future__ import annotations

import httpx

from listener.local.stack import StackThread
from tests.e2e.harness import (
    converged,
    events,
    frontend_user,
    in_state,
    invariant_violations,
    machines,
    rows,
    running_listener,
    session_row,
    wait_until,
)


async def test_insert_becomes_ready_with_a_started_machine(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info):
        session_id = await user.create_session()
        await wait_until(in_state(db, session_id, "ready"), what="ready")
    row = session_row(db, session_id)
    assert row is not None
    (machine,) = machines(stack)
    assert row["sandbox_id"] == machine.id
    assert machine.state == "started"
    assert machine.metadata["session_id"] == session_id
    assert machine.metadata["managed_by"] == "sandbox-listener"
    assert machine.metadata["epoch"] == str(row["sandbox_epoch"])
    assert row["sandbox_ready_at"] is not None and row["sandbox_expires_at"] is not None
    assert events(db, session_id) == ["provisioning_started", "machine_created", "sandbox_ready"]
    (ready,) = rows(db, "select detail from sandbox_events where event = 'sandbox_ready'")
    assert ready["detail"]["smoke_output"] == "Hello from sandbox"


async def test_ending_a_session_destroys_its_machine(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info):
        session_id = await user.create_session()
        await wait_until(in_state(db, session_id, "ready"), what="ready")
        await user.end_session(session_id)
        await wait_until(in_state(db, session_id, "destroyed"), what="destroyed")
    row = session_row(db, session_id)
    assert row is not None and row["sandbox_stop_reason"] == "ended"
    assert row["sandbox_destroyed_at"] is not None
    assert machines(stack) == []
    assert events(db, session_id)[-2:] == ["sandbox_stopping", "sandbox_destroyed"]
    assert invariant_violations(stack) == []


async def test_deleting_the_row_destroys_its_machine(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info):
        session_id = await user.create_session()
        await wait_until(in_state(db, session_id, "ready"), what="ready")
        await user.delete_session(session_id)
        await wait_until(lambda: machines(stack) == [], what="machine destroyed")
    assert session_row(db, session_id) is None
    assert events(db, session_id)[-1] == "sandbox_destroyed"


async def test_idle_session_is_reaped(stack: StackThread, http: httpx.AsyncClient) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info):
        session_id = await user.create_session()
        await wait_until(in_state(db, session_id, "ready"), what="ready")
        rows(
            db,
            "update coding_sessions set last_activity_at = now() - interval '2 hours', "
            "sandbox_ready_at = now() - interval '2 hours' where id = %s returning id",
            session_id,
        )
        await wait_until(in_state(db, session_id, "destroyed"), what="idle reaping")
    row = session_row(db, session_id)
    assert row is not None and row["sandbox_stop_reason"] == "idle"
    assert machines(stack) == []


async def test_max_age_wins_over_activity(stack: StackThread, http: httpx.AsyncClient) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info):
        session_id = await user.create_session()
        await wait_until(in_state(db, session_id, "ready"), what="ready")
        rows(
            db,
            "update coding_sessions set sandbox_deadline_at = now() - interval '1 second', "
            "last_activity_at = now() where id = %s returning id",
            session_id,
        )
        await wait_until(in_state(db, session_id, "destroyed"), what="max-age reaping")
    row = session_row(db, session_id)
    assert row is not None and row["sandbox_stop_reason"] == "max_age"


async def test_bad_row_fails_with_a_clear_error_and_others_still_served(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info, SANDBOX_ALLOWED_REGIONS="ord"):
        bad = await user.create_session(requested_region="xyz", requested_memory_mb=1000)
        good = await user.create_session(requested_region="ord")
        await wait_until(in_state(db, bad, "failed"), what="bad row failed")
        await wait_until(in_state(db, good, "ready"), what="good row ready")
    row = session_row(db, bad)
    assert row is not None
    assert "region 'xyz' is not allowed (allowed: iad, ord)" in row["sandbox_error"]
    assert "memory_mb 1000 must be a multiple of 256" in row["sandbox_error"]
    assert "sandbox_rejected" in events(db, bad)
    (machine,) = machines(stack)
    assert machine.region == "ord"
    await converged(stack)


async def test_sessions_inserted_before_the_listener_starts_are_caught_up(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    waiting = [await user.create_session() for _ in range(5)]
    async with running_listener(stack.info):
        for session_id in waiting:
            await wait_until(in_state(db, session_id, "ready"), what="caught-up session ready")
    assert len(machines(stack)) == 5
    await converged(stack)
