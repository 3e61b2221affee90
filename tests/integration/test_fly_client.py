"""FlyClient over respx: requests on the wire, parsed results, errors, retries, waits, limits."""

from __future__ import annotations

import itertools
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import respx
import structlog
from pydantic import SecretStr
from structlog.testing import capture_logs
from tenacity import wait_none

from listener.config import Settings
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
)
from listener.fly import FLY_GET_RATE, FLY_RATE, FlyApp, FlyClient, machine_config
from listener.metrics import Metrics
from listener.models import ExecResult, Lease, Machine, MachineState
from listener.ratelimit import Rate, RateLimiter
from listener.reconciler import Policy, pick_machine, reconcile

BASE = "http://fly.test"
APP = "sandboxes"
MACHINES = f"{BASE}/v1/apps/{APP}/machines"
TOKEN = "fo1_s3cret-token-value-do-not-log"
UNLIMITED = Rate(1e9, 10**9)
SETTINGS_ENV = {
    "SUPABASE_URL": "http://127.0.0.1:54321",
    "SUPABASE_SERVICE_ROLE_KEY": "service-key",
    "FLY_API_TOKEN": TOKEN,
    "FLY_APP_NAME": APP,
}


class FakeClock:
    """Monotonic time that only moves when told to (or when the limiter sleeps)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def machine_json(machine_id: str = "m1", state: str = "started", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": machine_id,
        "name": "aged-thunder-7371",
        "state": state,
        "region": "iad",
        "instance_id": "01H8ZQ4V3N6S0X9JQK2W7R5T1A",
        "private_ip": "fdaa:0:1::2",
        "config": {
            "image": "registry.fly.io/sandbox:1",
            "metadata": {"session_id": "s1", "epoch": "3", "managed_by": "sandbox-listener"},
        },
        "created_at": "2024-05-01T12:00:00Z",
        "updated_at": "2024-05-01T12:00:05Z",
        "events": [{"type": "launch", "status": "created", "source": "user", "timestamp": 1}],
    }
    body.update(over)
    return body


def ok(
    body: Any = None, status: int = 200, headers: dict[str, str] | None = None
) -> httpx.Response:
    if body is None:
        return httpx.Response(status, headers=headers)
    return httpx.Response(status, json=body, headers=headers)


def err(
    status: int, message: str = "boom", headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.Response(status, json={"error": message}, headers=headers)


def sent_json(route: respx.Route, index: int = -1) -> Any:
    return json.loads(route.calls[index].request.content)


def query(route: respx.Route, index: int = -1) -> list[tuple[str, str]]:
    request: httpx.Request = route.calls[index].request
    return request.url.params.multi_items()


@pytest.fixture(autouse=True)
def fresh_structlog() -> Iterator[None]:
    """capture_logs must see debug events whatever another test configured."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=MACHINES, assert_all_called=True) as mock:
        yield mock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fly(http: httpx.AsyncClient, clock: FakeClock) -> FlyClient:
    return FlyClient(
        http,
        base_url=BASE + "/",
        app_name=APP,
        token=TOKEN,
        limiter=RateLimiter(UNLIMITED),
        max_attempts=3,
        wait=wait_none(),
        clock=clock,
    )


# Requests on the wire and parsed results


async def test_create_sends_config_and_options_and_parses_the_machine(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    config = machine_config(
        "registry.fly.io/sandbox:1", env={"SESSION": "s1"}, metadata={"session_id": "s1"}
    )
    route = router.post("").mock(
        return_value=ok(machine_json(state="created", nonce="n1"), headers={"fly-request-id": "r1"})
    )
    machine = await fly.create_machine(
        config, region="iad", name="sbx-s1", lease_ttl_s=30, skip_launch=True
    )
    request = route.calls.last.request
    assert request.method == "POST"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"] == "application/json"
    assert "fly-machine-lease-nonce" not in request.headers
    assert sent_json(route) == {
        "config": dict(config),
        "region": "iad",
        "name": "sbx-s1",
        "lease_ttl": 30,
        "skip_launch": True,
    }
    assert machine.id == "m1"
    assert machine.state is MachineState.CREATED
    assert (machine.region, machine.instance_id, machine.name) == (
        "iad",
        "01H8ZQ4V3N6S0X9JQK2W7R5T1A",
        "aged-thunder-7371",
    )
    assert machine.session_id == "s1"
    assert machine.epoch == 3
    assert machine.created_at == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert machine.nonce == "n1"


async def test_create_without_options_sends_only_the_config(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.post("").mock(return_value=ok(machine_json(state="created")))
    machine = await fly.create_machine({"image": "img"}, region=None)
    assert sent_json(route) == {"config": {"image": "img"}}
    assert machine.nonce is None


async def test_get_machine_parses_and_tolerates_unknown_states_and_odd_timestamps(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.get("/m1").mock(
        return_value=ok(machine_json(state="hibernating", created_at="yesterday", config=None))
    )
    machine = await fly.get_machine("m1")
    assert machine.state is MachineState.UNKNOWN
    assert machine.created_at is None
    assert machine.metadata == {}
    assert machine.updated_at == datetime(2024, 5, 1, 12, 0, 5, tzinfo=UTC)


def listed(machine_id: str, **over: Any) -> dict[str, Any]:
    """A machine of a list answer with some fields replaced (None: removed)."""
    body = machine_json(machine_id, **over)
    return {key: value for key, value in body.items() if value is not None}


def with_metadata(**metadata: Any) -> dict[str, Any]:
    return {"image": "registry.fly.io/sandbox:1", "metadata": metadata}


async def test_one_malformed_field_costs_that_field_not_the_machine_or_the_list(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.get("").mock(
        return_value=ok(
            [
                listed("good"),
                listed("year-10000", created_at="10000-01-01T00:00:00Z"),
                listed("before-year-1-in-utc", created_at="0001-01-01T00:00:00+01:00"),
                listed("number-time", created_at=1714564800, updated_at=True),
                listed("no-offset", created_at="2024-05-01T12:00:00"),
                listed("offset", created_at="2024-05-01T14:00:00.123456789+02:00"),
                listed("odd-types", state=7, region=["iad"], name={}, nonce=1, instance_id=3),
                listed("no-region", region=None, instance_id=None, state="teleporting"),
                listed("config-a-string", config="image=x"),
                listed("metadata-a-list", config={"metadata": ["session_id", "s1"]}),
                listed(
                    "odd-metadata",
                    config=with_metadata(session_id="s4", epoch=3, n=None, o={"a": 1}),
                ),
                listed("huge-epoch", config=with_metadata(epoch="99999999999999999999")),
                listed("digit-epoch", config=with_metadata(epoch="²")),
            ]
        )
    )
    machines = {m.id: m for m in await fly.list_machines()}
    assert len(machines) == 13
    aware = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert machines["good"].created_at == aware
    assert machines["year-10000"].created_at is None
    assert machines["before-year-1-in-utc"].created_at is None
    assert (machines["number-time"].created_at, machines["number-time"].updated_at) == (None, None)
    assert machines["no-offset"].created_at == aware
    assert machines["offset"].created_at == datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    odd = machines["odd-types"]
    assert (odd.state, odd.region, odd.name, odd.nonce, odd.instance_id) == (
        MachineState.UNKNOWN,
        "",
        "",
        None,
        "",
    )
    bare = machines["no-region"]
    assert (bare.state, bare.region, bare.instance_id) == (MachineState.UNKNOWN, "", "")
    assert machines["config-a-string"].metadata == {}
    assert machines["metadata-a-list"].metadata == {}
    assert machines["odd-metadata"].metadata == {"session_id": "s4"}
    assert machines["odd-metadata"].epoch is None
    assert machines["huge-epoch"].epoch is None
    assert machines["digit-epoch"].epoch is None
    now = datetime(2024, 5, 2, tzinfo=UTC)
    policy = Policy.from_settings(Settings.from_env(SETTINGS_ENV))
    reconcile(machines.values(), {}, [], now, policy)  # the sweeper's arithmetic holds up
    pick_machine(machines.values(), "inc")


async def test_a_machine_without_a_usable_id_is_skipped_and_logged_not_the_list(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.get("").mock(
        return_value=ok(
            [
                listed("m1"),
                listed("", state="started"),
                listed("m2", id=None),
                listed("m3", id=42),
                "not a machine",
                None,
                listed("m4"),
            ]
        )
    )
    with capture_logs() as logs:
        machines = await fly.list_machines()
    assert [m.id for m in machines] == ["m1", "m4"]
    skipped = [e for e in logs if e["event"] == "fly_machine_unparseable"]
    assert [(e["log_level"], e["machine_id"]) for e in skipped] == [
        ("warning", ""),
        ("warning", None),
        ("warning", "42"),
        ("warning", None),
        ("warning", None),
    ]


async def test_a_list_answer_that_is_not_a_list_is_still_an_error(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.get("").mock(return_value=ok({"machines": [machine_json()]}))
    with pytest.raises(FlyUnavailableError, match="list_machines: unparseable response"):
        await fly.list_machines()


async def test_get_machine_reads_malformed_fields_as_absent(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.get("/m1").mock(
        return_value=ok(machine_json(region=5, config={"metadata": {"epoch": 3}}, nonce=[]))
    )
    machine = await fly.get_machine("m1")
    assert (machine.region, machine.metadata, machine.nonce) == ("", {}, None)


async def test_get_metadata_drops_values_that_are_not_strings(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.get("/m1/metadata")
    route.mock(return_value=ok({"session_id": "s1", "epoch": 3, "x": None}))
    assert await fly.get_metadata("m1") == {"session_id": "s1"}
    route.mock(return_value=ok(["session_id"]))
    with pytest.raises(FlyUnavailableError, match="get_metadata: unparseable response"):
        await fly.get_metadata("m1")


async def test_list_sends_every_filter_as_query_params(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.get("").mock(return_value=ok([machine_json("m1"), machine_json("m2")]))
    machines = await fly.list_machines(
        metadata={"session_id": "s1", "managed_by": "sandbox-listener"},
        state=["started", "stopped"],
        include_deleted=True,
        region="iad",
        summary=True,
    )
    assert [m.id for m in machines] == ["m1", "m2"]
    assert query(route) == [
        ("metadata.session_id", "s1"),
        ("metadata.managed_by", "sandbox-listener"),
        ("state", "started,stopped"),
        ("include_deleted", "true"),
        ("region", "iad"),
        ("summary", "true"),
    ]


async def test_list_without_filters_sends_no_query(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.get("").mock(return_value=ok([]))
    assert await fly.list_machines() == []
    assert query(route) == []


async def test_start_stop_suspend_send_the_lease_nonce_when_given(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    start = router.post("/m1/start").mock(return_value=ok({"previous_state": "stopped"}))
    stop = router.post("/m1/stop").mock(return_value=ok({"ok": True}))
    suspend = router.post("/m1/suspend").mock(return_value=ok({"ok": True}))
    await fly.start("m1", nonce="n1")
    await fly.stop("m1", signal="SIGTERM", timeout_s=10, nonce="n1")
    await fly.suspend("m1", nonce="n1")
    for route in (start, stop, suspend):
        assert route.calls.last.request.headers["fly-machine-lease-nonce"] == "n1"
    assert sent_json(stop) == {"signal": "SIGTERM", "timeout": "10s"}
    assert start.calls.last.request.content == b""
    assert suspend.calls.last.request.content == b""


async def test_stop_without_options_sends_an_empty_object_and_no_nonce(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.post("/m1/stop").mock(return_value=ok({"ok": True}))
    await fly.stop("m1")
    assert sent_json(route) == {}
    assert "fly-machine-lease-nonce" not in route.calls.last.request.headers


@pytest.mark.parametrize(("force", "value"), [(True, "true"), (False, "false")])
async def test_destroy_sends_force(
    fly: FlyClient, router: respx.MockRouter, force: bool, value: str
) -> None:
    route = router.delete("/m1").mock(return_value=ok())
    await fly.destroy("m1", force=force, nonce="n1")
    assert query(route) == [("force", value)]
    assert route.calls.last.request.headers["fly-machine-lease-nonce"] == "n1"


async def test_destroy_of_a_machine_already_gone_is_done(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.delete("/m1").mock(return_value=err(404, "machine not found"))
    await fly.destroy("m1")
    assert route.call_count == 1


async def test_exec_sends_argv_stdin_timeout_and_a_longer_http_timeout(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.post("/m1/exec").mock(
        return_value=ok({"stdout": "hi\n", "stderr": "", "exit_code": 0, "exit_signal": None})
    )
    result = await fly.exec("m1", ["echo", "hi"], stdin="input", timeout_s=30)
    assert result == ExecResult(exit_code=0, stdout="hi\n", stderr="")
    assert result.ok
    assert sent_json(route) == {"command": ["echo", "hi"], "timeout": 30, "stdin": "input"}
    assert route.calls.last.request.extensions["timeout"]["read"] == 45


async def test_exec_non_zero_exit_is_a_result_not_an_error(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.post("/m1/exec").mock(
        return_value=ok({"stdout": "", "stderr": "nope\n", "exit_code": 2, "exit_signal": 9})
    )
    result = await fly.exec("m1", ["false"], timeout_s=5)
    assert result == ExecResult(exit_code=2, stdout="", stderr="nope\n", exit_signal=9)
    assert not result.ok
    assert "stdin" not in sent_json(route)


async def test_acquire_lease_parses_fly_envelope(fly: FlyClient, router: respx.MockRouter) -> None:
    route = router.post("/m1/lease").mock(
        return_value=ok(
            {
                "status": "success",
                "data": {
                    "nonce": "n1",
                    "expires_at": 1714564800,
                    "owner": "me@example.com",
                    "description": "claim",
                    "version": "01H8",
                },
            },
            status=201,
        )
    )
    lease = await fly.acquire_lease("m1", 30, "claim")
    assert lease == Lease(
        nonce="n1", expires_at=1714564800, owner="me@example.com", description="claim"
    )
    assert sent_json(route) == {"ttl": 30, "description": "claim"}
    assert "fly-machine-lease-nonce" not in route.calls.last.request.headers


async def test_acquire_lease_tolerates_the_bare_lease_shape(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.post("/m1/lease").mock(return_value=ok({"nonce": "n2", "expires_at": 5}, status=201))
    assert await fly.acquire_lease("m1", 30) == Lease(nonce="n2", expires_at=5)


async def test_acquire_lease_held_by_another_is_a_conflict_with_fly_message(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.post("/m1/lease").mock(
        return_value=httpx.Response(
            409, json={"status": "error", "message": "lease currently held by other@example.com"}
        )
    )
    with pytest.raises(FlyConflictError, match="lease currently held by other") as info:
        await fly.acquire_lease("m1", 30)
    assert info.value.status == 409
    assert route.call_count == 1


async def test_refresh_lease_sends_the_nonce_and_rejects_a_changed_one(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.post("/m1/lease").mock(
        side_effect=[
            ok({"status": "success", "data": {"nonce": "n1", "expires_at": 10}}, status=201),
            ok({"status": "success", "data": {"nonce": "other", "expires_at": 20}}, status=201),
        ]
    )
    assert (await fly.refresh_lease("m1", "n1", 60)).expires_at == 10
    assert route.calls.last.request.headers["fly-machine-lease-nonce"] == "n1"
    assert sent_json(route) == {"ttl": 60}
    with pytest.raises(FlyConflictError, match="another nonce"):
        await fly.refresh_lease("m1", "n1", 60)


async def test_release_lease_sends_the_nonce_and_a_missing_lease_is_released(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.delete("/m1/lease").mock(
        side_effect=[ok({"status": "success", "data": {"ok": True}}), err(404, "no lease")]
    )
    await fly.release_lease("m1", "n1")
    await fly.release_lease("m1", "n1")
    assert [c.request.headers["fly-machine-lease-nonce"] for c in route.calls] == ["n1", "n1"]


async def test_metadata_get_set_delete(fly: FlyClient, router: respx.MockRouter) -> None:
    get = router.get("/m1/metadata").mock(return_value=ok({"session_id": "s1"}))
    put = router.post("/m1/metadata/odd%2Fkey").mock(return_value=ok(status=204))
    delete = router.delete("/m1/metadata/epoch").mock(return_value=ok(status=204))
    assert await fly.get_metadata("m1") == {"session_id": "s1"}
    await fly.set_metadata("m1", "odd/key", "v", nonce="n1")
    await fly.delete_metadata("m1", "epoch")
    assert sent_json(put) == {"value": "v"}
    assert put.calls.last.request.headers["fly-machine-lease-nonce"] == "n1"
    assert delete.calls.last.request.content == b""
    assert get.call_count == 1


async def test_macaroon_tokens_use_the_flyv1_scheme(
    http: httpx.AsyncClient, router: respx.MockRouter
) -> None:
    fly = FlyClient(
        http,
        base_url=BASE,
        app_name=APP,
        token=SecretStr("FlyV1 fm2_abc,fm2_def"),
        wait=wait_none(),
    )
    route = router.get("/m1").mock(return_value=ok(machine_json()))
    await fly.get_machine("m1")
    assert route.calls.last.request.headers["authorization"] == "FlyV1 fm2_abc,fm2_def"


async def test_from_settings_uses_endpoint_app_token_attempts_and_rates(
    http: httpx.AsyncClient,
) -> None:
    settings = Settings.from_env(
        {
            "SUPABASE_URL": "http://127.0.0.1:54321",
            "SUPABASE_SERVICE_ROLE_KEY": "service-key",
            "FLY_API_TOKEN": TOKEN,
            "FLY_APP_NAME": "other-app",
            "FLY_API_HOSTNAME": "http://127.0.0.1:4280",
            "FLY_RATE_PER_S": "20",
            "FLY_BURST": "1",
            "FLY_MAX_ATTEMPTS": "1",
        }
    )
    fly = FlyClient.from_settings(settings, http)
    with respx.mock(base_url="http://127.0.0.1:4280/v1/apps/other-app/machines") as mock:
        start = mock.post("/m1/start").mock(return_value=ok())
        get = mock.get("/m1").mock(return_value=err(503))
        await fly.start("m1")
        started = time.perf_counter()
        await fly.start("m1")  # burst 1 at 20/s: the second start waits ~50 ms
        waited_s = time.perf_counter() - started
        with pytest.raises(FlyServerError):
            await fly.get_machine("m1")
    assert start.calls.last.request.headers["authorization"] == f"Bearer {TOKEN}"
    assert waited_s >= 0.04
    assert get.call_count == 1  # FLY_MAX_ATTEMPTS=1


# Exec answers, read as a stream


def streamed(
    parts: Iterable[bytes], status: int = 200, headers: dict[str, str] | None = None
) -> httpx.Response:
    """A response whose body is produced part by part, as the server writes it."""

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    return httpx.Response(status, content=body(), headers=headers)


async def test_exec_reads_an_answer_arriving_in_pieces_and_asks_for_it_uncompressed(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    body = '{"stderr":"\\ud83d\\ude00 é\\u0000","exit_signal":null,"stdout":"ok\\n","exit_code":0}'
    raw = body.encode()
    route = router.post("/m1/exec").mock(
        return_value=streamed(raw[i : i + 3] for i in range(0, len(raw), 3))
    )
    result = await fly.exec("m1", ["true"], timeout_s=5)
    assert result == ExecResult(0, "ok\n", "😀 é\u0000")
    assert route.calls.last.request.headers["accept-encoding"] == "identity"


async def test_exec_keeps_64_kib_of_each_output_by_default_and_flags_the_cut(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.post("/m1/exec").mock(
        return_value=ok({"exit_code": 1, "stdout": "é" * 40_000, "stderr": "short"})
    )
    result = await fly.exec("m1", ["cat", "big"], timeout_s=5)
    assert (result.stdout, result.stdout_truncated) == ("é" * 32_768, True)
    assert (result.stderr, result.stderr_truncated) == ("short", False)
    assert result.exit_code == 1


async def test_exec_keeps_what_output_limit_bytes_says(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.post("/m1/exec").mock(return_value=ok({"exit_code": 0, "stdout": "abc", "stderr": "de"}))
    result = await fly.exec("m1", ["true"], timeout_s=5, output_limit_bytes=2)
    assert result == ExecResult(0, "ab", "de", stdout_truncated=True)


async def test_exec_finds_the_exit_code_after_a_huge_stdout_without_holding_it(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    piece = b"x" * 1023 + b"\\n" * 512 + b"y"  # 2 KiB on the wire, 1,536 characters
    count = 16_000  # 32 MB
    parts = itertools.chain(
        [b'{"stdout":"'], itertools.repeat(piece, count), [b'","exit_code":3,"exit_signal":9}']
    )
    router.post("/m1/exec").mock(return_value=streamed(parts))
    tracemalloc.start()
    try:
        result = await fly.exec("m1", ["yes"], timeout_s=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (result.exit_code, result.exit_signal, result.stdout_truncated) == (3, 9, True)
    assert result.stdout == (("x" * 1023 + "\n" * 512 + "y") * 43)[:65536]
    assert peak < 2_000_000, f"held {peak} bytes of a {count * len(piece)}-byte answer"


@pytest.mark.parametrize(
    "body",
    [b"<html>502 Bad Gateway</html>", b'{"stdout":"hi"}', b'{"exit_code":0', b'{"exit_code":"0"}'],
    ids=["html", "no-exit-code", "cut-short", "exit-code-a-string"],
)
async def test_exec_unparseable_answer_is_a_typed_error_and_not_retried(
    fly: FlyClient, router: respx.MockRouter, body: bytes
) -> None:
    route = router.post("/m1/exec").mock(
        return_value=httpx.Response(200, content=body, headers={"fly-request-id": "r7"})
    )
    with pytest.raises(FlyUnavailableError, match="exec: unparseable response from Fly") as info:
        await fly.exec("m1", ["true"], timeout_s=5)
    assert (info.value.status, info.value.request_id) == (200, "r7")
    assert info.value.__cause__ is None
    assert route.call_count == 1


async def test_exec_answer_over_the_ceiling_stops_reading_with_a_typed_error(
    http: httpx.AsyncClient, router: respx.MockRouter
) -> None:
    fly = FlyClient(
        http,
        base_url=BASE,
        app_name=APP,
        token=TOKEN,
        limiter=RateLimiter(UNLIMITED),
        exec_body_limit_bytes=1_000_000,
    )
    sent: list[int] = []

    def endless() -> Iterator[bytes]:
        yield b'{"exit_code":0,"stdout":"'
        for n in itertools.count():
            sent.append(n)
            yield b"x" * 65536

    route = router.post("/m1/exec").mock(return_value=streamed(endless()))
    with pytest.raises(FlyUnavailableError, match="over the 1000000-byte ceiling; reading stopped"):
        await fly.exec("m1", ["yes"], timeout_s=5)
    assert len(sent) == 16  # 16 x 64 KiB passes 1 MB: not a chunk more was asked for
    assert route.call_count == 1


async def test_exec_connection_lost_mid_answer_is_unavailable_and_not_retried(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    def dropped() -> Iterator[bytes]:
        yield b'{"exit_code":0,"stdout":"par'
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")

    route = router.post("/m1/exec").mock(return_value=streamed(dropped()))
    with pytest.raises(FlyUnavailableError, match="Fly unreachable") as info:
        await fly.exec("m1", ["true"], timeout_s=5)
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
    assert route.call_count == 1


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, FlyNotFoundError), (408, FlyTimeoutError), (412, FlyConflictError)],
)
async def test_exec_error_answers_keep_their_type_and_fly_message(
    fly: FlyClient, router: respx.MockRouter, status: int, error: type[FlyError]
) -> None:
    router.post("/m1/exec").mock(
        return_value=streamed([b'{"error":"deadline', b'_exceeded"}'], status=status)
    )
    with pytest.raises(error, match="exec: deadline_exceeded") as info:
        await fly.exec("m1", ["sleep", "60"], timeout_s=5)
    assert info.value.status == status


# Errors


async def test_not_found_carries_the_fly_request_id(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.get("/nope").mock(
        return_value=err(404, "machine not found", headers={"fly-request-id": "r9"})
    )
    with pytest.raises(FlyNotFoundError) as info:
        await fly.get_machine("nope")
    assert (info.value.status, info.value.request_id) == (404, "r9")
    assert "machine not found" in str(info.value)


@pytest.mark.parametrize(
    "body",
    [b"<html>502 Bad Gateway</html>", b'{"state": "started"}', b'{"id": ""}', b"[]"],
    ids=["html", "no-id", "empty-id", "list"],
)
async def test_unparseable_2xx_is_a_typed_error_not_a_crash(
    fly: FlyClient, router: respx.MockRouter, body: bytes
) -> None:
    router.get("/m1").mock(return_value=httpx.Response(200, content=body))
    with pytest.raises(FlyUnavailableError, match="unparseable response") as info:
        await fly.get_machine("m1")
    assert info.value.__cause__ is None  # the body is not dragged into tracebacks


async def test_connect_error_surfaces_as_unavailable_chained_from_httpx(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.get("/m1").mock(side_effect=httpx.ConnectError("Connection refused"))
    with pytest.raises(FlyUnavailableError) as info:
        await fly.get_machine("m1")
    assert isinstance(info.value, FlyConnectError)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert not isinstance(info.value, httpx.HTTPError)
    assert route.call_count == 3


async def test_capacity_on_create_is_not_retried(fly: FlyClient, router: respx.MockRouter) -> None:
    route = router.post("").mock(
        return_value=httpx.Response(
            412, json={"error": "insufficient resources", "status": "insufficient_capacity"}
        )
    )
    with pytest.raises(FlyCapacityError) as info:
        await fly.create_machine({"image": "img"}, region="iad")
    assert info.value.code == "insufficient_capacity"
    assert route.call_count == 1


@pytest.mark.parametrize("status", [400, 401, 409, 422])
async def test_client_errors_are_not_retried(
    fly: FlyClient, router: respx.MockRouter, status: int
) -> None:
    route = router.get("/m1").mock(return_value=err(status))
    with pytest.raises(FlyClientError):
        await fly.get_machine("m1")
    assert route.call_count == 1


# Retries


async def test_get_retries_a_503_and_logs_the_retry(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.get("/m1").mock(side_effect=[err(503, "unavailable"), ok(machine_json())])
    with capture_logs() as logs:
        machine = await fly.get_machine("m1")
    assert machine.id == "m1"
    assert route.call_count == 2
    retried = [e for e in logs if e["event"] == "fly_request_retrying"]
    assert len(retried) == 1
    assert retried[0]["log_level"] == "warning"
    assert (retried[0]["operation"], retried[0]["machine_id"], retried[0]["attempt"]) == (
        "get_machine",
        "m1",
        1,
    )
    assert retried[0]["status"] == 503
    finished = [e for e in logs if e["event"] == "fly_request_finished"]
    assert [(e["status"], e["attempt"], e["log_level"]) for e in finished] == [
        (503, 1, "debug"),
        (200, 2, "debug"),
    ]
    assert all(e["duration_ms"] >= 0 and e["operation"] == "get_machine" for e in finished)
    assert not [e for e in logs if e["event"] == "fly_request_failed"]


async def test_calls_and_retries_are_counted_when_metrics_are_given(
    http: httpx.AsyncClient, router: respx.MockRouter
) -> None:
    metrics = Metrics()
    fly = FlyClient(
        http,
        base_url=BASE,
        app_name=APP,
        token=TOKEN,
        limiter=RateLimiter(UNLIMITED),
        wait=wait_none(),
        metrics=metrics,
    )
    router.get("/m1").mock(
        side_effect=[err(503), httpx.ConnectError("refused"), ok(machine_json())]
    )
    await fly.get_machine("m1")

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("fly_api_calls_total", operation="get_machine", status="503") == 1
    assert sample("fly_api_calls_total", operation="get_machine", status="unreachable") == 1
    assert sample("fly_api_calls_total", operation="get_machine", status="200") == 1
    assert sample("fly_api_retries_total", operation="get_machine") == 2


@pytest.mark.parametrize(
    "failure",
    [err(500), err(502), err(429), err(408), httpx.ReadTimeout("slow"), httpx.ConnectError("no")],
    ids=["500", "502", "429", "408", "read-timeout", "connect"],
)
async def test_idempotent_calls_retry_transient_failures(
    fly: FlyClient, router: respx.MockRouter, failure: httpx.Response | Exception
) -> None:
    route = router.post("/m1/stop").mock(side_effect=[failure, ok({"ok": True})])
    await fly.stop("m1")
    assert route.call_count == 2


async def test_retries_are_bounded_by_attempts(fly: FlyClient, router: respx.MockRouter) -> None:
    route = router.delete("/m1").mock(return_value=err(503))
    with pytest.raises(FlyServerError):
        await fly.destroy("m1")
    assert route.call_count == 3


async def test_retry_after_is_honoured_when_longer_than_the_backoff(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.get("/m1").mock(
        side_effect=[err(429, headers={"retry-after": "0.05"}), ok(machine_json())]
    )
    with capture_logs() as logs:
        await fly.get_machine("m1")
    assert route.call_count == 2
    assert [e["sleep_s"] for e in logs if e["event"] == "fly_request_retrying"] == [0.05]


async def test_retry_after_beyond_the_retry_budget_gives_up_at_once(
    http: httpx.AsyncClient, router: respx.MockRouter
) -> None:
    fly = FlyClient(
        http,
        base_url=BASE,
        app_name=APP,
        token=TOKEN,
        limiter=RateLimiter(UNLIMITED),
        wait=wait_none(),
        max_retry_time_s=30,
    )
    route = router.get("/m1").mock(return_value=err(429, headers={"retry-after": "120"}))
    with pytest.raises(FlyRateLimitedError) as info:
        await fly.get_machine("m1")
    assert info.value.retry_after_s == 120
    assert route.call_count == 1


@pytest.mark.parametrize(
    ("failure", "cause"),
    [
        (err(408, "deadline exceeded"), FlyTimeoutError),
        (err(500), FlyServerError),
        (err(503), FlyServerError),
        (httpx.ReadTimeout("read timed out"), FlyUnavailableError),
        (httpx.RemoteProtocolError("Server disconnected"), FlyUnavailableError),
        (httpx.Response(200, content=b"{}"), FlyUnavailableError),
    ],
    ids=["408", "500", "503", "read-timeout", "disconnected", "unreadable-200"],
)
async def test_create_that_may_have_reached_fly_is_outcome_unknown_after_one_call(
    fly: FlyClient,
    router: respx.MockRouter,
    failure: httpx.Response | Exception,
    cause: type[FlyError],
) -> None:
    route = router.post("").mock(side_effect=[failure])
    with pytest.raises(FlyOutcomeUnknownError, match="list by metadata and adopt") as info:
        await fly.create_machine({"image": "img"}, region="iad")
    assert route.call_count == 1
    assert type(info.value.__cause__) is cause


@pytest.mark.parametrize(
    "failure",
    [err(429), httpx.ConnectError("refused"), httpx.ConnectTimeout("connect timed out")],
    ids=["429", "connect-error", "connect-timeout"],
)
async def test_create_retries_when_fly_cannot_have_acted(
    fly: FlyClient, router: respx.MockRouter, failure: httpx.Response | Exception
) -> None:
    route = router.post("").mock(side_effect=[failure, ok(machine_json(state="created"))])
    machine = await fly.create_machine({"image": "img"}, region="iad")
    assert machine.id == "m1"
    assert route.call_count == 2


async def test_create_gives_up_on_connect_errors_as_unreachable_not_unknown(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    route = router.post("").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(FlyConnectError):
        await fly.create_machine({"image": "img"}, region="iad")
    assert route.call_count == 3


@pytest.mark.parametrize("failure", [err(503), err(408), httpx.ReadTimeout("slow")])
async def test_exec_is_not_retried_once_sent(
    fly: FlyClient, router: respx.MockRouter, failure: httpx.Response | Exception
) -> None:
    route = router.post("/m1/exec").mock(side_effect=[failure])
    with pytest.raises(FlyError):
        await fly.exec("m1", ["echo"], timeout_s=5)
    assert route.call_count == 1


@pytest.mark.parametrize("failure", [err(429), httpx.ConnectError("refused")])
async def test_exec_retries_when_never_run(
    fly: FlyClient, router: respx.MockRouter, failure: httpx.Response | Exception
) -> None:
    route = router.post("/m1/exec").mock(side_effect=[failure, ok({"exit_code": 0})])
    assert (await fly.exec("m1", ["echo"], timeout_s=5)).ok
    assert route.call_count == 2


# Waiting


async def test_wait_loops_on_408_rereading_the_machine_until_started(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    get = router.get("/m1").mock(
        side_effect=[
            ok(machine_json(state="created")),
            ok(machine_json(state="starting")),
        ]
    )
    wait = router.get("/m1/wait").mock(
        side_effect=[err(408, "deadline exceeded"), ok({"ok": True, "state": "started"})]
    )
    machine = await fly.wait_for_state("m1", "started", timeout_s=90)
    assert machine.state is MachineState.STARTED
    # GET, wait (408), GET, wait (200 names the state): no GET after the 200
    assert (get.call_count, wait.call_count) == (2, 2)
    assert query(wait, 0) == [("state", "started"), ("timeout", "60")]
    assert wait.calls[0].request.extensions["timeout"]["read"] == 75


async def test_wait_from_a_known_machine_costs_one_call(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    wait = router.get("/m1/wait").mock(return_value=ok({"ok": True}))  # no GET route: none made
    created = Machine(id="m1", state=MachineState.CREATED, region="iad", instance_id="v1")
    machine = await fly.wait_for_state("m1", "started", timeout_s=30, known=created)
    assert machine.state is MachineState.STARTED and machine.region == "iad"
    assert wait.call_count == 1


async def test_wait_rereads_when_a_200_names_an_unwanted_state(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    get = router.get("/m1").mock(
        side_effect=[ok(machine_json(state="starting")), ok(machine_json(state="started"))]
    )
    wait = router.get("/m1/wait").mock(return_value=ok({"ok": True, "state": "stopped"}))
    machine = await fly.wait_for_state("m1", "started", timeout_s=30)
    assert machine.state is MachineState.STARTED
    assert (get.call_count, wait.call_count) == (2, 1)


async def test_wait_returns_at_once_when_already_there(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.get("/m1").mock(return_value=ok(machine_json(state="started")))
    assert (await fly.wait_for_state("m1", timeout_s=10)).state is MachineState.STARTED


async def test_wait_stops_at_the_deadline_with_shrinking_server_waits(
    fly: FlyClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    router.get("/m1").mock(return_value=ok(machine_json(state="starting")))

    def slow_408(request: httpx.Request) -> httpx.Response:
        clock.now += int(request.url.params["timeout"])
        return err(408, "machine failed to reach desired state, started, currently starting")

    wait = router.get("/m1/wait").mock(side_effect=slow_408)
    with pytest.raises(FlyTimeoutError, match="still starting after 90s") as info:
        await fly.wait_for_state("m1", "started", timeout_s=90)
    assert info.value.status is None
    assert [dict(query(wait, i))["timeout"] for i in range(wait.call_count)] == ["60", "30"]
    assert [c.request.extensions["timeout"]["read"] for c in wait.calls] == [75, 45]


@pytest.mark.parametrize("state", ["destroyed", "destroying", "failed", "launch_failed"])
async def test_wait_for_started_fails_fast_when_the_machine_cannot_start(
    fly: FlyClient, router: respx.MockRouter, state: str
) -> None:
    router.get("/m1").mock(
        side_effect=[ok(machine_json(state="starting")), ok(machine_json(state=state))]
    )
    router.get("/m1/wait").mock(return_value=err(408))
    with pytest.raises(FlyStateError) as info:
        await fly.wait_for_state("m1", "started", timeout_s=60)
    assert info.value.state == state


async def test_wait_for_destroyed_treats_404_as_done(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.get("/m1").mock(side_effect=[ok(machine_json(state="destroying")), err(404)])
    wait = router.get("/m1/wait").mock(return_value=err(404, "machine not found"))
    machine = await fly.wait_for_state("m1", "destroyed", timeout_s=60)
    assert machine.state is MachineState.DESTROYED
    assert machine.region == "iad"  # the last machine read, marked destroyed
    assert query(wait) == [("state", "destroyed"), ("timeout", "60")]


async def test_wait_for_destroyed_of_an_unknown_machine_is_done(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.get("/gone").mock(return_value=err(404))
    machine = await fly.wait_for_state("gone", "destroyed", timeout_s=60)
    assert (machine.id, machine.state) == ("gone", MachineState.DESTROYED)


async def test_wait_for_started_of_an_unknown_machine_is_not_found(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.get("/m1").mock(side_effect=[ok(machine_json(state="starting")), err(404)])
    router.get("/m1/wait").mock(return_value=err(404))
    with pytest.raises(FlyNotFoundError):
        await fly.wait_for_state("m1", "started", timeout_s=60)


async def test_wait_for_stopped_sends_the_version_just_read(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.get("/m1").mock(
        side_effect=[ok(machine_json(state="stopping")), ok(machine_json(state="stopped"))]
    )
    wait = router.get("/m1/wait").mock(return_value=ok({"ok": True}))
    await fly.wait_for_state("m1", "stopped", timeout_s=5.5)
    assert query(wait) == [
        ("state", "stopped"),
        ("timeout", "6"),
        ("version", "01H8ZQ4V3N6S0X9JQK2W7R5T1A"),
    ]


async def test_wait_for_several_states_repeats_the_param_and_passes_instance_id(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.get("/m1").mock(
        side_effect=[ok(machine_json(state="starting")), ok(machine_json(state="suspended"))]
    )
    wait = router.get("/m1/wait").mock(return_value=ok({"ok": True}))
    machine = await fly.wait_for_state(
        "m1", ["started", "suspended"], timeout_s=30, instance_id="01VERSION"
    )
    assert machine.state is MachineState.SUSPENDED
    assert query(wait) == [
        ("state", "started"),
        ("state", "suspended"),
        ("timeout", "30"),
        ("version", "01VERSION"),
    ]


async def test_wait_400_is_raised_not_looped(fly: FlyClient, router: respx.MockRouter) -> None:
    router.get("/m1").mock(return_value=ok(machine_json(state="starting")))
    wait = router.get("/m1/wait").mock(return_value=err(400, "invalid_argument"))
    with pytest.raises(FlyClientError, match="invalid_argument"):
        await fly.wait_for_state("m1", timeout_s=30)
    assert wait.call_count == 1


@pytest.mark.parametrize("state", ["settled", "bogus", []])
async def test_wait_rejects_states_it_cannot_wait_for(fly: FlyClient, state: Any) -> None:
    with pytest.raises(ValueError, match="can only wait for"):
        await fly.wait_for_state("m1", state, timeout_s=1)


# Rate limiting


async def test_bursts_queue_on_the_limiter_instead_of_reaching_fly(
    http: httpx.AsyncClient, router: respx.MockRouter, clock: FakeClock
) -> None:
    limiter = RateLimiter(FLY_RATE, {"get": FLY_GET_RATE}, clock=clock, sleep=clock.sleep)
    fly = FlyClient(http, base_url=BASE, app_name=APP, token=TOKEN, limiter=limiter)
    router.post("/m1/start").mock(return_value=ok())
    router.post("/m2/start").mock(return_value=ok())
    router.get("/m1").mock(return_value=ok(machine_json()))
    router.post("").mock(return_value=ok(machine_json()))
    for _ in range(4):
        await fly.start("m1")
    assert clock.slept == [1.0]
    await fly.start("m2")  # another machine: its own bucket
    for _ in range(10):
        await fly.get_machine("m1")  # get has its own, larger bucket
    assert clock.slept == [1.0]
    await fly.get_machine("m1")
    assert clock.slept == [1.0, pytest.approx(0.2)]
    for _ in range(4):  # create is scoped to the app
        await fly.create_machine({"image": "img"}, region=None)
    assert clock.slept == [1.0, pytest.approx(0.2), 1.0]


# Secrets


async def test_token_never_appears_in_repr_logs_or_errors(
    fly: FlyClient, router: respx.MockRouter
) -> None:
    router.get("/m1").mock(side_effect=[err(503), err(401, "Authenticate: token validation error")])
    router.post("").mock(side_effect=httpx.ReadTimeout("read timed out"))
    with capture_logs() as logs:
        with pytest.raises(FlyClientError) as auth_error:
            await fly.get_machine("m1")
        with pytest.raises(FlyOutcomeUnknownError) as unknown:
            await fly.create_machine({"image": "img"}, region="iad")
    texts = [repr(fly), str(fly), repr(vars(fly)), str(logs)]
    for exc in (auth_error.value, unknown.value):
        texts += [str(exc), repr(exc), repr(exc.__cause__), str(exc.__cause__)]
    assert logs
    assert all(TOKEN not in text for text in texts)


# Apps (the doctor's check of the token and the app)

APP_URL = f"{BASE}/v1/apps/{APP}"


@pytest.fixture
def app_router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=APP_URL, assert_all_called=True) as mock:
        yield mock


async def test_get_app_reads_the_app_with_the_token(
    fly: FlyClient, app_router: respx.MockRouter
) -> None:
    body = {
        "id": APP,
        "name": APP,
        "status": "deployed",
        "organization": {"name": "Acme", "slug": "acme"},
        "machine_count": 3,
        "volume_count": 0,
        "network": "default",
    }
    route = app_router.get("").mock(return_value=ok(body))
    app = await fly.get_app()
    assert app == FlyApp(name=APP, status="deployed", organization="acme", machine_count=3)
    request: httpx.Request = route.calls.last.request
    assert (request.method, str(request.url), request.content) == ("GET", APP_URL, b"")
    assert request.headers["authorization"] == f"Bearer {TOKEN}"


async def test_get_app_tolerates_a_bare_app(fly: FlyClient, app_router: respx.MockRouter) -> None:
    app_router.get("").mock(return_value=ok({"name": APP}))
    assert await fly.get_app() == FlyApp(name=APP, status="", organization="")


async def test_get_app_reads_malformed_fields_as_absent(
    fly: FlyClient, app_router: respx.MockRouter
) -> None:
    app_router.get("").mock(
        return_value=ok(
            {"name": APP, "status": 1, "organization": "personal", "machine_count": "many"}
        )
    )
    assert await fly.get_app() == FlyApp(name=APP, status="", organization="")


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, FlyClientError), (403, FlyClientError), (404, FlyNotFoundError)],
    ids=["bad-token", "other-org", "no-such-app"],
)
async def test_get_app_failures_are_typed_and_not_retried(
    fly: FlyClient, app_router: respx.MockRouter, status: int, error: type[FlyError]
) -> None:
    route = app_router.get("").mock(return_value=err(status, "nope"))
    with pytest.raises(error) as info:
        await fly.get_app()
    assert info.value.status == status
    assert str(info.value).startswith("get_app: nope")
    assert route.call_count == 1


async def test_get_app_retries_a_503(fly: FlyClient, app_router: respx.MockRouter) -> None:
    route = app_router.get("").mock(side_effect=[err(503), ok({"name": APP})])
    assert (await fly.get_app()).name == APP
    assert route.call_count == 2
