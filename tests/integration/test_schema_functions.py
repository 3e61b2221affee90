"""Triggers and listener functions of the sandbox schema: derived times, claims, CAS, leases."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import DictRow

from listener.local.postgres import EmbeddedPostgres
from tests.integration.db_helpers import (
    Row,
    api_connection,
    as_role,
    call,
    get_session,
    in_threads,
    insert_session,
    svc,
    svc_one,
)

Conn = psycopg.Connection[DictRow]
LEASE_S = 30
CAS_FUNCTIONS = [
    ("sandbox_renew_lease", (60,)),
    ("sandbox_release", ()),
    ("sandbox_begin_provision", (3600,)),
    ("sandbox_set_machine", ("m-2", "ord")),
    ("sandbox_mark_ready", (600,)),
    ("sandbox_mark_failed", ("boom", None)),
    ("sandbox_begin_stop", ("ended",)),
    ("sandbox_mark_destroyed", ()),
]


def expire_lease(db: Conn, session_id: uuid.UUID) -> None:
    """Move the claim's lease into the past, as if its holder had died."""
    db.execute(
        "update coding_sessions set sandbox_lease_expires_at = now() - interval '1 second'"
        " where id = %s",
        (session_id,),
    )


# -- triggers ----------------------------------------------------------------------------------

HOUR = 3600
READY = {
    "sandbox_state": "ready",
    "sandbox_ready_at": 0,
    "last_activity_at": 0,
    "sandbox_idle_timeout_s": 600,
    "sandbox_deadline_at": HOUR,
}
LEASE = {"sandbox_claimed_by": "L1", "sandbox_lease_expires_at": 300}
TIME_COLUMNS = {
    "sandbox_next_attempt_at",
    "sandbox_lease_expires_at",
    "sandbox_ready_at",
    "last_activity_at",
    "sandbox_deadline_at",
}


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        pytest.param({}, "created_at", id="requested"),
        pytest.param({"sandbox_next_attempt_at": HOUR}, HOUR, id="requested-retry-later"),
        pytest.param({"sandbox_state": "provisioning"}, "now", id="provisioning-unclaimed"),
        pytest.param({"sandbox_state": "stopping"}, "now", id="stopping-unclaimed"),
        pytest.param(READY, 600, id="ready-expires"),
        pytest.param({"sandbox_state": "destroyed"}, None, id="destroyed"),
        pytest.param({"sandbox_state": "failed"}, None, id="failed"),
        pytest.param({"status": "ended"}, "now", id="ended-requested"),
        pytest.param({**READY, "status": "ended"}, "now", id="ended-ready"),
        pytest.param({"status": "ended", "sandbox_state": "stopping"}, "now", id="ended-stopping"),
        pytest.param({"status": "ended", "sandbox_state": "destroyed"}, None, id="ended-destroyed"),
        pytest.param(LEASE, 300, id="requested-leased"),
        pytest.param({**LEASE, "sandbox_state": "provisioning"}, 300, id="provisioning-leased"),
        pytest.param({**READY, **LEASE, "sandbox_idle_timeout_s": 60}, 300, id="ready-leased"),
        pytest.param({**READY, **LEASE, "sandbox_lease_expires_at": -300}, 600, id="lapsed-lease"),
        pytest.param({**LEASE, "status": "ended"}, 300, id="ended-leased"),
        pytest.param({**LEASE, "sandbox_state": "failed"}, None, id="failed-leased"),
    ],
)
def test_due_at_follows_state_status_and_lease(
    db: Conn, owner: uuid.UUID, columns: dict[str, Any], expected: str | int | None
) -> None:
    base = datetime.now(UTC)
    values = {
        name: base + timedelta(seconds=value) if name in TIME_COLUMNS else value
        for name, value in columns.items()
    }
    row = insert_session(db, owner, **values)
    if expected == "created_at":
        wanted = row["created_at"]
    elif expected == "now":
        wanted = row["tx_now"]
    elif isinstance(expected, int):
        wanted = base + timedelta(seconds=expected)
    else:
        wanted = None
    assert row["sandbox_due_at"] == wanted
    if row["sandbox_state"] != "ready":
        assert row["sandbox_expires_at"] is None


def test_expires_at_follows_last_activity_and_never_passes_the_deadline(
    db: Conn, api: Conn, owner: uuid.UUID
) -> None:
    base = datetime.now(UTC).replace(microsecond=0)
    row = insert_session(
        db,
        owner,
        sandbox_state="ready",
        sandbox_ready_at=base,
        last_activity_at=base,
        sandbox_idle_timeout_s=600,
        sandbox_deadline_at=base + timedelta(hours=1),
    )
    assert row["sandbox_expires_at"] == row["sandbox_due_at"] == base + timedelta(seconds=600)

    def keepalive(at: datetime) -> Row:  # service_role: owners may not send future times
        with as_role(api, "service_role"):
            moved = api.execute(
                "update coding_sessions set last_activity_at = %s where id = %s"
                " returning sandbox_expires_at, sandbox_due_at",
                (at, row["id"]),
            ).fetchone()
        assert moved is not None
        return moved

    later = keepalive(base + timedelta(minutes=20))
    assert later["sandbox_expires_at"] == later["sandbox_due_at"] == base + timedelta(minutes=30)
    capped = keepalive(base + timedelta(hours=2))
    assert capped["sandbox_expires_at"] == capped["sandbox_due_at"] == base + timedelta(hours=1)
    # Activity before the sandbox was ready does not shorten its idle window.
    early = keepalive(base - timedelta(hours=1))
    assert early["sandbox_expires_at"] == base + timedelta(seconds=600)


def test_ending_a_session_makes_it_due_now(db: Conn, api: Conn, owner: uuid.UUID) -> None:
    future = datetime.now(UTC) + timedelta(hours=1)
    row = insert_session(
        db, owner, sandbox_state="ready", sandbox_ready_at=future, sandbox_idle_timeout_s=600
    )
    assert row["sandbox_due_at"] > future
    with as_role(api, "authenticated", owner):
        ended = api.execute(
            "update coding_sessions set status = 'ended' where id = %s"
            " returning sandbox_due_at, now() as tx_now",
            (row["id"],),
        ).fetchone()
    assert ended is not None
    assert ended["sandbox_due_at"] == ended["tx_now"]


def test_updated_at_moves_on_every_update(db: Conn, api: Conn, owner: uuid.UUID) -> None:
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    session_id = insert_session(db, owner, updated_at=long_ago)["id"]
    assert get_session(db, session_id)["updated_at"] == long_ago
    with as_role(api, "authenticated", owner):
        touched = api.execute(
            "update coding_sessions set last_activity_at = now() where id = %s"
            " returning updated_at, now() as tx_now",
            (session_id,),
        ).fetchone()
    assert touched is not None
    assert touched["updated_at"] == touched["tx_now"]
    claimed, _ = svc_one(api, "claim_session", session_id, "owner", 30, True)
    db.execute("update coding_sessions set updated_at = %s where id = %s", (long_ago, session_id))
    _, now = svc_one(api, "sandbox_release", session_id, claimed["sandbox_epoch"])
    assert get_session(db, session_id)["updated_at"] == now


# -- one session through its life --------------------------------------------------------------


def test_a_released_claim_can_no_longer_write(db: Conn, api: Conn, owner: uuid.UUID) -> None:
    session_id = insert_session(db, owner)["id"]
    claimed, _ = svc_one(api, "claim_session", session_id, "a", 30, True)
    epoch = claimed["sandbox_epoch"]
    svc_one(api, "sandbox_begin_provision", session_id, epoch, 3600)
    failed, _ = svc_one(api, "sandbox_mark_failed", session_id, epoch, "boom", 60)
    assert failed["sandbox_state"] == "requested" and failed["sandbox_claimed_by"] is None
    # a stale job still holding this epoch must not skip the backoff or write anything else
    for function, args in [
        ("sandbox_begin_provision", (3600,)),
        ("sandbox_begin_stop", ("ended",)),
        ("sandbox_mark_destroyed", ()),
        ("sandbox_mark_failed", ("late", None)),
    ]:
        after, _ = svc_one(api, function, session_id, epoch, *args)
        assert (after["sandbox_state"], after["sandbox_error"]) == ("requested", "boom"), function


def test_a_session_goes_from_requested_to_destroyed(db: Conn, api: Conn, owner: uuid.UUID) -> None:
    session_id = insert_session(db, owner)["id"]

    claimed, now = svc_one(api, "claim_session", session_id, "L1", LEASE_S)
    assert (claimed["sandbox_epoch"], claimed["sandbox_claimed_by"]) == (1, "L1")
    assert claimed["sandbox_lease_expires_at"] == now + timedelta(seconds=LEASE_S)
    assert claimed["sandbox_due_at"] == claimed["sandbox_lease_expires_at"]

    provisioning, now = svc_one(api, "sandbox_begin_provision", session_id, 1, 3600)
    assert provisioning["sandbox_state"] == "provisioning"
    assert provisioning["sandbox_attempts"] == 1
    assert provisioning["sandbox_deadline_at"] == now + timedelta(hours=1)

    placed, _ = svc_one(api, "sandbox_set_machine", session_id, 1, "m-1", "ams")
    assert (placed["sandbox_id"], placed["sandbox_region"]) == ("m-1", "ams")

    ready, now = svc_one(api, "sandbox_mark_ready", session_id, 1, 600)
    assert ready["sandbox_state"] == "ready"
    assert ready["sandbox_ready_at"] == now
    assert (ready["sandbox_claimed_by"], ready["sandbox_lease_expires_at"]) == (None, None)
    assert ready["sandbox_expires_at"] == ready["sandbox_due_at"] == now + timedelta(seconds=600)

    not_due, _ = svc_one(api, "claim_session", session_id, "L1", LEASE_S)
    assert not_due == ready
    forced, _ = svc_one(api, "claim_session", session_id, "L1", LEASE_S, True)
    assert forced["sandbox_epoch"] == 2

    stopping, _ = svc_one(api, "sandbox_begin_stop", session_id, 2, "idle")
    assert (stopping["sandbox_state"], stopping["sandbox_stop_reason"]) == ("stopping", "idle")
    assert stopping["sandbox_claimed_by"] == "L1"
    assert stopping["sandbox_due_at"] == stopping["sandbox_lease_expires_at"]

    destroyed, now = svc_one(api, "sandbox_mark_destroyed", session_id, 2)
    assert destroyed["sandbox_state"] == "destroyed"
    assert destroyed["sandbox_destroyed_at"] == now
    assert destroyed["sandbox_claimed_by"] is None
    assert (destroyed["sandbox_expires_at"], destroyed["sandbox_due_at"]) == (None, None)

    after, _ = svc_one(api, "claim_session", session_id, "L1", LEASE_S, True)
    assert after == destroyed


# -- claim_session -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "force", "claimed"),
    [
        pytest.param({}, False, True, id="due"),
        pytest.param({"sandbox_next_attempt_at": HOUR}, False, False, id="not-due"),
        pytest.param({"sandbox_next_attempt_at": HOUR}, True, True, id="not-due-forced"),
        pytest.param({"sandbox_claimed_by": "L2"}, True, False, id="leased-by-other-forced"),
        pytest.param({"sandbox_claimed_by": "L1"}, False, False, id="own-lease-not-due"),
        pytest.param({"sandbox_claimed_by": "L1"}, True, True, id="own-lease-forced"),
        pytest.param({"sandbox_state": "destroyed"}, True, False, id="destroyed-forced"),
        pytest.param({"sandbox_state": "failed"}, True, False, id="failed-forced"),
    ],
)
def test_claim_session_claims_only_due_unleased_live_rows(
    db: Conn,
    api: Conn,
    owner: uuid.UUID,
    columns: dict[str, Any],
    force: bool,
    claimed: bool,
) -> None:
    base = datetime.now(UTC)
    if "sandbox_next_attempt_at" in columns:
        columns = {**columns, "sandbox_next_attempt_at": base + timedelta(hours=1)}
    if "sandbox_claimed_by" in columns:
        columns = {
            **columns,
            "sandbox_epoch": 4,
            "sandbox_lease_expires_at": base + timedelta(minutes=5),
        }
    before = get_session(db, insert_session(db, owner, **columns)["id"])

    row, _ = svc_one(api, "claim_session", before["id"], "L1", LEASE_S, force)

    if claimed:
        assert row["sandbox_epoch"] == before["sandbox_epoch"] + 1
        assert row["sandbox_claimed_by"] == "L1"
    else:
        assert row == before == get_session(db, before["id"])


def test_claim_session_of_a_missing_row_returns_nothing(api: Conn) -> None:
    rows, _ = svc(api, "claim_session", uuid.uuid4(), "L1", LEASE_S, True)
    assert rows == []


def test_claim_session_skips_a_locked_row_and_returns_it_unclaimed(
    db: Conn, api: Conn, postgres: EmbeddedPostgres, owner: uuid.UUID
) -> None:
    session_id = insert_session(db, owner)["id"]
    with api_connection(postgres) as rival, as_role(api, "service_role"):
        (won,) = call(api, "claim_session", session_id, "A", LEASE_S)
        with as_role(rival, "service_role"):
            rival.execute("set local statement_timeout = '5s'")  # waiting would be the bug
            (lost,) = call(rival, "claim_session", session_id, "B", LEASE_S, True)
    assert (won["sandbox_claimed_by"], won["sandbox_epoch"]) == ("A", 1)
    assert (lost["sandbox_claimed_by"], lost["sandbox_epoch"]) == (None, 0)
    final = get_session(db, session_id)
    assert (final["sandbox_claimed_by"], final["sandbox_epoch"]) == ("A", 1)


def test_concurrent_claims_of_one_row_have_exactly_one_winner(
    db: Conn, postgres: EmbeddedPostgres, owner: uuid.UUID
) -> None:
    session_id = insert_session(db, owner)["id"]

    def claim(conn: Conn, i: int) -> bool:
        with as_role(conn, "service_role"):
            (row,) = call(conn, "claim_session", session_id, f"L{i}", LEASE_S)
        return bool(row["sandbox_claimed_by"] == f"L{i}")

    assert sum(in_threads(claim, postgres)) == 1
    assert get_session(db, session_id)["sandbox_epoch"] == 1


def test_lease_takeover_after_expiry_fences_the_old_holder(
    db: Conn, api: Conn, owner: uuid.UUID
) -> None:
    session_id = insert_session(db, owner)["id"]
    svc_one(api, "claim_session", session_id, "A", LEASE_S)
    refused, _ = svc_one(api, "claim_session", session_id, "B", LEASE_S, True)
    assert (refused["sandbox_claimed_by"], refused["sandbox_epoch"]) == ("A", 1)

    expire_lease(db, session_id)
    taken, _ = svc_one(api, "claim_session", session_id, "B", LEASE_S)
    assert (taken["sandbox_claimed_by"], taken["sandbox_epoch"]) == ("B", 2)

    before = get_session(db, session_id)
    for function, args in [("sandbox_begin_provision", (3600,)), ("sandbox_renew_lease", (60,))]:
        late, _ = svc_one(api, function, session_id, 1, *args)
        assert late == before
    current, _ = svc_one(api, "sandbox_begin_provision", session_id, 2, 3600)
    assert current["sandbox_state"] == "provisioning"


# -- claim_sessions ----------------------------------------------------------------------------


def add_due_rows(db: Conn, owner: uuid.UUID, count: int) -> list[uuid.UUID]:
    """`count` due rows, most overdue first, plus rows that are not due and must not be claimed."""
    due = db.execute(
        "insert into coding_sessions (user_id, created_at)"
        " select %s, now() - make_interval(secs => %s - g) from generate_series(1, %s) g"
        " returning id, created_at",
        (owner, count, count),
    ).fetchall()
    soon = datetime.now(UTC) + timedelta(hours=1)
    not_due: list[dict[str, Any]] = [
        {"sandbox_next_attempt_at": soon},
        {"sandbox_state": "destroyed"},
        {"sandbox_state": "failed", "status": "ended"},
        {"sandbox_claimed_by": "other", "sandbox_lease_expires_at": soon},
        {"sandbox_state": "ready", "sandbox_ready_at": soon, "sandbox_idle_timeout_s": 60},
    ]
    for columns in not_due:
        insert_session(db, owner, **columns)
    return [row["id"] for row in sorted(due, key=lambda row: row["created_at"])]


def test_claim_sessions_gives_concurrent_callers_disjoint_sets(
    db: Conn, api: Conn, postgres: EmbeddedPostgres, owner: uuid.UUID, empty: None
) -> None:
    due = add_due_rows(db, owner, 50)
    with api_connection(postgres) as rival, as_role(api, "service_role"):
        first = call(api, "claim_sessions", "A", LEASE_S, 30)
        with as_role(rival, "service_role"):
            rival.execute("set local statement_timeout = '5s'")
            second = call(rival, "claim_sessions", "B", LEASE_S, 100)
    first_ids = {row["id"] for row in first}
    second_ids = {row["id"] for row in second}
    assert first_ids == set(due[:30])  # the most overdue first
    assert second_ids == set(due[30:])
    assert {row["sandbox_claimed_by"] for row in first} == {"A"}
    assert {row["sandbox_epoch"] for row in second} == {1}
    assert svc(api, "claim_sessions", "C", LEASE_S, 100)[0] == []


def test_claim_sessions_racing_in_threads_share_out_every_due_row_once(
    db: Conn, postgres: EmbeddedPostgres, owner: uuid.UUID, empty: None
) -> None:
    due = add_due_rows(db, owner, 50)

    def drain(conn: Conn, i: int) -> list[uuid.UUID]:
        taken: list[uuid.UUID] = []
        while True:
            with as_role(conn, "service_role"):
                batch = call(conn, "claim_sessions", f"L{i}", LEASE_S, 3)
            if not batch:
                return taken
            taken += [row["id"] for row in batch]

    shares = in_threads(drain, postgres)
    everything = [session_id for share in shares for session_id in share]
    assert sorted(everything) == sorted(due)  # each due row exactly once
    epochs = db.execute("select sandbox_epoch from coding_sessions where id = any(%s)", (due,))
    assert {row["sandbox_epoch"] for row in epochs} == {1}


def test_claim_sessions_takes_over_rows_whose_lease_lapsed(
    db: Conn, api: Conn, owner: uuid.UUID, empty: None
) -> None:
    (session_id,) = add_due_rows(db, owner, 1)
    assert [row["id"] for row in svc(api, "claim_sessions", "A", LEASE_S, 10)[0]] == [session_id]
    assert svc(api, "claim_sessions", "B", LEASE_S, 10)[0] == []
    expire_lease(db, session_id)
    (taken,) = svc(api, "claim_sessions", "B", LEASE_S, 10)[0]
    assert (taken["id"], taken["sandbox_claimed_by"], taken["sandbox_epoch"]) == (
        session_id,
        "B",
        2,
    )


def xact_scans(conn: Conn, index: str) -> Row:
    """This transaction's scans of coding_sessions and tuples read from `index`, so far."""
    row = conn.execute(
        "select t.seq_scan, t.seq_tup_read, pg_stat_get_xact_tuples_returned(%s::regclass) as read"
        " from pg_stat_xact_user_tables t where t.relid = 'coding_sessions'::regclass",
        (index,),
    ).fetchone()
    assert row is not None
    return dict(row)


@pytest.mark.parametrize(
    ("function", "args", "index"),
    [
        ("claim_sessions", ("L1", LEASE_S, 100), "coding_sessions_due_idx"),
        ("sandbox_live_sessions", (100,), "coding_sessions_live_idx"),
    ],
)
def test_listener_queries_read_what_is_due_not_the_whole_table(
    db: Conn,
    api: Conn,
    owner: uuid.UUID,
    empty: None,
    function: str,
    args: tuple[Any, ...],
    index: str,
) -> None:
    db.execute(
        "insert into coding_sessions (user_id, sandbox_state, sandbox_destroyed_at)"
        " select %s, 'destroyed', now() from generate_series(1, 20000)",
        (owner,),
    )
    db.execute(
        "insert into coding_sessions (user_id, sandbox_state)"
        " select %s, 'provisioning' from generate_series(1, 5)",
        (owner,),
    )
    db.execute("analyze coding_sessions")
    with as_role(api, "service_role"):
        before = xact_scans(api, index)
        rows = call(api, function, *args)
        after = xact_scans(api, index)
    assert len(rows) == 5
    assert after["seq_scan"] == before["seq_scan"] == 0
    assert after["read"] - before["read"] == 5  # index entries read = what is due / live


# -- CAS writes --------------------------------------------------------------------------------


def claimed_row(db: Conn, owner: uuid.UUID, **columns: Any) -> Row:
    """A row claimed by L1 at epoch 5 with a live lease, in whatever state `columns` say."""
    claim = {
        "sandbox_epoch": 5,
        "sandbox_claimed_by": "L1",
        "sandbox_lease_expires_at": datetime.now(UTC) + timedelta(minutes=5),
    }
    row = insert_session(db, owner, **{**claim, **columns})
    return get_session(db, row["id"])


@pytest.mark.parametrize(
    ("function", "args", "state"),
    [
        ("sandbox_renew_lease", (60,), "requested"),
        ("sandbox_release", (), "requested"),
        ("sandbox_begin_provision", (3600,), "requested"),
        ("sandbox_set_machine", ("m-2", "ord"), "provisioning"),
        ("sandbox_mark_ready", (600,), "provisioning"),
        ("sandbox_mark_failed", ("boom", None), "provisioning"),
        ("sandbox_mark_failed", ("boom", 30), "ready"),
        ("sandbox_begin_stop", ("ended",), "ready"),
        ("sandbox_mark_destroyed", (), "stopping"),
    ],
)
def test_a_write_with_a_stale_epoch_changes_nothing(
    db: Conn, api: Conn, owner: uuid.UUID, function: str, args: tuple[Any, ...], state: str
) -> None:
    before = claimed_row(db, owner, sandbox_state=state, sandbox_id="m-1")
    stale, _ = svc_one(api, function, before["id"], 4, *args)
    assert stale == before == get_session(db, before["id"])
    current, _ = svc_one(api, function, before["id"], 5, *args)
    assert current != before  # the same call with the current epoch applies


@pytest.mark.parametrize(
    ("function", "args", "columns"),
    [
        (
            "sandbox_renew_lease",
            (60,),
            {"sandbox_claimed_by": None, "sandbox_lease_expires_at": None},
        ),
        ("sandbox_begin_provision", (3600,), {"sandbox_state": "ready"}),
        ("sandbox_begin_provision", (3600,), {"status": "ended"}),
        ("sandbox_set_machine", ("m-2", "ord"), {"sandbox_state": "requested"}),
        ("sandbox_mark_ready", (600,), {"sandbox_state": "provisioning", "sandbox_id": None}),
        ("sandbox_mark_ready", (600,), {"sandbox_state": "stopping"}),
        ("sandbox_mark_failed", ("boom", None), {"sandbox_state": "stopping"}),
        ("sandbox_mark_failed", ("boom", 30), {"sandbox_state": "destroyed"}),
        ("sandbox_begin_stop", ("ended",), {"sandbox_state": "destroyed"}),
        ("sandbox_begin_stop", ("ended",), {"sandbox_state": "failed"}),
        ("sandbox_mark_destroyed", (), {"sandbox_state": "failed"}),
        ("sandbox_mark_destroyed", (), {"sandbox_state": "destroyed"}),
    ],
)
def test_a_write_whose_state_precondition_fails_changes_nothing(
    db: Conn,
    api: Conn,
    owner: uuid.UUID,
    function: str,
    args: tuple[Any, ...],
    columns: dict[str, Any],
) -> None:
    before = claimed_row(db, owner, **{"sandbox_id": "m-1", **columns})
    row, _ = svc_one(api, function, before["id"], 5, *args)
    assert row == before == get_session(db, before["id"])


@pytest.mark.parametrize(("function", "args"), CAS_FUNCTIONS, ids=[f for f, _ in CAS_FUNCTIONS])
def test_a_write_to_a_missing_session_returns_nothing(
    api: Conn, function: str, args: tuple[Any, ...]
) -> None:
    assert svc(api, function, uuid.uuid4(), 1, *args)[0] == []


def test_begin_provision_from_requested_counts_an_attempt_and_sets_the_deadline(
    db: Conn, api: Conn, owner: uuid.UUID
) -> None:
    before = claimed_row(
        db,
        owner,
        sandbox_attempts=2,
        sandbox_error="capacity",
        sandbox_next_attempt_at=datetime.now(UTC) - timedelta(seconds=1),
    )
    row, now = svc_one(api, "sandbox_begin_provision", before["id"], 5, 900)
    assert row["sandbox_attempts"] == 3
    assert row["sandbox_deadline_at"] == now + timedelta(seconds=900)
    assert (row["sandbox_error"], row["sandbox_next_attempt_at"]) == (None, None)


def test_begin_provision_resumed_keeps_attempts_and_deadline(
    db: Conn, api: Conn, owner: uuid.UUID
) -> None:
    deadline = datetime.now(UTC) + timedelta(minutes=50)
    before = claimed_row(
        db,
        owner,
        sandbox_state="provisioning",
        sandbox_attempts=1,
        sandbox_deadline_at=deadline,
        sandbox_error="transient",
    )
    row, _ = svc_one(api, "sandbox_begin_provision", before["id"], 5, 900)
    assert (row["sandbox_state"], row["sandbox_attempts"]) == ("provisioning", 1)
    assert row["sandbox_deadline_at"] == deadline
    assert row["sandbox_error"] is None


def test_mark_failed_with_retry_requeues_the_session_without_a_machine(
    db: Conn, api: Conn, owner: uuid.UUID
) -> None:
    before = claimed_row(
        db,
        owner,
        sandbox_state="provisioning",
        sandbox_id="m-1",
        sandbox_region="ams",
        sandbox_deadline_at=datetime.now(UTC) + timedelta(hours=1),
    )
    row, now = svc_one(api, "sandbox_mark_failed", before["id"], 5, "Fly has no capacity", 30)
    assert row["sandbox_state"] == "requested"
    assert row["sandbox_error"] == "Fly has no capacity"
    assert (row["sandbox_id"], row["sandbox_region"], row["sandbox_deadline_at"]) == (None,) * 3
    assert (row["sandbox_claimed_by"], row["sandbox_lease_expires_at"]) == (None, None)
    assert row["sandbox_next_attempt_at"] == row["sandbox_due_at"] == now + timedelta(seconds=30)
    not_yet, _ = svc_one(api, "claim_session", before["id"], "L2", LEASE_S)
    assert not_yet == row


def test_mark_failed_without_retry_fails_for_good(db: Conn, api: Conn, owner: uuid.UUID) -> None:
    before = claimed_row(db, owner, sandbox_state="provisioning", sandbox_id="m-1")
    row, _ = svc_one(api, "sandbox_mark_failed", before["id"], 5, "image not found")
    assert (row["sandbox_state"], row["sandbox_error"], row["sandbox_id"]) == (
        "failed",
        "image not found",
        "m-1",
    )
    assert (row["sandbox_claimed_by"], row["sandbox_due_at"]) == (None, None)


def test_renew_lease_extends_the_lease_and_defers_attention(
    db: Conn, api: Conn, owner: uuid.UUID
) -> None:
    before = claimed_row(db, owner, sandbox_state="provisioning")
    row, now = svc_one(api, "sandbox_renew_lease", before["id"], 5, 120)
    assert row["sandbox_lease_expires_at"] == row["sandbox_due_at"] == now + timedelta(seconds=120)
    assert (row["sandbox_claimed_by"], row["sandbox_epoch"]) == ("L1", 5)


def test_release_hands_the_session_back_at_once(db: Conn, api: Conn, owner: uuid.UUID) -> None:
    before = claimed_row(db, owner)
    released, _ = svc_one(api, "sandbox_release", before["id"], 5)
    assert (released["sandbox_claimed_by"], released["sandbox_lease_expires_at"]) == (None, None)
    assert released["sandbox_due_at"] == released["created_at"]
    taken, _ = svc_one(api, "claim_session", before["id"], "L2", LEASE_S)
    assert (taken["sandbox_claimed_by"], taken["sandbox_epoch"]) == ("L2", 6)


# -- events and reads --------------------------------------------------------------------------


def test_record_event_returns_the_inserted_row(api: Conn) -> None:
    session_id = uuid.uuid4()
    with as_role(api, "service_role"):
        (first,) = call(api, "sandbox_record_event", session_id, None, 3, "machine_created")
        (second,) = call(api, "sandbox_record_event", session_id, None, None, "sandbox_lost", None)
    assert (first["session_id"], first["epoch"], first["event"]) == (
        session_id,
        3,
        "machine_created",
    )
    assert first["detail"] == second["detail"] == {}
    assert second["id"] > first["id"]


def test_sessions_by_ids_returns_the_existing_ones(db: Conn, api: Conn, owner: uuid.UUID) -> None:
    known = [insert_session(db, owner)["id"] for _ in range(3)]
    rows, _ = svc(api, "sandbox_sessions_by_ids", [*known, uuid.uuid4()])
    assert sorted(row["id"] for row in rows) == sorted(known)


def test_live_sessions_are_the_ones_whose_machine_may_exist(
    db: Conn, api: Conn, owner: uuid.UUID, empty: None
) -> None:
    live = {
        insert_session(db, owner, sandbox_state=state)["id"]
        for state in ("provisioning", "ready", "stopping", "ready")
    }
    for state in ("requested", "destroyed", "failed"):
        insert_session(db, owner, sandbox_state=state)
    rows, _ = svc(api, "sandbox_live_sessions")
    assert {row["id"] for row in rows} == live
    page, _ = svc(api, "sandbox_live_sessions", 2)
    assert [row["id"] for row in page] == sorted(live)[:2]


# -- listener leases ---------------------------------------------------------------------------


def lease_holder(db: Conn, name: str) -> Row | None:
    return db.execute(
        "select owner, expires_at from listener_leases where name = %s", (name,)
    ).fetchone()


def take(api: Conn, name: str, owner: str, ttl_s: int = 30) -> bool:
    (row,) = svc(api, "take_listener_lease", name, owner, ttl_s)[0]
    return bool(row["take_listener_lease"])


def test_listener_lease_is_exclusive_until_it_lapses(db: Conn, api: Conn) -> None:
    name = f"sweeper-{uuid.uuid4().hex}"
    assert take(api, name, "A", 30)
    assert not take(api, name, "B")
    first = lease_holder(db, name)
    assert take(api, name, "A", 300)  # renewing
    renewed = lease_holder(db, name)
    assert first is not None and renewed is not None
    assert renewed["expires_at"] > first["expires_at"]

    db.execute(
        "update listener_leases set expires_at = now() - interval '1 second' where name = %s",
        (name,),
    )
    assert take(api, name, "B")
    assert not take(api, name, "A")

    held = lease_holder(db, name)
    svc(api, "release_listener_lease", name, "A")  # not the holder: nothing changes
    assert held is not None and held["owner"] == "B"
    assert lease_holder(db, name) == held
    svc(api, "release_listener_lease", name, "B")
    assert lease_holder(db, name) is None
    assert take(api, name, "A")


def test_concurrent_lease_takers_have_exactly_one_winner(postgres: EmbeddedPostgres) -> None:
    name = f"sweeper-{uuid.uuid4().hex}"

    def race(conn: Conn, i: int) -> bool:
        with as_role(conn, "service_role"):
            (row,) = call(conn, "take_listener_lease", name, f"L{i}", 30)
        return bool(row["take_listener_lease"])

    assert sum(in_threads(race, postgres)) == 1
