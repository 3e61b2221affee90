"""The Fly emulator's request parsing: raw JSON and query in, typed specs or a readable 4xx out."""

from __future__ import annotations

import copy
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from listener.local.fly_state import JSON, SETTLED, ApiError, MachineRecord, error
from listener.models import MachineState as S

WAITABLE = frozenset({"started", "stopped", "suspended", "destroyed", "failed", "settled"})
STOP_SIGNALS = frozenset(
    {"SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGTERM"}
)
RESTART_POLICIES = frozenset({"no", "always", "on-failure", "spot-price"})
MAX_WAIT_S = 60


@dataclass(frozen=True, slots=True)
class CreateSpec:
    config: JSON
    region: str
    name: str | None
    skip_launch: bool
    lease_ttl_s: int | None


def parse_create(body: object, default_region: str) -> CreateSpec:
    request = _object(body, "request body")
    config = copy.deepcopy(_object(request.get("config"), "config"))
    image = config.get("image")
    if not isinstance(image, str) or not image.strip():
        raise error(400, "invalid_argument: config.image is required")
    config["guest"] = parse_guest(config.get("guest"))
    config.setdefault("metadata", {})
    for key in ("env", "metadata"):
        value = config.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise error(400, f"invalid_argument: config.{key} must map strings to strings")
    restart = config.get("restart", {})
    if not isinstance(restart, dict) or restart.get("policy", "on-failure") not in RESTART_POLICIES:
        raise error(
            400,
            f"invalid_argument: config.restart.policy must be one of {sorted(RESTART_POLICIES)}",
        )
    if not isinstance(config.get("auto_destroy", False), bool):
        raise error(400, "invalid_argument: config.auto_destroy must be a boolean")
    region = request.get("region") or default_region
    name = request.get("name")
    skip_launch = request.get("skip_launch", False)
    lease_ttl = request.get("lease_ttl")
    if not isinstance(region, str) or not (name is None or (isinstance(name, str) and name)):
        raise error(400, "invalid_argument: region and name must be non-empty strings")
    if not isinstance(skip_launch, bool) or not _whole(lease_ttl, 1, optional=True):
        raise error(400, "invalid_argument: skip_launch must be a boolean, lease_ttl seconds > 0")
    return CreateSpec(config, region, name, skip_launch, lease_ttl)


def parse_guest(raw: object) -> JSON:
    """Fill the guest defaults and enforce Fly's sizes (memory per CPU, multiples of 256 MB)."""
    guest = dict(_object(raw, "config.guest")) if raw is not None else {}
    kind = guest.setdefault("cpu_kind", "shared")
    cpus = guest.setdefault("cpus", 1)
    if kind not in {"shared", "performance"}:
        raise error(422, f"invalid guest: cpu_kind {kind!r} is not 'shared' or 'performance'")
    if not _whole(cpus, 1):
        raise error(422, f"invalid guest: cpus must be an integer >= 1, got {cpus!r}")
    low, high = (256, 2048 * cpus) if kind == "shared" else (2048 * cpus, 8192 * cpus)
    memory = guest.setdefault("memory_mb", low)
    if not _whole(memory, 1) or memory % 256:
        raise error(422, f"invalid guest: memory_mb must be a multiple of 256, got {memory!r}")
    if not low <= memory <= high:
        raise error(
            422,
            f"invalid guest: memory_mb {memory} is outside {low}..{high} for {cpus} {kind} CPU(s)",
        )
    return guest


@dataclass(frozen=True, slots=True)
class WaitSpec:
    states: tuple[str, ...]
    timeout_s: int
    version: str | None

    def reached(self, state: S) -> bool:
        return state.value in self.states or ("settled" in self.states and state in SETTLED)

    def timeout_error(self, state: S) -> ApiError:
        wanted = ",".join(self.states)
        return error(
            408, f"machine failed to reach desired state, {wanted}, currently {state.value}"
        )


def parse_wait(
    states: Iterable[str], timeout: str | None, version: str | None, *, strict: bool
) -> WaitSpec:
    wanted = tuple(dict.fromkeys(s.strip() for raw in states for s in raw.split(",") if s.strip()))
    unknown = [s for s in wanted if s not in WAITABLE]
    if unknown:
        raise error(
            400,
            f"invalid_argument: cannot wait for {unknown[0]!r}; use one of {sorted(WAITABLE)}",
        )
    timeout_s = MAX_WAIT_S if timeout is None else int(timeout) if timeout.isdigit() else -1
    if not 1 <= timeout_s <= MAX_WAIT_S:
        raise error(
            400,
            f"invalid_argument: timeout must be whole seconds in 1..{MAX_WAIT_S}, got {timeout!r}",
        )
    if strict and "stopped" in wanted and not version:
        raise error(400, "instance_id required when waiting for stopped machine")
    return WaitSpec(wanted or ("started",), timeout_s, version or None)


@dataclass(frozen=True, slots=True)
class ListFilter:
    include_deleted: bool = False
    states: frozenset[str] = frozenset()
    region: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    summary: bool = False

    def matches(self, machine: MachineRecord) -> bool:
        return (
            (self.include_deleted or machine.state != S.DESTROYED)
            and (not self.states or machine.state.value in self.states)
            and (self.region is None or machine.region == self.region)
            and all(machine.metadata.get(k) == v for k, v in self.metadata)
        )


def parse_list(params: Iterable[tuple[str, str]]) -> ListFilter:
    pairs = list(params)
    first = {k: v for k, v in reversed(pairs)}
    return ListFilter(
        include_deleted=_truthy(first.get("include_deleted")),
        states=frozenset(s.strip() for s in first.get("state", "").split(",") if s.strip()),
        region=first.get("region") or None,
        metadata=tuple(
            (k.removeprefix("metadata."), v) for k, v in pairs if k.startswith("metadata.")
        ),
        summary=_truthy(first.get("summary")),
    )


@dataclass(frozen=True, slots=True)
class ExecSpec:
    argv: tuple[str, ...]
    stdin: bytes | None
    timeout_s: float


def parse_exec(body: object, max_s: float) -> ExecSpec:
    """`command` (argv) or the deprecated `cmd` string; a timeout is capped by `max_s`."""
    request = _object(body, "request body")
    command = request.get("command")
    if command is None and isinstance(request.get("cmd"), str):
        command = shlex.split(request["cmd"])
    if not isinstance(command, list) or not command or not command[0]:
        raise error(400, "invalid_argument: command must be a non-empty array of strings")
    if not all(isinstance(a, str) for a in command):
        raise error(400, "invalid_argument: command must be a non-empty array of strings")
    stdin, timeout = request.get("stdin"), request.get("timeout")
    if not (stdin is None or isinstance(stdin, str)) or not _whole(timeout, 0, optional=True):
        raise error(400, "invalid_argument: stdin must be a string, timeout whole seconds >= 0")
    limit = min(float(timeout), max_s) if timeout else max_s
    return ExecSpec(tuple(command), stdin.encode() if stdin is not None else None, limit)


def parse_lease(body: object, query_ttl: str | None) -> tuple[int, str]:
    """(ttl seconds, description) from the body or, as fly-go sends it, `?ttl=`."""
    request = _object(body, "request body") if body is not None else {}
    ttl = request.get("ttl", query_ttl)
    if isinstance(ttl, str) and ttl.isdigit():
        ttl = int(ttl)
    description = request.get("description", "")
    if not isinstance(ttl, int) or not _whole(ttl, 1) or not isinstance(description, str):
        raise error(400, "invalid_argument: ttl must be whole seconds > 0, description a string")
    return ttl, description


def parse_stop(body: object) -> None:
    """The optional StopRequest: only its shape matters here."""
    if body is None:
        return
    if not isinstance(body, dict):
        kind = {list: "array", str: "string", bool: "bool"}.get(type(body), "number")
        raise error(400, f"json: cannot unmarshal {kind} into Go value of type main.stopRequest")
    if body.get("signal") not in STOP_SIGNALS | {None}:
        raise error(400, f"invalid_argument: signal must be one of {sorted(STOP_SIGNALS)}")


def parse_destroy(force: str | None, kill: str | None) -> bool:
    """Whether to kill a running machine: `?force=true` (the docs) or `?kill=true` (fly-go)."""
    return _truthy(force) or _truthy(kill)


def parse_metadata_value(body: object) -> str:
    value = _object(body, "request body").get("value")
    if not isinstance(value, str):
        raise error(400, "invalid_argument: value must be a string")
    return value


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise error(400, f"invalid_argument: {what} must be a JSON object")
    return value


def _whole(value: object, minimum: int, *, optional: bool = False) -> bool:
    if value is None:
        return optional
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in {"1", "true", "yes"}
