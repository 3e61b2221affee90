"""The Fly emulator's machine records: ids, JSON shape, events, leases, what each state admits."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from listener.models import MachineState as S

JSON = dict[str, Any]

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
NAME_WORDS = (
    ("aged", "bold", "calm", "dark", "eager", "fancy", "gentle", "hidden", "quiet", "rapid"),
    ("thunder", "river", "forest", "meadow", "glade", "ember", "frost", "harbor", "canyon", "dune"),
)
LEASE_OWNER = "emulator@fly.local"
SETTLED = frozenset({S.CREATED, S.STARTED, S.STOPPED, S.SUSPENDED, S.FAILED, S.DESTROYED})


class ApiError(Exception):
    """A request the emulator answers with a non-2xx status and a Fly-shaped JSON body."""

    def __init__(self, status: int, body: JSON) -> None:
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = body


def error(code: int, message: str, **extra: str) -> ApiError:
    """The common `{"error": ...}` shape (`extra` may add Fly's `status` code word)."""
    return ApiError(code, {"error": message, **extra})


def not_found(what: str = "machine") -> ApiError:
    return error(404, f"{what} not found")


class IdSource:
    """Machine ids, ULIDs, names, addresses and nonces drawn from one seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def machine_id(self) -> str:
        return f"{self._rng.getrandbits(56):014x}"

    def ulid(self, now: float) -> str:
        value = (int(now * 1000) << 80) | self._rng.getrandbits(80)
        return "".join(CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))

    def name(self) -> str:
        adjective, noun = (self._rng.choice(words) for words in NAME_WORDS)
        return f"{adjective}-{noun}-{self._rng.randrange(1000, 10000)}"

    def private_ip(self) -> str:
        parts = (self._rng.getrandbits(16) for _ in range(3))
        return "fdaa:0:1:a7b:{:x}:{:x}:{:x}:2".format(*parts)

    def nonce(self) -> str:
        return f"{self._rng.getrandbits(128):032x}"


def rfc3339(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_ref(image: str) -> JSON:
    """Split an image reference the way Fly reports it (Docker Hub images via Fly's mirror)."""
    name, _, digest = image.partition("@")
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = "docker-hub-mirror.fly.io", name if slash else f"library/{name}"
    repository, _, tag = path.rpartition(":") if ":" in path else (path, "", "latest")
    return {
        "registry": registry,
        "repository": repository,
        "tag": tag,
        "digest": digest or "sha256:" + hashlib.sha256(image.encode()).hexdigest(),
        "labels": {},
    }


@dataclass(slots=True)
class LeaseRecord:
    nonce: str
    expires_at: int
    description: str
    version: str
    owner: str = LEASE_OWNER

    def to_json(self) -> JSON:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class MachineSnapshot:
    """A machine as tests and benchmarks see it through the Python inventory API."""

    id: str
    name: str
    state: S
    region: str
    instance_id: str
    config: JSON
    metadata: dict[str, str]
    workdir: Path
    lease_nonce: str | None
    created_at: float
    updated_at: float
    events: tuple[JSON, ...]


@dataclass(slots=True)
class MachineRecord:
    """One machine of the inventory; only the emulator mutates it."""

    id: str
    name: str
    region: str
    instance_id: str
    private_ip: str
    config: JSON
    workdir: Path
    created_at: float
    updated_at: float
    state: S = S.CREATED
    events: list[JSON] = field(default_factory=list)  # newest first
    lease: LeaseRecord | None = None

    @property
    def metadata(self) -> dict[str, str]:
        meta: dict[str, str] = self.config.setdefault("metadata", {})
        return meta

    @property
    def deadline_epoch_s(self) -> float | None:
        """When the main process exits on its own (the sandbox's dead-man's switch)."""
        raw = (self.config.get("env") or {}).get("SANDBOX_DEADLINE_EPOCH_S")
        try:
            return float(raw) if raw is not None else None
        except ValueError:
            return None

    @property
    def restart_policy(self) -> str:
        return str((self.config.get("restart") or {}).get("policy") or "on-failure")

    def record(
        self, state: S, kind: str, source: str, now: float, ids: IdSource, **request: Any
    ) -> None:
        """Move to `state` and log the event (newest first)."""
        self.state = state
        self.updated_at = now
        event: JSON = {
            "id": ids.ulid(now),
            "type": kind,
            "status": state.value,
            "source": source,
            "timestamp": int(now * 1000),
        }
        if request:
            event["request"] = request
        self.events.insert(0, event)

    def active_lease(self, now: float) -> LeaseRecord | None:
        if self.lease is not None and self.lease.expires_at <= now:
            self.lease = None
        return self.lease

    def to_json(self, *, summary: bool = False, nonce: str | None = None) -> JSON:
        body: JSON = {
            "id": self.id,
            "name": self.name,
            "state": self.state.value,
            "region": self.region,
            "instance_id": self.instance_id,
            "private_ip": self.private_ip,
            "image_ref": image_ref(str(self.config["image"])),
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
        }
        if not summary:
            body |= {
                "config": copy.deepcopy(self.config),
                "events": copy.deepcopy(self.events),
                "checks": [],
                "host_status": "ok",
            }
            if nonce is not None:
                body["nonce"] = nonce
        return body

    def snapshot(self) -> MachineSnapshot:
        lease = self.lease
        return MachineSnapshot(
            id=self.id,
            name=self.name,
            state=self.state,
            region=self.region,
            instance_id=self.instance_id,
            config=copy.deepcopy(self.config),
            metadata=dict(self.metadata),
            workdir=self.workdir,
            lease_nonce=lease.nonce if lease else None,
            created_at=self.created_at,
            updated_at=self.updated_at,
            events=tuple(copy.deepcopy(self.events)),
        )

    def check_nonce(self, nonce: str | None, now: float) -> None:
        """A held lease admits only calls that carry its nonce (409 otherwise)."""
        lease = self.active_lease(now)
        if lease is not None and nonce != lease.nonce:
            raise lease_conflict(self.id, lease)

    def acquire_lease(
        self, nonce: str | None, ttl_s: int, description: str, now: float, ids: IdSource
    ) -> LeaseRecord:
        """Take a new lease, or refresh the held one when `nonce` is its nonce."""
        self.check_nonce(nonce, now)
        expires_at = math.ceil(now + ttl_s)
        if self.lease is None:
            self.lease = LeaseRecord(ids.nonce(), expires_at, description, self.instance_id)
        else:
            self.lease.expires_at = expires_at
            self.lease.description = description or self.lease.description
        return self.lease

    def release_lease(self, nonce: str | None, now: float) -> None:
        if self.active_lease(now) is None:
            raise not_found("lease")
        self.check_nonce(nonce, now)
        self.lease = None


def lease_conflict(machine_id: str, lease: LeaseRecord) -> ApiError:
    message = f"machine ID {machine_id} lease currently held by {lease.owner}"
    return ApiError(409, {"status": "error", "message": message})


# Which calls a state admits. True: do the work; False: already there, answer 200 and do nothing.
STARTABLE = frozenset({S.CREATED, S.STOPPED, S.SUSPENDED, S.FAILED})
DESTROYABLE = frozenset({S.CREATED, S.STOPPED, S.SUSPENDED, S.FAILED})


def start_plan(state: S, started_status: int) -> bool:
    """Starting a started machine is a no-op unless `started_status` makes it an error."""
    if state in {S.STARTED, S.STARTING} and started_status == 200:
        return False
    if state not in STARTABLE:
        status = started_status if state in {S.STARTED, S.STARTING} else 412
        raise error(status, "unable to start machine from current state")
    return True


def stop_plan(state: S) -> bool:
    """Stop is idempotent: stopped, stopping (and destroying) machines need nothing."""
    return state not in {S.STOPPED, S.STOPPING, S.DESTROYING}


def suspend_plan(state: S) -> bool:
    if state in {S.SUSPENDED, S.SUSPENDING}:
        return False
    if state != S.STARTED:
        raise error(412, "unable to suspend machine from current state")
    return True


def destroy_plan(state: S, force: bool, running_status: int) -> bool:
    """A running machine needs `force`; one already being destroyed needs nothing more."""
    if state == S.DESTROYING:
        return False
    if not force and state not in DESTROYABLE:
        raise error(
            running_status, "unable to destroy machine, not currently stopped, suspended or failed"
        )
    return True
