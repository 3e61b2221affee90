"""The doctor's verdicts: plain values in, one PASS/WARN/FAIL/SKIP line (and a hint) out."""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path
from typing import Any

import pytest
from realtime import RealtimeSubscribeStates

from listener import doctor as d
from listener.doctor import Check, DatabaseReport, RealtimeOutcome, RestAnswer, Verdict
from listener.errors import (
    ConfigError,
    FlyClientError,
    FlyConnectError,
    FlyError,
    FlyNotFoundError,
    FlyServerError,
    FlyUnavailableError,
)
from listener.fly import FlyApp

STORE = Path(d.__file__).with_name("store.py")
URL = "https://abc.supabase.co"


def healthy_report(**over: Any) -> DatabaseReport:
    fields: dict[str, Any] = {
        "publication_exists": True,
        "publication_tables": frozenset({"public.coding_sessions", "public.sandbox_commands"}),
        "replica_identity": {"coding_sessions": "default", "sandbox_commands": "default"},
        "functions": frozenset(d.REQUIRED_FUNCTIONS) | {"sandbox_doctor"},
        "relations": frozenset(d.REQUIRED_RELATIONS),
    }
    return DatabaseReport(**{**fields, **over})


def doctor_body(report: DatabaseReport) -> dict[str, Any]:
    return {
        "publication_exists": report.publication_exists,
        "publication_tables": sorted(report.publication_tables),
        "replica_identity": dict(report.replica_identity),
        "functions": sorted(report.functions),
        "relations": sorted(report.relations),
    }


def test_required_functions_are_exactly_the_ones_the_store_calls() -> None:
    called = {
        node.args[0].value
        for node in ast.walk(ast.parse(STORE.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"_rpc", "_call", "_cas"}
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    assert called == set(d.REQUIRED_FUNCTIONS)


def test_a_check_shows_its_hint_only_when_something_is_to_be_done() -> None:
    assert Check("x", Verdict.PASS, "fine", "ignored").lines() == ["PASS x: fine"]
    assert Check("x", Verdict.SKIP, "later", "ignored").lines() == ["SKIP x: later"]
    assert Check("x", Verdict.FAIL, "broken", "fix it").lines() == [
        "FAIL x: broken",
        "     hint: fix it",
    ]
    assert Check("x", Verdict.WARN, "hmm").lines() == ["WARN x: hmm"]


def test_config_problems_become_one_failure_each() -> None:
    checks = d.config_checks(ConfigError(["A: required but not set", "B: too small"]))
    assert [(c.name, c.verdict, c.detail) for c in checks] == [
        ("config", Verdict.FAIL, "A: required but not set"),
        ("config", Verdict.FAIL, "B: too small"),
    ]


@pytest.mark.parametrize(
    ("image", "verdict", "detail"),
    [
        ("  ", Verdict.FAIL, "SANDBOX_IMAGE is blank"),
        ("reg/img@sha256:" + "0" * 64, Verdict.PASS, "pinned by digest"),
        ("reg/img:latest", Verdict.WARN, "reg/img:latest is not pinned by digest"),
        ("reg/img", Verdict.WARN, "reg/img is not pinned by digest"),
    ],
    ids=["blank", "digest", "tag", "bare"],
)
def test_image(image: str, verdict: Verdict, detail: str) -> None:
    check = d.judge_image(image)
    assert check.verdict is verdict
    assert detail in check.detail


@pytest.mark.parametrize(
    ("answer", "verdict", "detail"),
    [
        (RestAnswer(None, message="ConnectError: refused"), Verdict.FAIL, "is unreachable"),
        (RestAnswer(200, body=[]), Verdict.PASS, "answers with the service-role key"),
        (RestAnswer(404, "PGRST205", "no table"), Verdict.PASS, "answers"),
        (RestAnswer(401, "42501", "permission denied"), Verdict.FAIL, "not the service_role key"),
        (RestAnswer(401, "", "Invalid API key"), Verdict.FAIL, "rejected (HTTP 401: Invalid"),
        (RestAnswer(401, "PGRST301", "JWT"), Verdict.FAIL, "rejected (HTTP 401: JWT)"),
        (RestAnswer(404, "", "Not Found"), Verdict.FAIL, "unexpected answer"),
        (RestAnswer(502, "", "Bad Gateway"), Verdict.FAIL, "HTTP 502: Bad Gateway"),
    ],
    ids=[
        "unreachable",
        "ok",
        "table-missing",
        "anon-key",
        "bad-key",
        "bad-jwt",
        "wrong-url",
        "5xx",
    ],
)
def test_supabase(answer: RestAnswer, verdict: Verdict, detail: str) -> None:
    check = d.judge_supabase(URL, answer)
    assert (check.name, check.verdict) == ("supabase", verdict)
    assert detail in check.detail
    assert bool(check.hint) is (verdict is Verdict.FAIL)


def test_schema_passes_when_everything_is_there() -> None:
    report = healthy_report()
    check, parsed = d.judge_schema(RestAnswer(200, body=doctor_body(report)))
    assert check.verdict is Verdict.PASS
    assert parsed == report


def test_schema_names_what_is_missing() -> None:
    report = healthy_report(
        functions=frozenset(d.REQUIRED_FUNCTIONS) - {"claim_sessions"},
        relations=frozenset(d.REQUIRED_RELATIONS) - {"sandbox_stats"},
    )
    check, parsed = d.judge_schema(RestAnswer(200, body=doctor_body(report)))
    assert check.verdict is Verdict.FAIL
    assert check.detail == "missing or not granted to service_role: sandbox_stats, claim_sessions()"
    assert parsed == report  # the publication can still be judged


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (RestAnswer(None, message="ReadTimeout"), "became unreachable (ReadTimeout)"),
        (RestAnswer(404, "PGRST202", "no function"), "sandbox_doctor() not found"),
        (RestAnswer(401, "42501", "permission denied"), "failed (HTTP 401: permission denied)"),
        (RestAnswer(200, body=["not", "an", "object"]), "answered something unexpected"),
        (RestAnswer(200, body={"functions": []}), "answered something unexpected"),
    ],
    ids=["unreachable", "not-applied", "denied", "not-an-object", "incomplete"],
)
def test_schema_failures(answer: RestAnswer, detail: str) -> None:
    check, parsed = d.judge_schema(answer)
    assert check.verdict is Verdict.FAIL
    assert detail in check.detail
    assert parsed is None


def test_a_denied_doctor_call_points_at_the_key() -> None:
    check, _ = d.judge_schema(RestAnswer(401, "42501", "permission denied"))
    assert check.hint == d.KEY_HINT


@pytest.mark.parametrize(
    ("report", "verdict", "detail"),
    [
        (healthy_report(), Verdict.PASS, "coding_sessions default, sandbox_commands default"),
        (healthy_report(publication_exists=False), Verdict.FAIL, "does not exist"),
        (
            healthy_report(publication_tables=frozenset({"public.sandbox_commands"})),
            Verdict.FAIL,
            "coding_sessions not in publication supabase_realtime",
        ),
        (
            healthy_report(publication_tables=frozenset()),
            Verdict.FAIL,
            "coding_sessions, sandbox_commands not in publication",
        ),
        (
            healthy_report(replica_identity={"coding_sessions": "nothing"}),
            Verdict.FAIL,
            "replica identity nothing",
        ),
        (
            healthy_report(replica_identity={"coding_sessions": "full"}),
            Verdict.PASS,
            "coding_sessions full, sandbox_commands unknown",
        ),
    ],
    ids=["ok", "no-publication", "one-missing", "both-missing", "identity-nothing", "full"],
)
def test_publication(report: DatabaseReport, verdict: Verdict, detail: str) -> None:
    check = d.judge_publication(report)
    assert check.verdict is verdict
    assert detail in check.detail


def test_the_publication_hint_is_the_sql_that_fixes_it() -> None:
    check = d.judge_publication(healthy_report(publication_tables=frozenset()))
    assert check.hint == (
        "alter publication supabase_realtime add table public.coding_sessions, "
        "public.sandbox_commands;"
    )


@pytest.mark.parametrize(
    ("outcome", "verdict", "detail"),
    [
        (RealtimeOutcome(True, 0.25), Verdict.PASS, "changes in 0.25 s"),
        (RealtimeOutcome(False, 0.1, "Unable to subscribe"), Verdict.FAIL, "refused: Unable"),
        (RealtimeOutcome(False, 5.0), Verdict.FAIL, "no subscription confirmation within 5 s"),
    ],
    ids=["confirmed", "refused", "silent"],
)
def test_realtime(outcome: RealtimeOutcome, verdict: Verdict, detail: str) -> None:
    check = d.judge_realtime(outcome, 5)
    assert check.verdict is verdict
    assert detail in check.detail


def test_realtime_errors_read_realtimes_own_message() -> None:
    payload = {"extension": "postgres_changes", "status": "error", "message": "no table"}
    error = Exception(json.dumps(payload))
    state = RealtimeSubscribeStates.CHANNEL_ERROR
    assert d.realtime_error_text(state, error) == "no table"
    assert d.realtime_error_text(state, Exception("socket gone")) == "CHANNEL_ERROR: socket gone"
    assert d.realtime_error_text(RealtimeSubscribeStates.TIMED_OUT, None) == "TIMED_OUT"


@pytest.mark.parametrize(
    ("result", "verdict", "detail"),
    [
        (
            FlyApp("sbx", "deployed", "acme", 3),
            Verdict.PASS,
            "app sbx exists (deployed, 3 machine(s), org acme)",
        ),
        (FlyApp("sbx", "", ""), Verdict.PASS, "app sbx exists (no status)"),
        (ValueError("the Fly API token is empty"), Verdict.FAIL, "FLY_API_TOKEN is unusable"),
        (FlyNotFoundError("get_app: no", status=404), Verdict.FAIL, "app sbx not found"),
        (FlyConnectError("get_app: Fly unreachable (x)"), Verdict.FAIL, "unreachable"),
        (FlyUnavailableError("get_app: garbled"), Verdict.FAIL, "unreachable"),
        (FlyClientError("get_app: no", status=401), Verdict.FAIL, "token was rejected"),
        (FlyClientError("get_app: no", status=403), Verdict.FAIL, "may not use app sbx"),
        (FlyServerError("get_app: boom", status=500), Verdict.FAIL, "Fly answered 500"),
    ],
    ids=["ok", "bare", "empty-token", "404", "connect", "garbled", "401", "403", "500"],
)
def test_fly(result: FlyApp | FlyError | ValueError, verdict: Verdict, detail: str) -> None:
    check = d.judge_fly("sbx", "https://api.machines.dev", result)
    assert (check.name, check.verdict) == ("fly", verdict)
    assert detail in check.detail


def test_the_report_masks_secrets_and_counts_failures() -> None:
    out = io.StringIO()
    report = d.Report(out, ["s3cret", ""])
    report.add(
        Check("a", Verdict.PASS, "ok"),
        Check("b", Verdict.FAIL, "sent s3cret", "rotate s3cret"),
        Check("c", Verdict.WARN, "meh"),
    )
    assert report.finish() == 1
    text = out.getvalue()
    assert "s3cret" not in text
    assert "FAIL b: sent [redacted]\n     hint: rotate [redacted]" in text
    assert text.endswith("Problems found: 1 failed, 1 warning(s), 3 check(s).\n")


def test_a_report_without_failures_exits_zero() -> None:
    out = io.StringIO()
    report = d.Report(out)
    report.add(Check("a", Verdict.WARN, "meh"), Check("b", Verdict.SKIP, "later"))
    assert report.finish() == 0
    assert out.getvalue().endswith("All good: 0 failed, 1 warning(s), 2 check(s).\n")
