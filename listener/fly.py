"""FlyClient: typed async calls to the Fly Machines API, its answers as errors, retries."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypedDict, TypeVar
from urllib.parse import quote

import httpx
import structlog
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    SecretStr,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import core_schema
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_random,
)
from tenacity.wait import WaitBaseT

from listener.errors import (
    FlyCapacityError,
    FlyClientError,
    FlyConflictError,
    FlyConnectError,
    FlyError,
    FlyNotFoundError,
    FlyOutcomeUnknownError,
    FlyRateLimitedError,
    FlyServerError,
    FlyStateError,
    FlyTimeoutError,
    FlyUnavailableError,
    is_retryable,
)
from listener.exec_stream import ExecScanner, ExecStreamError
from listener.models import ExecResult, Lease, Machine, MachineState
from listener.ratelimit import Rate, RateLimiter

if TYPE_CHECKING:
    from listener.config import Settings
    from listener.metrics import Metrics

DEFAULT_BASE_URL = "https://api.machines.dev"
LEASE_NONCE_HEADER = "fly-machine-lease-nonce"
REQUEST_ID_HEADER = "fly-request-id"
MACAROON_PREFIXES = ("fm1r_", "fm1a_", "fm2_")
FLY_RATE = Rate(per_s=1.0, burst=3)  # Fly's documented limit per action and machine/app
FLY_GET_RATE = Rate(per_s=5.0, burst=10)  # ... and the one for Get Machine
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0
TIMEOUT_MARGIN_S = 15.0  # HTTP read timeout beyond a server-side wait or exec timeout
DEFAULT_BACKOFF = wait_exponential(multiplier=0.2, max=5.0) + wait_random(0, 0.5)  # 0.2 s doubling
WAIT_MIN_S, WAIT_MAX_S = 1, 60  # what Fly's wait endpoint accepts
ERROR_TEXT_LIMIT = 200
EXEC_OUTPUT_LIMIT_BYTES = 65536  # per stream, as SANDBOX_COMMAND_OUTPUT_LIMIT_BYTES defaults
# Past this an exec answer is not read on (Fly documents no output limit). A 150 MB print fits
# even if JSON escaped every byte as \u0000 (6x); more means a misbehaving server. Memory stays
# bounded anyway: the ceiling bounds the time, about 7 s of one core at the benched 160 MB/s.
EXEC_BODY_LIMIT_BYTES = 1 << 30
WAITABLE = frozenset(
    {
        MachineState.STARTED,
        MachineState.STOPPED,
        MachineState.SUSPENDED,
        MachineState.DESTROYED,
        MachineState.FAILED,
    }
)
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_DEAD_ENDS = frozenset(
    {
        MachineState.DESTROYING,
        MachineState.DESTROYED,
        MachineState.FAILED,
        MachineState.LAUNCH_FAILED,
    }
)

Signal = Literal["SIGHUP", "SIGINT", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGTERM"]
WaitVerdict = Literal["reached", "impossible", "pending"]
T = TypeVar("T")

log = structlog.get_logger(component="fly")


class GuestConfig(TypedDict):
    """`config.guest` of a machine: its CPU and memory size."""

    cpu_kind: str
    cpus: int
    memory_mb: int


class RestartConfig(TypedDict):
    """`config.restart` of a machine."""

    policy: Literal["no", "always", "on-failure"]


class MachineConfig(TypedDict):
    """The subset of Fly's MachineConfig the listener sets (built by `machine_config`)."""

    image: str
    guest: GuestConfig
    env: dict[str, str]
    metadata: dict[str, str]
    auto_destroy: bool
    restart: RestartConfig


@dataclass(frozen=True, slots=True)
class FlyApp:
    """A Fly app as `get_app` reads it; `machine_count` only when Fly says."""

    name: str
    status: str
    organization: str
    machine_count: int | None = None


def machine_config(
    image: str,
    *,
    cpu_kind: str = "shared",
    cpus: int = 1,
    memory_mb: int = 256,
    env: Mapping[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
    auto_destroy: bool = True,
    restart_policy: Literal["no", "always", "on-failure"] = "no",
) -> MachineConfig:
    """A machine config for `create_machine`."""
    return {
        "image": image,
        "guest": {"cpu_kind": cpu_kind, "cpus": cpus, "memory_mb": memory_mb},
        "env": dict(env or {}),
        "metadata": dict(metadata or {}),
        "auto_destroy": auto_destroy,
        "restart": {"policy": restart_policy},
    }


def authorization_header(token: str) -> str:
    """The Authorization value for a token: `FlyV1` for macaroons, `Bearer` otherwise."""
    raw = token.strip()
    scheme, _, rest = raw.partition(" ")
    if scheme.lower() in {"bearer", "flyv1"}:
        raw = rest.strip()
    if not raw:
        raise ValueError("the Fly API token is empty")
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    if any(part.startswith(MACAROON_PREFIXES) for part in parts):
        return "FlyV1 " + ",".join(parts)
    return "Bearer " + raw


def fly_rate_limiter(rate: Rate = FLY_RATE, get_rate: Rate = FLY_GET_RATE) -> RateLimiter:
    """A limiter keyed the way Fly limits (per action and per machine or app), pacing just
    inside Fly's rates (`Rate.with_headroom`) so bursts queue instead of earning 429s."""
    return RateLimiter(rate.with_headroom(), {_GET.action: get_rate.with_headroom()})


def to_fly_error(failure: httpx.Response | httpx.HTTPError, *, operation: str) -> FlyError:
    """Translate a non-2xx response or a transport failure into the Fly error tree."""
    if isinstance(failure, httpx.HTTPError):
        cls = FlyConnectError if isinstance(failure, _NOT_SENT) else FlyUnavailableError
        detail = str(failure) or "no detail"
        return cls(f"{operation}: Fly unreachable ({type(failure).__name__}: {detail})")
    status = failure.status_code
    message, code = _error_body(failure)
    text = f"{operation}: {message}"
    kw: dict[str, Any] = {
        "status": status,
        "code": code,
        "request_id": failure.headers.get(REQUEST_ID_HEADER),
    }
    if code == "insufficient_capacity":
        return FlyCapacityError(text, **kw)
    if status == 404:
        return FlyNotFoundError(text, **kw)
    if status == 408:
        return FlyTimeoutError(text, **kw)
    if status in (409, 412):
        return FlyConflictError(text, **kw)
    if status == 429:
        retry_after_s = _retry_after_s(failure.headers.get("retry-after"))
        return FlyRateLimitedError(text, retry_after_s=retry_after_s, **kw)
    if 400 <= status < 500:
        return FlyClientError(text, **kw)
    if status >= 500:
        return FlyServerError(text, **kw)
    return FlyUnavailableError(f"{operation}: unexpected HTTP status", **kw)


def wait_verdict(state: MachineState, wanted: frozenset[MachineState]) -> WaitVerdict:
    """Whether a machine in `state` has reached, can still reach or can never reach `wanted`."""
    if state in wanted:
        return "reached"
    if MachineState.DESTROYED in wanted or state not in _DEAD_ENDS:
        return "pending"
    return "impossible"


def server_wait_s(remaining_s: float) -> int:
    """The `timeout` for one wait call: what is left of the caller's deadline, within 1..60 s."""
    return max(WAIT_MIN_S, min(WAIT_MAX_S, math.ceil(remaining_s)))


def _error_body(response: httpx.Response) -> tuple[str, str | None]:
    """(message, Fly status code) from `{"error","status"}` or `{"status":"error","message"}`."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        text = response.text.strip()[:ERROR_TEXT_LIMIT]
        return text or response.reason_phrase or "no detail", None
    status = body.get("status")
    code = status if isinstance(status, str) and status != "error" else None
    message = body.get("message") or body.get("error")
    if isinstance(message, str) and message:
        return message[:ERROR_TEXT_LIMIT], code
    return response.reason_phrase or "no detail", code


def _retry_after_s(value: str | None) -> float | None:
    """Delta-seconds from a Retry-After header; dates and junk are ignored."""
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _retry_wait(exc: BaseException) -> bool:
    """Waits retry like any idempotent call, except 408, which the wait loop itself handles."""
    return is_retryable(exc) and not isinstance(exc, FlyTimeoutError)


def _retry_unsent(exc: BaseException) -> bool:
    """Non-idempotent calls retry only when Fly cannot have acted: never sent, or 429."""
    return isinstance(exc, FlyConnectError | FlyRateLimitedError)


@dataclass(frozen=True, slots=True)
class _Op:
    """One kind of call: log name, HTTP method, path under the app's URL, rate-limit action
    (scoped to the machine, or to the app for create and list) and retry policy."""

    name: str
    method: str
    path: str
    action: str
    retry: Callable[[BaseException], bool] = is_retryable


_GET_APP = _Op("get_app", "GET", "", "get_app")
_CREATE = _Op("create_machine", "POST", "/machines", "create", _retry_unsent)
_LIST = _Op("list_machines", "GET", "/machines", "list")
_GET = _Op("get_machine", "GET", "/machines/{id}", "get")
_WAIT = _Op("wait_for_state", "GET", "/machines/{id}/wait", "wait", _retry_wait)
_START = _Op("start", "POST", "/machines/{id}/start", "start")
_STOP = _Op("stop", "POST", "/machines/{id}/stop", "stop")
_SUSPEND = _Op("suspend", "POST", "/machines/{id}/suspend", "suspend")
_DESTROY = _Op("destroy", "DELETE", "/machines/{id}", "destroy")
_EXEC = _Op("exec", "POST", "/machines/{id}/exec", "exec", _retry_unsent)
_ACQUIRE_LEASE = _Op("acquire_lease", "POST", "/machines/{id}/lease", "lease")
_REFRESH_LEASE = _Op("refresh_lease", "POST", "/machines/{id}/lease", "lease")
_RELEASE_LEASE = _Op("release_lease", "DELETE", "/machines/{id}/lease", "lease")
_GET_METADATA = _Op("get_metadata", "GET", "/machines/{id}/metadata", "metadata")
_SET_METADATA = _Op("set_metadata", "POST", "/machines/{id}/metadata/{key}", "metadata")
_DELETE_METADATA = _Op("delete_metadata", "DELETE", "/machines/{id}/metadata/{key}", "metadata")


class _OrNone:
    """Wire-field annotation: a value of the wrong type or shape reads as None, in pydantic-core."""

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_default_schema(handler(source), default=None, on_error="default")


_Text = Annotated[str | None, _OrNone]
_Strings = dict[str, _Text]  # Fly's string maps; a value of another type reads as None


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _ConfigWire(_Wire):
    metadata: Annotated[_Strings | None, _OrNone] = None


class _MachineWire(_Wire):
    id: str = Field(min_length=1)  # the one field a machine cannot do without
    state: _Text = None
    region: _Text = None
    instance_id: _Text = None
    name: _Text = None
    config: Annotated[_ConfigWire | None, _OrNone] = None
    created_at: _Text = None
    updated_at: _Text = None
    nonce: _Text = None

    def model(self) -> Machine:
        return Machine(
            id=self.id,
            state=MachineState.parse(self.state),
            region=self.region or "",
            instance_id=self.instance_id or "",
            name=self.name or "",
            metadata=_strings(self.config.metadata if self.config else None),
            created_at=_timestamp(self.created_at),
            updated_at=_timestamp(self.updated_at),
            nonce=self.nonce or None,
        )


class _LeaseWire(_Wire):
    nonce: str = Field(min_length=1)
    expires_at: int
    owner: _Text = None
    description: _Text = None

    def model(self) -> Lease:
        return Lease(self.nonce, self.expires_at, self.owner or "", self.description or "")


class _LeaseEnvelope(_Wire):
    data: _LeaseWire


class _OrganizationWire(_Wire):
    slug: _Text = None


class _AppWire(_Wire):
    name: str = Field(min_length=1)
    status: _Text = None
    organization: Annotated[_OrganizationWire | None, _OrNone] = None
    machine_count: Annotated[int | None, _OrNone] = None

    def model(self) -> FlyApp:
        org = self.organization.slug if self.organization else None
        return FlyApp(self.name, self.status or "", org or "", self.machine_count)


_MACHINE = TypeAdapter(_MachineWire)
# A machine without a usable id comes through raw, to be skipped, not to fail the whole list.
_MACHINES = TypeAdapter(list[Annotated[_MachineWire | Any, Field(union_mode="left_to_right")]])
_LEASE: TypeAdapter[_LeaseEnvelope | _LeaseWire] = TypeAdapter(_LeaseEnvelope | _LeaseWire)
_APP = TypeAdapter(_AppWire)
_METADATA = TypeAdapter(_Strings)


def _timestamp(value: str | None) -> datetime | None:
    """An RFC 3339 time in UTC (no offset: taken as UTC); None if unreadable or out of range."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: in range only before the offset
        return None


def _strings(mapping: Mapping[str, str | None] | None) -> dict[str, str]:
    """A wire string map without the values that were not strings."""
    return {key: value for key, value in (mapping or {}).items() if value is not None}


def _raw_id(item: object) -> str | None:
    """The id of a machine that did not parse, if it has one, for the log."""
    raw = item.get("id") if isinstance(item, dict) else None
    return None if raw is None else str(raw)[:64]


def _decode(adapter: TypeAdapter[T], response: httpx.Response, op: _Op) -> T:
    """Parse a 2xx body; a body that does not fit is FlyUnavailableError, never a crash."""
    try:
        return adapter.validate_json(response.content)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
            for e in exc.errors(include_input=False)[:3]
        )
        # `from None`: the validation error quotes the body, which may hold machine env values.
        raise _unusable(response, op, f"unparseable response from Fly ({problems})") from None


def _unusable(response: httpx.Response, op: _Op, problem: str) -> FlyUnavailableError:
    """A 2xx answer the listener cannot use."""
    return FlyUnavailableError(
        f"{op.name}: {problem}",
        status=response.status_code,
        request_id=response.headers.get(REQUEST_ID_HEADER),
    )


class FlyClient:
    """The Fly Machines API for one app, over an injected `httpx.AsyncClient`."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        app_name: str,
        token: SecretStr | str,
        base_url: str = DEFAULT_BASE_URL,
        limiter: RateLimiter | None = None,
        max_attempts: int = 5,
        wait: WaitBaseT | None = None,
        max_retry_time_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        exec_body_limit_bytes: int = EXEC_BODY_LIMIT_BYTES,
    ) -> None:
        if max_attempts < 1 or max_retry_time_s <= 0:
            raise ValueError("max_attempts must be >= 1 and max_retry_time_s > 0")
        secret = token.get_secret_value() if isinstance(token, SecretStr) else token
        self._http = http
        self._app = app_name
        self._base_url = base_url.rstrip("/")
        self._app_url = f"{self._base_url}/v1/apps/{quote(app_name, safe='')}"
        self._authorization = SecretStr(authorization_header(secret))
        self._limiter = limiter if limiter is not None else fly_rate_limiter()
        self._max_attempts = max_attempts
        self._wait = wait if wait is not None else DEFAULT_BACKOFF
        self._max_retry_time_s = max_retry_time_s
        self._clock = clock
        self._metrics = metrics
        self._exec_body_limit_bytes = exec_body_limit_bytes

    @classmethod
    def from_settings(
        cls, settings: Settings, http: httpx.AsyncClient, *, metrics: Metrics | None = None
    ) -> FlyClient:
        """The client the listener runs with: settings' app, token, endpoint, limits, attempts."""
        limiter = fly_rate_limiter(
            Rate(settings.fly_rate_per_s, settings.fly_burst),
            Rate(settings.fly_get_rate_per_s, settings.fly_get_burst),
        )
        return cls(
            http,
            base_url=str(settings.fly_api_hostname),
            app_name=settings.fly_app_name,
            token=settings.fly_api_token,
            limiter=limiter,
            max_attempts=settings.fly_max_attempts,
            metrics=metrics,
        )

    def __repr__(self) -> str:
        return f"FlyClient(base_url={self._base_url!r}, app_name={self._app!r})"

    # Apps

    async def get_app(self) -> FlyApp:
        """The app the client works on; checks the token too (401 bad token, 404 no such app,
        403 an app of another organisation)."""
        return _decode(_APP, await self._send(_GET_APP), _GET_APP).model()

    # Machines

    async def create_machine(
        self,
        config: Mapping[str, object],
        *,
        region: str | None,
        name: str | None = None,
        lease_ttl_s: int | None = None,
        skip_launch: bool = False,
    ) -> Machine:
        """Create (and, unless `skip_launch`, boot) a machine.

        Retried only when Fly cannot have acted (never sent, 429). A 408, a 5xx, a lost response
        or an unreadable 2xx raises FlyOutcomeUnknownError: list by metadata and adopt.
        """
        body: dict[str, object] = {"config": dict(config)}
        if region:
            body["region"] = region
        if name:
            body["name"] = name
        if lease_ttl_s is not None:
            body["lease_ttl"] = lease_ttl_s
        if skip_launch:
            body["skip_launch"] = True
        try:
            return _decode(_MACHINE, await self._send(_CREATE, json=body), _CREATE).model()
        except FlyConnectError:
            raise
        except (FlyTimeoutError, FlyServerError, FlyUnavailableError) as exc:
            raise FlyOutcomeUnknownError(
                f"create_machine: outcome unknown, list by metadata and adopt ({exc.message})",
                status=exc.status,
                code=exc.code,
                request_id=exc.request_id,
            ) from exc

    async def get_machine(self, machine_id: str) -> Machine:
        """The machine as Fly sees it now (FlyNotFoundError if unknown or long gone)."""
        return _decode(_MACHINE, await self._send(_GET, machine_id), _GET).model()

    async def list_machines(
        self,
        *,
        metadata: Mapping[str, str] | None = None,
        state: Sequence[str] | None = None,
        include_deleted: bool = False,
        region: str | None = None,
        summary: bool = False,
    ) -> list[Machine]:
        """Machines of the app, filtered; `summary` omits config, so metadata comes back empty."""
        params = [(f"metadata.{key}", value) for key, value in (metadata or {}).items()]
        if state:
            params.append(("state", ",".join(state)))
        if include_deleted:
            params.append(("include_deleted", "true"))
        if region:
            params.append(("region", region))
        if summary:
            params.append(("summary", "true"))
        response = await self._send(_LIST, params=params)
        machines = []
        for item in _decode(_MACHINES, response, _LIST):
            if isinstance(item, _MachineWire):
                machines.append(item.model())
            else:
                log.warning("fly_machine_unparseable", machine_id=_raw_id(item))
        return machines

    async def wait_for_state(
        self,
        machine_id: str,
        state: str | Sequence[str] = MachineState.STARTED,
        *,
        timeout_s: float,
        instance_id: str | None = None,
        known: Machine | None = None,
    ) -> Machine:
        """Wait until the machine is in (one of) `state`; return it.

        Alternates a GET with a server-side wait (1..60 s; 408 means not yet) until `timeout_s`,
        checked between calls: FlyTimeoutError then, FlyStateError as soon as the machine is in
        a state it cannot leave for the wanted one. `known` (e.g. the create response) stands in
        for the first GET, and a 200 naming a wanted state ends the wait without another GET,
        so a fresh machine costs one call. Waiting for `destroyed`, a 404 is success and the
        result is the last machine read (or a bare one) marked destroyed.
        """
        wanted = _wanted(state)
        deadline = self._clock() + timeout_s
        machine = known or Machine(
            id=machine_id, state=MachineState.UNKNOWN, region="", instance_id=""
        )
        fresh = known is not None
        while True:
            if not fresh:
                try:
                    machine = await self.get_machine(machine_id)
                except FlyNotFoundError:
                    if MachineState.DESTROYED in wanted:
                        return replace(machine, state=MachineState.DESTROYED)
                    raise
            fresh = False
            verdict = wait_verdict(machine.state, wanted)
            if verdict == "reached":
                return machine
            goal = ",".join(sorted(wanted))
            if verdict == "impossible":
                raise FlyStateError(
                    f"wait_for_state: machine {machine_id} is {machine.state}, it cannot be {goal}",
                    state=machine.state,
                )
            remaining_s = deadline - self._clock()
            if remaining_s <= 0:
                raise FlyTimeoutError(
                    f"wait_for_state: machine {machine_id} still {machine.state} "
                    f"after {timeout_s:g}s waiting for {goal}"
                )
            reached = await self._wait_once(machine, wanted, remaining_s, instance_id)
            if reached is not None:
                return replace(machine, state=reached)

    async def start(self, machine_id: str, *, nonce: str | None = None) -> None:
        """Start a created, stopped or suspended machine."""
        await self._send(_START, machine_id, nonce=nonce)

    async def stop(
        self,
        machine_id: str,
        *,
        signal: Signal | None = None,
        timeout_s: float | None = None,
        nonce: str | None = None,
    ) -> None:
        """Stop a machine (idempotent); `timeout_s` is how long Fly waits before SIGKILL."""
        body: dict[str, str] = {}
        if signal:
            body["signal"] = signal
        if timeout_s is not None:
            body["timeout"] = f"{timeout_s:g}s"
        await self._send(_STOP, machine_id, json=body, nonce=nonce)

    async def suspend(self, machine_id: str, *, nonce: str | None = None) -> None:
        """Suspend a started machine (resume is not guaranteed)."""
        await self._send(_SUSPEND, machine_id, nonce=nonce)

    async def destroy(
        self, machine_id: str, *, force: bool = True, nonce: str | None = None
    ) -> None:
        """Destroy a machine; an unknown or already destroyed one (404) counts as done."""
        params = [("force", "true" if force else "false")]
        try:
            await self._send(_DESTROY, machine_id, params=params, nonce=nonce)
        except FlyNotFoundError:
            return

    async def exec(
        self,
        machine_id: str,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        timeout_s: int,
        output_limit_bytes: int = EXEC_OUTPUT_LIMIT_BYTES,
    ) -> ExecResult:
        """Run argv in the machine; a non-zero exit is a result, not an error.

        The answer is parsed as it streams in: stdout and stderr each keep at most
        `output_limit_bytes` of UTF-8 (whole characters; `*_truncated` says what was cut), the
        rest is dropped unheld, and an answer past the client's `exec_body_limit_bytes` is a
        FlyUnavailableError. Retried only when never sent or on 429, since a command need not
        be idempotent.
        """
        body: dict[str, object] = {"command": list(argv), "timeout": timeout_s}
        if stdin is not None:
            body["stdin"] = stdin
        timeout = timeout_s + TIMEOUT_MARGIN_S
        scanner = ExecScanner(output_limit_bytes, self._exec_body_limit_bytes)
        await self._send(_EXEC, machine_id, json=body, read_timeout_s=timeout, scanner=scanner)
        return scanner.result()

    # Leases

    async def acquire_lease(self, machine_id: str, ttl_s: int, description: str = "") -> Lease:
        """Take the machine's lease (FlyConflictError if someone else holds it)."""
        body = {"ttl": ttl_s, "description": description}
        return _lease(await self._send(_ACQUIRE_LEASE, machine_id, json=body), _ACQUIRE_LEASE)

    async def refresh_lease(self, machine_id: str, nonce: str, ttl_s: int) -> Lease:
        """Extend a lease we hold; Fly keeps the nonce (a changed one is a FlyConflictError)."""
        response = await self._send(_REFRESH_LEASE, machine_id, json={"ttl": ttl_s}, nonce=nonce)
        lease = _lease(response, _REFRESH_LEASE)
        if lease.nonce != nonce:
            raise FlyConflictError(f"refresh_lease: machine {machine_id} answered another nonce")
        return lease

    async def release_lease(self, machine_id: str, nonce: str) -> None:
        """Give the lease back; a lease (or machine) already gone counts as released."""
        try:
            await self._send(_RELEASE_LEASE, machine_id, nonce=nonce)
        except FlyNotFoundError:
            return

    # Metadata

    async def get_metadata(self, machine_id: str) -> dict[str, str]:
        """The machine's metadata map."""
        response = await self._send(_GET_METADATA, machine_id)
        return _strings(_decode(_METADATA, response, _GET_METADATA))

    async def set_metadata(
        self, machine_id: str, key: str, value: str, *, nonce: str | None = None
    ) -> None:
        """Set one metadata key (idempotent)."""
        await self._send(_SET_METADATA, machine_id, key=key, json={"value": value}, nonce=nonce)

    async def delete_metadata(self, machine_id: str, key: str, *, nonce: str | None = None) -> None:
        """Remove one metadata key."""
        await self._send(_DELETE_METADATA, machine_id, key=key, nonce=nonce)

    # Plumbing

    async def _wait_once(
        self,
        machine: Machine,
        wanted: frozenset[MachineState],
        remaining_s: float,
        instance_id: str | None,
    ) -> MachineState | None:
        """One server-side wait: the wanted state Fly says was reached, or None to re-read."""
        timeout = server_wait_s(remaining_s)
        params = [("state", str(s)) for s in sorted(wanted)] + [("timeout", str(timeout))]
        # Some API versions need the version to wait for stopped: use the one just read.
        version = instance_id or (machine.instance_id if MachineState.STOPPED in wanted else "")
        if version:
            params.append(("version", version))
        try:
            response = await self._send(
                _WAIT,
                machine.id,
                params=params,
                read_timeout_s=timeout + TIMEOUT_MARGIN_S,
                budget_s=remaining_s,
            )
        except FlyTimeoutError:
            return None
        except FlyNotFoundError:
            if MachineState.DESTROYED not in wanted:
                raise
            return MachineState.DESTROYED
        return _reached(response, wanted)

    async def _send(
        self,
        op: _Op,
        machine_id: str | None = None,
        *,
        key: str = "",
        params: Sequence[tuple[str, str]] = (),
        json: object = None,
        nonce: str | None = None,
        read_timeout_s: float = REQUEST_TIMEOUT_S,
        budget_s: float | None = None,
        scanner: ExecScanner | None = None,
    ) -> httpx.Response:
        """Send `op` under its retry policy and the rate limiter: a 2xx response or a FlyError.

        With `scanner`, a 2xx body is asked for uncompressed (one chunk in memory is one network
        read) and fed to it as it arrives, not kept in the response.
        """
        path = op.path.format(id=quote(machine_id or "", safe=""), key=quote(key, safe=""))
        url = self._app_url + path
        headers = {"Authorization": self._authorization.get_secret_value()}
        if nonce:
            headers[LEASE_NONCE_HEADER] = nonce
        if scanner is not None:
            headers["Accept-Encoding"] = "identity"
        timeout = httpx.Timeout(read_timeout_s, connect=CONNECT_TIMEOUT_S)
        query = tuple(params)
        attempts = itertools.count(1)

        async def attempt() -> httpx.Response:
            number = next(attempts)
            await self._limiter.acquire(op.action, machine_id or self._app)
            started = time.perf_counter()
            status: int | None = None
            try:
                request = self._http.build_request(
                    op.method, url, params=query, json=json, headers=headers, timeout=timeout
                )
                response = await self._http.send(request, stream=True)
                try:
                    status = response.status_code
                    if scanner is not None and response.is_success:
                        await _scan(response, scanner, op)
                    else:
                        await response.aread()
                finally:
                    await response.aclose()
            except httpx.HTTPError as exc:
                raise to_fly_error(exc, operation=op.name) from exc
            finally:
                if self._metrics is not None:
                    self._metrics.fly_calls.labels(
                        operation=op.name, status=str(status or "unreachable")
                    ).inc()
                log.debug(
                    "fly_request_finished",
                    operation=op.name,
                    machine_id=machine_id,
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                    attempt=number,
                )
            if response.is_success:
                return response
            raise to_fly_error(response, operation=op.name)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts)
            | stop_before_delay(self._max_retry_time_s if budget_s is None else budget_s),
            wait=self._backoff,
            retry=retry_if_exception(op.retry),
            before_sleep=self._before_retry(op, machine_id),
            reraise=True,
        )
        response: httpx.Response = await retrying(attempt)
        return response

    def _before_retry(self, op: _Op, machine_id: str | None) -> Callable[[RetryCallState], None]:
        """tenacity's before_sleep: log the retry at warning and count it."""

        def before_sleep(retry_state: RetryCallState) -> None:
            exc = retry_state.outcome.exception() if retry_state.outcome else None
            if self._metrics is not None:
                self._metrics.fly_retries.labels(operation=op.name).inc()
            log.warning(
                "fly_request_retrying",
                operation=op.name,
                machine_id=machine_id,
                attempt=retry_state.attempt_number,
                sleep_s=round(retry_state.upcoming_sleep, 3),
                status=exc.status if isinstance(exc, FlyError) else None,
                error=str(exc),
            )

        return before_sleep

    def _backoff(self, retry_state: RetryCallState) -> float:
        """The jittered backoff, or Fly's Retry-After when that is longer."""
        backoff = float(self._wait(retry_state))
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hinted = exc.retry_after_s if isinstance(exc, FlyRateLimitedError) else None
        return max(backoff, hinted or 0.0)


def _reached(response: httpx.Response, wanted: frozenset[MachineState]) -> MachineState | None:
    """The state a 200 wait answer names, if it is one of `wanted`; otherwise None (re-read).

    The docs' example body is only `{"ok": true}`; then a single wanted state is implied.
    """
    try:
        body = response.json()
    except ValueError:
        body = None
    named = body.get("state") if isinstance(body, dict) else None
    if isinstance(named, str):
        state = MachineState.parse(named)
        return state if state in wanted else None
    return next(iter(wanted)) if len(wanted) == 1 else None


async def _scan(response: httpx.Response, scanner: ExecScanner, op: _Op) -> None:
    """Feed a streamed body to `scanner`; what it cannot use is FlyUnavailableError."""
    try:
        async for chunk in response.aiter_bytes():
            scanner.feed(chunk)
        scanner.close()
    except ExecStreamError as exc:
        raise _unusable(response, op, str(exc)) from None  # the message never quotes the body


def _lease(response: httpx.Response, op: _Op) -> Lease:
    """A lease from Fly's `{status, data{...}}` envelope or from the bare Lease shape."""
    parsed = _decode(_LEASE, response, op)
    return (parsed.data if isinstance(parsed, _LeaseEnvelope) else parsed).model()


def _wanted(state: str | Sequence[str]) -> frozenset[MachineState]:
    names = [state] if isinstance(state, str) else list(state)
    wanted = frozenset(MachineState.parse(name) for name in names)
    if not wanted or not wanted <= WAITABLE:
        raise ValueError(f"can only wait for {', '.join(sorted(WAITABLE))}, not {names}")
    return wanted
