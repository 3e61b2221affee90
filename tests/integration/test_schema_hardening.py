"""The schema as an attacker meets it: server-made keys, incarnations, tombstones, owner input
that is refused at the door, and the per-user and per-session limits (real Postgres, API roles)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from tests.integration.db_helpers import (
    as_role,
    call,
    create_user,
    get_session,
    in_threads,
    insert_session,
    svc,
    svc_one,
)

Conn = psycopg.Connection[psycopg.rows.DictRow]
PERMISSION_DENIED = psycopg.errors.InsufficientPrivilege
REFUSED = psycopg.errors.CheckViolation


def owner_insert(api: Conn, owner: uuid.UUID, **columns: object) -> dict[str, object]:
    names = ", ".join(columns) or ""
    values = ", ".join(["%s"] * len(columns))
    statement = (
        f"insert into coding_sessions ({names}) values ({values}) returning *"
        if columns
        else "insert into coding_sessions default values returning *"
    )
    with as_role(api, "authenticated", owner):
        row = api.execute(statement, list(columns.values())).fetchone()
    assert row is not None
    return dict(row)


# -- keys the server makes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "columns"),
    [
        ("coding_sessions", "(id)"),
        ("coding_sessions", "(sandbox_incarnation)"),
        ("sandbox_commands", "(id, session_id, command)"),
    ],
)
def test_an_owner_cannot_choose_a_key(
    db: Conn, api: Conn, owner: uuid.UUID, table: str, columns: str
) -> None:
    session_id = insert_session(db, owner)["id"]
    values = {
        "(id)": (uuid.uuid4(),),
        "(sandbox_incarnation)": (uuid.uuid4(),),
        "(id, session_id, command)": (uuid.uuid4(), session_id, ["true"]),
    }[columns]
    placeholders = ", ".join(["%s"] * len(values))
    with pytest.raises(PERMISSION_DENIED), as_role(api, "authenticated", owner):
        api.execute(f"insert into {table} {columns} values ({placeholders})", list(values))


def test_the_incarnation_is_made_at_insert_and_never_changes(db: Conn, api: Conn) -> None:
    owner = create_user(db)
    chosen = uuid.uuid4()
    with as_role(api, "service_role"):  # even the trusted side cannot pick or move it
        row = api.execute(
            "insert into coding_sessions (user_id, sandbox_incarnation) values (%s, %s)"
            " returning id, sandbox_incarnation",
            (owner, chosen),
        ).fetchone()
        assert row is not None and row["sandbox_incarnation"] != chosen
        api.execute(
            "update coding_sessions set sandbox_incarnation = %s where id = %s",
            (chosen, row["id"]),
        )
    assert get_session(db, row["id"])["sandbox_incarnation"] == row["sandbox_incarnation"]


def test_a_reused_id_is_a_new_incarnation_that_reads_nothing_of_the_old_one(
    db: Conn, api: Conn
) -> None:
    user_a, user_b = create_user(db), create_user(db)
    first = owner_insert(api, user_a)
    with as_role(api, "service_role"):
        call(api, "sandbox_record_event", first["id"], first["sandbox_incarnation"], 1, "secret")
    with as_role(api, "authenticated", user_a):
        api.execute("delete from coding_sessions where id = %s", (first["id"],))
    # The only way left to reuse an id is the trusted side; it still gets a new incarnation.
    second = insert_session(db, user_b, id=first["id"])
    assert second["sandbox_incarnation"] != first["sandbox_incarnation"]
    with as_role(api, "authenticated", user_b):
        seen = api.execute(
            "select event from sandbox_events where session_id = %s", (first["id"],)
        ).fetchall()
    assert seen == []
    with as_role(api, "authenticated", user_a):
        mine = api.execute(
            "select event from sandbox_events where session_id = %s", (first["id"],)
        ).fetchall()
    assert [r["event"] for r in mine] == ["secret"]


def test_deleting_a_row_leaves_a_tombstone_only_the_listener_sees(
    db: Conn, api: Conn, owner: uuid.UUID
) -> None:
    row = insert_session(db, owner, sandbox_state="ready", sandbox_id="m-1")
    gone = insert_session(db, owner, sandbox_state="destroyed")
    with as_role(api, "authenticated", owner):
        api.execute("delete from coding_sessions where id = any(%s)", ([row["id"], gone["id"]],))
    with pytest.raises(PERMISSION_DENIED), as_role(api, "authenticated", owner):
        api.execute("select * from sandbox_tombstones")
    claimed, _ = svc(api, "claim_tombstones", "L1", 30, 10, row["id"])
    assert [(t["incarnation"], t["sandbox_id"]) for t in claimed] == [
        (row["sandbox_incarnation"], "m-1")
    ]
    assert svc(api, "claim_tombstones", "L2", 30, 10, row["id"])[0] == []  # held by L1
    assert svc(api, "claim_tombstones", "L1", 30, 10, gone["id"])[0] == []  # no machine left
    assert svc_one(api, "sandbox_bury", row["sandbox_incarnation"], "L2")[0] == {
        "sandbox_bury": False
    }
    assert svc_one(api, "sandbox_bury", row["sandbox_incarnation"], "L1")[0] == {
        "sandbox_bury": True
    }


def test_events_for_a_deleted_incarnation_go_to_its_owner(
    db: Conn, api: Conn, owner: uuid.UUID
) -> None:
    row = insert_session(db, owner, sandbox_state="ready", sandbox_id="m-1")
    db.execute("delete from coding_sessions where id = %s", (row["id"],))
    (event,), _ = svc(
        api, "sandbox_record_event", row["id"], row["sandbox_incarnation"], None, "destroyed"
    )
    assert event["user_id"] == owner


# -- owner input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["infinity", "-infinity", "10000-01-01 00:00:00+00", "3000-01-01", "0044-03-15 BC"],
)
def test_an_owner_cannot_write_an_unusable_activity_time(
    db: Conn, api: Conn, owner: uuid.UUID, value: str
) -> None:
    row = insert_session(db, owner)
    with pytest.raises(REFUSED), as_role(api, "authenticated", owner):
        api.execute(
            "update coding_sessions set last_activity_at = %s::timestamptz where id = %s",
            (value, row["id"]),
        )
    with pytest.raises(REFUSED):
        owner_insert(api, owner, last_activity_at=value)
    assert get_session(db, row["id"])["last_activity_at"] == row["last_activity_at"]


def test_nobody_writes_an_infinite_activity_time(db: Conn, owner: uuid.UUID) -> None:
    with pytest.raises(REFUSED):
        insert_session(db, owner, last_activity_at="infinity")


def test_now_is_a_keepalive_and_a_little_clock_skew_is_clamped(
    db: Conn, api: Conn, owner: uuid.UUID
) -> None:
    row = insert_session(db, owner)
    with as_role(api, "authenticated", owner):
        ahead = datetime.now(UTC) + timedelta(minutes=2)
        moved = api.execute(
            "update coding_sessions set last_activity_at = %s where id = %s"
            " returning last_activity_at, now() as tx_now",
            (ahead, row["id"]),
        ).fetchone()
        assert moved is not None and moved["last_activity_at"] == moved["tx_now"]
        kept = api.execute(
            "update coding_sessions set last_activity_at = 'now' where id = %s"
            " returning last_activity_at, now() as tx_now",
            (row["id"],),
        ).fetchone()
        assert kept is not None and kept["last_activity_at"] == kept["tx_now"]


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("requested_region", "x" * 200_000),
        ("requested_region", "IAD; drop table"),
        ("requested_memory_mb", 2**31 - 1),
        ("requested_cpus", 1000),
        ("requested_cpus", -1),
    ],
)
def test_an_owner_cannot_ask_for_an_absurd_sandbox(
    db: Conn, api: Conn, owner: uuid.UUID, column: str, value: object
) -> None:
    with pytest.raises(REFUSED):
        owner_insert(api, owner, **{column: value})


# -- limits --------------------------------------------------------------------------------


def claim(api: Conn, session_id: object) -> dict[str, object]:
    row, _ = svc_one(api, "claim_session", session_id, "L1", 30, True)
    return row


def test_begin_provision_fails_a_session_over_the_owners_live_limit(
    db: Conn, api: Conn, owner: uuid.UUID
) -> None:
    insert_session(db, owner, sandbox_state="ready", sandbox_id="m-1")
    insert_session(db, owner, sandbox_state="provisioning")
    insert_session(db, owner, sandbox_state="destroyed")  # not live: does not count
    extra = claim(api, insert_session(db, owner)["id"])
    refused, _ = svc_one(api, "sandbox_begin_provision", extra["id"], extra["sandbox_epoch"], 60, 2)
    assert refused["sandbox_state"] == "failed"
    assert "2 live sandboxes" in refused["sandbox_error"]
    assert refused["sandbox_claimed_by"] is None
    other = claim(api, insert_session(db, create_user(db))["id"])  # another user is unaffected
    fine, _ = svc_one(api, "sandbox_begin_provision", other["id"], other["sandbox_epoch"], 60, 2)
    assert fine["sandbox_state"] == "provisioning"


def test_the_live_limit_holds_when_replicas_race(db: Conn, api: Conn, postgres: object) -> None:
    owner = create_user(db)
    rows = [claim(api, insert_session(db, owner)["id"]) for _ in range(8)]

    def begin(conn: Conn, i: int) -> str:
        row, _ = svc_one(
            conn, "sandbox_begin_provision", rows[i]["id"], rows[i]["sandbox_epoch"], 60, 3
        )
        return str(row["sandbox_state"])

    states = in_threads(begin, postgres)  # type: ignore[arg-type]
    assert sorted(states) == ["failed"] * 5 + ["provisioning"] * 3


def test_a_session_holds_at_most_100_queued_commands(db: Conn, api: Conn, owner: uuid.UUID) -> None:
    session_id = insert_session(db, owner)["id"]
    with as_role(api, "authenticated", owner):
        for _ in range(100):
            api.execute(
                "insert into sandbox_commands (session_id, command) values (%s, %s)",
                (session_id, ["true"]),
            )
    with pytest.raises(REFUSED, match="100 queued commands"), as_role(api, "authenticated", owner):
        api.execute(
            "insert into sandbox_commands (session_id, command) values (%s, %s)",
            (session_id, ["true"]),
        )
    other = insert_session(db, owner)["id"]  # another session of the same owner is unaffected
    with as_role(api, "authenticated", owner):
        api.execute(
            "insert into sandbox_commands (session_id, command) values (%s, %s)",
            (other, ["true"]),
        )


def test_an_unreadable_row_is_failed_alone_claimed_or_not(
    db: Conn, api: Conn, owner: uuid.UUID
) -> None:
    row = insert_session(db, owner, sandbox_state="ready", sandbox_id="m-1")
    failed, _ = svc_one(
        api, "sandbox_fail_unreadable", row["id"], row["sandbox_epoch"], "unreadable: x"
    )
    assert (failed["sandbox_state"], failed["sandbox_error"]) == ("failed", "unreadable: x")
    stale, _ = svc(api, "sandbox_fail_unreadable", row["id"], row["sandbox_epoch"] + 1, "no")
    assert stale == []
