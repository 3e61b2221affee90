"""The Fly emulator's knobs: options (latency, delays, faults, limits), fault dice, rate limits."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

PROBABILITIES = ("p_5xx", "p_429", "p_408_after_create", "p_capacity", "p_vanish")
DURATIONS = ("launch_delay_s", "start_delay_s", "stop_delay_s", "destroy_delay_s", "exec_max_s")


@dataclass(frozen=True, slots=True)
class EmulatorOptions:
    """Every knob of the emulator; the ones in RUNTIME_KNOBS may change while it runs."""

    token: str
    app_name: str = "sandbox-local"
    default_region: str = "iad"
    latency_s: Mapping[str, float] = field(default_factory=dict)  # by operation name
    launch_delay_s: float = 0.05  # created -> starting
    start_delay_s: float = 0.05  # starting -> started
    stop_delay_s: float = 0.05  # stopping -> stopped, suspending -> suspended
    destroy_delay_s: float = 0.05  # destroying -> destroyed
    p_5xx: float = 0.0
    p_429: float = 0.0
    p_408_after_create: float = 0.0
    p_capacity: float = 0.0
    p_vanish: float = 0.0  # per live machine per second
    capacity_status: int = 422  # UNCONFIRMED in the fact sheet
    start_started_status: int = 200  # answer to starting a started machine (UNCONFIRMED)
    destroy_running_status: int = 412  # answer to a non-forced destroy of a running machine
    get_destroyed_404: bool = False  # GET of a destroyed machine: 404 instead of state=destroyed
    seed: int | None = None
    rate_limits: bool = True
    action_rate_per_s: float = 1.0
    action_burst: int = 3
    get_rate_per_s: float = 5.0
    get_burst: int = 10
    exec_max_s: float = 30.0
    strict_stopped_wait: bool = False
    workdir_root: Path | None = None  # as root, fly-machine must be able to reach it

    def __post_init__(self) -> None:
        problems = [
            f"{n} must be within 0..1" for n in PROBABILITIES if not 0 <= getattr(self, n) <= 1
        ]
        problems += [f"{n} must be >= 0" for n in DURATIONS if getattr(self, n) < 0]
        problems += [f"latency_s[{k}] must be >= 0" for k, v in self.latency_s.items() if v < 0]
        if self.action_rate_per_s <= 0 or self.get_rate_per_s <= 0:
            problems.append("rates must be > 0")
        if self.action_burst < 1 or self.get_burst < 1:
            problems.append("bursts must be >= 1")
        if not self.token:
            problems.append("token must not be empty")
        if problems:
            raise ValueError("; ".join(problems))


_KNOB_TYPES: dict[str, type] = {
    **dict.fromkeys(PROBABILITIES + DURATIONS + ("action_rate_per_s", "get_rate_per_s"), float),
    **dict.fromkeys(
        ("capacity_status", "start_started_status", "destroy_running_status", "seed"), int
    ),
    **dict.fromkeys(("action_burst", "get_burst"), int),
    **dict.fromkeys(("rate_limits", "strict_stopped_wait", "get_destroyed_404"), bool),
    "latency_s": dict,
}
RUNTIME_KNOBS = frozenset(_KNOB_TYPES)


def options_with(options: EmulatorOptions, changes: Mapping[str, object]) -> EmulatorOptions:
    """`options` with runtime knobs changed; ValueError names every unknown or ill-typed knob."""
    problems = [f"unknown knob {k!r}" for k in changes if k not in RUNTIME_KNOBS]
    problems += [
        f"{k} must be a {_KNOB_TYPES[k].__name__}"
        for k, v in changes.items()
        if k in RUNTIME_KNOBS
        and not (k == "seed" and v is None)
        and not _has_type(v, _KNOB_TYPES[k])
    ]
    if problems:
        raise ValueError("; ".join(problems))
    return dataclasses.replace(options, **changes)  # type: ignore[arg-type]  # types checked above


def knob_values(options: EmulatorOptions) -> dict[str, Any]:
    """The runtime knobs and their current values, as JSON."""
    return {
        k: dict(v) if isinstance(v := getattr(options, k), Mapping) else v
        for k in sorted(RUNTIME_KNOBS)
    }


def _has_type(value: object, want: type) -> bool:
    if want is bool or isinstance(value, bool):
        return want is bool and isinstance(value, bool)
    if want is float:
        return isinstance(value, int | float)
    if want is dict:
        return isinstance(value, dict) and all(_has_type(v, float) for v in value.values())
    return isinstance(value, want)


class Fault(Enum):
    """A failure injected instead of (or, for TIMEOUT_AFTER_CREATE, after) the real work."""

    SERVER_ERROR = "server_error"
    RATE_LIMITED = "rate_limited"
    CAPACITY = "capacity"
    TIMEOUT_AFTER_CREATE = "timeout_after_create"


def draw_fault(rng: random.Random, options: EmulatorOptions, operation: str) -> Fault | None:
    """Roll the dice for one API call; a knob at 0 consumes no randomness."""
    draws = [(options.p_5xx, Fault.SERVER_ERROR), (options.p_429, Fault.RATE_LIMITED)]
    if operation == "create":
        draws += [
            (options.p_capacity, Fault.CAPACITY),
            (options.p_408_after_create, Fault.TIMEOUT_AFTER_CREATE),
        ]
    for p, fault in draws:
        if p > 0 and rng.random() < p:
            return fault
    return None


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimits:
    """Server-side token buckets per (operation, scope): over the limit a call is refused, not
    queued. Written apart from the client's limiter on purpose, so one cannot mask the other."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], _Bucket] = {}

    def allow(self, operation: str, scope: str, now: float, options: EmulatorOptions) -> bool:
        rate, burst = (
            (options.get_rate_per_s, options.get_burst)
            if operation == "get"
            else (options.action_rate_per_s, options.action_burst)
        )
        bucket = self._buckets.setdefault((operation, scope), _Bucket(float(burst), now))
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def reset(self) -> None:
        self._buckets.clear()
