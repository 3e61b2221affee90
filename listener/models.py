"""Domain values: frozen dataclasses and enums for machines, sandboxes, commands and actions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

MANAGED_BY = "sandbox-listener"
ECHO_LIMIT = 64  # characters of a value someone sent, when it is quoted back


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """A value a user (or Fly) sent, as it may be echoed into errors, logs and events."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


MAX_EPOCH = 2**63 - 1  # sandbox_epoch is a Postgres bigint


class MachineState(StrEnum):
    """Fly Machine states (persistent, transient and terminal) as the API reports them."""

    CREATING = "creating"
    CREATED = "created"
    STARTING = "starting"
    STARTED = "started"
    STOPPING = "stopping"
    STOPPED = "stopped"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    RESTARTING = "restarting"
    UPDATING = "updating"
    REPLACING = "replacing"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"
    LAUNCH_FAILED = "launch_failed"
    REPLACED = "replaced"
    MIGRATED = "migrated"
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: str | None) -> MachineState:
        """Map a wire value to a state; anything unrecognised is UNKNOWN, never an exception."""
        try:
            return cls(value or "unknown")
        except ValueError:
            return cls.UNKNOWN

    @property
    def is_gone(self) -> bool:
        """The machine no longer exists or is on its way out."""
        return self in {MachineState.DESTROYING, MachineState.DESTROYED}

    @property
    def is_young(self) -> bool:
        """Still coming up: never reap as stale."""
        return self in {
            MachineState.CREATING,
            MachineState.CREATED,
            MachineState.STARTING,
            MachineState.REPLACING,
            MachineState.UPDATING,
        }


@dataclass(frozen=True, slots=True)
class Machine:
    """A Fly Machine as the listener needs to see it."""

    id: str
    state: MachineState
    region: str
    instance_id: str
    name: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    nonce: str | None = None

    @property
    def session_id(self) -> str | None:
        """The coding session this machine was created for, from its metadata."""
        return self.metadata.get("session_id")

    @property
    def incarnation(self) -> str | None:
        """The row incarnation this machine was created for, from its metadata."""
        return self.metadata.get("incarnation")

    @property
    def epoch(self) -> int | None:
        """The claim epoch it was created under, from its metadata."""
        raw = self.metadata.get("epoch")
        if raw is None or not (raw.isascii() and raw.isdigit()):
            return None  # str.isdigit alone lets "²" through, which int() refuses
        epoch = int(raw)
        return epoch if epoch <= MAX_EPOCH else None


@dataclass(frozen=True, slots=True)
class ExecResult:
    """A command's result from Fly exec (HTTP 200 is not success); whether each output was cut."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""
    exit_signal: int | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        """The command exited 0 and was not killed by a signal."""
        return self.exit_code == 0 and not self.exit_signal


@dataclass(frozen=True, slots=True)
class Lease:
    """A Fly machine lease: the nonce authorises mutating calls while it is held."""

    nonce: str
    expires_at: int
    owner: str = ""
    description: str = ""


class SessionStatus(StrEnum):
    """What the app wants: a live session or an ended one."""

    ACTIVE = "active"
    ENDED = "ended"


class SandboxState(StrEnum):
    """Where the session's sandbox is in its life (written only by the listener)."""

    REQUESTED = "requested"
    PROVISIONING = "provisioning"
    READY = "ready"
    STOPPING = "stopping"
    DESTROYED = "destroyed"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        """No machine is wanted or expected any more."""
        return self in {SandboxState.DESTROYED, SandboxState.FAILED}


class StopReason(StrEnum):
    """Why a sandbox was torn down (the row's sandbox_stop_reason)."""

    ENDED = "ended"
    DELETED = "deleted"
    IDLE = "idle"
    MAX_AGE = "max_age"
    LOST = "lost"
    SHUTDOWN = "shutdown"
    OPERATOR = "operator"


@dataclass(frozen=True, slots=True)
class Session:
    """A coding_sessions row as the listener reads it."""

    id: str
    incarnation: str  # server-made, never reused: what names this row's machine
    user_id: str
    status: SessionStatus
    state: SandboxState
    epoch: int
    attempts: int = 0
    created_at: datetime | None = None
    last_activity_at: datetime | None = None
    sandbox_id: str | None = None
    region: str | None = None
    error: str | None = None
    claimed_by: str | None = None
    lease_expires_at: datetime | None = None
    ready_at: datetime | None = None
    deadline_at: datetime | None = None
    expires_at: datetime | None = None
    stop_reason: str | None = None
    requested_region: str | None = None
    requested_memory_mb: int | None = None
    requested_cpus: int | None = None
    warn_at: datetime | None = None
    idle_warning_at: datetime | None = None

    def claimed_by_me(self, owner: str, epoch: int | None = None) -> bool:
        """Whether `owner` holds this row's claim (at `epoch`, when given)."""
        return self.claimed_by == owner and (epoch is None or self.epoch == epoch)


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A deleted session incarnation whose machines are still to be destroyed."""

    incarnation: str
    session_id: str
    sandbox_id: str | None = None


@dataclass(frozen=True, slots=True)
class MachineSpec:
    """What to ask Fly for: a validated region and guest size."""

    region: str
    cpu_kind: str
    cpus: int
    memory_mb: int


class CommandStatus(StrEnum):
    """Where a queued command is (sandbox_commands.status)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Command:
    """A sandbox_commands row as the runner needs it."""

    id: str
    session_id: str
    argv: tuple[str, ...]
    timeout_s: int
    status: CommandStatus
    stdin: str | None = None
    machine_id: str | None = None  # the session's sandbox when the command was claimed


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """What to write back when a command ends (a finished or a refused run)."""

    status: CommandStatus
    exit_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    error: str | None = None
    output_replaced: bool = False  # bytes text cannot hold were stored as U+FFFD
