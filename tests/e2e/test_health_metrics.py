"""Health, readiness, Prometheus metrics and JSON logs of a listener through a session's life."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Iterator

import httpx
import psycopg
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from listener.local.stack import StackThread
from listener.logs import configure_logging
from tests.e2e.harness import frontend_user, in_state, running_listener, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
STATES = ("requested", "provisioning", "ready", "stopping", "destroyed", "failed")
TRANSITIONS = (
    "provisioning_started",
    "machine_created",
    "sandbox_ready",
    "sandbox_stopping",
    "sandbox_destroyed",
)


@contextlib.contextmanager
def production_logging() -> Iterator[None]:
    """The listener's own logging setup, undone on exit (before the stack's teardown logs)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("info", "auto")
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture(autouse=True)
def fresh_structlog() -> Iterator[None]:
    """capture_logs sees info events whatever another test configured."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Scraper:
    """The listener's HTTP endpoints on one port."""

    def __init__(self, http: httpx.AsyncClient, port: int) -> None:
        self.http = http
        self.base = f"http://127.0.0.1:{port}"

    async def up(self) -> bool:
        try:
            await self.http.get(f"{self.base}/healthz")
        except httpx.TransportError:
            return False
        return True

    async def get(self, path: str) -> httpx.Response:
        return await self.http.get(f"{self.base}{path}")

    async def ready(self) -> bool:
        return (await self.get("/readyz")).status_code == 200

    async def metrics(self) -> Samples:
        """Every sample of /metrics, keyed by (sample name, labels)."""
        response = await self.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        }

    async def shows(self, expected: float, name: str, **labels: str) -> bool:
        return value(await self.metrics(), name, **labels) == expected


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str) -> float:
    """The sum of a metric over all its label values."""
    return sum(v for (n, _), v in samples.items() if n == name)


def sessions_by_state(samples: Samples) -> dict[str, float | None]:
    return {state: value(samples, "sandbox_sessions", state=state) for state in STATES}


async def test_metrics_follow_one_session_from_insert_to_destroyed(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    db = stack.info.db_url
    port = free_port()
    site = Scraper(http, port)
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info, LISTENER_HTTP_PORT=str(port)):
        await wait_until(site.up, what="the HTTP server")
        health = await site.get("/healthz")
        assert health.status_code == 200 and health.json()["ok"] is True
        await wait_until(site.ready, what="readiness")
        ready = await site.get("/readyz")
        assert ready.json() == {"ok": True, "realtime_subscribed": True, "supabase": True}

        start = await site.metrics()
        assert value(start, "realtime_subscribed") == 1
        assert sessions_by_state(start) == dict.fromkeys(STATES, 0)
        assert value(start, "sandbox_provisioning_seconds_count") == 0

        session_id = await user.create_session()
        await wait_until(in_state(db, session_id, "ready"), what="ready")
        await wait_until(lambda: site.shows(1, "sandbox_provisioning_seconds_count"), what="ready")
        at_ready = await site.metrics()
        assert (value(at_ready, "sandbox_provisioning_seconds_sum") or 0) > 0
        assert value(at_ready, "fly_api_calls_total", operation="create_machine", status="200") == 1
        intake = {dict(labels)["source"] for n, labels in at_ready if n == "sandbox_intake_total"}
        assert intake and intake <= {"realtime", "scan"}
        assert total(at_ready, "sandbox_intake_total") >= 1
        assert sessions_by_state(at_ready) == {**dict.fromkeys(STATES, 0), "ready": 1}

        await user.end_session(session_id)
        await wait_until(in_state(db, session_id, "destroyed"), what="destroyed")
        await wait_until(
            lambda: site.shows(1, "sandbox_destroyed_total", reason="ended"), what="destroyed"
        )
        end = await site.metrics()
    assert value(end, "sandbox_provisioning_seconds_count") == 1
    assert value(end, "fly_api_calls_total", operation="create_machine", status="200") == 1
    assert value(end, "fly_api_calls_total", operation="destroy", status="200") == 1
    assert sessions_by_state(end) == {**dict.fromkeys(STATES, 0), "destroyed": 1}
    # Present, but not asserted idle: the row's own last UPDATE is a hint that may be in hand.
    assert value(end, "listener_queue_depth") is not None
    assert value(end, "listener_in_flight") is not None
    assert total(end, "sweeper_runs_total") > 0
    assert value(end, "sweeper_runs_total", outcome="failed") is None
    assert value(end, "realtime_subscribed") == 1
    assert total(end, "sandbox_sessions_failed_total") == 0


async def test_metrics_still_answer_when_sessions_cannot_be_counted(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    port = free_port()
    site = Scraper(http, port)
    user = await frontend_user(stack.info, http)
    async with running_listener(stack.info, LISTENER_HTTP_PORT=str(port)):
        await wait_until(site.up, what="the HTTP server")
        await user.create_session()
        await wait_until(lambda: site.shows(1, "sandbox_sessions", state="ready"), what="ready")
        with psycopg.connect(stack.info.db_url, autocommit=True) as conn:
            conn.execute("revoke select on sandbox_stats from service_role")
            try:
                with capture_logs() as logs:
                    samples = await site.metrics()
            finally:
                conn.execute("grant select on sandbox_stats to service_role")
    assert sessions_by_state(samples) == {**dict.fromkeys(STATES, 0), "ready": 1}  # last counts
    (failed,) = [e for e in logs if e["event"] == "session_count_failed"]
    assert failed["log_level"] == "warning"
    assert "permission denied" in failed["error"]
    assert stack.info.service_role_key not in str(logs)


async def test_readiness_is_503_until_realtime_confirms_then_200(
    stack: StackThread, http: httpx.AsyncClient
) -> None:
    port = free_port()
    site = Scraper(http, port)
    with psycopg.connect(stack.info.db_url, autocommit=True) as conn:
        conn.execute("alter publication supabase_realtime drop table public.coding_sessions")
        try:
            with capture_logs() as logs:
                async with running_listener(stack.info, LISTENER_HTTP_PORT=str(port)):
                    await wait_until(site.up, what="the HTTP server")
                    await wait_until(
                        lambda: any(e["event"] == "realtime_channel_state" for e in logs),
                        what="Realtime refusing the subscription",
                    )
                    refused = await site.get("/readyz")
                    assert refused.status_code == 503
                    assert refused.json() == {
                        "ok": False,
                        "realtime_subscribed": False,
                        "supabase": True,
                    }
                    assert value(await site.metrics(), "realtime_subscribed") == 0
                    assert (await site.get("/healthz")).status_code == 200  # alive all the same

                    conn.execute(
                        "alter publication supabase_realtime add table public.coding_sessions"
                    )
                    await wait_until(
                        site.ready,
                        timeout_s=30,
                        what="readiness after the table is published again",
                    )
                    assert value(await site.metrics(), "realtime_subscribed") == 1
        finally:
            conn.execute(
                "do $$ begin if not exists (select 1 from pg_publication_tables where pubname ="
                " 'supabase_realtime' and tablename = 'coding_sessions') then alter publication"
                " supabase_realtime add table public.coding_sessions; end if; end $$"
            )


async def test_logs_are_json_lines_with_stable_events_and_bound_ids(
    stack: StackThread, http: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    db = stack.info.db_url
    user = await frontend_user(stack.info, http)
    with production_logging():  # stderr is captured, not a terminal: JSON
        async with running_listener(stack.info):
            session_id = await user.create_session()
            await wait_until(in_state(db, session_id, "ready"), what="ready")
            await user.end_session(session_id)
            await wait_until(in_state(db, session_id, "destroyed"), what="destroyed")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"event", "level", "timestamp"} <= entry.keys() for entry in entries)
    events = {entry["event"] for entry in entries}
    assert {"listener_started", "realtime_subscribed", "sweep_finished", "listener_stopped"} <= (
        events
    )
    mine = [e for e in entries if e.get("session_id") == session_id]
    transitions = [e for e in mine if e["event"] in TRANSITIONS]
    assert [e["event"] for e in transitions] == list(TRANSITIONS)
    assert all(isinstance(e["epoch"], int) and e["level"] == "info" for e in transitions)
    created, ready = transitions[1], transitions[2]
    assert created["machine_id"] == ready["machine_id"]
    assert ready["seconds"] > 0
    destroyed = transitions[-1]
    assert destroyed["reason"] == "ended" and destroyed["machines"] == [created["machine_id"]]
    for secret in (stack.info.service_role_key, stack.info.fly_api_token):
        assert all(secret not in line for line in lines)
