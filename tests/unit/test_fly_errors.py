"""Pure parts of fly.py: Fly answers to errors, the auth scheme, wait decisions, the config."""

from __future__ import annotations

import httpx
import pytest

from listener.errors import (
    FlyCapacityError,
    FlyClientError,
    FlyConflictError,
    FlyConnectError,
    FlyError,
    FlyNotFoundError,
    FlyRateLimitedError,
    FlyServerError,
    FlyTimeoutError,
    FlyUnavailableError,
)
from listener.fly import (
    authorization_header,
    machine_config,
    server_wait_s,
    to_fly_error,
    wait_verdict,
)
from listener.models import MachineState

S = MachineState


def response(status: int, body: object = None, text: str = "", **headers: str) -> httpx.Response:
    if body is not None:
        return httpx.Response(status, json=body, headers=headers)
    return httpx.Response(status, text=text, headers=headers)


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (400, {"error": "invalid config"}, FlyClientError),
        (401, {"error": "Authenticate: token validation error"}, FlyClientError),
        (403, {"error": "app in another org"}, FlyClientError),
        (404, {"error": "machine not found"}, FlyNotFoundError),
        (408, {"error": "machine failed to reach desired state"}, FlyTimeoutError),
        (409, {"status": "error", "message": "lease currently held"}, FlyConflictError),
        (412, {"error": "unable to start machine from current state"}, FlyConflictError),
        (422, {"error": "machine limit reached"}, FlyClientError),
        (429, {"error": "rate limited"}, FlyRateLimitedError),
        (500, {"error": "internal"}, FlyServerError),
        (502, {"error": "bad gateway"}, FlyServerError),
        (503, {"error": "unavailable"}, FlyServerError),
        (422, {"error": "no capacity", "status": "insufficient_capacity"}, FlyCapacityError),
        (503, {"error": "no capacity", "status": "insufficient_capacity"}, FlyCapacityError),
        (302, {"error": "moved"}, FlyUnavailableError),
    ],
    ids=lambda v: str(v) if isinstance(v, int) else None,
)
def test_status_and_body_pick_the_error_type(
    status: int, body: dict[str, str], cls: type[FlyError]
) -> None:
    err = to_fly_error(response(status, body), operation="get_machine")
    assert type(err) is cls
    assert err.status == status


def test_error_shape_with_error_and_status_carries_message_code_and_request_id() -> None:
    err = to_fly_error(
        response(
            422,
            {"error": "not enough capacity in iad", "status": "insufficient_capacity"},
            **{"fly-request-id": "01REQ"},
        ),
        operation="create_machine",
    )
    assert (err.message, err.code, err.request_id) == (
        "create_machine: not enough capacity in iad",
        "insufficient_capacity",
        "01REQ",
    )
    assert str(err) == (
        "create_machine: not enough capacity in iad "
        "(status=422, code=insufficient_capacity, request_id=01REQ)"
    )


def test_status_error_message_shape_prefers_message_and_drops_the_generic_code() -> None:
    body = {"status": "error", "message": "lease held by x", "error": "other text"}
    err = to_fly_error(response(409, body), operation="acquire_lease")
    assert err.message == "acquire_lease: lease held by x"
    assert err.code is None


@pytest.mark.parametrize(
    ("body", "text", "expected"),
    [
        (None, "upstream connect error", "stop: upstream connect error"),
        (None, "", "stop: Bad Gateway"),
        (["not", "an", "object"], "", 'stop: ["not","an","object"]'),
        ({"details": {}}, "", "stop: Bad Gateway"),
        (None, "x" * 500, "stop: " + "x" * 200),
    ],
    ids=["plain-text", "empty", "json-list", "no-message", "truncated"],
)
def test_bodies_without_a_message_fall_back_to_text_or_reason(
    body: object, text: str, expected: str
) -> None:
    assert to_fly_error(response(502, body, text), operation="stop").message == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("2", 2.0),
        ("0.5", 0.5),
        ("-1", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("nan", None),
    ],
)
def test_retry_after_seconds_are_read_and_junk_ignored(header: str, expected: float | None) -> None:
    err = to_fly_error(
        response(429, {"error": "slow down"}, **{"retry-after": header}), operation="x"
    )
    assert isinstance(err, FlyRateLimitedError)
    assert err.retry_after_s == expected


def test_429_without_retry_after_has_none() -> None:
    err = to_fly_error(response(429, {"error": "slow down"}), operation="x")
    assert isinstance(err, FlyRateLimitedError)
    assert err.retry_after_s is None


@pytest.mark.parametrize(
    ("exc", "cls"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), FlyConnectError),
        (httpx.ConnectTimeout("connect timed out"), FlyConnectError),
        (httpx.PoolTimeout("pool exhausted"), FlyConnectError),
        (httpx.ReadTimeout("read timed out"), FlyUnavailableError),
        (httpx.ReadError("connection reset"), FlyUnavailableError),
        (httpx.WriteError("broken pipe"), FlyUnavailableError),
        (httpx.RemoteProtocolError("Server disconnected"), FlyUnavailableError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_transport_failures_say_whether_the_request_can_have_been_sent(
    exc: httpx.HTTPError, cls: type[FlyError]
) -> None:
    err = to_fly_error(exc, operation="create_machine")
    assert type(err) is cls
    assert type(exc).__name__ in err.message
    assert err.status is None


def test_fly_errors_are_not_httpx_errors() -> None:
    assert not issubclass(FlyError, httpx.HTTPError)


@pytest.mark.parametrize(
    ("token", "header"),
    [
        ("fo1_plain", "Bearer fo1_plain"),
        ("  fo1_plain\n", "Bearer fo1_plain"),
        ("Bearer fo1_plain", "Bearer fo1_plain"),
        ("bearer fo1_plain", "Bearer fo1_plain"),
        ("fm2_abc", "FlyV1 fm2_abc"),
        ("fm1r_abc, fm1a_def", "FlyV1 fm1r_abc,fm1a_def"),
        ("FlyV1 fm2_abc,fm2_def", "FlyV1 fm2_abc,fm2_def"),
        ("flyv1 fm2_abc", "FlyV1 fm2_abc"),
    ],
)
def test_authorization_scheme_follows_the_token_kind(token: str, header: str) -> None:
    assert authorization_header(token) == header


@pytest.mark.parametrize("token", ["", "   ", "Bearer ", "FlyV1"])
def test_empty_token_is_rejected_without_echoing_it(token: str) -> None:
    with pytest.raises(ValueError, match="token is empty"):
        authorization_header(token)


@pytest.mark.parametrize(
    ("state", "wanted", "verdict"),
    [
        (S.STARTED, {S.STARTED}, "reached"),
        (S.STOPPED, {S.STARTED, S.STOPPED}, "reached"),
        (S.CREATED, {S.STARTED}, "pending"),
        (S.STARTING, {S.STARTED}, "pending"),
        (S.STOPPED, {S.STARTED}, "pending"),  # a start may still be on its way
        (S.UNKNOWN, {S.STARTED}, "pending"),
        (S.DESTROYED, {S.STARTED}, "impossible"),
        (S.DESTROYING, {S.STARTED}, "impossible"),
        (S.FAILED, {S.STARTED}, "impossible"),
        (S.LAUNCH_FAILED, {S.STARTED}, "impossible"),
        (S.FAILED, {S.STOPPED}, "impossible"),
        (S.FAILED, {S.FAILED}, "reached"),
        (S.DESTROYING, {S.DESTROYED}, "pending"),
        (S.LAUNCH_FAILED, {S.DESTROYED}, "pending"),
        (S.DESTROYED, {S.DESTROYED}, "reached"),
    ],
)
def test_wait_verdict(state: MachineState, wanted: set[MachineState], verdict: str) -> None:
    assert wait_verdict(state, frozenset(wanted)) == verdict


@pytest.mark.parametrize(
    ("remaining_s", "timeout"), [(0.01, 1), (1.0, 1), (30.2, 31), (60.0, 60), (600.0, 60)]
)
def test_server_wait_is_the_remaining_time_within_fly_bounds(
    remaining_s: float, timeout: int
) -> None:
    assert server_wait_s(remaining_s) == timeout


def test_machine_config_builds_a_self_destroying_never_restarting_machine() -> None:
    config = machine_config(
        "registry.fly.io/sandbox:1",
        cpu_kind="performance",
        cpus=2,
        memory_mb=4096,
        env={"A": "1"},
        metadata={"session_id": "s1"},
    )
    assert config == {
        "image": "registry.fly.io/sandbox:1",
        "guest": {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096},
        "env": {"A": "1"},
        "metadata": {"session_id": "s1"},
        "auto_destroy": True,
        "restart": {"policy": "no"},
    }
