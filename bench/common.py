"""Shared bench plumbing: machine facts, percentiles, result files, the local stack with a log of
the Fly requests it answered, child processes (listener, probe, baseline) and their metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import structlog
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bench.report import machine_facts
from listener.config import Settings
from listener.fly import FlyClient, fly_rate_limiter, machine_config
from listener.local.stack import LocalStack, StackInfo, StackThread, create_user
from listener.models import MANAGED_BY
from listener.ratelimit import Rate
from listener.server import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
LOG_DIR = RESULTS_DIR / "logs"
BENCH_EMAIL = "bench@example.com"
MACHINE_PATH = re.compile(r"^/v1/apps/[^/]+/machines(?:/(?P<id>[^/]+)(?P<rest>/.*)?)?$")
# Fly's documented limits, which the emulator and the client both enforce by default.
FLY_RATE_PER_S = 1.0
FLY_BURST = 3
UNLIMITED = {"FLY_RATE_PER_S": "100000", "FLY_BURST": "100000"}
CREATE_CONCURRENCY = 32
DRAIN_TIMEOUT_S = 300.0


# -- facts and figures ------------------------------------------------------------------------


def percentiles(samples_ms: Iterable[float]) -> dict[str, float]:
    """n, min, p50, p90, p99 (nearest rank) and max of latencies in milliseconds."""
    ordered = sorted(samples_ms)
    if not ordered:
        return {"n": 0}

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p * len(ordered)) - 1)], 2)

    return {
        "n": len(ordered),
        "min_ms": round(ordered[0], 2),
        "p50_ms": rank(0.50),
        "p90_ms": rank(0.90),
        "p99_ms": rank(0.99),
        "max_ms": round(ordered[-1], 2),
    }


def write_result(path: Path, payload: Mapping[str, Any]) -> None:
    """Write one benchmark's JSON with the machine it ran on (load average at the end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**payload, "machine": machine_facts()}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def quiet_logs() -> None:
    """Warnings only from the stack and the bench itself, as a deployment would log."""
    logging.basicConfig(level=logging.WARNING)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


# -- the Fly request log ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlyRequest:
    """One API call the emulator answered, with perf_counter times (CLOCK_MONOTONIC, so they
    compare across processes on one host): when it reached the app and when the answer began."""

    operation: str
    machine_id: str | None
    session_id: str | None
    status: int
    arrived: float
    answered: float


def classify(method: str, path: str) -> tuple[str, str | None] | None:
    """(operation, machine id) of a Machines API request; None for anything else."""
    match = MACHINE_PATH.match(path)
    if match is None:
        return None
    machine_id, rest = match.group("id"), match.group("rest") or ""
    if machine_id is None:
        return ("create" if method == "POST" else "list"), None
    if not rest:
        return {"GET": "get", "DELETE": "destroy"}.get(method, method.lower()), machine_id
    return rest.strip("/").split("/")[0], machine_id


class FlyRequestLog:
    """ASGI middleware on the emulator: appends a FlyRequest per Machines API call. The session
    of a create comes from its body's metadata, of any other call from the machine it names."""

    def __init__(self, app: ASGIApp, sink: list[FlyRequest]) -> None:
        self.app = app
        self.sink = sink
        self.sessions: dict[str, str] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = classify(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if kind is None:
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()
        operation, machine_id = kind
        sent: list[bytes] = []
        received: list[bytes] = []
        answer: dict[str, Any] = {}

        async def tap_receive() -> Message:
            message = await receive()
            received.append(message.get("body", b""))
            return message

        async def tap_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.update(status=message["status"], at=time.perf_counter())
            elif operation == "create":
                sent.append(message.get("body", b""))
            await send(message)

        await self.app(scope, tap_receive, tap_send)
        session_id = self.sessions.get(machine_id or "")
        if operation == "create" and answer.get("status") == 200:
            machine_id, session_id = _created(b"".join(received), b"".join(sent))
            if machine_id and session_id:
                self.sessions[machine_id] = session_id
        status = int(answer.get("status", 0))
        self.sink.append(
            FlyRequest(operation, machine_id, session_id, status, arrived, answer.get("at", 0.0))
        )


def _created(request: bytes, response: bytes) -> tuple[str | None, str | None]:
    try:
        machine = json.loads(response)
        metadata = json.loads(request)["config"].get("metadata") or {}
    except (ValueError, KeyError, TypeError):
        return None, None
    return machine.get("id"), metadata.get("session_id")


def request_counts(requests: Iterable[FlyRequest]) -> dict[str, int]:
    """Calls by operation (every status)."""
    counts: dict[str, int] = {}
    for r in requests:
        counts[r.operation] = counts.get(r.operation, 0) + 1
    return dict(sorted(counts.items()))


# -- the stack --------------------------------------------------------------------------------


@dataclass
class BenchStack:
    """A LocalStack (own Postgres) on a background loop, with the Fly request log installed."""

    thread: StackThread
    requests: list[FlyRequest] = field(default_factory=list)

    @classmethod
    def start(cls, **knobs: Any) -> BenchStack:
        """Start a fresh stack; `knobs` are emulator options (fly_knobs.RUNTIME_KNOBS)."""
        running = cls(StackThread(LocalStack()))
        fly = running.thread.stack.fly
        assert fly is not None
        # Starlette builds its middleware stack on the first request; none has been made yet.
        fly.app.add_middleware(FlyRequestLog, sink=running.requests)
        if knobs:
            running.set_knobs(**knobs)
        return running

    @property
    def info(self) -> StackInfo:
        return self.thread.info

    @property
    def db_url(self) -> str:
        return self.thread.info.db_url

    def set_knobs(self, **knobs: Any) -> None:
        """Change emulator knobs on the stack's loop (also resets its rate-limit buckets)."""
        fly = self.thread.stack.fly
        assert fly is not None

        async def apply() -> None:
            fly.set_options(**knobs)

        self.thread.call(apply)

    def call_counts(self) -> dict[str, int]:
        """Emulator API calls by operation (all statuses)."""
        fly = self.thread.stack.fly
        assert fly is not None
        counts: dict[str, int] = {}
        for (operation, _), n in fly.call_counts().items():
            counts[operation] = counts.get(operation, 0) + n
        return dict(sorted(counts.items()))

    def status_counts(self) -> dict[str, int]:
        """Emulator API calls by `operation status`."""
        fly = self.thread.stack.fly
        assert fly is not None
        return {f"{op} {st}": n for (op, st), n in sorted(fly.call_counts().items())}

    def reset(self) -> None:
        """Empty the tables and the emulator's call counts and request log."""
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute(
                "truncate coding_sessions, sandbox_events, sandbox_commands, listener_leases"
            )
        fly = self.thread.stack.fly
        assert fly is not None

        async def clear() -> None:
            fly.reset_stats()
            self.requests.clear()

        self.thread.call(clear)

    def close(self) -> None:
        self.thread.close()


def insert_sessions(db_url: str, user_id: uuid.UUID, n: int) -> tuple[list[str], float, float]:
    """Insert `n` requested sessions in one transaction as the superuser; return their ids and
    the wall-clock and perf_counter times at which the commit returned. The commit is
    synchronous, as on Supabase (the local stack's server default is off, which delays
    Realtime by up to a few WAL-writer rounds of 200 ms)."""
    ids = [str(uuid.uuid4()) for _ in range(n)]
    with psycopg.connect(db_url, options="-c synchronous_commit=on") as conn:
        conn.execute(
            "insert into coding_sessions (id, user_id) select unnest(%s::uuid[]), %s",
            (ids, user_id),
        )
        conn.commit()
        return ids, time.time(), time.perf_counter()


def state_counts(db_url: str, ids: Sequence[str] | None = None) -> dict[str, int]:
    """coding_sessions rows by sandbox_state (all, or just `ids`)."""
    where = "" if ids is None else " where id = any(%s::uuid[])"
    with psycopg.connect(db_url) as conn:
        found = conn.execute(
            f"select sandbox_state, count(*) from coding_sessions{where} group by 1",
            () if ids is None else (list(ids),),
        ).fetchall()
    return {str(state): int(n) for state, n in found}


def track_function_calls(db_url: str) -> None:
    """Count calls of the SQL functions from now on (the listener's RPCs are functions)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("alter system set track_functions = 'pl'")
        conn.execute("select pg_reload_conf()")
        conn.execute("select pg_stat_reset()")


def function_calls(db_url: str, quiet_s: float = 11.0, timeout_s: float = 40.0) -> dict[str, int]:
    """Calls per public SQL function (not triggers), once the counts have not moved for
    `quiet_s` (an idle backend reports its counts within 10 s: PGSTAT_IDLE_INTERVAL)."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, int] = {}
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        with psycopg.connect(db_url) as conn:
            found = conn.execute(
                "select f.funcname, f.calls from pg_stat_user_functions f"
                " join pg_proc p on p.oid = f.funcid"
                " where f.schemaname = 'public' and p.prorettype <> 'trigger'::regtype"
                " order by 1"
            ).fetchall()
        counts = {str(name): int(n) for name, n in found}
        if counts != last:
            last, stable_since = counts, time.monotonic()
        elif time.monotonic() - stable_since >= quiet_s:
            break
        time.sleep(1.0)
    return last


def bench_user(db_url: str) -> uuid.UUID:
    return create_user(db_url, BENCH_EMAIL)


def unlimited_fly(settings: Settings, http: httpx.AsyncClient) -> FlyClient:
    huge = Rate(1e9, 10**9)
    return FlyClient(
        http,
        app_name=settings.fly_app_name,
        token=settings.fly_api_token,
        base_url=str(settings.fly_api_hostname),
        limiter=fly_rate_limiter(huge, huge),
    )


async def create_machines(fly: FlyClient, session_ids: list[str], image: str) -> list[str]:
    """One machine per session through the emulator's API, `CREATE_CONCURRENCY` at a time."""
    gate = asyncio.Semaphore(CREATE_CONCURRENCY)

    async def one(session_id: str) -> str:
        config = machine_config(
            image, metadata={"session_id": session_id, "epoch": "1", "managed_by": MANAGED_BY}
        )
        async with gate:
            return (await fly.create_machine(config, region=None)).id

    return list(await asyncio.gather(*(one(s) for s in session_ids)))


def insert_ready(db_url: str, user: uuid.UUID, sessions: list[str], machines: list[str]) -> None:
    """Ready rows for these sessions and machines (as a listener would have left them)."""
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "insert into coding_sessions (id, user_id, sandbox_state, sandbox_id, sandbox_region,"
            " sandbox_epoch, sandbox_attempts, sandbox_ready_at, sandbox_idle_timeout_s,"
            " sandbox_deadline_at)"
            " select s, %s, 'ready', m, 'iad', 1, 1, now(), 3600, now() + interval '4 hours'"
            " from unnest(%s::uuid[], %s::text[]) as t(s, m)",
            (user, sessions, machines),
        )


def seed_ready_sessions(
    stack: BenchStack, settings: Settings, user: uuid.UUID, n: int
) -> list[str]:
    """`n` ready sessions with their machines (created through the emulator's API, rate limits
    lifted on both sides); returns the session ids."""
    sessions = [str(uuid.uuid4()) for _ in range(n)]

    async def make() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as http:
            return await create_machines(
                unlimited_fly(settings, http), sessions, settings.sandbox_image
            )

    stack.set_knobs(rate_limits=False)
    machines = asyncio.run(make())
    insert_ready(stack.db_url, user, sessions, machines)
    return sessions


def drain_realtime(stack: BenchStack, changes: int) -> None:
    """Wait until the Realtime gateway (in this process) has handled `changes` row changes,
    so decoding the inserts' WAL does not compete with the measurements."""
    gateway = stack.thread.stack.realtime
    assert gateway is not None
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while gateway.stats["changes_seen"] < changes and time.monotonic() < deadline:
        time.sleep(0.2)


# -- child processes --------------------------------------------------------------------------


def listener_env(info: StackInfo, **settings: str) -> dict[str, str]:
    """The environment of a child listener against this stack: production defaults unless
    `settings` say otherwise, JSON logs at warning."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        **info.env(),
        "SANDBOX_IMAGE": "registry.fly.io/sandbox:bench",
        "SANDBOX_MAX_LIVE_PER_USER": "0",  # every bench session belongs to one simulated user
        "LOG_LEVEL": "warning",
        "LOG_FORMAT": "json",
        **settings,
    }


class Child:
    """`python -m <module> [args]` as a child process, its output in a log file."""

    def __init__(
        self,
        module: str,
        args: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        pipe_stdout: bool = False,
    ) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=dict(env),
            cwd=REPO_ROOT,
            bufsize=0,  # unbuffered, so select() on the pipe never misses a buffered line
            stdout=subprocess.PIPE if pipe_stdout else self._log,
            stderr=self._log if pipe_stdout else subprocess.STDOUT,
        )

    def read_line(self, timeout_s: float) -> str:
        """The next line the child printed (with `pipe_stdout`); TimeoutError after `timeout_s`."""
        stream = self.proc.stdout
        assert stream is not None, "started without pipe_stdout"
        ready, _, _ = select.select([stream], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"{self.log_path.name}: no output for {timeout_s}s")
        line = stream.readline()
        if not line:
            raise RuntimeError(f"child exited {self.proc.wait()}: see {self.log_path}")
        return line.decode().strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) of the child, in kB, from /proc."""
        found: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in {"VmRSS", "VmHWM"}:
                    found[key] = int(value.split()[0])
        return found

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self, timeout_s: float = 30) -> int:
        """SIGTERM and wait for the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._log.close()


class ListenerChild(Child):
    """`python -m listener run` (or an instrumented `module` that runs it) with its health port,
    so /readyz and /metrics can be read from outside."""

    def __init__(
        self,
        info: StackInfo,
        log_path: Path,
        settings: Mapping[str, str] | None = None,
        *,
        module: str = "listener",
        pipe_stdout: bool = False,
    ) -> None:
        self.port = free_port()
        env = listener_env(info, LISTENER_HTTP_PORT=str(self.port), **(settings or {}))
        args = ["run"] if module == "listener" else []
        super().__init__(module, args, env, log_path, pipe_stdout=pipe_stdout)

    def wait_ready(self, timeout_s: float = 30) -> None:
        """Until /readyz says the Realtime subscription is confirmed."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"listener exited {self.proc.returncode}: {self.log_path}")
                try:
                    if http.get(f"http://127.0.0.1:{self.port}/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"listener not ready after {timeout_s}s: {self.log_path}")

    def metrics(self) -> dict[str, float]:
        """The listener's Prometheus metrics: `name{label="v",...}` -> value."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out


def metric(values: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total
