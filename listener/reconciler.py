"""The state machine: given a row, the observed machines and `now`, what to do. No I/O, no await."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import assert_never

from listener.config import ALLOWED_CPUS, Settings, memory_per_cpu_mb
from listener.errors import (
    FlyCapacityError,
    FlyClientError,
    FlyConflictError,
    FlyError,
    FlyNotFoundError,
    FlyOutcomeUnknownError,
    FlyRateLimitedError,
    FlyServerError,
    FlyStateError,
    FlyTimeoutError,
    FlyUnavailableError,
    StoreError,
)
from listener.models import (
    Command,
    CommandOutcome,
    CommandStatus,
    ExecResult,
    Machine,
    MachineSpec,
    MachineState,
    SandboxState,
    Session,
    SessionStatus,
    StopReason,
    clip,
)

CLOCK_SKEW_S = 2.0


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings the decisions depend on, as plain values."""

    default_region: str
    allowed_regions: frozenset[str]
    cpu_kind: str
    cpus: int
    memory_mb: int
    max_memory_mb: int
    max_cpus: int
    max_attempts: int
    idle_timeout_s: int
    max_lifetime_s: int
    idle_warning_s: int = 0
    retry_base_s: float = 5.0
    retry_max_s: float = 300.0
    orphan_grace_s: float = 120.0
    max_live_per_user: int = 0  # 0: no limit

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        """The policy a running listener applies."""
        return cls(
            default_region=settings.sandbox_region,
            allowed_regions=settings.allowed_regions,
            cpu_kind=settings.sandbox_cpu_kind,
            cpus=settings.sandbox_cpus,
            memory_mb=settings.sandbox_memory_mb,
            max_memory_mb=settings.sandbox_max_memory_mb,
            max_cpus=settings.sandbox_max_cpus,
            max_attempts=settings.listener_max_attempts,
            idle_timeout_s=settings.sandbox_idle_timeout_s,
            max_lifetime_s=settings.sandbox_max_lifetime_s,
            idle_warning_s=settings.sandbox_idle_warning_s,
            retry_base_s=settings.listener_retry_base_s,
            retry_max_s=settings.listener_retry_max_s,
            orphan_grace_s=settings.listener_orphan_grace_s,
            max_live_per_user=settings.sandbox_max_live_per_user,
        )


# -- what to do with a claimed session ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Provision:
    """Create (or adopt) a machine of this spec, wait for it, smoke-test it, mark ready."""

    spec: MachineSpec


@dataclass(frozen=True, slots=True)
class Teardown:
    """Destroy the session's machine and mark the row destroyed."""

    reason: StopReason


@dataclass(frozen=True, slots=True)
class Reject:
    """The row asks for something not allowed: fail it for good with this sentence."""

    error: str


@dataclass(frozen=True, slots=True)
class Warn:
    """The sandbox will be reaped soon for idleness: record the idle warning."""


@dataclass(frozen=True, slots=True)
class Release:
    """Nothing is due: hand the claim back."""


Decision = Provision | Teardown | Reject | Warn | Release


def decide(session: Session, now: datetime, policy: Policy) -> Decision:
    """The next step for a session this process has claimed."""
    state = session.state
    if state.is_final:
        return Release()
    if session.status is SessionStatus.ENDED:
        return Teardown(StopReason.ENDED)
    match state:
        case SandboxState.STOPPING:
            return Teardown(_stop_reason(session.stop_reason))
        case SandboxState.READY:
            reason = expiry_reason(session, now)
            if reason:
                return Teardown(reason)
            return Warn() if idle_warning_due(session, now) else Release()
        case SandboxState.REQUESTED | SandboxState.PROVISIONING:
            spec = machine_spec(session, policy)
            return Reject(spec) if isinstance(spec, str) else Provision(spec)
        case SandboxState.DESTROYED | SandboxState.FAILED:  # pragma: no cover - is_final above
            return Release()
        case _:
            assert_never(state)


def expiry_reason(session: Session, now: datetime) -> StopReason | None:
    """Why a ready sandbox is due for reaping now, if it is (expires_at is kept by the DB)."""
    if session.expires_at is None or session.expires_at > now + timedelta(seconds=CLOCK_SKEW_S):
        return None
    if session.deadline_at is not None and session.deadline_at <= session.expires_at:
        return StopReason.MAX_AGE
    return StopReason.IDLE


def idle_warning_due(session: Session, now: datetime) -> bool:
    """The warning period before the idle expiry has begun and no warning was given for it."""
    warn_at = session.warn_at
    if warn_at is None or warn_at > now + timedelta(seconds=CLOCK_SKEW_S):
        return False
    return session.idle_warning_at is None or session.idle_warning_at < warn_at


def _stop_reason(raw: str | None) -> StopReason:
    try:
        return StopReason(raw or StopReason.OPERATOR)
    except ValueError:
        return StopReason.OPERATOR


def machine_spec(session: Session, policy: Policy) -> MachineSpec | str:
    """The region and size to create, or one sentence naming everything wrong with the request."""
    problems: list[str] = []
    region = session.requested_region or policy.default_region
    if region not in policy.allowed_regions:
        allowed = ", ".join(sorted(policy.allowed_regions))
        problems.append(f"region {clip(repr(region))} is not allowed (allowed: {allowed})")
    cpus = session.requested_cpus or policy.cpus
    allowed_cpus = [c for c in ALLOWED_CPUS if c <= policy.max_cpus]
    if cpus not in allowed_cpus:
        problems.append(f"cpus {cpus} is not one of {', '.join(map(str, allowed_cpus))}")
    memory_mb = session.requested_memory_mb or policy.memory_mb
    per_cpu = memory_per_cpu_mb(policy.cpu_kind)
    ceiling = min(policy.max_memory_mb, per_cpu * max(cpus, 1))
    if memory_mb < 256 or memory_mb % 256 or memory_mb > ceiling:
        problems.append(
            f"memory_mb {memory_mb} must be a multiple of 256 between 256 and {ceiling}"
        )
    if problems:
        return "Requested sandbox is invalid: " + "; ".join(problems) + ". Start a new session."
    return MachineSpec(region=region, cpu_kind=policy.cpu_kind, cpus=cpus, memory_mb=memory_mb)


# -- failures -------------------------------------------------------------------------------


class SmokeTestError(Exception):
    """The machine started but the smoke command did not succeed."""

    def __init__(self, exit_code: int, output: str) -> None:
        self.exit_code = exit_code
        self.output = output
        super().__init__(f"smoke command exited {exit_code}: {output[:200]}")


class MachineLostError(Exception):
    """A ready sandbox's machine no longer runs (host failure or destroyed outside the listener)."""

    def __init__(self, machine_id: str) -> None:
        self.machine_id = machine_id
        super().__init__(f"machine {machine_id} is gone")


def retry_delay_s(attempts: int, error: BaseException, policy: Policy) -> float | None:
    """Seconds until the next provisioning attempt, or None to fail the row for good."""
    if is_permanent(error) or attempts >= policy.max_attempts:
        return None
    return float(min(policy.retry_base_s * 2 ** max(attempts - 1, 0), policy.retry_max_s))


def is_permanent(error: BaseException) -> bool:
    """Errors that another attempt with the same request cannot fix (Fly rejected the request)."""
    transient = FlyNotFoundError | FlyConflictError | FlyRateLimitedError | FlyCapacityError
    return isinstance(error, FlyClientError) and not isinstance(error, transient)


def failure_message(error: BaseException, spec: MachineSpec | None = None) -> str:
    """A sentence a person can act on, for the row's sandbox_error."""
    where = f" ({spec.cpus}x{spec.cpu_kind} {spec.memory_mb} MB in {spec.region})" if spec else ""
    match error:
        case FlyCapacityError():
            return f"Fly has no capacity for this sandbox{where}; try another region or size."
        case FlyRateLimitedError():
            return "Fly rate-limited the listener; it will retry."
        case FlyOutcomeUnknownError() | FlyTimeoutError():
            return f"Fly did not confirm the machine in time{where}: {error.message}."
        case FlyServerError() | FlyUnavailableError():
            return f"Fly's API failed ({error.message}); the listener will retry."
        case FlyClientError():
            return (
                f"Fly rejected the sandbox{where}: {error.message}. Check SANDBOX_IMAGE and size."
            )
        case FlyError():
            return f"Fly error: {error.message}."
        case SmokeTestError():
            return (
                f"The sandbox started but the smoke command exited {error.exit_code}: "
                f"{error.output.strip()[:200]}. Check the image or SANDBOX_SMOKE_COMMAND."
            )
        case MachineLostError():
            return (
                f"The sandbox's machine {error.machine_id} disappeared (host failure or destroyed "
                "outside the listener); a new one will be provisioned."
            )
        case StoreError():
            return f"Supabase call failed: {error}."
        case _:
            return f"Unexpected error: {type(error).__name__}: {error}"


# -- commands ---------------------------------------------------------------------------------


def refuse_command(command: Command, max_timeout_s: int) -> CommandOutcome | None:
    """A command the listener will not run, with the reason; None if it may run."""
    if not 1 <= command.timeout_s <= max_timeout_s:
        return CommandOutcome(
            CommandStatus.REJECTED,
            error=f"timeout_s {command.timeout_s} is outside 1..{max_timeout_s} "
            "(SANDBOX_COMMAND_MAX_TIMEOUT_S); queue it again with a smaller timeout.",
        )
    return None


def truncate(text: str, limit_bytes: int) -> tuple[str, bool]:
    """At most `limit_bytes` of UTF-8 (never splitting a character), and whether it was cut."""
    raw = text.encode(errors="surrogatepass")
    if len(raw) <= limit_bytes:
        return text, False
    return raw[:limit_bytes].decode(errors="ignore"), True


UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL and lone surrogates: not Postgres text


def storable(text: str) -> tuple[str, bool]:
    """Text Postgres can hold (each NUL or lone surrogate becomes U+FFFD), and whether
    anything was replaced."""
    clean = UNSTORABLE.sub("\ufffd", text)
    return clean, clean != text


def command_outcome(result: ExecResult, limit_bytes: int) -> CommandOutcome:
    """A finished run: exit 0 succeeded, anything else failed (a result, not a listener error)."""
    stdout, out_cut = truncate(result.stdout, limit_bytes)
    stderr, err_cut = truncate(result.stderr, limit_bytes)
    stdout, out_replaced = storable(stdout)
    stderr, err_replaced = storable(stderr)
    signal_note = f"killed by signal {result.exit_signal}" if result.exit_signal else None
    return CommandOutcome(
        CommandStatus.SUCCEEDED if result.ok else CommandStatus.FAILED,
        exit_code=result.exit_code,
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=out_cut or result.stdout_truncated,
        stderr_truncated=err_cut or result.stderr_truncated,
        error=signal_note,
        output_replaced=out_replaced or err_replaced,
    )


def unstored_outcome(outcome: CommandOutcome, error: BaseException) -> CommandOutcome:
    """The same result without its output, when the output could not be written: the exit code
    and a true reason survive."""
    return replace(
        outcome,
        stdout=None,
        stderr=None,
        error=f"The command finished but its output could not be stored: {clip(str(error), 300)}",
    )


def command_failure(error: BaseException, command: Command) -> CommandOutcome:
    """A run that produced no result: timed out, or the sandbox could not run it."""
    match error:
        case FlyTimeoutError():
            return CommandOutcome(
                CommandStatus.TIMED_OUT,
                error=f"The command ran longer than its timeout_s ({command.timeout_s} s) "
                "and was stopped.",
            )
        case FlyNotFoundError() | FlyStateError() | FlyConflictError():
            return CommandOutcome(
                CommandStatus.FAILED,
                error=f"The sandbox could not run the command: {error}. "
                "It may have been reaped; check the session's sandbox_state.",
            )
        case _:
            return CommandOutcome(
                CommandStatus.FAILED, error=f"The command could not be run: {error}."
            )


# -- the sweeper's three-way reconcile ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DestroyOrphan:
    """A managed machine that no live session owns: destroy it."""

    machine_id: str
    session_id: str | None
    reason: str
    incarnation: str | None = None


@dataclass(frozen=True, slots=True)
class RecoverLost:
    """A ready session whose machine is gone: re-provision (or fail when out of attempts)."""

    session_id: str
    machine_id: str


SweepAction = DestroyOrphan | RecoverLost


def reconcile(
    machines: Iterable[Machine],
    sessions: Mapping[str, Session],
    live: Iterable[Session],
    now: datetime,
    policy: Policy,
) -> list[SweepAction]:
    """Compare Fly's inventory with the rows; `sessions` holds the rows the machines name."""
    actions: list[SweepAction] = []
    present: set[str] = set()
    for machine in machines:
        if machine.state.is_gone:
            continue
        reason = orphan_reason(machine, sessions.get(machine.session_id or ""), now, policy)
        if reason is None:
            present.add(machine.id)  # an orphan never counts as a session's machine
        else:
            actions.append(
                DestroyOrphan(machine.id, machine.session_id, reason, machine.incarnation)
            )
    for session in live:
        if (
            session.state is SandboxState.READY
            and session.sandbox_id
            and session.sandbox_id not in present
        ):
            actions.append(RecoverLost(session.id, session.sandbox_id))
    return actions


def orphan_reason(
    machine: Machine, session: Session | None, now: datetime, policy: Policy
) -> str | None:
    """Why this managed machine should not exist, or None to leave it alone."""
    if machine.state.is_young or _age_s(machine, now) < policy.orphan_grace_s:
        return None
    if session is None:
        return "session missing"
    if session.state.is_final:
        return f"session {session.state.value}"
    if machine.incarnation != session.incarnation:
        return "other incarnation"  # an earlier (deleted) row with this id, or untagged
    if machine.id == session.sandbox_id:
        return None
    if machine.epoch is not None and machine.epoch < session.epoch:
        return "older epoch"
    return None


def _age_s(machine: Machine, now: datetime) -> float:
    if machine.created_at is None:
        return 0.0
    return (now - machine.created_at).total_seconds()


def pick_machine(
    found: Iterable[Machine], incarnation: str
) -> tuple[Machine | None, list[Machine]]:
    """Of a row incarnation's machines, the live one to keep (newest epoch, then newest) and
    the rest; a machine of any other incarnation is never picked (it is the sweeper's)."""
    live = [m for m in found if not m.state.is_gone and m.incarnation == incarnation]
    oldest = datetime.min.replace(tzinfo=UTC)
    live.sort(key=lambda m: (m.epoch or 0, m.created_at or oldest), reverse=True)
    return (live[0], live[1:]) if live else (None, [])


def is_machine_lost(machine: Machine | None) -> bool:
    """A confirmed observation that the machine no longer runs (not merely missing from a list)."""
    return machine is None or machine.state in {
        MachineState.DESTROYED,
        MachineState.DESTROYING,
        MachineState.FAILED,
        MachineState.STOPPED,
    }
