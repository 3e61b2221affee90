"""SandboxStore: the listener's SQL functions over Supabase RPC, rows parsed into Session models."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
import structlog
from postgrest.exceptions import APIError
from supabase import AsyncClient, AsyncClientOptions, acreate_client
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.wait import WaitBaseT

from listener.errors import ClaimLostError, SessionGoneError, StoreError
from listener.models import (
    Command,
    CommandOutcome,
    CommandStatus,
    SandboxState,
    Session,
    SessionStatus,
    Tombstone,
    clip,
)

if TYPE_CHECKING:
    from listener.metrics import Metrics

log = structlog.get_logger(component="store")

Row = Mapping[str, Any]
TABLE = "coding_sessions"
# Retrying these after the request may have run would claim twice or record twice.
NOT_IDEMPOTENT = frozenset(
    {
        "claim_session",
        "claim_sessions",
        "claim_next_command_with_machine",
        "claim_tombstones",
        "sandbox_record_event",
    }
)
UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
STATS_VIEW = "sandbox_stats"


async def connect(
    url: str, key: str, http: httpx.AsyncClient, *, access_token: str | None = None
) -> AsyncClient:
    """A supabase client over our own httpx client (explicit timeouts; the library's own
    timeout arguments are deprecated). `access_token` acts as a signed-in user instead."""
    headers = {"Authorization": f"Bearer {access_token}"} if access_token else {}
    return await acreate_client(
        url.rstrip("/"), key, options=AsyncClientOptions(httpx_client=http, headers=headers)
    )


class _TransientStoreError(StoreError):
    """Supabase could not be reached or answered 5xx: the call may be repeated."""


class SandboxStore:
    """Reads and changes coding_sessions rows through the atomic SQL functions (service role)."""

    def __init__(
        self,
        client: AsyncClient,
        owner: str,
        *,
        max_attempts: int = 4,
        wait: WaitBaseT | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._client = client
        self.owner = owner
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._wait = wait or (wait_exponential(multiplier=0.1, max=2.0) + wait_random(0, 0.1))

    # -- claims ----------------------------------------------------------------------------

    async def claim(self, session_id: str, lease_s: int, *, force: bool = False) -> Session | None:
        """Claim one session if it is due (or `force`); the row as it stands, None if missing."""
        rows = await self._rpc(
            "claim_session",
            {"p_id": session_id, "p_owner": self.owner, "p_lease_s": lease_s, "p_force": force},
        )
        sessions = await self._sessions(rows)
        return sessions[0] if sessions else None

    async def claim_due(self, lease_s: int, limit: int) -> list[Session]:
        """Claim up to `limit` due sessions; concurrent callers get disjoint sets."""
        rows = await self._rpc(
            "claim_sessions", {"p_owner": self.owner, "p_lease_s": lease_s, "p_limit": limit}
        )
        return await self._sessions(rows)

    async def renew(self, s: Session, lease_s: int) -> Session:
        """Extend this process's lease on a claimed session."""
        return await self._cas(
            "sandbox_renew_lease", s, None, {"p_lease_s": lease_s}, must_hold=True
        )

    async def release(self, s: Session) -> Session:
        """Hand a claim back without changing the state."""
        return await self._cas("sandbox_release", s, None, {})

    # -- transitions (compare-and-set on the epoch) ----------------------------------------

    async def begin_provision(
        self, s: Session, max_lifetime_s: int, max_live_per_user: int = 0
    ) -> Session:
        """requested/provisioning -> provisioning (sets the hard deadline of the new machine),
        or -> failed when the owner already has `max_live_per_user` live sandboxes."""
        return await self._cas(
            "sandbox_begin_provision",
            s,
            None,
            {"p_max_lifetime_s": max_lifetime_s, "p_max_live_per_user": max_live_per_user},
            check=lambda row: row.state in {SandboxState.PROVISIONING, SandboxState.FAILED},
        )

    async def set_machine(self, s: Session, machine_id: str, region: str) -> Session:
        """Record the machine id as soon as Fly returns it."""
        return await self._cas(
            "sandbox_set_machine",
            s,
            SandboxState.PROVISIONING,
            {"p_machine_id": machine_id, "p_region": region},
            check=lambda row: row.sandbox_id == machine_id,
        )

    async def mark_ready(self, s: Session, idle_timeout_s: int, idle_warning_s: int = 0) -> Session:
        """provisioning -> ready; releases the claim."""
        return await self._cas(
            "sandbox_mark_ready",
            s,
            SandboxState.READY,
            {"p_idle_timeout_s": idle_timeout_s, "p_idle_warning_s": idle_warning_s},
        )

    async def mark_idle_warning(self, s: Session) -> Session:
        """Record that the idle warning for the current expiry was given; releases the claim."""
        return await self._cas(
            "sandbox_mark_idle_warning",
            s,
            SandboxState.READY,
            {},
            check=lambda row: row.idle_warning_at is not None,
        )

    async def mark_failed(self, s: Session, error: str, retry_after_s: float | None) -> Session:
        """Back to requested after `retry_after_s`, or failed for good when it is None."""
        target = SandboxState.FAILED if retry_after_s is None else SandboxState.REQUESTED
        retry = None if retry_after_s is None else max(1, round(retry_after_s))
        return await self._cas(
            "sandbox_mark_failed", s, target, {"p_error": error, "p_retry_after_s": retry}
        )

    async def begin_stop(self, s: Session, reason: str) -> Session:
        """-> stopping, with the reason."""
        return await self._cas("sandbox_begin_stop", s, SandboxState.STOPPING, {"p_reason": reason})

    async def mark_destroyed(self, s: Session) -> Session:
        """-> destroyed; releases the claim."""
        return await self._cas("sandbox_mark_destroyed", s, SandboxState.DESTROYED, {})

    # -- reads and the audit ----------------------------------------------------------------

    async def record_event(
        self,
        session_id: str,
        incarnation: str | None,
        epoch: int | None,
        event: str,
        detail: Mapping[str, Any],
    ) -> None:
        """Append to sandbox_events (the dashboard history of every sandbox), readable by the
        owner of that incarnation only."""
        await self._rpc(
            "sandbox_record_event",
            {
                "p_session_id": session_id,
                "p_incarnation": incarnation,
                "p_epoch": epoch,
                "p_event": event,
                "p_detail": detail,
            },
        )

    async def claim_tombstones(
        self, lease_s: int, limit: int, session_id: str | None = None
    ) -> list[Tombstone]:
        """Deleted incarnations whose machines are still to be destroyed (of one session, when
        given); concurrent callers get disjoint sets."""
        rows = await self._rpc(
            "claim_tombstones",
            {
                "p_owner": self.owner,
                "p_lease_s": lease_s,
                "p_limit": limit,
                "p_session_id": session_id,
            },
        )
        return [tombstone_from_row(r) for r in rows]

    async def bury(self, tombstone: Tombstone) -> bool:
        """Forget a tombstone whose machines are destroyed; False if no longer held."""
        return (
            await self._call(
                "sandbox_bury", {"p_incarnation": tombstone.incarnation, "p_owner": self.owner}
            )
            is True
        )

    async def sessions_by_ids(self, ids: Sequence[str]) -> dict[str, Session]:
        """The rows with these ids (missing ids are absent from the result)."""
        if not ids:
            return {}
        rows = await self._rpc("sandbox_sessions_by_ids", {"p_ids": list(ids)})
        return {s.id: s for s in await self._sessions(rows)}

    async def live_sessions(self, limit: int = 10000) -> list[Session]:
        """Rows in provisioning, ready or stopping."""
        rows = await self._rpc("sandbox_live_sessions", {"p_limit": limit})
        return await self._sessions(rows)

    async def due_sessions(self, limit: int = 100) -> list[Session]:
        """Rows due for attention now, without claiming them (for dry runs)."""
        now = datetime.now(UTC).isoformat()
        response = await self._select(
            lambda q: q.lte("sandbox_due_at", now).order("sandbox_due_at").limit(limit)
        )
        return await self._sessions(response)

    async def recent_sessions(self, limit: int = 50) -> list[Session]:
        """Live rows first, then the most recent others (for `status`)."""
        live = await self.live_sessions(limit)
        recent = await self._select(lambda q: q.order("created_at", desc=True).limit(limit))
        seen = {s.id for s in live}
        rest = [s for s in await self._sessions(recent) if s.id not in seen]
        return (live + rest)[:limit]

    # -- the command queue ------------------------------------------------------------------

    async def claim_next_command(self, session_id: str, lease_s: int) -> Command | None:
        """The session's next command to run (FIFO, one at a time, ready sandbox) with the
        machine to run it in, if any."""
        rows = await self._rpc(
            "claim_next_command_with_machine",
            {"p_session_id": session_id, "p_owner": self.owner, "p_lease_s": lease_s},
        )
        return command_from_row(rows[0]) if rows else None

    async def renew_command_lease(self, command: Command, lease_s: int) -> bool:
        """Extend a running command's lease (and count it as activity); False if lost."""
        rows = await self._rpc(
            "renew_command_lease",
            {"p_id": command.id, "p_owner": self.owner, "p_lease_s": lease_s},
        )
        return bool(rows)

    async def finish_command(self, command: Command, outcome: CommandOutcome) -> bool:
        """Write a command's result; False if this process no longer held it."""
        rows = await self._rpc(
            "finish_command",
            {
                "p_id": command.id,
                "p_owner": self.owner,
                "p_status": outcome.status.value,
                "p_exit_code": outcome.exit_code,
                "p_stdout": outcome.stdout,
                "p_stderr": outcome.stderr,
                "p_stdout_truncated": outcome.stdout_truncated,
                "p_stderr_truncated": outcome.stderr_truncated,
                "p_error": outcome.error,
                "p_output_replaced": outcome.output_replaced,
            },
        )
        return bool(rows)

    async def sessions_with_pending_commands(self, limit: int = 1000) -> list[str]:
        """Sessions with a command to run, reject or settle now."""
        rows = await self._call("sessions_with_pending_commands", {"p_limit": limit})
        return [str(r) for r in rows or []]

    async def session_counts(self) -> dict[str, int]:
        """Sessions by sandbox state, from the sandbox_stats view (one query)."""
        rows = await self._select(lambda q: q, table=STATS_VIEW, columns="sessions_by_state")
        counts: Mapping[str, Any] = rows[0]["sessions_by_state"] if rows else {}
        return {str(state): int(n) for state, n in counts.items()}

    async def ping(self) -> None:
        """A cheap read through a listener function: Supabase, the key and the schema answer."""
        await self.live_sessions(limit=0)

    async def take_leader_lease(self, name: str, ttl_s: int) -> bool:
        """Take or renew a named lease (e.g. the sweeper's); True if this process holds it."""
        held = await self._call(
            "take_listener_lease", {"p_name": name, "p_owner": self.owner, "p_ttl_s": ttl_s}
        )
        return held is True

    async def release_leader_lease(self, name: str) -> None:
        """Give a named lease up (on shutdown) so another replica takes over at once."""
        await self._call("release_listener_lease", {"p_name": name, "p_owner": self.owner})

    # -- rows that cannot be read ---------------------------------------------------------

    async def _sessions(self, rows: Sequence[Row]) -> list[Session]:
        """Parse each row on its own: one unreadable row never hides the others; it is failed
        for good with a sentence."""
        sessions: list[Session] = []
        for row in rows:
            try:
                sessions.append(session_from_row(row))
            except StoreError as exc:
                await self._unreadable(row, str(exc))
        return sessions

    async def _unreadable(self, row: Row, problem: str) -> None:
        try:
            session_id, epoch = str(uuid.UUID(str(row["id"]))), int(row["sandbox_epoch"])
        except (KeyError, ValueError, TypeError):
            log.error("session_row_unparseable", problem=problem)  # no id: nothing to fail
            return
        log.warning("session_row_unreadable", session_id=session_id, problem=problem)
        message = (
            f"The listener could not read this session ({problem}); it will not get a sandbox. "
            "Start a new session."
        )
        try:  # a CAS on the epoch it was read at: never fails a row someone has since changed
            args = {"p_id": session_id, "p_epoch": epoch, "p_error": message}
            if await self._rpc("sandbox_fail_unreadable", args) and self._metrics:
                self._metrics.session_failed("unreadable")
        except StoreError as exc:
            log.warning("session_row_fail_failed", session_id=session_id, error=str(exc))

    # -- plumbing -------------------------------------------------------------------------

    async def _cas(
        self,
        fn: str,
        s: Session,
        target: SandboxState | None,
        args: Mapping[str, Any],
        *,
        check: Any = None,
        must_hold: bool = False,
    ) -> Session:
        rows = await self._rpc(fn, {"p_id": s.id, "p_epoch": s.epoch, **args})
        if not rows:
            raise SessionGoneError(s.id, s.epoch)
        parsed = await self._sessions(rows[:1])
        if not parsed:
            raise ClaimLostError(s.id, s.epoch)  # unreadable now: failed, not ours to go on with
        now = parsed[0]
        applied = now.epoch == s.epoch and (target is None or now.state is target)
        if must_hold:
            applied = applied and now.claimed_by == self.owner
        if check is not None:
            applied = applied and check(now)
        if not applied:
            raise ClaimLostError(s.id, s.epoch)
        return now

    async def _select(
        self, refine: Callable[[Any], Any], *, table: str = TABLE, columns: str = "*"
    ) -> list[Row]:
        """A read through PostgREST (service role), errors translated."""
        try:
            response = await refine(self._client.table(table).select(columns)).execute()
        except APIError as exc:
            raise _store_error(f"select {table}", exc) from exc
        except httpx.HTTPError as exc:
            raise StoreError(f"select {table}: {type(exc).__name__}: {exc}") from exc
        rows: list[Row] = response.data
        return rows

    async def _rpc(self, fn: str, args: Mapping[str, Any]) -> list[Row]:
        data = await self._call(fn, args, idempotent=fn not in NOT_IDEMPOTENT)
        if data is None:
            return []
        if isinstance(data, dict):
            return [data]
        if isinstance(data, list):
            return data
        raise StoreError(f"{fn} returned {type(data).__name__}, expected rows")

    async def _call(self, fn: str, args: Mapping[str, Any], *, idempotent: bool = True) -> Any:
        """Call an RPC with bounded retries and translated errors. Idempotent functions are
        retried on transport errors and 5xx; the others only when the request was never sent."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts),
            wait=self._wait,
            retry=retry_if_exception(lambda e: isinstance(e, _TransientStoreError)),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "store_request_retrying", function=fn, attempt=state.attempt_number
            ),
        )
        async for attempt in retrying:
            with attempt:
                try:
                    response = await self._client.rpc(fn, dict(args)).execute()
                except APIError as exc:
                    error = _store_error(fn, exc)
                    if not idempotent and isinstance(error, _TransientStoreError):
                        error = StoreError(str(error))
                    raise error from exc
                except httpx.HTTPError as exc:
                    unsent = isinstance(exc, UNSENT)
                    kind = _TransientStoreError if idempotent or unsent else StoreError
                    raise kind(f"{fn}: {type(exc).__name__}: {exc}") from exc
                return response.data
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover


def _store_error(fn: str, exc: APIError) -> StoreError:
    code = str(exc.code or "")
    message = f"{fn} failed: {exc.message} (code {code})"
    if (code.isdigit() and int(code) >= 500) or code.startswith(("08", "53", "57")):
        return _TransientStoreError(message)
    return StoreError(message)


def session_from_row(row: Row) -> Session:
    """Parse a coding_sessions row (as PostgREST returns it) into a Session."""
    try:
        return Session(
            id=str(row["id"]),
            incarnation=str(row["sandbox_incarnation"]),
            user_id=str(row["user_id"]),
            status=SessionStatus(row["status"]),
            state=SandboxState(row["sandbox_state"]),
            epoch=int(row["sandbox_epoch"]),
            attempts=int(row.get("sandbox_attempts") or 0),
            created_at=_ts(row.get("created_at")),
            last_activity_at=_ts(row.get("last_activity_at")),
            sandbox_id=row.get("sandbox_id"),
            region=row.get("sandbox_region"),
            error=row.get("sandbox_error"),
            claimed_by=row.get("sandbox_claimed_by"),
            lease_expires_at=_ts(row.get("sandbox_lease_expires_at")),
            ready_at=_ts(row.get("sandbox_ready_at")),
            deadline_at=_ts(row.get("sandbox_deadline_at")),
            expires_at=_ts(row.get("sandbox_expires_at")),
            stop_reason=row.get("sandbox_stop_reason"),
            requested_region=row.get("requested_region"),
            requested_memory_mb=row.get("requested_memory_mb"),
            requested_cpus=row.get("requested_cpus"),
            warn_at=_ts(row.get("sandbox_warn_at")),
            idle_warning_at=_ts(row.get("sandbox_idle_warning_at")),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"unreadable coding_sessions row: {clip(str(exc))}") from exc


def tombstone_from_row(row: Row) -> Tombstone:
    """Parse a sandbox_tombstones row."""
    try:
        return Tombstone(
            incarnation=str(row["incarnation"]),
            session_id=str(row["session_id"]),
            sandbox_id=row.get("sandbox_id"),
        )
    except KeyError as exc:
        raise StoreError(f"unreadable sandbox_tombstones row: {exc!r}") from exc


def command_from_row(row: Row) -> Command:
    """Parse a sandbox_commands row into a Command."""
    try:
        return Command(
            id=str(row["id"]),
            session_id=str(row["session_id"]),
            argv=tuple(str(a) for a in row["command"]),
            timeout_s=int(row["timeout_s"]),
            status=CommandStatus(row["status"]),
            stdin=row.get("stdin"),
            machine_id=row.get("sandbox_id"),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"unexpected sandbox_commands row shape: {exc!r}") from exc


def _ts(value: object) -> datetime | None:
    """A timestamp column: null is None; anything else must be a real time (PostgREST sends
    'infinity' and years past 9999 as text Python cannot hold: those rows are unreadable)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"timestamp {clip(repr(value))} is not text")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"timestamp {clip(repr(value))} is not a time the listener can use"
        ) from None
