"""The reconciler's decisions as tables of plain values: row, machines, now -> action."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from listener.errors import (
    FlyCapacityError,
    FlyClientError,
    FlyNotFoundError,
    FlyOutcomeUnknownError,
    FlyServerError,
    FlyTimeoutError,
)
from listener.models import (
    Command,
    CommandStatus,
    ExecResult,
    Machine,
    MachineSpec,
    MachineState,
    SandboxState,
    Session,
    SessionStatus,
)
from listener.models import StopReason as R
from listener.reconciler import (
    DestroyOrphan,
    Policy,
    Provision,
    RecoverLost,
    Reject,
    Release,
    SmokeTestError,
    Teardown,
    Warn,
    command_failure,
    command_outcome,
    decide,
    failure_message,
    is_permanent,
    machine_spec,
    pick_machine,
    reconcile,
    refuse_command,
    retry_delay_s,
    storable,
    truncate,
    unstored_outcome,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
POLICY = Policy(
    default_region="iad",
    allowed_regions=frozenset({"iad", "ord"}),
    cpu_kind="shared",
    cpus=1,
    memory_mb=1024,
    max_memory_mb=4096,
    max_cpus=4,
    max_attempts=3,
    idle_timeout_s=1800,
    max_lifetime_s=14400,
    orphan_grace_s=120,
)
SPEC = MachineSpec(region="iad", cpu_kind="shared", cpus=1, memory_mb=1024)


def session(**kw: object) -> Session:
    base = Session(
        id="s1",
        incarnation="inc-s1",
        user_id="u1",
        status=SessionStatus.ACTIVE,
        state=SandboxState.REQUESTED,
        epoch=3,
        created_at=NOW - timedelta(minutes=5),
    )
    return replace(base, **kw)  # type: ignore[arg-type]  # test helper


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        pytest.param(session(), Provision(SPEC), id="requested->provision"),
        pytest.param(
            session(state=SandboxState.PROVISIONING, sandbox_id="m1"),
            Provision(SPEC),
            id="provisioning(resumed)->provision",
        ),
        pytest.param(
            session(requested_region="ord", requested_memory_mb=2048, requested_cpus=2),
            Provision(MachineSpec("ord", "shared", 2, 2048)),
            id="requested-size-within-limits",
        ),
        pytest.param(
            session(status=SessionStatus.ENDED), Teardown(R.ENDED), id="requested+ended->teardown"
        ),
        pytest.param(
            session(state=SandboxState.READY, status=SessionStatus.ENDED, sandbox_id="m1"),
            Teardown(R.ENDED),
            id="ready+ended->teardown",
        ),
        pytest.param(
            session(state=SandboxState.READY, sandbox_id="m1", expires_at=NOW + timedelta(hours=1)),
            Release(),
            id="ready-not-due->release",
        ),
        pytest.param(
            session(
                state=SandboxState.READY,
                sandbox_id="m1",
                expires_at=ago(1),
                deadline_at=NOW + timedelta(hours=1),
            ),
            Teardown(R.IDLE),
            id="ready-idle->teardown-idle",
        ),
        pytest.param(
            session(
                state=SandboxState.READY, sandbox_id="m1", expires_at=ago(1), deadline_at=ago(1)
            ),
            Teardown(R.MAX_AGE),
            id="ready-past-deadline->teardown-max-age",
        ),
        pytest.param(
            session(state=SandboxState.STOPPING, sandbox_id="m1", stop_reason="idle"),
            Teardown(R.IDLE),
            id="stopping(resumed)->teardown-same-reason",
        ),
        pytest.param(
            session(state=SandboxState.STOPPING, stop_reason="nonsense"),
            Teardown(R.OPERATOR),
            id="stopping-unknown-reason->operator",
        ),
        pytest.param(session(state=SandboxState.DESTROYED), Release(), id="destroyed->release"),
        pytest.param(session(state=SandboxState.FAILED), Release(), id="failed->release"),
    ],
)
def test_decide(row: Session, expected: object) -> None:
    assert decide(row, NOW, POLICY) == expected


@pytest.mark.parametrize(
    ("kw", "fragments"),
    [
        pytest.param(
            {"requested_region": "xyz"}, ["region 'xyz' is not allowed", "iad, ord"], id="region"
        ),
        pytest.param(
            {"requested_memory_mb": 1000}, ["memory_mb 1000", "multiple of 256"], id="mem-not-256"
        ),
        pytest.param(
            {"requested_memory_mb": 8192},
            ["memory_mb 8192", "between 256 and 2048"],
            id="mem-too-big",
        ),
        pytest.param({"requested_cpus": 3}, ["cpus 3"], id="cpus"),
        pytest.param(
            {"requested_region": "xyz", "requested_cpus": 3},
            ["region 'xyz'", "cpus 3"],
            id="every-problem-named",
        ),
    ],
)
def test_bad_request_is_rejected_with_every_problem_named(
    kw: dict[str, object], fragments: list[str]
) -> None:
    decision = decide(session(**kw), NOW, POLICY)
    assert isinstance(decision, Reject)
    for fragment in fragments:
        assert fragment in decision.error
    assert decision.error.endswith("Start a new session.")


def test_machine_spec_defaults_come_from_policy() -> None:
    assert machine_spec(session(), POLICY) == SPEC


@pytest.mark.parametrize(
    ("attempts", "error", "expected"),
    [
        pytest.param(1, FlyServerError("boom", status=503), 5.0, id="first-retry-base"),
        pytest.param(2, FlyCapacityError("full", status=422), 10.0, id="capacity-doubles"),
        pytest.param(3, FlyServerError("boom", status=503), None, id="out-of-attempts"),
        pytest.param(1, FlyClientError("bad image", status=422), None, id="permanent-4xx"),
        pytest.param(1, SmokeTestError(1, "no bash"), 5.0, id="smoke-retried"),
        pytest.param(1, FlyOutcomeUnknownError("408"), 5.0, id="outcome-unknown-retried"),
    ],
)
def test_retry_delay(attempts: int, error: Exception, expected: float | None) -> None:
    assert retry_delay_s(attempts, error, POLICY) == expected


def test_retry_delay_is_capped() -> None:
    policy = replace(POLICY, max_attempts=50, retry_max_s=60)
    assert retry_delay_s(20, FlyServerError("x"), policy) == 60


def test_permanent_errors_are_fly_rejections_only() -> None:
    assert is_permanent(FlyClientError("bad", status=400))
    assert not is_permanent(FlyCapacityError("full"))
    assert not is_permanent(FlyServerError("x"))
    assert not is_permanent(TimeoutError())


@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (FlyCapacityError("full"), "no capacity for this sandbox (1xshared 1024 MB in iad)"),
        (FlyClientError("image not found", status=422), "Check SANDBOX_IMAGE"),
        (SmokeTestError(127, "bash: not found\n"), "smoke command exited 127: bash: not found"),
        (FlyServerError("internal", status=500), "the listener will retry"),
        (FlyTimeoutError("still starting after 300s", status=None), "did not confirm the machine"),
    ],
)
def test_failure_messages_are_actionable(error: Exception, fragment: str) -> None:
    assert fragment in failure_message(error, SPEC)


def machine(
    mid: str,
    session_id: str | None,
    *,
    epoch: int = 3,
    age_s: float = 600,
    state: MachineState = MachineState.STARTED,
    incarnation: str | None = None,
) -> Machine:
    meta = {"managed_by": "sandbox-listener", "epoch": str(epoch)}
    if session_id:
        meta["session_id"] = session_id
        meta["incarnation"] = incarnation or f"inc-{session_id}"
    return Machine(
        id=mid, state=state, region="iad", instance_id="i", metadata=meta, created_at=ago(age_s)
    )


READY = session(state=SandboxState.READY, sandbox_id="m1", epoch=3)


@pytest.mark.parametrize(
    ("machines", "sessions", "expected"),
    [
        pytest.param([machine("m1", "s1")], {"s1": READY}, [], id="owned-machine-kept"),
        pytest.param(
            [machine("m9", "gone")],
            {},
            [DestroyOrphan("m9", "gone", "session missing", "inc-gone")],
            id="session-missing->destroy",
        ),
        pytest.param(
            [machine("m9", None)],
            {},
            [DestroyOrphan("m9", None, "session missing")],
            id="untagged-managed->destroy",
        ),
        pytest.param(
            [machine("m1", "s1")],
            {"s1": replace(READY, state=SandboxState.DESTROYED)},
            [DestroyOrphan("m1", "s1", "session destroyed", "inc-s1")],
            id="final-session->destroy",
        ),
        pytest.param(
            [machine("m1", "s1")],
            {"s1": replace(READY, state=SandboxState.FAILED)},
            [DestroyOrphan("m1", "s1", "session failed", "inc-s1")],
            id="failed-session->destroy",
        ),
        pytest.param(
            [machine("m1", "s1"), machine("m0", "s1", epoch=2)],
            {"s1": READY},
            [DestroyOrphan("m0", "s1", "older epoch", "inc-s1")],
            id="superseded-attempt->destroy",
        ),
        pytest.param(
            [machine("m1", "s1"), machine("mA", "s1", epoch=9, incarnation="inc-earlier")],
            {"s1": READY},
            [DestroyOrphan("mA", "s1", "other incarnation", "inc-earlier")],
            id="earlier-incarnation-of-a-reused-id->destroy-whatever-its-epoch",
        ),
        pytest.param(
            [machine("m1", "s1", incarnation="inc-earlier")],
            {"s1": READY},
            [
                DestroyOrphan("m1", "s1", "other incarnation", "inc-earlier"),
                RecoverLost("s1", "m1"),
            ],
            id="recorded-id-but-other-incarnation->destroy",
        ),
        pytest.param(
            [machine("m1", "s1"), machine("m2", "s1", epoch=3)],
            {"s1": READY},
            [],
            id="same-epoch-unrecorded-kept",
        ),
        pytest.param([machine("m9", "gone", age_s=30)], {}, [], id="young-by-age-kept"),
        pytest.param(
            [machine("m9", "gone", state=MachineState.CREATED)], {}, [], id="created-state-kept"
        ),
        pytest.param(
            [machine("m9", "gone", state=MachineState.REPLACING)], {}, [], id="replacing-state-kept"
        ),
        pytest.param(
            [machine("m9", "gone", state=MachineState.DESTROYED)], {}, [], id="destroyed-ignored"
        ),
        pytest.param(
            [], {"s1": READY}, [RecoverLost("s1", "m1")], id="ready-without-machine->lost"
        ),
        pytest.param(
            [machine("m1", "s1", state=MachineState.DESTROYING)],
            {"s1": READY},
            [RecoverLost("s1", "m1")],
            id="ready-machine-destroying->lost",
        ),
    ],
)
def test_reconcile(
    machines: list[Machine], sessions: dict[str, Session], expected: list[object]
) -> None:
    live = [s for s in sessions.values() if not s.state.is_final]
    assert reconcile(machines, sessions, live, NOW, POLICY) == expected


def test_pick_machine_keeps_the_newest_epoch_and_tolerates_missing_timestamps() -> None:
    old = machine("m0", "s1", epoch=2)
    new = machine("m1", "s1", epoch=3)
    undated = replace(machine("m2", "s1", epoch=3), created_at=None)
    gone = machine("m3", "s1", epoch=9, state=MachineState.DESTROYED)
    keep, extras = pick_machine([old, undated, gone, new], "inc-s1")
    assert keep == new and extras == [undated, old]
    assert pick_machine([gone], "inc-s1") == (None, [])


def test_pick_machine_never_picks_another_incarnation_of_the_same_session_id() -> None:
    """The takeover: user A's machine (epoch 2) and user B's row reusing A's session id."""
    of_user_a = machine("mA", "s1", epoch=2, incarnation="inc-user-a")
    assert pick_machine([of_user_a], "inc-user-b") == (None, [])
    of_user_b = machine("mB", "s1", epoch=1, incarnation="inc-user-b")
    assert pick_machine([of_user_a, of_user_b], "inc-user-b") == (of_user_b, [])


def test_reconcile_ignores_provisioning_rows_without_machine() -> None:
    provisioning = session(state=SandboxState.PROVISIONING, sandbox_id="m1")
    assert reconcile([], {"s1": provisioning}, [provisioning], NOW, POLICY) == []


# -- idle warning and commands ------------------------------------------------------------------

READY_ROW = session(
    state=SandboxState.READY, sandbox_id="m1", expires_at=NOW + timedelta(minutes=4)
)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        pytest.param(replace(READY_ROW, warn_at=ago(1)), Warn(), id="warning-due"),
        pytest.param(
            replace(READY_ROW, warn_at=ago(10), idle_warning_at=ago(5)),
            Release(),
            id="already-warned-for-this-expiry",
        ),
        pytest.param(
            replace(READY_ROW, warn_at=ago(10), idle_warning_at=ago(60)),
            Warn(),
            id="activity-moved-the-expiry-warn-again",
        ),
        pytest.param(
            replace(READY_ROW, warn_at=NOW + timedelta(minutes=1)), Release(), id="not-yet"
        ),
        pytest.param(replace(READY_ROW, warn_at=None), Release(), id="warnings-off"),
        pytest.param(
            replace(READY_ROW, warn_at=ago(100), expires_at=ago(1)),
            Teardown(R.IDLE),
            id="expired-beats-warning",
        ),
    ],
)
def test_idle_warning(row: Session, expected: object) -> None:
    assert decide(row, NOW, POLICY) == expected


def cmd(timeout_s: int = 60) -> Command:
    return Command("c1", "s1", ("echo", "hi"), timeout_s, CommandStatus.RUNNING)


def test_command_with_timeout_above_the_setting_is_refused_with_the_bound() -> None:
    outcome = refuse_command(cmd(600), max_timeout_s=300)
    assert outcome is not None and outcome.status is CommandStatus.REJECTED
    assert outcome.error and "timeout_s 600 is outside 1..300" in outcome.error
    assert refuse_command(cmd(300), max_timeout_s=300) is None


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("hello", 10, ("hello", False)),
        ("hello", 5, ("hello", False)),
        ("hello!", 5, ("hello", True)),
        ("ééé", 3, ("é", True)),  # 2-byte characters: never split one
    ],
)
def test_truncate_counts_utf8_bytes(text: str, limit: int, expected: tuple[str, bool]) -> None:
    assert truncate(text, limit) == expected


def test_command_outcome_maps_exit_codes_and_truncates() -> None:
    ok = command_outcome(ExecResult(0, "x" * 10, ""), limit_bytes=4)
    assert (ok.status, ok.exit_code, ok.stdout, ok.stdout_truncated) == (
        CommandStatus.SUCCEEDED,
        0,
        "xxxx",
        True,
    )
    failed = command_outcome(ExecResult(2, "", "bad"), limit_bytes=100)
    assert (failed.status, failed.exit_code, failed.stderr) == (CommandStatus.FAILED, 2, "bad")
    killed = command_outcome(ExecResult(137, "", "", exit_signal=9), limit_bytes=100)
    assert killed.status is CommandStatus.FAILED and killed.error == "killed by signal 9"


def test_command_failures_say_what_happened() -> None:
    timed_out = command_failure(FlyTimeoutError("deadline_exceeded", status=408), cmd(5))
    assert timed_out.status is CommandStatus.TIMED_OUT
    assert timed_out.error and "longer than its timeout_s (5 s)" in timed_out.error
    gone = command_failure(FlyNotFoundError("machine not found", status=404), cmd())
    assert gone.status is CommandStatus.FAILED
    assert gone.error and "could not run the command" in gone.error


# -- output that Postgres text cannot hold ------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stored", "replaced"),
    [
        ("plain é", "plain é", False),
        ("a\x00b", "a\ufffdb", True),
        ("lone \ud800 surrogate", "lone \ufffd surrogate", True),
        ("pair \U0001f600 kept", "pair \U0001f600 kept", False),
    ],
)
def test_storable_replaces_only_what_text_cannot_hold(
    raw: str, stored: str, replaced: bool
) -> None:
    assert storable(raw) == (stored, replaced)


def test_a_nul_in_output_keeps_the_exit_code_and_says_it_was_replaced() -> None:
    outcome = command_outcome(ExecResult(exit_code=3, stdout="a\x00b", stderr="ok"), 1024)
    assert (outcome.status, outcome.exit_code, outcome.stdout) == (
        CommandStatus.FAILED,
        3,
        "a\ufffdb",
    )
    assert outcome.output_replaced and not outcome.stdout_truncated


def test_truncation_flags_from_the_exec_stream_are_kept() -> None:
    result = ExecResult(exit_code=0, stdout="x" * 10, stdout_truncated=True)
    assert command_outcome(result, 1024).stdout_truncated


def test_an_unstored_outcome_keeps_the_exit_code_and_a_true_reason() -> None:
    outcome = command_outcome(ExecResult(exit_code=7, stdout="out"), 1024)
    fallback = unstored_outcome(outcome, RuntimeError("22P05 " + "x" * 1000))
    assert (fallback.exit_code, fallback.stdout, fallback.stderr) == (7, None, None)
    assert fallback.error is not None and "could not be stored" in fallback.error
    assert len(fallback.error) < 400


def test_a_huge_requested_region_is_clipped_in_the_error() -> None:
    error = machine_spec(session(requested_region="x" * 200_000), POLICY)
    assert isinstance(error, str) and len(error) < 300 and "…" in error
