"""Row Level Security, privileges and publication of the sandbox tables, per Supabase API role."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import DictRow
from psycopg.types.json import Jsonb

from tests.integration.db_helpers import (
    as_role,
    call,
    create_user,
    get_session,
    insert_session,
)

Conn = psycopg.Connection[DictRow]
PERMISSION_DENIED = psycopg.errors.InsufficientPrivilege

# One call per listener function with arguments of the right types.
LISTENER_CALLS: list[tuple[str, tuple[object, ...]]] = [
    ("claim_session", (uuid.uuid4(), "owner", 30, True)),
    ("claim_sessions", ("owner", 30, 0)),  # limit 0: claims nobody else's rows
    ("sandbox_renew_lease", (uuid.uuid4(), 1, 30)),
    ("sandbox_release", (uuid.uuid4(), 1)),
    ("sandbox_begin_provision", (uuid.uuid4(), 1, 3600)),
    ("sandbox_set_machine", (uuid.uuid4(), 1, "m1", "ams")),
    ("sandbox_mark_ready", (uuid.uuid4(), 1, 600)),
    ("sandbox_mark_failed", (uuid.uuid4(), 1, "boom", None)),
    ("sandbox_begin_stop", (uuid.uuid4(), 1, "ended")),
    ("sandbox_mark_destroyed", (uuid.uuid4(), 1)),
    ("sandbox_record_event", (uuid.uuid4(), uuid.uuid4(), 1, "probe", Jsonb({}))),
    ("sandbox_sessions_by_ids", ([uuid.uuid4()],)),
    ("sandbox_live_sessions", (10,)),
    ("take_listener_lease", ("sweeper-" + uuid.uuid4().hex, "owner", 30)),
    ("release_listener_lease", ("sweeper", "owner")),
]
SANDBOX_TABLES = ("coding_sessions", "sandbox_events", "sandbox_commands", "listener_leases")


@pytest.fixture
def other(db: Conn) -> uuid.UUID:
    return create_user(db)


def add_command(db: Conn, session_id: uuid.UUID, user_id: uuid.UUID) -> uuid.UUID:
    row = db.execute(
        "insert into sandbox_commands (session_id, user_id, command, status, exit_code, stdout)"
        " values (%s, %s, array['echo', 'hi'], 'succeeded', 0, 'hi') returning id",
        (session_id, user_id),
    ).fetchone()
    assert row is not None
    command_id: uuid.UUID = row["id"]
    return command_id


# -- coding_sessions ---------------------------------------------------------------------------


def test_owner_reads_own_sessions_but_not_another_users(
    db: Conn, api: Conn, owner: uuid.UUID, other: uuid.UUID
) -> None:
    mine = insert_session(db, owner)["id"]
    theirs = insert_session(db, other)["id"]
    with as_role(api, "authenticated", owner):
        ids = {row["id"] for row in api.execute("select id from coding_sessions")}
    assert mine in ids
    assert theirs not in ids


def test_owner_inserts_session_with_owner_and_sandbox_defaults(
    db: Conn, api: Conn, owner: uuid.UUID
) -> None:
    with as_role(api, "authenticated", owner):
        row = api.execute(
            "insert into coding_sessions (requested_region, requested_memory_mb, requested_cpus)"
            " values ('zzz9', 2048, 2) returning *"
        ).fetchone()
    assert row is not None
    assert row["user_id"] == owner
    assert (row["status"], row["sandbox_state"], row["sandbox_epoch"]) == ("active", "requested", 0)
    assert row["requested_region"] == "zzz9"  # odd regions are the listener's to reject, readably
    assert row["sandbox_due_at"] == row["created_at"]


def test_owner_cannot_insert_session_for_another_user(
    api: Conn, owner: uuid.UUID, other: uuid.UUID
) -> None:
    with (
        pytest.raises(PERMISSION_DENIED, match="row-level security"),
        as_role(api, "authenticated", owner),
    ):
        api.execute("insert into coding_sessions (user_id) values (%s)", (other,))


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("sandbox_state", "ready"),
        ("sandbox_id", "m-forged"),
        ("sandbox_epoch", 7),
        ("sandbox_claimed_by", "me"),
        ("sandbox_due_at", None),
        ("sandbox_expires_at", None),
        ("sandbox_error", "x"),
        ("created_at", None),
        ("updated_at", None),
    ],
)
def test_owner_cannot_set_sandbox_columns_on_insert(
    api: Conn, owner: uuid.UUID, column: str, value: object
) -> None:
    with (
        pytest.raises(PERMISSION_DENIED, match="permission denied"),
        as_role(api, "authenticated", owner),
    ):
        api.execute(
            sql.SQL("insert into coding_sessions ({}) values (%s)").format(sql.Identifier(column)),
            (value,),
        )


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("sandbox_state", "destroyed"),
        ("sandbox_id", "m-forged"),
        ("sandbox_epoch", 99),
        ("sandbox_lease_expires_at", None),
        ("sandbox_expires_at", None),
        ("user_id", None),
        ("requested_region", "ams"),
        ("created_at", None),
    ],
)
def test_owner_cannot_update_columns_other_than_status_and_activity(
    db: Conn, api: Conn, owner: uuid.UUID, column: str, value: object
) -> None:
    session_id = insert_session(db, owner)["id"]
    with (
        pytest.raises(PERMISSION_DENIED, match="permission denied"),
        as_role(api, "authenticated", owner),
    ):
        api.execute(
            sql.SQL("update coding_sessions set {} = %s where id = %s").format(
                sql.Identifier(column)
            ),
            (value, session_id),
        )


def test_owner_updates_status_and_last_activity_of_own_session(
    db: Conn, api: Conn, owner: uuid.UUID
) -> None:
    session_id = insert_session(db, owner)["id"]
    with as_role(api, "authenticated", owner):
        cur = api.execute(
            "update coding_sessions set status = 'ended', last_activity_at = now() where id = %s",
            (session_id,),
        )
        assert cur.rowcount == 1
    assert get_session(db, session_id)["status"] == "ended"


def test_owner_cannot_update_another_users_session(
    db: Conn, api: Conn, owner: uuid.UUID, other: uuid.UUID
) -> None:
    before = get_session(db, insert_session(db, other)["id"])
    with as_role(api, "authenticated", owner):
        cur = api.execute(
            "update coding_sessions set status = 'ended' where id = %s", (before["id"],)
        )
        assert cur.rowcount == 0
    assert get_session(db, before["id"]) == before


def test_owner_cannot_move_own_session_to_another_user(
    db: Conn, api: Conn, owner: uuid.UUID, other: uuid.UUID
) -> None:
    session_id = insert_session(db, owner)["id"]
    # user_id is not updatable at all; the policy's WITH CHECK is the second line of defence.
    with pytest.raises(PERMISSION_DENIED), as_role(api, "authenticated", owner):
        api.execute("update coding_sessions set user_id = %s where id = %s", (other, session_id))


@pytest.mark.parametrize("role", ["authenticated", "service_role"])
def test_nobody_reopens_an_ended_session(db: Conn, api: Conn, owner: uuid.UUID, role: str) -> None:
    session_id = insert_session(db, owner, status="ended")["id"]
    with (
        pytest.raises(psycopg.errors.CheckViolation, match="has ended and cannot be reopened"),
        as_role(api, role, owner),
    ):
        api.execute("update coding_sessions set status = 'active' where id = %s", (session_id,))
    assert get_session(db, session_id)["status"] == "ended"


def test_owner_deletes_own_session_but_not_another_users(
    db: Conn, api: Conn, owner: uuid.UUID, other: uuid.UUID
) -> None:
    mine = insert_session(db, owner)["id"]
    theirs = insert_session(db, other)["id"]
    with as_role(api, "authenticated", owner):
        assert api.execute("delete from coding_sessions where id = %s", (theirs,)).rowcount == 0
        assert api.execute("delete from coding_sessions where id = %s", (mine,)).rowcount == 1
    assert db.execute(
        "select count(*) as n from coding_sessions where id = %s", (theirs,)
    ).fetchone() == {"n": 1}


# -- sandbox_events ----------------------------------------------------------------------------


def test_owner_reads_events_of_own_sessions_only(
    db: Conn, api: Conn, owner: uuid.UUID, other: uuid.UUID
) -> None:
    mine = insert_session(db, owner)
    theirs = insert_session(db, other)
    with as_role(api, "service_role"):
        for row in (mine, theirs):
            call(api, "sandbox_record_event", row["id"], row["sandbox_incarnation"], 1, "probe")
    mine, theirs = mine["id"], theirs["id"]
    with as_role(api, "authenticated", owner):
        seen = {row["session_id"] for row in api.execute("select session_id from sandbox_events")}
    assert mine in seen
    assert theirs not in seen


@pytest.mark.parametrize(
    "statement",
    [
        "insert into sandbox_events (session_id, event) values (%(sid)s, 'forged')",
        "update sandbox_events set event = 'forged' where session_id = %(sid)s",
        "delete from sandbox_events where session_id = %(sid)s",
    ],
    ids=["insert", "update", "delete"],
)
def test_owner_cannot_write_events(db: Conn, api: Conn, owner: uuid.UUID, statement: str) -> None:
    session_id = insert_session(db, owner)["id"]
    with pytest.raises(PERMISSION_DENIED), as_role(api, "authenticated", owner):
        api.execute(statement, {"sid": session_id})


def test_events_survive_a_deleted_session(db: Conn, api: Conn, owner: uuid.UUID) -> None:
    row = insert_session(db, owner)
    session_id = row["id"]
    with as_role(api, "service_role"):
        call(
            api,
            "sandbox_record_event",
            session_id,
            row["sandbox_incarnation"],
            1,
            "sandbox_ready",
            Jsonb({}),
        )
    with as_role(api, "authenticated", owner):
        api.execute("delete from coding_sessions where id = %s", (session_id,))
    rows = db.execute("select event from sandbox_events where session_id = %s", (session_id,))
    assert [row["event"] for row in rows] == ["sandbox_ready"]
    with as_role(api, "authenticated", owner):  # still the owner's history
        seen = api.execute("select event from sandbox_events where session_id = %s", (session_id,))
        assert [r["event"] for r in seen] == ["sandbox_ready"]


# -- sandbox_commands --------------------------------------------------------------------------


def test_owner_queues_command_in_own_session(db: Conn, api: Conn, owner: uuid.UUID) -> None:
    session_id = insert_session(db, owner)["id"]
    with as_role(api, "authenticated", owner):
        row = api.execute(
            "insert into sandbox_commands (session_id, command, stdin, timeout_s)"
            " values (%s, array['cat'], 'hello', 5) returning *",
            (session_id,),
        ).fetchone()
    assert row is not None
    assert (row["user_id"], row["status"], row["exit_code"]) == (owner, "queued", None)


def test_owner_cannot_queue_command_in_another_users_session(
    db: Conn, api: Conn, owner: uuid.UUID, other: uuid.UUID
) -> None:
    theirs = insert_session(db, other)["id"]
    with (
        pytest.raises(PERMISSION_DENIED, match="row-level security"),
        as_role(api, "authenticated", owner),
    ):
        api.execute(
            "insert into sandbox_commands (session_id, command) values (%s, array['id'])",
            (theirs,),
        )


def test_owner_cannot_queue_command_in_another_users_name(
    db: Conn, api: Conn, owner: uuid.UUID, other: uuid.UUID
) -> None:
    mine = insert_session(db, owner)["id"]
    with (
        pytest.raises(PERMISSION_DENIED, match="row-level security"),
        as_role(api, "authenticated", owner),
    ):
        api.execute(
            "insert into sandbox_commands (session_id, user_id, command)"
            " values (%s, %s, array['id'])",
            (mine, other),
        )


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("status", "succeeded"),
        ("exit_code", 0),
        ("stdout", "forged"),
        ("error", None),
        ("claimed_by", "me"),
        ("finished_at", None),
    ],
)
def test_owner_cannot_set_command_results_on_insert(
    db: Conn, api: Conn, owner: uuid.UUID, column: str, value: object
) -> None:
    session_id = insert_session(db, owner)["id"]
    with (
        pytest.raises(PERMISSION_DENIED, match="permission denied"),
        as_role(api, "authenticated", owner),
    ):
        api.execute(
            sql.SQL(
                "insert into sandbox_commands (session_id, command, {})"
                " values (%s, array['id'], %s)"
            ).format(sql.Identifier(column)),
            (session_id, value),
        )


@pytest.mark.parametrize(
    "statement",
    [
        "update sandbox_commands set exit_code = 1, stdout = 'forged' where id = %(cid)s",
        "update sandbox_commands set status = 'queued' where id = %(cid)s",
        "delete from sandbox_commands where id = %(cid)s",
    ],
    ids=["forge-result", "requeue", "delete"],
)
def test_owner_cannot_change_command_results(
    db: Conn, api: Conn, owner: uuid.UUID, statement: str
) -> None:
    command_id = add_command(db, insert_session(db, owner)["id"], owner)
    with pytest.raises(PERMISSION_DENIED), as_role(api, "authenticated", owner):
        api.execute(statement, {"cid": command_id})
    row = db.execute("select status, stdout from sandbox_commands where id = %s", (command_id,))
    assert row.fetchone() == {"status": "succeeded", "stdout": "hi"}


def test_owner_reads_own_commands_but_not_another_users(
    db: Conn, api: Conn, owner: uuid.UUID, other: uuid.UUID
) -> None:
    mine = add_command(db, insert_session(db, owner)["id"], owner)
    theirs = add_command(db, insert_session(db, other)["id"], other)
    with as_role(api, "authenticated", owner):
        ids = {row["id"] for row in api.execute("select id from sandbox_commands")}
    assert mine in ids
    assert theirs not in ids


# -- listener_leases, anon, functions ----------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "select * from listener_leases",
        "insert into listener_leases (name, owner, expires_at) values ('sweeper', 'me', now())",
        "delete from listener_leases",
    ],
    ids=["select", "insert", "delete"],
)
def test_owner_cannot_touch_listener_leases(api: Conn, owner: uuid.UUID, statement: str) -> None:
    with pytest.raises(PERMISSION_DENIED), as_role(api, "authenticated", owner):
        api.execute(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "select * from coding_sessions",
        "insert into coding_sessions (user_id) values (%(uid)s)",
        "update coding_sessions set status = 'ended'",
        "delete from coding_sessions",
        "select * from sandbox_events",
        "insert into sandbox_events (session_id, event) values (gen_random_uuid(), 'x')",
        "select * from sandbox_commands",
        "insert into sandbox_commands (session_id, user_id, command)"
        " values (gen_random_uuid(), %(uid)s, array['id'])",
        "select * from listener_leases",
        "insert into listener_leases values ('sweeper', 'anon', now())",
    ],
)
def test_anon_can_do_nothing(api: Conn, owner: uuid.UUID, statement: str) -> None:
    with pytest.raises(PERMISSION_DENIED), as_role(api, "anon"):
        api.execute(statement, {"uid": owner})


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize(("function", "args"), LISTENER_CALLS, ids=[c[0] for c in LISTENER_CALLS])
def test_api_roles_cannot_execute_listener_functions(
    api: Conn, owner: uuid.UUID, role: str, function: str, args: tuple[object, ...]
) -> None:
    with (
        pytest.raises(PERMISSION_DENIED, match="permission denied for function"),
        as_role(api, role, owner),
    ):
        call(api, function, *args)


@pytest.mark.parametrize(("function", "args"), LISTENER_CALLS, ids=[c[0] for c in LISTENER_CALLS])
def test_service_role_executes_listener_functions(
    api: Conn, function: str, args: tuple[object, ...]
) -> None:
    with as_role(api, "service_role"):
        call(api, function, *args)


def test_no_function_in_public_is_executable_by_anon_or_authenticated(db: Conn) -> None:
    rows = db.execute(
        "select p.oid::regprocedure::text as fn, r.rolname from pg_proc p"
        " cross join (values ('anon'), ('authenticated')) as r(rolname)"
        " where p.pronamespace = 'public'::regnamespace"
        " and has_function_privilege(r.rolname, p.oid, 'execute')"
    ).fetchall()
    assert rows == []
    listed = db.execute(
        "select count(*) as n from pg_proc where pronamespace = 'public'::regnamespace"
        " and proname = any(%s)",
        ([name for name, _ in LISTENER_CALLS],),
    ).fetchone()
    assert listed == {"n": len(LISTENER_CALLS)}


def test_anon_and_authenticated_hold_only_the_listed_privileges(db: Conn) -> None:
    rows = db.execute(
        "select r.rolname, c.relname, p.privilege, array_agg(a.attname::text order by a.attname)"
        " as columns from pg_class c"
        " join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped"
        " cross join (values ('anon'), ('authenticated')) as r(rolname)"
        " cross join (values ('SELECT'), ('INSERT'), ('UPDATE'), ('REFERENCES')) as p(privilege)"
        " where c.relnamespace = 'public'::regnamespace and c.relkind = 'r'"
        " and has_column_privilege(r.rolname, c.oid, a.attnum, p.privilege)"
        " group by 1, 2, 3"
    ).fetchall()
    granted = {(row["rolname"], row["relname"], row["privilege"]): row["columns"] for row in rows}
    session_columns = sorted(
        row["attname"]
        for row in db.execute(
            "select attname::text from pg_attribute"
            " where attrelid = 'coding_sessions'::regclass and attnum > 0 and not attisdropped"
        )
    )
    event_columns = [
        "created_at",
        "detail",
        "epoch",
        "event",
        "id",
        "incarnation",
        "session_id",
        "user_id",
    ]
    command_columns = sorted(
        row["attname"]
        for row in db.execute(
            "select attname::text from pg_attribute"
            " where attrelid = 'sandbox_commands'::regclass and attnum > 0 and not attisdropped"
        )
    )
    assert granted == {
        ("authenticated", "coding_sessions", "SELECT"): session_columns,
        ("authenticated", "coding_sessions", "INSERT"): [  # never a key: the server makes those
            "last_activity_at",
            "requested_cpus",
            "requested_memory_mb",
            "requested_region",
            "status",
            "user_id",
        ],
        ("authenticated", "coding_sessions", "UPDATE"): ["last_activity_at", "status"],
        ("authenticated", "sandbox_events", "SELECT"): event_columns,
        ("authenticated", "sandbox_commands", "SELECT"): command_columns,
        ("authenticated", "sandbox_commands", "INSERT"): [
            "command",
            "session_id",
            "stdin",
            "timeout_s",
            "user_id",
        ],
    }
    table_level = db.execute(
        "select c.relname, r.rolname, p.privilege from pg_class c"
        " cross join (values ('anon'), ('authenticated')) as r(rolname)"
        " cross join (values ('DELETE'), ('TRUNCATE'), ('TRIGGER'), ('USAGE')) as p(privilege)"
        " where c.relnamespace = 'public'::regnamespace and case"
        "   when c.relkind = 'r' and p.privilege <> 'USAGE'"
        "     then has_table_privilege(r.rolname, c.oid, p.privilege)"
        "   when c.relkind = 'S' then has_sequence_privilege(r.rolname, c.oid, 'USAGE, UPDATE')"
        "   else false end"
    ).fetchall()
    assert [tuple(row.values()) for row in table_level] == [
        ("coding_sessions", "authenticated", "DELETE")
    ]


# -- service_role ------------------------------------------------------------------------------


def test_service_role_reads_and_writes_every_users_rows(
    db: Conn, api: Conn, owner: uuid.UUID, other: uuid.UUID
) -> None:
    theirs = insert_session(db, other)["id"]
    with as_role(api, "service_role"):
        created = api.execute(
            "insert into coding_sessions (user_id, sandbox_state, sandbox_id, sandbox_epoch)"
            " values (%s, 'provisioning', 'm1', 3) returning id",
            (owner,),
        ).fetchone()
        assert created is not None
        ids = {row["id"] for row in api.execute("select id from coding_sessions")}
        assert {theirs, created["id"]} <= ids
        updated = api.execute(
            "update coding_sessions set sandbox_state = 'failed', sandbox_error = 'x'"
            " where id = %s",
            (theirs,),
        )
        assert updated.rowcount == 1
        command_id = api.execute(
            "insert into sandbox_commands (session_id, user_id, command)"
            " values (%s, %s, array['id']) returning id",
            (theirs, other),
        ).fetchone()
        assert command_id is not None
        finished = api.execute(
            "update sandbox_commands set status = 'succeeded', exit_code = 0 where id = %s",
            (command_id["id"],),
        )
        assert finished.rowcount == 1
        api.execute("insert into listener_leases values (%s, 'me', now())", (uuid.uuid4().hex,))
        assert api.execute("delete from coding_sessions where id = %s", (theirs,)).rowcount == 1


@pytest.mark.parametrize(
    "statement",
    [
        "update sandbox_events set event = 'rewritten'",
        "delete from sandbox_events",
        "truncate sandbox_events",
    ],
    ids=["update", "delete", "truncate"],
)
def test_events_are_append_only_even_for_service_role(api: Conn, statement: str) -> None:
    with as_role(api, "service_role"):
        api.execute(
            "insert into sandbox_events (session_id, event) values (gen_random_uuid(), 'x')"
        )
    with pytest.raises(PERMISSION_DENIED), as_role(api, "service_role"):
        api.execute(statement)


# -- catalog: RLS, publication, comments -------------------------------------------------------


def test_row_level_security_is_on_for_every_sandbox_table(db: Conn) -> None:
    rows = db.execute(
        "select relname, relrowsecurity from pg_class"
        " where relnamespace = 'public'::regnamespace and relname = any(%s)",
        (list(SANDBOX_TABLES),),
    ).fetchall()
    assert {row["relname"]: row["relrowsecurity"] for row in rows} == dict.fromkeys(
        SANDBOX_TABLES, True
    )


def test_sessions_and_commands_are_published_with_default_replica_identity(db: Conn) -> None:
    published = db.execute(
        "select t.tablename, c.relreplident from pg_publication_tables t"
        " join pg_class c on c.relname = t.tablename and c.relnamespace = 'public'::regnamespace"
        " where t.pubname = 'supabase_realtime' and t.schemaname = 'public'"
    ).fetchall()
    assert {row["tablename"]: row["relreplident"] for row in published} == {
        "coding_sessions": "d",
        "sandbox_commands": "d",
    }


def test_every_sandbox_column_has_a_comment(db: Conn) -> None:
    missing = db.execute(
        "select c.relname, a.attname from pg_attribute a join pg_class c on c.oid = a.attrelid"
        " where c.relnamespace = 'public'::regnamespace and c.relname = any(%s)"
        " and a.attnum > 0 and not a.attisdropped and col_description(c.oid, a.attnum) is null",
        (list(SANDBOX_TABLES),),
    ).fetchall()
    assert missing == []
