"""Nothing is lost: replicas, kill -9, SIGTERM, Fly faults, vanished and orphan machines."""

from __future__ import annotations

from pathlib import Path

import httpx

from listener.fly import FlyClient, machine_config
from listener.local.stack import StackThread
from tests.e2e.harness import (
    ListenerProcess,
    converged,
    events,
    fly_calls,
    frontend_user,
    in_state,
    invariant_violations,
    machines,
    rows,
    running_listener,
    session_row,
    set_faults,
    vanish,
    wait_until,
)


def all_in(db: str, ids: list[str], *states: str) -> object:
    return lambda: all(
        r["sandbox_state"] in states
        for r in rows(db, "select sandbox_state from coding_sessions where id = any(%s)", ids)
    )


async def test_two_replicas_share_fifty_sessions_without_doubles(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with (
        running_listener(stack.info, owner="replica-a"),
        running_listener(stack.info, owner="replica-b"),
    ):
        ids = [await user.create_session() for _ in range(50)]
        await wait_until(all_in(db, ids, "ready"), timeout_s=60, what="50 sessions ready")
    assert len(machines(stack)) == 50
    assert fly_calls(stack)[("create", 200)] == 50, "a session got a second machine"
    assert invariant_violations(stack) == []


async def test_kill_9_during_provisioning_then_restart_adopts(
    stack: StackThread, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    set_faults(stack, start_delay_s=4.0)  # machines are still `starting` when the kill comes
    first = ListenerProcess(stack.info, tmp_path / "first.log", LISTENER_LEASE_S="3")
    try:
        ids = [await user.create_session() for _ in range(5)]

        def recorded() -> bool:
            found = rows(db, "select sandbox_id from coding_sessions where id = any(%s)", ids)
            return all(r["sandbox_id"] for r in found)

        await wait_until(recorded, timeout_s=20, what="machine ids written back")
        first.kill()
    finally:
        first.close()
    assert all(state == "provisioning" for state in (r["sandbox_state"] for r in rows(db)))
    set_faults(stack, start_delay_s=0.05)
    async with running_listener(stack.info, owner="second", LISTENER_LEASE_S="3"):
        await wait_until(all_in(db, ids, "ready"), timeout_s=40, what="resumed sessions ready")
    assert fly_calls(stack)[("create", 200)] == 5, "restart created machines instead of adopting"
    await converged(stack)


async def test_kill_9_during_teardown_then_restart_finishes_it(
    stack: StackThread, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info):
        ids = [await user.create_session() for _ in range(5)]
        await wait_until(all_in(db, ids, "ready"), what="ready")
    set_faults(stack, latency_s={"destroy": 30.0})
    first = ListenerProcess(stack.info, tmp_path / "first.log", LISTENER_LEASE_S="3")
    try:
        for session_id in ids:
            await user.end_session(session_id)
        await wait_until(all_in(db, ids, "stopping"), timeout_s=20, what="teardown started")
        first.kill()
    finally:
        first.close()
    set_faults(stack, latency_s={})
    async with running_listener(stack.info, owner="second", LISTENER_LEASE_S="3"):
        await wait_until(all_in(db, ids, "destroyed"), timeout_s=40, what="destroyed")
    assert machines(stack) == []
    await converged(stack)


async def test_sigterm_mid_work_exits_cleanly_and_hands_back(
    stack: StackThread, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    set_faults(stack, start_delay_s=4.0)
    proc = ListenerProcess(stack.info, tmp_path / "listener.log", LISTENER_SHUTDOWN_GRACE_S="2")
    try:
        ids = [await user.create_session() for _ in range(3)]
        await wait_until(all_in(db, ids, "provisioning"), timeout_s=20, what="provisioning")
        code = proc.terminate(timeout_s=15)
    finally:
        proc.close()
    assert code == 0
    handed_back = rows(db, "select sandbox_claimed_by from coding_sessions")
    assert all(r["sandbox_claimed_by"] is None for r in handed_back), "claims were not handed back"
    assert len(machines(stack)) == 3, "shutdown must not destroy sandboxes by default"
    set_faults(stack, start_delay_s=0.05)
    async with running_listener(stack.info, owner="next"):
        await wait_until(all_in(db, ids, "ready"), timeout_s=30, what="next process finishes")
    assert fly_calls(stack)[("create", 200)] == 3
    await converged(stack)


async def test_destroy_on_shutdown_opt_in(stack: StackThread, http: httpx.AsyncClient) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info, LISTENER_DESTROY_ON_SHUTDOWN="true"):
        session_id = await user.create_session()
        await wait_until(in_state(db, session_id, "ready"), what="ready")
    row = session_row(db, session_id)
    assert row is not None and row["sandbox_state"] == "destroyed"
    assert row["sandbox_stop_reason"] == "shutdown"
    assert machines(stack) == []


async def test_fly_faults_end_in_ready_or_failed_with_reason(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    set_faults(
        stack,
        p_5xx=0.1,
        p_429=0.05,
        p_408_after_create=0.1,
        p_capacity=0.05,
        seed=7,
        action_rate_per_s=100.0,
        action_burst=100,
    )
    fast = {"FLY_RATE_PER_S": "100", "FLY_BURST": "100"}
    async with running_listener(stack.info, LISTENER_MAX_ATTEMPTS="6", **fast):
        ids = [await user.create_session() for _ in range(20)]
        await wait_until(all_in(db, ids, "ready", "failed"), timeout_s=90, what="settled")
        set_faults(stack, p_5xx=0.0, p_429=0.0, p_408_after_create=0.0, p_capacity=0.0)
        await converged(stack, timeout_s=30)
    settled = rows(db, "select sandbox_state, sandbox_error from coding_sessions")
    assert sum(r["sandbox_state"] == "ready" for r in settled) >= 15
    for r in settled:
        if r["sandbox_state"] == "failed":
            assert r["sandbox_error"], "a failed row must say why"


async def test_vanished_machine_is_replaced(stack: StackThread, http: httpx.AsyncClient) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info, LISTENER_ORPHAN_GRACE_S="0"):
        session_id = await user.create_session()
        await wait_until(in_state(db, session_id, "ready"), what="ready")
        row = session_row(db, session_id)
        assert row is not None
        lost = row["sandbox_id"]
        vanish(stack, lost)

        def replaced() -> bool:
            now = session_row(db, session_id)
            return bool(now and now["sandbox_state"] == "ready" and now["sandbox_id"] != lost)

        await wait_until(replaced, timeout_s=30, what="a new machine")
    assert "sandbox_lost" in events(db, session_id)
    await converged(stack)


async def test_orphan_machine_is_destroyed_but_young_ones_are_spared(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    info = stack.info
    fly = FlyClient(
        http, base_url=info.fly_api_hostname, app_name=info.fly_app_name, token=info.fly_api_token
    )
    config = machine_config(
        "img",
        metadata={
            "managed_by": "sandbox-listener",
            "session_id": "00000000-0000-0000-0000-000000000000",
            "epoch": "1",
        },
    )
    orphan = await fly.create_machine(config, region="iad")
    async with running_listener(info, LISTENER_ORPHAN_GRACE_S="3600"):
        await wait_until(lambda: fly_calls(stack).get(("list", 200), 0) >= 2, what="two sweeps")
        assert [m.id for m in machines(stack)] == [orphan.id], "a young machine was reaped"
    async with running_listener(info, LISTENER_ORPHAN_GRACE_S="0"):
        await wait_until(lambda: machines(stack) == [], timeout_s=20, what="orphan destroyed")


async def test_realtime_drops_lose_nothing(stack: StackThread, http: httpx.AsyncClient) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    gateway = stack.stack.realtime
    assert gateway is not None
    async with running_listener(stack.info):
        ids = []
        for i in range(10):
            ids.append(await user.create_session())
            if i % 3 == 0:
                stack.call(gateway.drop_all_connections)
        await wait_until(all_in(db, ids, "ready"), timeout_s=30, what="all ready despite drops")
    await converged(stack)
