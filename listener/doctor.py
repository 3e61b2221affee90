"""`sandbox-listener doctor`: check settings, Supabase, schema, Realtime and Fly; print verdicts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TextIO

import httpx
from realtime import RealtimeSubscribeStates
from realtime.message import SuccessSystemPayload
from realtime.types import RealtimePostgresChangesListenEvent
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from listener.config import Settings
from listener.errors import (
    ConfigError,
    FlyConnectError,
    FlyError,
    FlyNotFoundError,
    FlyUnavailableError,
)
from listener.fly import FlyApp, FlyClient
from listener.realtime import PUBLISHED_TABLES, is_confirmation

# What the listener needs from the database (store.py calls these functions; a unit test keeps
# the list in step) and the tables its Realtime channel listens to (realtime.py).
REQUIRED_RELATIONS = (
    "coding_sessions",
    "sandbox_events",
    "sandbox_commands",
    "listener_leases",
    "sandbox_overview",
    "sandbox_stats",
)
REQUIRED_FUNCTIONS = (
    "claim_next_command_with_machine",
    "claim_session",
    "claim_sessions",
    "claim_tombstones",
    "finish_command",
    "release_listener_lease",
    "renew_command_lease",
    "sandbox_begin_provision",
    "sandbox_begin_stop",
    "sandbox_bury",
    "sandbox_fail_unreadable",
    "sandbox_live_sessions",
    "sandbox_mark_destroyed",
    "sandbox_mark_failed",
    "sandbox_mark_idle_warning",
    "sandbox_mark_ready",
    "sandbox_record_event",
    "sandbox_release",
    "sandbox_renew_lease",
    "sandbox_sessions_by_ids",
    "sandbox_set_machine",
    "sessions_with_pending_commands",
    "take_listener_lease",
)
PUBLICATION = "supabase_realtime"
DOCTOR_FUNCTION = "sandbox_doctor"
CHANNEL = "sandbox-listener-doctor"
HTTP_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
REALTIME_TIMEOUT_S = 5.0
FLY_ATTEMPTS = 2
FLY_RETRY_BUDGET_S = 5.0
TEXT_LIMIT = 200
MISSING_TABLE_CODES = frozenset({"PGRST205", "42P01"})
KEY_HINT = "set SUPABASE_SERVICE_ROLE_KEY to the service_role key (Project Settings -> API keys)"
MIGRATION_HINT = "apply supabase/migrations to the project (supabase db push)"


class Verdict(StrEnum):
    """How a check came out; only FAIL makes the doctor exit non-zero."""

    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True, slots=True)
class Check:
    """One verdict line, with what to do about it when it is not a pass."""

    name: str
    verdict: Verdict
    detail: str
    hint: str = ""

    def lines(self) -> list[str]:
        """`VERDICT name: detail`, then the hint, indented, on a WARN or FAIL."""
        line = f"{self.verdict} {self.name}: {self.detail}"
        shown = self.hint and self.verdict in (Verdict.WARN, Verdict.FAIL)
        return [line, f"     hint: {self.hint}"] if shown else [line]


@dataclass(frozen=True, slots=True)
class RestAnswer:
    """Supabase's REST API answered `status` (None: no answer, `message` says why) with an error
    code and message, or with the JSON `body`."""

    status: int | None
    code: str = ""
    message: str = ""
    body: Any = None


@dataclass(frozen=True, slots=True)
class DatabaseReport:
    """What sandbox_doctor() says about the database."""

    publication_exists: bool
    publication_tables: frozenset[str]
    replica_identity: Mapping[str, str]
    functions: frozenset[str]
    relations: frozenset[str]


@dataclass(frozen=True, slots=True)
class RealtimeOutcome:
    """A subscription attempt: confirmed, refused with Realtime's reason, or neither in time."""

    confirmed: bool
    seconds: float
    error: str | None = None


# -- verdicts (pure) -----------------------------------------------------------------------------


def config_checks(error: ConfigError) -> list[Check]:
    """One FAIL per bad variable (ConfigError never holds a value)."""
    hint = "set it in the environment or the --env-file (every setting is in .env.example)"
    return [Check("config", Verdict.FAIL, problem, hint) for problem in error.problems]


def judge_image(image: str) -> Check:
    """The sandbox image is set, and pinned by digest so every machine runs the same bits."""
    if not image.strip():
        return Check("image", Verdict.FAIL, "SANDBOX_IMAGE is blank", "set it to the sandbox image")
    if "@sha256:" in image:
        return Check("image", Verdict.PASS, f"{image} (pinned by digest)")
    hint = "pin it as <repository>@sha256:<digest> (`docker buildx imagetools inspect` shows it)"
    return Check("image", Verdict.WARN, f"{image} is not pinned by digest", hint)


def judge_supabase(url: str, answer: RestAnswer) -> Check:
    """The REST API answers a read of coding_sessions with the service-role key."""
    name = "supabase"
    if answer.status is None:
        hint = "check SUPABASE_URL (https://<project>.supabase.co) and the network"
        return Check(name, Verdict.FAIL, f"{url} is unreachable ({answer.message})", hint)
    if answer.status < 300 or answer.code in MISSING_TABLE_CODES:
        return Check(name, Verdict.PASS, f"{url} answers with the service-role key")
    if answer.code == "42501":
        detail = f"the key is not the service_role key ({answer.message})"
        return Check(name, Verdict.FAIL, detail, KEY_HINT)
    if answer.status in (401, 403):
        detail = f"the key was rejected (HTTP {answer.status}: {answer.message})"
        return Check(name, Verdict.FAIL, detail, KEY_HINT)
    detail = f"unexpected answer from {url} (HTTP {answer.status}: {answer.message})"
    return Check(name, Verdict.FAIL, detail, "SUPABASE_URL must be the project's API URL")


def judge_schema(answer: RestAnswer) -> tuple[Check, DatabaseReport | None]:
    """sandbox_doctor() exists and names every table, view and function the listener uses."""
    name = "schema"
    if answer.status is None:
        return Check(name, Verdict.FAIL, f"Supabase became unreachable ({answer.message})"), None
    if answer.status == 404 and answer.code == "PGRST202":
        detail = f"function {DOCTOR_FUNCTION}() not found: the migrations are not (all) applied"
        return Check(name, Verdict.FAIL, detail, MIGRATION_HINT), None
    if answer.status >= 300:
        detail = f"{DOCTOR_FUNCTION}() failed (HTTP {answer.status}: {answer.message})"
        hint = KEY_HINT if answer.code == "42501" else MIGRATION_HINT
        return Check(name, Verdict.FAIL, detail, hint), None
    try:
        report = database_report(answer.body)
    except (KeyError, TypeError, ValueError) as exc:
        detail = f"{DOCTOR_FUNCTION}() answered something unexpected ({exc!r})"
        return Check(name, Verdict.FAIL, detail, MIGRATION_HINT), None
    missing = [r for r in REQUIRED_RELATIONS if r not in report.relations]
    missing += [f"{f}()" for f in REQUIRED_FUNCTIONS if f not in report.functions]
    if missing:
        detail = f"missing or not granted to service_role: {', '.join(missing)}"
        return Check(name, Verdict.FAIL, detail, MIGRATION_HINT), report
    detail = f"{len(REQUIRED_RELATIONS)} tables and views, {len(REQUIRED_FUNCTIONS)} functions"
    return Check(name, Verdict.PASS, detail), report


def database_report(body: Any) -> DatabaseReport:
    """Parse sandbox_doctor()'s JSON (KeyError, TypeError or ValueError if it does not fit)."""
    if not isinstance(body, Mapping):
        raise TypeError(f"expected an object, got {type(body).__name__}")
    identity = body["replica_identity"]
    if not isinstance(identity, Mapping):
        raise TypeError("replica_identity is not an object")
    return DatabaseReport(
        publication_exists=bool(body["publication_exists"]),
        publication_tables=frozenset(map(str, body["publication_tables"])),
        replica_identity={str(k): str(v) for k, v in identity.items()},
        functions=frozenset(map(str, body["functions"])),
        relations=frozenset(map(str, body["relations"])),
    )


def judge_publication(report: DatabaseReport) -> Check:
    """The listener's tables are in supabase_realtime, with a replica identity that publishes."""
    name = "publication"
    if not report.publication_exists:
        hint = f"create publication {PUBLICATION}; then add {', '.join(PUBLISHED_TABLES)}"
        return Check(name, Verdict.FAIL, f"publication {PUBLICATION} does not exist", hint)
    absent = [t for t in PUBLISHED_TABLES if f"public.{t}" not in report.publication_tables]
    if absent:
        detail = f"{', '.join(absent)} not in publication {PUBLICATION}"
        tables = ", ".join(f"public.{t}" for t in absent)
        hint = f"alter publication {PUBLICATION} add table {tables};"
        return Check(name, Verdict.FAIL, detail, hint)
    identities = [f"{t} {report.replica_identity.get(t, 'unknown')}" for t in PUBLISHED_TABLES]
    if any(report.replica_identity.get(t) == "nothing" for t in PUBLISHED_TABLES):
        hint = "alter table ... replica identity default;"
        detail = f"replica identity nothing drops updates ({', '.join(identities)})"
        return Check(name, Verdict.FAIL, detail, hint)
    detail = f"{', '.join(PUBLISHED_TABLES)} in {PUBLICATION} (replica identity: "
    return Check(name, Verdict.PASS, detail + ", ".join(identities) + ")")


def judge_realtime(outcome: RealtimeOutcome, timeout_s: float) -> Check:
    """Realtime confirmed a postgres_changes subscription to the listener's tables."""
    name = "realtime"
    tables = ", ".join(PUBLISHED_TABLES)
    if outcome.confirmed:
        detail = f"subscribed to {tables} changes in {outcome.seconds:.2f} s"
        return Check(name, Verdict.PASS, detail)
    hint = f"add {tables} to {PUBLICATION} and check that Realtime is enabled for the project"
    if outcome.error is not None:
        return Check(name, Verdict.FAIL, f"subscription refused: {outcome.error}", hint)
    detail = f"no subscription confirmation within {timeout_s:g} s"
    return Check(name, Verdict.FAIL, detail, hint)


def judge_fly(app_name: str, hostname: str, result: FlyApp | FlyError | ValueError) -> Check:
    """The token is accepted and the app exists (GET /v1/apps/{app})."""
    name = "fly"
    token_hint = "create a token (fly tokens create deploy -a <app>) and set FLY_API_TOKEN"
    match result:
        case FlyApp(status=status, organization=org, machine_count=count):
            machines = "" if count is None else f", {count} machine(s)"
            detail = f"token accepted; app {app_name} exists ({status or 'no status'}{machines}"
            return Check(name, Verdict.PASS, detail + (f", org {org})" if org else ")"))
        case ValueError():
            return Check(name, Verdict.FAIL, f"FLY_API_TOKEN is unusable ({result})", token_hint)
        case FlyNotFoundError():
            detail = f"app {app_name} not found (HTTP 404)"
            return Check(name, Verdict.FAIL, detail, "fix FLY_APP_NAME or `fly apps create` it")
        case FlyConnectError() | FlyUnavailableError():
            detail = f"{hostname} is unreachable ({result.message})"
            return Check(name, Verdict.FAIL, detail, "check FLY_API_HOSTNAME and the network")
        case FlyError(status=401):
            return Check(name, Verdict.FAIL, "the token was rejected (HTTP 401)", token_hint)
        case FlyError(status=403):
            detail = f"the token may not use app {app_name} (HTTP 403)"
            hint = "use a token of the organisation that owns the app, or one scoped to it"
            return Check(name, Verdict.FAIL, detail, hint)
        case _:
            detail = f"Fly answered {result.status or 'nothing'}: {result.message}"
            return Check(name, Verdict.FAIL, detail, "retry; if it persists see status.flyio.net")


def skipped(name: str, reason: str) -> Check:
    """A check that cannot run because another one failed."""
    return Check(name, Verdict.SKIP, reason)


# -- probes (I/O) --------------------------------------------------------------------------------


async def probe_rest(
    http: httpx.AsyncClient, url: str, key: str, *, rpc: str | None = None
) -> RestAnswer:
    """GET a REST path, or POST to an RPC; the answer however it came out."""
    headers = {"apikey": key, "Authorization": f"Bearer {key}", "Accept": "application/json"}
    try:
        if rpc is None:
            response = await http.get(url, headers=headers)
        else:
            response = await http.post(f"{url}/rpc/{rpc}", headers=headers, json={})
    except httpx.HTTPError as exc:
        return RestAnswer(None, message=f"{type(exc).__name__}: {exc}".rstrip(": "))
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success:
        return RestAnswer(response.status_code, body=body)
    error = body if isinstance(body, dict) else {}
    message = str(error.get("message") or response.text.strip() or response.reason_phrase)
    return RestAnswer(response.status_code, str(error.get("code") or ""), message[:TEXT_LIMIT])


async def probe_realtime(url: str, key: str, timeout_s: float) -> RealtimeOutcome:
    """Join a channel listening to the listener's tables; wait for Realtime's verdict."""
    started = time.monotonic()
    verdict: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    def settle(error: str | None) -> None:
        if not verdict.done():
            verdict.set_result(error)

    def on_system(payload: SuccessSystemPayload) -> None:
        if is_confirmation(payload):
            settle(None)

    def on_state(state: RealtimeSubscribeStates, error: Exception | None) -> None:
        if state is not RealtimeSubscribeStates.SUBSCRIBED:
            settle(realtime_error_text(state, error))

    client: AsyncClient | None = None
    try:
        async with asyncio.timeout(timeout_s):
            client = await acreate_client(
                url, key, options=AsyncClientOptions(realtime={"max_retries": 1})
            )
            channel = client.channel(CHANNEL)
            for table in PUBLISHED_TABLES:
                channel.on_postgres_changes(
                    RealtimePostgresChangesListenEvent.All,
                    schema="public",
                    table=table,
                    callback=lambda _: None,
                )
            channel.on_system(on_system)
            await channel.subscribe(on_state)
            error = await verdict
    except TimeoutError:
        return RealtimeOutcome(False, time.monotonic() - started)
    except Exception as exc:  # the socket or the join failed: that is the verdict
        return RealtimeOutcome(False, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.realtime.close(), timeout=5)
    return RealtimeOutcome(error is None, time.monotonic() - started, error)


def realtime_error_text(state: RealtimeSubscribeStates, error: Exception | None) -> str:
    """Realtime's own message when the error carries its system payload, else the state."""
    text = str(error or "")
    with contextlib.suppress(ValueError):
        payload = json.loads(text)
        if isinstance(payload, dict) and isinstance(payload.get("message"), str):
            return str(payload["message"])
    return f"{state.value}: {text}" if text else state.value


async def probe_fly(settings: Settings, http: httpx.AsyncClient) -> FlyApp | FlyError | ValueError:
    """GET the app with the configured token, with little retrying: a doctor answers fast."""
    try:
        fly = FlyClient(
            http,
            app_name=settings.fly_app_name,
            token=settings.fly_api_token,
            base_url=str(settings.fly_api_hostname),
            max_attempts=FLY_ATTEMPTS,
            max_retry_time_s=FLY_RETRY_BUDGET_S,
        )
        return await fly.get_app()
    except (FlyError, ValueError) as exc:
        return exc


# -- the command ---------------------------------------------------------------------------------


class Report:
    """Prints checks as they come, with every known secret masked, and keeps the verdicts."""

    def __init__(self, out: TextIO, secrets: Iterable[str] = ()) -> None:
        self._out = out
        self._secrets = [s for s in secrets if s]
        self.checks: list[Check] = []

    def add(self, *checks: Check) -> Check:
        """Print and keep `checks`; return the last one."""
        for check in checks:
            self.checks.append(check)
            for line in check.lines():
                for secret in self._secrets:
                    line = line.replace(secret, "[redacted]")
                print(line, file=self._out, flush=True)
        return checks[-1]

    def finish(self) -> int:
        """Print the tally; 1 if any check failed, else 0."""
        failed = sum(c.verdict is Verdict.FAIL for c in self.checks)
        warned = sum(c.verdict is Verdict.WARN for c in self.checks)
        tally = f"{failed} failed, {warned} warning(s), {len(self.checks)} check(s)"
        print(f"\n{'Problems found' if failed else 'All good'}: {tally}.", file=self._out)
        return 1 if failed else 0


async def doctor(
    env: Mapping[str, str],
    out: TextIO = sys.stdout,
    *,
    realtime_timeout_s: float = REALTIME_TIMEOUT_S,
) -> int:
    """Run every check against the deployment `env` describes; 0 ok, 1 a failure, 2 bad config."""
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        report = Report(out)
        report.add(*config_checks(exc))
        report.finish()
        return 2
    key = settings.supabase_service_role_key.get_secret_value()
    report = Report(out, [key, settings.fly_api_token.get_secret_value()])
    report.add(Check("config", Verdict.PASS, "every setting is valid"))
    report.add(judge_image(settings.sandbox_image))
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http:
        await check_supabase(report, settings, http, realtime_timeout_s)
        hostname = str(settings.fly_api_hostname).rstrip("/")
        report.add(judge_fly(settings.fly_app_name, hostname, await probe_fly(settings, http)))
    return report.finish()


async def check_supabase(
    report: Report, settings: Settings, http: httpx.AsyncClient, realtime_timeout_s: float
) -> None:
    """The Supabase checks in order; each one runs only if what it needs passed."""
    url = str(settings.supabase_url).rstrip("/")
    key = settings.supabase_service_role_key.get_secret_value()
    rest = f"{url}/rest/v1"
    answer = await probe_rest(http, f"{rest}/coding_sessions?select=id&limit=1", key)
    if report.add(judge_supabase(url, answer)).verdict is Verdict.FAIL:
        reason = "needs a working Supabase connection"
        report.add(*(skipped(n, reason) for n in ("schema", "publication", "realtime")))
        return
    schema, database = judge_schema(await probe_rest(http, rest, key, rpc=DOCTOR_FUNCTION))
    report.add(schema)
    if database is None:
        report.add(skipped("publication", f"needs {DOCTOR_FUNCTION}()"))
    else:
        report.add(judge_publication(database))
    outcome = await probe_realtime(url, key, realtime_timeout_s)
    report.add(judge_realtime(outcome, realtime_timeout_s))
