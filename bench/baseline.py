"""The original design, as a baseline to measure the listener against: one job at a time, 3
retries, an in-memory session map, Realtime events only (no catch-up scan, no sweeper) and
destroy-all on shutdown.

Run: python -m bench.baseline, with the listener's environment (same settings, same FlyClient,
same supabase client; only the design differs). Prints `subscribed` once Realtime confirms.

What it does, and deliberately nothing more:
- INSERT event of a requested row -> queue a provision job; the one worker creates a machine
  (same config and metadata as the listener), waits for `started`, runs the smoke command and
  writes `ready` + the machine id to the row. Any failure is retried 3 times (0.5/1/2 s apart);
  a machine the failed attempt knows of is destroyed first. Then the row is marked `failed`.
- UPDATE event to status `ended`, or DELETE event -> destroy the machine the map holds for it
  and mark the row destroyed. A session not in the map (e.g. provisioned by an earlier process)
  is left alone: the map is all it knows.
- SIGTERM/SIGINT -> destroy every machine in the map, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import structlog
from realtime.message import SuccessSystemPayload
from realtime.types import PostgresChangesPayload, RealtimePostgresChangesListenEvent
from supabase import AsyncClient

from listener.config import Settings
from listener.fly import FlyClient, machine_config
from listener.logs import configure_logging
from listener.models import MANAGED_BY, MachineState
from listener.realtime import is_confirmation
from listener.store import connect

log = structlog.get_logger(component="baseline")

RETRIES = 3
RETRY_DELAYS_S = (0.5, 1.0, 2.0)
START_TIMEOUT_S = 60.0
SMOKE_TIMEOUT_S = 30
HTTP_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
TABLE = "coding_sessions"
ALL = RealtimePostgresChangesListenEvent.All


@dataclass(frozen=True, slots=True)
class Job:
    kind: str  # provision | teardown
    session_id: str
    reason: str = ""


@dataclass
class Baseline:
    """The original worker: a queue of events and one job at a time."""

    fly: FlyClient
    db: AsyncClient
    settings: Settings
    machines: dict[str, str] = field(default_factory=dict)  # session id -> machine id
    queue: asyncio.Queue[Job] = field(default_factory=asyncio.Queue)

    def changed(self, payload: PostgresChangesPayload) -> None:
        """Realtime callback: turn an event into a job."""
        data = payload.get("data") or {}
        record = data.get("record") or {}
        kind = data.get("type")
        if kind == "INSERT" and record.get("sandbox_state") == "requested":
            self.queue.put_nowait(Job("provision", str(record["id"])))
        elif kind == "UPDATE" and record.get("status") == "ended":
            self.queue.put_nowait(Job("teardown", str(record["id"]), "ended"))
        elif kind == "DELETE":
            old = data.get("old_record") or {}
            if old.get("id"):
                self.queue.put_nowait(Job("teardown", str(old["id"]), "deleted"))

    async def work(self, stop: asyncio.Event) -> None:
        """Run jobs one at a time until `stop`."""
        while not stop.is_set():
            getter = asyncio.ensure_future(self.queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not getter.done():
                getter.cancel()
                return
            job = getter.result()
            try:
                if job.kind == "provision":
                    await self.provision(job.session_id)
                else:
                    await self.teardown(job.session_id, job.reason)
            except Exception:
                log.exception("baseline_job_failed", session_id=job.session_id, kind=job.kind)

    async def provision(self, session_id: str) -> None:
        error: Exception | None = None
        for attempt in range(RETRIES + 1):
            if attempt:
                await asyncio.sleep(RETRY_DELAYS_S[attempt - 1])
            machine_id: str | None = None
            try:
                machine = await self.fly.create_machine(self._config(session_id), region=None)
                machine_id = machine.id
                await self.fly.wait_for_state(
                    machine.id, MachineState.STARTED, timeout_s=START_TIMEOUT_S, known=machine
                )
                result = await self.fly.exec(
                    machine.id,
                    shlex.split(self.settings.sandbox_smoke_command),
                    timeout_s=SMOKE_TIMEOUT_S,
                )
                if not result.ok:
                    raise RuntimeError(f"smoke command exited {result.exit_code}")
            except Exception as exc:
                error = exc
                log.warning("baseline_attempt_failed", session_id=session_id, error=str(exc))
                if machine_id is not None:
                    with contextlib.suppress(Exception):
                        await self.fly.destroy(machine_id, force=True)
                continue
            self.machines[session_id] = machine.id
            await self._write(
                session_id,
                sandbox_state="ready",
                sandbox_id=machine.id,
                sandbox_region=machine.region,
                sandbox_ready_at=_now(),
            )
            return
        await self._write(session_id, sandbox_state="failed", sandbox_error=str(error))

    async def teardown(self, session_id: str, reason: str) -> None:
        machine_id = self.machines.pop(session_id, None)
        if machine_id is None:
            return
        await self.fly.destroy(machine_id, force=True)
        if reason != "deleted":
            await self._write(
                session_id,
                sandbox_state="destroyed",
                sandbox_stop_reason=reason,
                sandbox_destroyed_at=_now(),
            )

    async def destroy_all(self) -> None:
        for session_id in list(self.machines):
            with contextlib.suppress(Exception):
                await self.teardown(session_id, "shutdown")

    def _config(self, session_id: str) -> dict[str, object]:
        s = self.settings
        return dict(
            machine_config(
                s.sandbox_image,
                cpu_kind=s.sandbox_cpu_kind,
                cpus=s.sandbox_cpus,
                memory_mb=s.sandbox_memory_mb,
                env={"SESSION_ID": session_id},
                metadata={"session_id": session_id, "epoch": "0", "managed_by": MANAGED_BY},
            )
        )

    async def _write(self, session_id: str, **columns: object) -> None:
        await self.db.table(TABLE).update(columns).eq("id", session_id).execute()


def _now() -> str:
    return datetime.now(UTC).isoformat()


async def run(settings: Settings, stop: asyncio.Event) -> None:
    async with (
        httpx.AsyncClient(timeout=HTTP_TIMEOUT) as fly_http,
        httpx.AsyncClient(timeout=HTTP_TIMEOUT) as db_http,
    ):
        db = await connect(
            str(settings.supabase_url),
            settings.supabase_service_role_key.get_secret_value(),
            db_http,
        )
        baseline = Baseline(FlyClient.from_settings(settings, fly_http), db, settings)

        def on_system(payload: SuccessSystemPayload) -> None:
            if is_confirmation(payload):  # the database subscription is live
                print("subscribed", flush=True)

        channel = db.channel("baseline")
        channel.on_postgres_changes(ALL, schema="public", table=TABLE, callback=baseline.changed)
        channel.on_system(on_system)
        await channel.subscribe()
        try:
            await baseline.work(stop)
        finally:
            await baseline.destroy_all()
            await db.realtime.close()


def main() -> int:
    settings = Settings.from_env(os.environ)
    configure_logging(settings.log_level, settings.log_format)

    async def body() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    asyncio.run(body())
    return 0


if __name__ == "__main__":
    sys.exit(main())
