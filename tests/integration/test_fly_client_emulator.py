"""The Fly client against the local emulator over real HTTP, including its fault modes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from tenacity import wait_fixed, wait_none
from tenacity.wait import WaitBaseT

from listener.errors import (
    FlyCapacityError,
    FlyConflictError,
    FlyError,
    FlyNotFoundError,
    FlyOutcomeUnknownError,
)
from listener.fly import FlyClient, fly_rate_limiter, machine_config
from listener.local.fly_emulator import EmulatorOptions, FlyEmulator
from listener.models import MachineState
from listener.ratelimit import Rate, RateLimiter

TOKEN = "emulator-token"
Start = Callable[..., Awaitable[tuple[FlyEmulator, FlyClient]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start an emulator with `knobs` (Fly's rate limits lifted unless given) and a client for
    it (no backoff unless given, so retries are quick)."""
    running: list[FlyEmulator] = []
    async with httpx.AsyncClient() as http:

        async def make(
            limiter: RateLimiter | None = None, wait: WaitBaseT | None = None, **knobs: Any
        ) -> tuple[FlyEmulator, FlyClient]:
            unlimited = {
                "action_rate_per_s": 1000.0,
                "action_burst": 1000,
                "get_rate_per_s": 1000.0,
                "get_burst": 1000,
            }
            emulator = FlyEmulator(EmulatorOptions(token=TOKEN, **{**unlimited, **knobs}))
            await emulator.start()
            running.append(emulator)
            client = FlyClient(
                http,
                base_url=emulator.url,
                app_name=emulator.options.app_name,
                token=TOKEN,
                limiter=limiter if limiter is not None else RateLimiter(Rate(1000, 1000)),
                wait=wait if wait is not None else wait_none(),
            )
            return emulator, client

        yield make
        for emulator in running:
            await emulator.stop()


def tagged(session: str) -> dict[str, object]:
    return dict(machine_config("img", metadata={"session_id": session, "managed_by": "t"}))


async def test_a_machine_lifecycle_through_the_client(start: Start) -> None:
    emulator, fly = await start()
    created = await fly.create_machine(tagged("s1"), region="ord")
    assert created.state is MachineState.CREATED and created.region == "ord"
    started = await fly.wait_for_state(created.id, "started", timeout_s=10, known=created)
    assert started.state is MachineState.STARTED
    result = await fly.exec(created.id, ["sh", "-c", "echo hi; exit 3"], timeout_s=5)
    assert (result.exit_code, result.stdout, result.ok) == (3, "hi\n", False)
    assert [m.id for m in await fly.list_machines(metadata={"session_id": "s1"})] == [created.id]
    assert await fly.list_machines(metadata={"session_id": "other"}) == []
    lease = await fly.acquire_lease(created.id, ttl_s=30)
    with pytest.raises(FlyConflictError):
        await fly.stop(created.id)  # leased: the nonce is required
    await fly.release_lease(created.id, lease.nonce)
    await fly.destroy(created.id)
    await fly.destroy(created.id)  # 404: already done
    gone = await fly.wait_for_state(created.id, "destroyed", timeout_s=10)
    assert gone.state is MachineState.DESTROYED
    with pytest.raises(FlyNotFoundError):
        await fly.get_machine("0123456789abcd")
    assert emulator.calls("create") == 1


async def test_server_errors_on_idempotent_calls_are_retried(start: Start) -> None:
    emulator, fly = await start()
    machine = await fly.create_machine(tagged("s1"), region=None)
    emulator.set_options(p_5xx=0.5, seed=3)
    for _ in range(10):
        assert (await fly.get_machine(machine.id)).id == machine.id
    assert emulator.calls("get", status=500) + emulator.calls("get", status=503) > 0


async def test_a_408_after_a_real_create_is_outcome_unknown_and_the_machine_can_be_adopted(
    start: Start,
) -> None:
    emulator, fly = await start(p_408_after_create=1.0)
    with pytest.raises(FlyOutcomeUnknownError):
        await fly.create_machine(tagged("s408"), region=None)
    assert emulator.calls("create") == 1, "a create that may have happened must not be repeated"
    (adopted,) = await fly.list_machines(metadata={"session_id": "s408"})
    assert adopted.session_id == "s408"


async def test_capacity_errors_are_typed_and_not_retried(start: Start) -> None:
    emulator, fly = await start(p_capacity=1.0)
    with pytest.raises(FlyCapacityError):
        await fly.create_machine(tagged("s1"), region="iad")
    assert emulator.calls("create") == 1


async def test_a_burst_queues_in_the_limiter_and_no_429_reaches_the_caller(
    start: Start,
) -> None:
    limits = {"action_rate_per_s": 20.0, "action_burst": 3}
    emulator, fly = await start(limiter=fly_rate_limiter(Rate(20, 3), Rate(50, 10)), **limits)
    machines = await asyncio.gather(
        *(fly.create_machine(tagged(f"s{i}"), region=None) for i in range(15))
    )
    assert len({m.id for m in machines}) == 15
    assert emulator.calls("create", status=429) == 0, "the limiter let a burst through"


async def test_without_the_limiter_fly_answers_429_and_the_client_retries(start: Start) -> None:
    emulator, fly = await start(action_rate_per_s=20.0, action_burst=3)
    machine = await fly.create_machine(tagged("s1"), region=None)
    await fly.wait_for_state(machine.id, "started", timeout_s=10, known=machine)
    unlimited = FlyClient(
        fly._http,  # the same connection pool, no limiter
        base_url=emulator.url,
        app_name=emulator.options.app_name,
        token=TOKEN,
        limiter=RateLimiter(Rate(10_000, 10_000)),
        wait=wait_fixed(0.1),
        max_attempts=20,
    )
    results = await asyncio.gather(
        *(unlimited.exec(machine.id, ["true"], timeout_s=5) for _ in range(8))
    )
    assert all(r.ok for r in results)
    assert emulator.calls("exec", status=429) > 0, "the emulator should have rate-limited"


async def test_unreachable_fly_is_a_typed_error(start: Start) -> None:
    emulator, fly = await start()
    await emulator.stop()
    with pytest.raises(FlyError) as caught:  # no httpx error escapes
        await fly.get_machine("0123456789abcd")
    assert not isinstance(caught.value, httpx.HTTPError)
