"""The operators' views (sandbox_overview, sandbox_stats) and sandbox_doctor(), on real Postgres."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from tests.integration.db_helpers import (
    Row,
    as_role,
    call,
    create_user,
    insert_session,
)

Conn = psycopg.Connection[DictRow]
PERMISSION_DENIED = psycopg.errors.InsufficientPrivilege
VIEWS = ("sandbox_overview", "sandbox_stats")
FUNCTIONS = ("sandbox_owner_email(uuid)", "sandbox_doctor()")


def email_of(db: Conn, user_id: uuid.UUID) -> str:
    row = db.execute("select email from auth.users where id = %s", (user_id,)).fetchone()
    assert row is not None
    return str(row["email"])


def session_row(db: Conn, session_id: uuid.UUID) -> Row:
    row = db.execute("select * from coding_sessions where id = %s", (session_id,)).fetchone()
    assert row is not None
    return dict(row)


def overview(conn: Conn, session_id: uuid.UUID) -> Row:
    """One sandbox_overview row plus the transaction's now() (which the view's times use)."""
    row = conn.execute(
        "select *, now() as tx_now from sandbox_overview where id = %s", (session_id,)
    ).fetchone()
    assert row is not None
    return dict(row)


def stats(conn: Conn) -> Row:
    rows = conn.execute("select * from sandbox_stats").fetchall()
    assert len(rows) == 1
    return dict(rows[0])


def add_event(db: Conn, event: str, detail: dict[str, Any], ago: timedelta) -> None:
    db.execute(
        "insert into sandbox_events (session_id, event, detail, created_at)"
        " values (gen_random_uuid(), %s, %s, now() - %s)",
        (event, Jsonb(detail), ago),
    )


@pytest.fixture
def ready_session(db: Conn) -> Row:
    """A ready session, created 2 h ago, idle for 10 min under a 30 min timeout."""
    owner = create_user(db)
    row = insert_session(
        db,
        owner,
        sandbox_state="ready",
        sandbox_id="m-1",
        sandbox_region="ams",
        sandbox_error="Fly was slow",
        sandbox_attempts=2,
        sandbox_epoch=7,
        sandbox_claimed_by="L1",
        sandbox_idle_timeout_s=1800,
    )
    db.execute(
        "update coding_sessions set created_at = now() - interval '2 hours',"
        " last_activity_at = now() - interval '10 minutes',"
        " sandbox_ready_at = now() - interval '1 hour',"
        " sandbox_deadline_at = now() + interval '3 hours' where id = %s",
        (row["id"],),
    )
    return session_row(db, row["id"])


# -- sandbox_overview --------------------------------------------------------------------------


def test_overview_shows_owner_state_machine_and_times(
    db: Conn, api: Conn, ready_session: Row
) -> None:
    with as_role(api, "service_role"):
        seen = overview(api, ready_session["id"])
    now = seen.pop("tx_now")
    assert seen == {
        "id": ready_session["id"],
        "user_id": ready_session["user_id"],
        "email": email_of(db, ready_session["user_id"]),
        "status": "active",
        "sandbox_state": "ready",
        "sandbox_id": "m-1",
        "sandbox_region": "ams",
        "age": now - ready_session["created_at"],
        "idle_for": now - ready_session["last_activity_at"],
        "expires_in": ready_session["sandbox_expires_at"] - now,
        "last_error": "Fly was slow",
        "stop_reason": None,
        "attempts": 2,
        "epoch": 7,
        "claimed_by": "L1",
    }
    assert timedelta(hours=2) <= seen["age"] < timedelta(hours=2, minutes=1)
    # Ten minutes idle under a 30-minute timeout: twenty minutes left.
    assert timedelta(minutes=19) < seen["expires_in"] <= timedelta(minutes=20)


def test_overview_of_a_session_that_is_not_ready_has_no_expiry(db: Conn, api: Conn) -> None:
    owner = create_user(db)
    row = insert_session(db, owner, sandbox_state="destroyed", sandbox_stop_reason="idle")
    with as_role(api, "service_role"):
        seen = overview(api, row["id"])
    assert (seen["sandbox_state"], seen["stop_reason"], seen["expires_in"]) == (
        "destroyed",
        "idle",
        None,
    )


def test_overview_works_where_service_role_cannot_read_auth_users(
    db: Conn, ready_session: Row
) -> None:
    # Hosted Supabase grants service_role nothing on auth.users; the local bootstrap does.
    with db.transaction(force_rollback=True):
        db.execute("revoke select on auth.users from service_role")
        db.execute("set local role service_role")
        with pytest.raises(PERMISSION_DENIED), db.transaction():
            db.execute("select email from auth.users")
        seen = overview(db, ready_session["id"])
    assert seen["email"] == email_of(db, ready_session["user_id"])


def test_overview_granted_to_authenticated_would_still_show_only_own_sessions(
    db: Conn, api: Conn, ready_session: Row
) -> None:
    """security_invoker: RLS of coding_sessions applies to the reader, not the view's owner."""
    other = create_user(db)
    theirs = insert_session(db, other)["id"]
    with db.transaction(force_rollback=True):
        db.execute("grant select on sandbox_overview to authenticated")
        db.execute("grant execute on function sandbox_owner_email(uuid) to authenticated")
        claims = Jsonb({"role": "authenticated", "sub": str(other)})
        db.execute("set local role authenticated")
        db.execute("select set_config('request.jwt.claims', %s::text, true)", (claims,))
        seen = db.execute("select id, email from sandbox_overview").fetchall()
    assert seen == [{"id": theirs, "email": email_of(db, other)}]


# -- sandbox_stats -----------------------------------------------------------------------------


def test_stats_count_sessions_by_state(db: Conn, api: Conn, empty: None) -> None:
    owner = create_user(db)
    for state in ("requested", "requested", "ready", "destroyed", "failed"):
        insert_session(db, owner, sandbox_state=state)
    with as_role(api, "service_role"):
        figures = stats(api)
    assert figures["sessions_by_state"] == {
        "requested": 2,
        "ready": 1,
        "destroyed": 1,
        "failed": 1,
    }


def test_stats_percentiles_of_provisioning_over_the_last_hour(
    db: Conn, api: Conn, empty: None
) -> None:
    for seconds in range(1, 11):
        add_event(db, "sandbox_ready", {"seconds": seconds}, timedelta(minutes=seconds))
    add_event(db, "sandbox_ready", {"seconds": 500}, timedelta(minutes=61))  # too old
    add_event(db, "sandbox_ready", {"seconds": "n/a"}, timedelta(minutes=1))  # not a number
    add_event(db, "machine_created", {"seconds": 900}, timedelta(minutes=1))  # not a ready
    with as_role(api, "service_role"):
        figures = stats(api)
    assert figures["provisioned_last_hour"] == 10
    assert figures["provisioning_p50_s"] == pytest.approx(5.5)
    assert figures["provisioning_p95_s"] == pytest.approx(9.55)  # 1 + 0.95 * (10 - 1)


def test_stats_without_events_have_no_percentiles_and_nothing_reaped(
    api: Conn, empty: None
) -> None:
    with as_role(api, "service_role"):
        figures = stats(api)
    assert figures["sessions_by_state"] == {}
    assert figures["provisioned_last_hour"] == 0
    assert figures["provisioning_p50_s"] is None
    assert figures["provisioning_p95_s"] is None
    assert figures["machines_reaped_last_24h"] == {}


def test_stats_count_machines_reaped_by_cause_over_the_last_day(
    db: Conn, api: Conn, empty: None
) -> None:
    hour = timedelta(hours=1)
    add_event(db, "sandbox_destroyed", {"reason": "ended", "machines": ["m1"]}, hour)
    add_event(db, "sandbox_destroyed", {"reason": "ended", "machines": ["m2"]}, 2 * hour)
    add_event(db, "sandbox_destroyed", {"reason": "idle", "machines": ["m3", "m4"]}, hour)
    add_event(db, "sandbox_destroyed", {"reason": "ended", "machines": []}, hour)  # no machine
    add_event(db, "sandbox_destroyed", {"reason": "deleted", "machines": []}, hour)
    add_event(db, "sandbox_destroyed", {"reason": "operator"}, hour)  # no list: one machine
    add_event(db, "orphan_destroyed", {"machine_id": "m5", "reason": "no row"}, hour)
    add_event(db, "sandbox_destroyed", {"reason": "max_age", "machines": ["m6"]}, 25 * hour)
    add_event(db, "sandbox_stopping", {"reason": "lost"}, hour)
    with as_role(api, "service_role"):
        figures = stats(api)
    assert figures["machines_reaped_last_24h"] == {
        "ended": 2,
        "idle": 2,
        "operator": 1,
        "orphan": 1,
    }


def plan_nodes(node: Any) -> Iterator[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan."""
    if isinstance(node, dict):
        if "Node Type" in node:
            yield node
        for value in node.values():
            yield from plan_nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from plan_nodes(value)


def test_stats_read_recent_events_through_the_index(db: Conn, api: Conn, empty: None) -> None:
    db.execute(
        "insert into sandbox_events (session_id, event, detail, created_at)"
        " select gen_random_uuid(), 'sandbox_ready', '{\"seconds\": 1}',"
        " now() - interval '2 days' from generate_series(1, 20000)"
    )
    add_event(db, "sandbox_ready", {"seconds": 2}, timedelta(minutes=1))
    db.execute("analyze sandbox_events")
    with as_role(api, "service_role"):
        row = api.execute("explain (format json) select * from sandbox_stats").fetchone()
    assert row is not None
    scans = [n for n in plan_nodes(row) if n.get("Relation Name") == "sandbox_events"]
    assert len(scans) == 2  # the ready window and the reaped window
    assert {n.get("Index Name") for n in scans} == {"sandbox_events_event_created_idx"}


# -- who may read them -------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize("view", VIEWS)
def test_api_roles_cannot_read_the_views(db: Conn, api: Conn, role: str, view: str) -> None:
    owner = create_user(db)
    with pytest.raises(PERMISSION_DENIED), as_role(api, role, owner):
        api.execute(sql.SQL("select * from {}").format(sql.Identifier(view)))


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize(
    ("function", "args"), [("sandbox_owner_email", (uuid.uuid4(),)), ("sandbox_doctor", ())]
)
def test_api_roles_cannot_call_the_dashboard_functions(
    db: Conn, api: Conn, role: str, function: str, args: tuple[object, ...]
) -> None:
    owner = create_user(db)
    with pytest.raises(PERMISSION_DENIED), as_role(api, role, owner):
        call(api, function, *args)


def test_the_views_are_read_only_even_for_service_role(db: Conn) -> None:
    rows = db.execute(
        "select c.relname, has_table_privilege('service_role', c.oid, 'select') as can_read,"
        " has_table_privilege('service_role', c.oid, 'insert, update, delete, truncate')"
        " as can_write from pg_class c"
        " where c.relnamespace = 'public'::regnamespace and c.relname = any(%s)",
        (list(VIEWS),),
    ).fetchall()
    assert sorted(rows, key=lambda r: r["relname"]) == [
        {"relname": view, "can_read": True, "can_write": False} for view in VIEWS
    ]


@pytest.mark.parametrize(
    "statement",
    [
        "update sandbox_overview set last_error = null",
        "delete from sandbox_overview",
        "insert into sandbox_overview (id, user_id) values (gen_random_uuid(), gen_random_uuid())",
    ],
    ids=["update", "delete", "insert"],
)
def test_service_role_cannot_write_through_the_overview(
    api: Conn, ready_session: Row, statement: str
) -> None:
    """sandbox_overview reads one table, so PostgreSQL would make it writable: no grant."""
    with pytest.raises(PERMISSION_DENIED), as_role(api, "service_role"):
        api.execute(statement)


def test_the_views_run_as_the_reader_and_every_column_has_a_comment(db: Conn) -> None:
    rows = db.execute(
        "select c.relname, c.reloptions, obj_description(c.oid, 'pg_class') as comment,"
        " array_agg(a.attname::text order by a.attnum)"
        "   filter (where col_description(c.oid, a.attnum) is null) as uncommented"
        " from pg_class c join pg_attribute a on a.attrelid = c.oid and a.attnum > 0"
        " where c.relnamespace = 'public'::regnamespace and c.relname = any(%s)"
        " group by c.oid, c.relname, c.reloptions",
        (list(VIEWS),),
    ).fetchall()
    assert {row["relname"] for row in rows} == set(VIEWS)
    for row in rows:
        assert row["reloptions"] == ["security_invoker=true"]
        assert row["comment"]
        assert row["uncommented"] is None


# -- sandbox_doctor() --------------------------------------------------------------------------


def doctor(api: Conn) -> dict[str, Any]:
    with as_role(api, "service_role"):
        (row,) = call(api, "sandbox_doctor")
    report: dict[str, Any] = row["sandbox_doctor"]
    return report


def test_doctor_reports_publication_identity_functions_and_relations(api: Conn) -> None:
    report = doctor(api)
    assert report["publication_exists"] is True
    assert {"public.coding_sessions", "public.sandbox_commands"} <= set(
        report["publication_tables"]
    )
    assert report["replica_identity"] == {
        "coding_sessions": "default",
        "sandbox_commands": "default",
    }
    assert {"claim_session", "take_listener_lease", "sandbox_doctor"} <= set(report["functions"])
    assert report["functions"] == sorted(set(report["functions"]))
    assert {"coding_sessions", "sandbox_events", "sandbox_overview", "sandbox_stats"} <= set(
        report["relations"]
    )


def test_doctor_sees_a_table_leave_the_publication(db: Conn) -> None:
    with db.transaction(force_rollback=True):
        db.execute("alter publication supabase_realtime drop table public.coding_sessions")
        db.execute("set local role service_role")
        (row,) = call(db, "sandbox_doctor")
    assert "public.coding_sessions" not in row["sandbox_doctor"]["publication_tables"]
    assert "public.sandbox_commands" in row["sandbox_doctor"]["publication_tables"]


def test_doctor_leaves_out_what_service_role_may_not_use(db: Conn) -> None:
    with db.transaction(force_rollback=True):
        db.execute(
            "revoke execute on function claim_sessions(text, integer, integer) from service_role"
        )
        db.execute("revoke select on sandbox_stats from service_role")
        db.execute("alter table listener_leases rename to listener_leases_gone")
        db.execute("set local role service_role")
        (row,) = call(db, "sandbox_doctor")
    report = row["sandbox_doctor"]
    assert "claim_sessions" not in report["functions"]
    assert "claim_session" in report["functions"]
    assert "sandbox_stats" not in report["relations"]
    assert "listener_leases" not in report["relations"]
