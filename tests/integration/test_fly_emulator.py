"""The Fly Machines emulator over real HTTP on loopback: API behaviour, faults, control, stats."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from listener.local.fly_emulator import EmulatorOptions, FlyEmulator, serve_forever
from listener.local.fly_state import IdSource, MachineRecord, image_ref
from listener.models import MachineState

TOKEN = "emulator-test-token"
APP = "sandbox-local"
IMAGE = "registry.fly.io/sandbox:1.2"
SPEC = Path(__file__).with_name("fly-machines-openapi.json")  # Fly's published OpenAPI
AUTH = {"Authorization": f"Bearer {TOKEN}"}

Serve = Callable[..., Awaitable[tuple[FlyEmulator, httpx.AsyncClient]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start emulators with the given options (rate limits off unless asked) and a client each."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> tuple[FlyEmulator, httpx.AsyncClient]:
            options = EmulatorOptions(token=TOKEN, **{"rate_limits": False, "seed": 7, **overrides})
            emulator = await stack.enter_async_context(FlyEmulator(options))
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=f"{emulator.url}/v1/apps/{APP}", headers=AUTH, timeout=10
                )
            )
            return emulator, client

        yield start


async def create(
    client: httpx.AsyncClient, config: dict[str, Any] | None = None, **body: Any
) -> dict[str, Any]:
    response = await client.post(
        "/machines", json={"config": {"image": IMAGE, **(config or {})}, **body}
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_for(
    client: httpx.AsyncClient, machine_id: str, state: str, **params: Any
) -> dict[str, Any]:
    response = await client.get(
        f"/machines/{machine_id}/wait", params={"state": state, "timeout": 5, **params}
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


async def started(
    client: httpx.AsyncClient, config: dict[str, Any] | None = None, **body: Any
) -> str:
    machine_id = str((await create(client, config, **body))["id"])
    await wait_for(client, machine_id, "started")
    return machine_id


async def run(
    client: httpx.AsyncClient, machine_id: str, *argv: str, **body: Any
) -> httpx.Response:
    return await client.post(f"/machines/{machine_id}/exec", json={"command": list(argv), **body})


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll a condition nothing signals (a file a process wrote, an inventory field)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110  # no event exists to wait on
            await asyncio.sleep(0.02)


def validate(instance: object, schema_name: str) -> None:
    """Validate against the spec's schema, made strict: a field the spec lacks is an error."""
    components = json.loads(SPEC.read_text())["components"]
    for schema in components["schemas"].values():
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": components}
    jsonschema.Draft4Validator(root).validate(instance)


async def test_create_returns_a_spec_shaped_machine_that_boots_to_started(serve: Serve) -> None:
    emulator, client = await serve()
    machine = await create(client, {"metadata": {"session_id": "s1"}}, region="ams")
    validate(machine, "Machine")
    assert machine["state"] == "created"
    assert len(machine["id"]) == 14 and int(machine["id"], 16) >= 0
    assert len(machine["instance_id"]) == 26 and machine["name"]
    assert machine["region"] == "ams" and machine["host_status"] == "ok"
    assert machine["created_at"].endswith("Z") and "nonce" not in machine
    assert machine["config"]["guest"] == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}
    assert machine["image_ref"]["registry"] == "registry.fly.io"
    assert machine["image_ref"]["repository"] == "sandbox" and machine["image_ref"]["tag"] == "1.2"
    assert [(e["type"], e["status"]) for e in machine["events"]] == [("launch", "created")]

    waited = await wait_for(client, machine["id"], "started")
    validate(waited, "WaitMachineResponse")
    assert waited["ok"] is True and waited["state"] == "started"
    assert waited["version"] == machine["instance_id"]
    now = (await client.get(f"/machines/{machine['id']}")).json()
    validate(now, "Machine")
    assert now["state"] == "started"
    assert now["events"][0]["id"] == waited["event_id"]
    assert [e["status"] for e in now["events"]] == ["started", "starting", "created"]
    assert emulator.get(machine["id"]).state is MachineState.STARTED


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({}, 400, "config"),
        ({"config": {}}, 400, "config.image is required"),
        ({"config": {"image": IMAGE, "guest": {"memory_mb": 300}}}, 422, "multiple of 256"),
        ({"config": {"image": IMAGE, "guest": {"memory_mb": 4096}}}, 422, "outside 256..2048"),
        ({"config": {"image": IMAGE, "guest": {"cpu_kind": "huge"}}}, 422, "cpu_kind"),
        ({"config": {"image": IMAGE, "guest": {"cpus": 0}}}, 422, "cpus"),
        ({"config": {"image": IMAGE, "env": {"A": 1}}}, 400, "config.env"),
        ({"config": {"image": IMAGE, "restart": {"policy": "sometimes"}}}, 400, "restart"),
        ({"config": {"image": IMAGE}, "lease_ttl": -1}, 400, "lease_ttl"),
        ({"config": {"image": IMAGE, "guest": "big"}, "name": "n"}, 400, "config.guest"),
        ({"config": {"image": IMAGE, "auto_destroy": "yes"}}, 400, "auto_destroy"),
        ({"config": {"image": IMAGE}, "name": ""}, 400, "name"),
        ([], 400, "request body"),
    ],
    ids=[
        "no-config",
        "no-image",
        "odd-memory",
        "too-much-memory",
        "cpu-kind",
        "no-cpus",
        "env-not-strings",
        "restart-policy",
        "negative-lease",
        "guest-not-object",
        "auto-destroy-not-bool",
        "empty-name",
        "array-body",
    ],
)
async def test_create_rejects_invalid_bodies_readably(
    serve: Serve, body: object, status: int, fragment: str
) -> None:
    emulator, client = await serve()
    response = await client.post("/machines", json=body)
    assert response.status_code == status
    assert fragment in response.json()["error"]
    assert emulator.machines() == []


async def test_create_accepts_sizes_fly_allows(serve: Serve) -> None:
    _, client = await serve()
    guest = {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096}
    machine = await create(client, {"guest": guest}, skip_launch=True)
    assert machine["config"]["guest"] == guest
    bad_json = await client.post(
        "/machines", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]


async def test_skip_launch_stays_created_and_lease_ttl_guards_the_new_machine(serve: Serve) -> None:
    _, client = await serve()
    machine = await create(client, skip_launch=True, lease_ttl=30, name="fixed-name")
    assert machine["name"] == "fixed-name" and len(machine["nonce"]) == 32
    assert (await wait_for(client, machine["id"], "settled"))["state"] == "created"

    unleased = await client.post(f"/machines/{machine['id']}/start")
    assert unleased.status_code == 409
    assert unleased.json() == {
        "status": "error",
        "message": f"machine ID {machine['id']} lease currently held by emulator@fly.local",
    }
    leased = await client.post(
        f"/machines/{machine['id']}/start", headers={"fly-machine-lease-nonce": machine["nonce"]}
    )
    assert leased.status_code == 200 and leased.json()["previous_state"] == "created"
    await wait_for(client, machine["id"], "started")


async def test_list_filters_by_state_region_metadata_and_hides_destroyed(serve: Serve) -> None:
    _, client = await serve()
    a = await create(client, {"metadata": {"session_id": "a", "managed_by": "x"}}, skip_launch=True)
    b = await create(client, {"metadata": {"session_id": "b", "managed_by": "x"}}, region="ams")
    c = await create(client, {"metadata": {"session_id": "c"}}, skip_launch=True)
    await wait_for(client, b["id"], "started")

    async def ids(**params: Any) -> set[str]:
        response = await client.get("/machines", params=params)
        assert response.status_code == 200
        return {m["id"] for m in response.json()}

    assert await ids() == {a["id"], b["id"], c["id"]}
    assert await ids(state="started") == {b["id"]}
    assert await ids(state="created,started") == {a["id"], b["id"], c["id"]}
    assert await ids(region="ams") == {b["id"]}
    assert await ids(**{"metadata.managed_by": "x"}) == {a["id"], b["id"]}
    both = httpx.QueryParams([("metadata.managed_by", "x"), ("metadata.session_id", "a")])
    assert {m["id"] for m in (await client.get("/machines", params=both)).json()} == {a["id"]}
    summary = (await client.get("/machines", params={"summary": "true"})).json()
    assert all("config" not in m and "events" not in m for m in summary)

    assert (await client.delete(f"/machines/{c['id']}")).status_code == 200
    await wait_for(client, c["id"], "destroyed")
    assert await ids() == {a["id"], b["id"]}
    assert await ids(include_deleted="true") == {a["id"], b["id"], c["id"]}


async def test_wait_validates_its_query_and_answers_404_and_408(serve: Serve) -> None:
    _, client = await serve(strict_stopped_wait=True)
    machine_id = await started(client)
    path = f"/machines/{machine_id}/wait"
    for params in ({"timeout": 0}, {"timeout": 61}, {"timeout": "1m"}, {"state": "running"}):
        response = await client.get(path, params=params)
        assert response.status_code == 400, params
        assert response.json()["error"].startswith("invalid_argument")
    assert (await client.get("/machines/00000000000000/wait")).status_code == 404
    assert (
        await client.get(path, params={"version": "01XXXXXXXXXXXXXXXXXXXXXXXX"})
    ).status_code == 404

    stopped = await client.get(path, params={"state": "stopped"})
    assert stopped.status_code == 400 and "instance_id required" in stopped.json()["error"]
    version = (await client.get(f"/machines/{machine_id}")).json()["instance_id"]
    timed_out = await client.get(
        path, params={"state": "stopped", "timeout": 1, "version": version}
    )
    assert timed_out.status_code == 408
    assert timed_out.json() == {
        "error": "machine failed to reach desired state, stopped, currently started"
    }
    several = await client.get(
        path, params=[("state", "stopped"), ("state", "suspended,started"), ("version", version)]
    )
    assert several.status_code == 200 and several.json()["state"] == "started"


async def test_wait_is_woken_by_the_transition_it_waits_for(serve: Serve) -> None:
    emulator, client = await serve(stop_delay_s=0.3)
    machine_id = await started(client)
    waiting = asyncio.create_task(wait_for(client, machine_id, "stopped"))
    assert (await client.post(f"/machines/{machine_id}/stop")).status_code == 200
    assert emulator.get(machine_id).state is MachineState.STOPPING
    assert (await waiting)["state"] == "stopped"


async def test_destroy_needs_force_for_a_running_machine_then_hides_it(serve: Serve) -> None:
    emulator, client = await serve()
    machine_id = await started(client)
    refused = await client.delete(f"/machines/{machine_id}")
    assert refused.status_code == 412
    assert refused.json() == {
        "error": "unable to destroy machine, not currently stopped, suspended or failed"
    }
    assert (
        await client.delete(f"/machines/{machine_id}", params={"force": "true"})
    ).status_code == 200
    assert (await wait_for(client, machine_id, "destroyed"))["state"] == "destroyed"
    assert (await client.get(f"/machines/{machine_id}")).json()["state"] == "destroyed"
    assert (await client.get("/machines")).json() == []
    assert (
        await client.delete(f"/machines/{machine_id}", params={"force": "true"})
    ).status_code == 404
    assert (await client.get(f"/machines/{machine_id}/wait")).status_code == 404
    assert not emulator.get(machine_id).workdir.exists()

    other = await started(client)
    assert (await client.delete(f"/machines/{other}", params={"kill": "true"})).status_code == 200
    emulator.set_options(get_destroyed_404=True)
    await wait_for(client, other, "destroyed")
    assert (await client.get(f"/machines/{other}")).status_code == 404


async def test_a_machine_being_destroyed_takes_no_new_work(serve: Serve) -> None:
    _, client = await serve(destroy_delay_s=30)  # stays `destroying`; stop() cancels the rest
    machine_id = await started(client)
    path = f"/machines/{machine_id}"
    assert (await client.delete(path, params={"force": "true"})).status_code == 200
    assert (await client.get(path)).json()["state"] == "destroying"
    assert (await client.delete(path)).status_code == 200  # already on its way
    assert (await client.post(f"{path}/stop")).status_code == 200
    assert (await client.post(f"{path}/start")).status_code == 412
    assert (await client.post(f"{path}/suspend")).status_code == 412
    assert (await run(client, machine_id, "true")).status_code == 412


async def test_stop_start_suspend_follow_the_state_machine(serve: Serve) -> None:
    emulator, client = await serve()
    machine_id = await started(client)
    path = f"/machines/{machine_id}"
    assert (await run(client, machine_id, "touch", "kept")).json()["exit_code"] == 0

    assert (await client.post(f"{path}/stop", json=["SIGTERM"])).status_code == 400
    assert (await client.post(f"{path}/stop", json={"signal": "SIGNOPE"})).status_code == 400
    stop = await client.post(f"{path}/stop", json={"signal": "SIGTERM", "timeout": "5s"})
    assert stop.status_code == 200
    await wait_for(client, machine_id, "stopped")
    assert (await client.post(f"{path}/stop")).status_code == 200  # idempotent
    assert (await run(client, machine_id, "true")).status_code == 412
    start = await client.post(f"{path}/start")
    assert start.json() == {"previous_state": "stopped", "migrated": False, "new_host": ""}
    await wait_for(client, machine_id, "started")
    assert not (emulator.get(machine_id).workdir / "kept").exists()  # a stopped machine boots clean

    again = await client.post(f"{path}/start")
    assert again.status_code == 200 and again.json()["previous_state"] == "started"
    emulator.set_options(start_started_status=412)
    assert (await client.post(f"{path}/start")).status_code == 412

    assert (await client.post(f"{path}/suspend")).status_code == 200
    await wait_for(client, machine_id, "suspended")
    assert (await client.post(f"{path}/start")).json()["previous_state"] == "suspended"
    await wait_for(client, machine_id, "started")
    assert (await client.delete(path)).status_code == 412
    await client.post(f"{path}/stop")
    await wait_for(client, machine_id, "stopped")
    assert (await client.post(f"{path}/suspend")).status_code == 412
    assert (await client.delete(path)).status_code == 200  # stopped: no force needed


async def test_exec_runs_real_processes_in_per_machine_directories(serve: Serve) -> None:
    emulator, client = await serve()
    one, two = await started(client), await started(client)

    echo = await run(client, one, "echo", "Hello from sandbox")
    assert echo.status_code == 200
    validate(echo.json(), "flydv1.ExecResponse")
    assert echo.json() == {
        "stdout": "Hello from sandbox\n",
        "stderr": "",
        "exit_code": 0,
        "exit_signal": 0,
    }
    failing = await run(client, one, "sh", "-c", "echo oops >&2; exit 3")
    assert failing.status_code == 200
    assert failing.json()["exit_code"] == 3 and failing.json()["stderr"] == "oops\n"
    piped = await run(client, one, "tr", "a-z", "A-Z", stdin="quiet\n")
    assert piped.json()["stdout"] == "QUIET\n"
    legacy = await client.post(f"/machines/{one}/exec", json={"cmd": "echo 'two words'"})
    assert legacy.json()["stdout"] == "two words\n"

    wrote = await run(client, one, "sh", "-c", 'echo secret > note.txt && pwd && echo "$HOME"')
    workdir = str(emulator.get(one).workdir)
    assert wrote.json()["stdout"] == f"{workdir}\n{workdir}\n"
    assert (await run(client, one, "cat", "note.txt")).json()["stdout"] == "secret\n"
    assert (await run(client, two, "ls", "-A")).json()["stdout"] == ""
    missing = await run(client, two, "definitely-not-a-command-xyz")
    assert missing.status_code == 200 and missing.json()["exit_code"] == 127


FAKE_SECRETS = {
    "SUPABASE_SERVICE_ROLE_KEY": "fake-service-role-key-7f3a",
    "FLY_API_TOKEN": "fake-fly-api-token-91c2",
}
AS_ROOT = os.geteuid() == 0


def environment_of(env_output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in env_output.splitlines())


async def test_exec_sees_only_the_machines_environment(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in FAKE_SECRETS.items():
        monkeypatch.setenv(key, value)
    emulator, client = await serve()
    machine_id = await started(client, {"env": {"SESSION_ID": "s-1"}})

    seen = (await run(client, machine_id, "env")).json()["stdout"]

    workdir = str(emulator.get(machine_id).workdir)
    assert environment_of(seen).keys() == {"PATH", "HOME", "SESSION_ID"}
    assert (environment_of(seen)["HOME"], environment_of(seen)["SESSION_ID"]) == (workdir, "s-1")
    assert not [v for v in FAKE_SECRETS.values() if v in seen]
    tools = await run(client, machine_id, "sh", "-c", "command -v bash git node")
    assert tools.json()["exit_code"] == 0, "the host's tools stand in for the image's"


@contextlib.asynccontextmanager
async def emulator_process(env: dict[str, str]) -> AsyncIterator[tuple[int, httpx.AsyncClient]]:
    """`sandbox-listener local fly` as a developer starts it from a shell holding secrets."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "listener", "local", "fly", "--port", "0",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    printed: dict[str, str] = {}
    try:
        async with asyncio.timeout(30):
            while not {"FLY_API_HOSTNAME", "FLY_API_TOKEN"} <= printed.keys():
                key, _, value = (await proc.stdout.readline()).decode().strip().partition("=")
                printed[key] = value
        async with httpx.AsyncClient(
            base_url=f"{printed['FLY_API_HOSTNAME']}/v1/apps/{APP}",
            headers={"Authorization": f"Bearer {printed['FLY_API_TOKEN']}"},
            timeout=10,
        ) as client:
            knobs = f"{printed['FLY_API_HOSTNAME']}/_emulator/faults"
            off = await client.post(knobs, json={"rate_limits": False})  # fast, not faithful
            assert off.status_code == 200, off.text
            yield proc.pid, client
    finally:
        proc.terminate()
        await proc.communicate()


@pytest.mark.skipif(not AS_ROOT, reason="not root: commands run as the current user (documented)")
async def test_exec_cannot_read_the_emulators_environment_or_roots_files() -> None:
    with tempfile.NamedTemporaryFile("w", prefix="root-only-", suffix=".env") as private:
        private.write(FAKE_SECRETS["FLY_API_TOKEN"])  # mkstemp makes it 0600
        private.flush()
        async with emulator_process({**os.environ, **FAKE_SECRETS}) as (pid, client):
            machine_id = await started(client, {"env": {"SESSION_ID": "s-1"}})
            attacks = [
                ["cat", f"/proc/{pid}/environ"],
                ["sh", "-c", "cat /proc/$PPID/environ"],
                ["cat", private.name],
            ]
            answers = [(await run(client, machine_id, *argv)).json() for argv in attacks]
            own = (await run(client, machine_id, "env")).json()
            uid = (await run(client, machine_id, "id", "-u")).json()["stdout"].strip()
            wrote = await run(client, machine_id, "sh", "-c", "echo mine > note && cat note")

    for argv, answer in zip(attacks, answers, strict=True):
        assert answer["exit_code"] != 0, f"{argv} succeeded: {answer['stdout'][:80]!r}"
        assert "Permission denied" in answer["stderr"]
    seen = "".join(a["stdout"] + a["stderr"] for a in [*answers, own])
    assert not [v for v in FAKE_SECRETS.values() if v in seen]
    assert environment_of(own["stdout"]).keys() == {"PATH", "HOME", "SESSION_ID"}
    assert uid != "0"
    assert wrote.json()["stdout"] == "mine\n", "the machine's own directory is writable"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"command": []},
        {"command": "echo hi"},
        {"command": ["echo", 1]},
        {"command": [""]},
        {"command": ["true"], "timeout": -1},
        {"command": ["true"], "stdin": 5},
    ],
    ids=[
        "missing",
        "empty",
        "string",
        "non-string-arg",
        "empty-program",
        "negative-timeout",
        "stdin",
    ],
)
async def test_exec_rejects_malformed_commands(serve: Serve, body: dict[str, Any]) -> None:
    _, client = await serve()
    machine_id = str((await create(client, skip_launch=True))["id"])
    response = await client.post(f"/machines/{machine_id}/exec", json=body)
    assert response.status_code == 400
    assert response.json()["error"].startswith("invalid_argument")


async def test_exec_timeouts_answer_408_and_kill_the_process(serve: Serve) -> None:
    emulator, client = await serve()
    machine_id = await started(client)
    assert (
        await run(client, str((await create(client, skip_launch=True))["id"]), "true")
    ).status_code == 412

    started_at = time.monotonic()
    slow = await run(client, machine_id, "sh", "-c", "echo $$ > pid; exec sleep 30", timeout=1)
    assert slow.status_code == 408 and slow.json() == {"error": "deadline_exceeded"}
    assert time.monotonic() - started_at < 5
    pid = int((emulator.get(machine_id).workdir / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    emulator.set_options(exec_max_s=0.2)
    capped = await run(client, machine_id, "sleep", "30", timeout=20)
    assert capped.status_code == 408


async def test_stop_of_the_machine_kills_its_running_exec(serve: Serve) -> None:
    emulator, client = await serve()
    machine_id = await started(client)
    running = asyncio.create_task(run(client, machine_id, "sh", "-c", "touch began; exec sleep 30"))
    began = emulator.get(machine_id).workdir / "began"
    await eventually(began.exists)
    assert (await client.post(f"/machines/{machine_id}/stop")).status_code == 200
    killed = await running
    assert killed.status_code == 200
    assert killed.json()["exit_signal"] == 9 and killed.json()["exit_code"] == 137


async def test_leases_exclude_other_callers_until_released(serve: Serve) -> None:
    _, client = await serve()
    machine_id = await started(client)
    lease_path = f"/machines/{machine_id}/lease"
    assert (await client.get(lease_path)).status_code == 404

    acquired = await client.post(lease_path, json={"ttl": 30, "description": "deploy"})
    assert acquired.status_code == 201
    body = acquired.json()
    assert body["status"] == "success"
    validate(body["data"], "Lease")
    nonce = body["data"]["nonce"]
    assert body["data"]["description"] == "deploy" and body["data"]["expires_at"] > time.time()

    held = await client.post(lease_path, params={"ttl": 10})
    assert held.status_code == 409 and "lease currently held by" in held.json()["message"]
    mine = {"fly-machine-lease-nonce": nonce}
    refreshed = await client.post(lease_path, json={"ttl": 60}, headers=mine)
    assert refreshed.status_code == 201 and refreshed.json()["data"]["nonce"] == nonce
    assert refreshed.json()["data"]["expires_at"] > body["data"]["expires_at"]
    assert (await client.get(lease_path)).json()["data"]["nonce"] == nonce

    meta = f"/machines/{machine_id}/metadata/owner"
    for call in (
        client.post(f"/machines/{machine_id}/stop"),
        client.post(f"/machines/{machine_id}/suspend"),
        client.delete(f"/machines/{machine_id}", params={"force": "true"}),
        client.post(meta, json={"value": "x"}),
        client.delete(meta),
        client.post(f"/machines/{machine_id}/stop", headers={"fly-machine-lease-nonce": "wrong"}),
        client.delete(lease_path),
    ):
        assert (await call).status_code == 409
    assert (await client.post(meta, json={"value": "x"}, headers=mine)).status_code == 204

    released = await client.delete(lease_path, headers=mine)
    assert released.json() == {"status": "success", "data": {"ok": True}}
    assert (await client.get(lease_path)).status_code == 404
    assert (await client.delete(lease_path, headers=mine)).status_code == 404
    assert (await client.post(lease_path, params={"ttl": 5})).status_code == 201  # fly-go's form
    assert (await client.post(lease_path, json={"ttl": 0}, headers=mine)).status_code == 400


def test_a_lease_expires_at_its_ttl() -> None:
    ids = IdSource(random.Random(1))
    machine = MachineRecord(
        "m", "n", "iad", "v", "ip", {"image": IMAGE}, Path("/nonexistent"), 0, 0
    )
    lease = machine.acquire_lease(None, 10, "", now=100.0, ids=ids)
    assert lease.expires_at == 110
    assert machine.active_lease(109.9) is lease
    machine.acquire_lease(None, 10, "", now=110.0, ids=ids)  # expired: anyone may take it
    assert machine.lease is not None and machine.lease.nonce != lease.nonce


async def test_metadata_endpoints_read_write_and_feed_the_list_filter(serve: Serve) -> None:
    _, client = await serve()
    machine = await create(client, {"metadata": {"session_id": "s"}}, skip_launch=True)
    path = f"/machines/{machine['id']}/metadata"
    assert (await client.get(path)).json() == {"session_id": "s"}
    assert (await client.get(f"{path}/epoch")).status_code == 404
    assert (await client.post(f"{path}/epoch", json={"value": "3"})).status_code == 204
    assert (await client.get(f"{path}/epoch")).json() == {"value": "3"}
    assert (await client.post(f"{path}/epoch", json={"value": 3})).status_code == 400
    listed = (await client.get("/machines", params={"metadata.epoch": "3"})).json()
    assert [m["id"] for m in listed] == [machine["id"]]
    assert listed[0]["config"]["metadata"] == {"session_id": "s", "epoch": "3"}
    assert (await client.delete(f"{path}/epoch")).status_code == 204
    assert (await client.get(path)).json() == {"session_id": "s"}
    assert (await client.get("/machines", params={"metadata.epoch": "3"})).json() == []


async def test_auth_app_and_request_ids(serve: Serve) -> None:
    emulator, client = await serve()
    responses = [
        await client.get("/machines", headers={"Authorization": ""}),
        await client.get("/machines", headers={"Authorization": "Bearer nope"}),
        await client.get("/machines", headers={"Authorization": TOKEN}),
    ]
    for response in responses:
        assert response.status_code == 401
        assert response.json() == {"error": "Authenticate: token validation error"}
    responses.append(await client.get("/machines", headers={"Authorization": f"FlyV1 {TOKEN}"}))
    assert responses[-1].status_code == 200
    responses.append(await client.get(f"{emulator.url}/v1/apps/other/machines"))
    assert responses[-1].status_code == 404 and responses[-1].json() == {"error": "app not found"}
    responses.append(await client.get(f"{emulator.url}/v1/nothing-here"))
    assert responses[-1].status_code == 404
    app = await client.get(f"{emulator.url}/v1/apps/{APP}")
    validate(app.json(), "App")
    responses.append(app)
    request_ids = [r.headers["fly-request-id"] for r in responses]
    assert len(set(request_ids)) == len(responses)


async def test_rate_limits_answer_429_after_the_documented_burst(serve: Serve) -> None:
    _, client = await serve(rate_limits=True, action_rate_per_s=0.01, get_rate_per_s=0.01)
    creates = [await client.post("/machines", json={"config": {"image": IMAGE}}) for _ in range(4)]
    assert [r.status_code for r in creates] == [200, 200, 200, 429]
    assert creates[-1].json() == {"error": "rate limit exceeded"}
    assert "retry-after" not in creates[-1].headers
    first, second = creates[0].json()["id"], creates[1].json()["id"]
    gets = [(await client.get(f"/machines/{first}")).status_code for _ in range(11)]
    assert gets == [200] * 10 + [429]
    assert (await client.get(f"/machines/{second}")).status_code == 200  # per machine


async def test_faults_and_ids_are_reproducible_from_the_seed(serve: Serve) -> None:
    sequences, machine_ids = [], []
    for _ in range(2):
        emulator, client = await serve(seed=42)
        machine_ids.append((await create(client))["id"])
        await wait_for(client, machine_ids[-1], "started")
        emulator.set_options(p_5xx=0.3, p_429=0.2, p_vanish=0.0)
        sequences.append([(await client.get("/machines")).status_code for _ in range(30)])
    assert sequences[0] == sequences[1] and machine_ids[0] == machine_ids[1]
    assert {200, 429} <= set(sequences[0]) and {500, 503} & set(sequences[0])
    _, client = await serve(p_5xx=1.0)
    failed = await client.get("/machines")
    assert failed.status_code in {500, 503} and failed.json() == {"error": "internal error"}


async def test_408_after_create_really_creates_the_machine(serve: Serve) -> None:
    emulator, client = await serve(p_408_after_create=1.0)
    response = await client.post(
        "/machines", json={"config": {"image": IMAGE, "metadata": {"k": "v"}}}
    )
    assert response.status_code == 408 and response.json() == {"error": "deadline_exceeded"}
    emulator.set_options(p_408_after_create=0.0)
    adopted = (await client.get("/machines", params={"metadata.k": "v"})).json()
    assert len(adopted) == 1
    await wait_for(client, adopted[0]["id"], "started")


async def test_capacity_faults_create_nothing(serve: Serve) -> None:
    emulator, client = await serve(p_capacity=1.0)
    response = await client.post("/machines", json={"config": {"image": IMAGE}})
    assert response.status_code == 422
    assert response.json() == {
        "error": "insufficient resources to create machine",
        "status": "insufficient_capacity",
    }
    emulator.set_options(capacity_status=412)
    assert (await client.post("/machines", json={"config": {"image": IMAGE}})).status_code == 412
    assert emulator.machines(include_deleted=True) == []
    assert (await client.get("/machines")).status_code == 200  # only create is affected


async def test_latency_knob_delays_the_named_operation(serve: Serve) -> None:
    _, client = await serve(latency_s={"list": 0.3})
    began = time.monotonic()
    await client.get("/machines")
    assert time.monotonic() - began >= 0.3


async def test_vanished_machines_are_destroyed_without_an_api_call(serve: Serve) -> None:
    emulator, client = await serve()
    one = await started(client)
    before = emulator.calls()
    emulator.vanish(one)
    assert emulator.calls() == before
    assert (await wait_for(client, one, "destroyed"))["state"] == "destroyed"
    assert (
        await client.get(f"/machines/{one}/wait", params={"state": "started"})
    ).status_code == 404
    assert (await client.get("/machines")).json() == []
    assert emulator.get(one).events[0]["request"]["host_failed"] is True
    with pytest.raises(KeyError):
        emulator.vanish("ffffffffffffff")

    two = await started(client)
    waiting = asyncio.create_task(
        client.get(f"/machines/{two}/wait", params={"state": "stopped", "timeout": 10})
    )
    control = httpx.AsyncClient(base_url=emulator.url, headers=AUTH)
    async with control:
        assert (await control.post(f"/_emulator/machines/{two}/vanish")).status_code == 200
        assert (await waiting).status_code == 404  # it can never get there now
        three = await started(client)
        assert (await control.post("/_emulator/faults", json={"p_vanish": 1.0})).status_code == 200
        assert (await wait_for(client, three, "destroyed"))["state"] == "destroyed"


@pytest.mark.parametrize(
    ("config", "final"),
    [
        ({"auto_destroy": True, "restart": {"policy": "no"}}, "destroyed"),
        ({"auto_destroy": True}, "destroyed"),
        ({"restart": {"policy": "no"}}, "stopped"),
    ],
    ids=["auto-destroy", "auto-destroy-default-policy", "no-auto-destroy"],
)
async def test_the_deadline_ends_the_main_process(
    serve: Serve, config: dict[str, Any], final: str
) -> None:
    _, client = await serve()
    deadline = {"SANDBOX_DEADLINE_EPOCH_S": str(time.time() + 0.3)}
    machine = await create(client, {**config, "env": deadline})
    await wait_for(client, machine["id"], "started")
    waited = await wait_for(client, machine["id"], final, version=machine["instance_id"])
    assert waited["state"] == final
    events = (await client.get(f"/machines/{machine['id']}")).json()["events"]
    assert "exit" in [e["type"] for e in events]


async def test_a_past_deadline_with_restart_always_restarts_instead(serve: Serve) -> None:
    emulator, client = await serve()
    env = {"SANDBOX_DEADLINE_EPOCH_S": str(time.time() - 10)}
    machine_id = await started(
        client, {"auto_destroy": True, "restart": {"policy": "always"}, "env": env}
    )
    await eventually(lambda: emulator.get(machine_id).events[0]["type"] == "restart")
    assert emulator.get(machine_id).state is MachineState.STARTED


async def test_control_endpoints_inspect_and_steer(serve: Serve) -> None:
    emulator, client = await serve()
    machine_id = await started(client, {"metadata": {"session_id": "s"}})
    async with httpx.AsyncClient(base_url=emulator.url, headers=AUTH) as control:
        assert (
            await control.get("/_emulator/stats", headers={"Authorization": ""})
        ).status_code == 401
        listed = (await control.get("/_emulator/machines")).json()
        assert [m["id"] for m in listed] == [machine_id]
        assert listed[0]["workdir"] == str(emulator.get(machine_id).workdir)

        bad = await control.post("/_emulator/faults", json={"p_5xx": "lots", "nope": 1})
        assert bad.status_code == 400
        assert "p_5xx must be a float" in bad.json()["error"] and "'nope'" in bad.json()["error"]
        assert (await control.post("/_emulator/faults", json={"p_5xx": 2})).status_code == 400
        knobs = (await control.post("/_emulator/faults", json={"p_429": 1.0, "seed": 3})).json()
        assert knobs["p_429"] == 1.0 and knobs["seed"] == 3
        assert (await client.get("/machines")).status_code == 429
        await control.post("/_emulator/faults", json={"p_429": 0})
        assert (await control.get("/_emulator/faults")).json()["p_429"] == 0

        stats = (await control.get("/_emulator/stats")).json()
        assert {"operation": "list", "status": 429, "count": 1} in stats["calls"]
        assert stats["machines"] == {"started": 1}
        reset = (await control.delete("/_emulator/stats")).json()
        assert reset["calls"] == [] and reset["total_calls"] == 0
        assert (await control.post("/_emulator/machines/ffffffffffffff/vanish")).status_code == 404


async def test_stats_count_calls_by_operation_and_status(serve: Serve) -> None:
    emulator, client = await serve()
    machine_id = str((await create(client, skip_launch=True))["id"])
    await client.get(f"/machines/{machine_id}")
    await client.get(f"/machines/{machine_id}")
    await client.get("/machines/ffffffffffffff")
    await client.get("/machines", headers={"Authorization": "Bearer wrong"})
    assert emulator.call_counts() == {
        ("create", 200): 1,
        ("get", 200): 2,
        ("get", 404): 1,
        ("list", 401): 1,
    }
    assert emulator.calls("get") == 3 and emulator.calls(status=200) == 3
    emulator.reset_stats()
    assert emulator.calls() == 0


async def test_stop_answers_waits_kills_execs_and_removes_workdirs() -> None:
    emulator = FlyEmulator(EmulatorOptions(token=TOKEN, rate_limits=False))
    await emulator.start()
    client = httpx.AsyncClient(base_url=f"{emulator.url}/v1/apps/{APP}", headers=AUTH, timeout=10)
    async with client:
        machine_id = await started(client)
        workdir = emulator.get(machine_id).workdir
        waiting = asyncio.create_task(
            client.get(f"/machines/{machine_id}/wait", params={"state": "stopped", "timeout": 30})
        )
        running = asyncio.create_task(
            run(client, machine_id, "sh", "-c", "touch began; exec sleep 30")
        )
        await eventually((workdir / "began").exists)
        async with asyncio.timeout(5):
            await emulator.stop()
            assert (await waiting).status_code == 503
            assert (await running).json()["exit_signal"] == 9
    assert not workdir.exists() and not workdir.parent.exists()


async def test_serve_forever_serves_until_cancelled(tmp_path: Path) -> None:
    ready: asyncio.Queue[FlyEmulator] = asyncio.Queue()
    options = EmulatorOptions(token=TOKEN, app_name="other-app", workdir_root=tmp_path / "machines")
    serving = asyncio.create_task(serve_forever(options, on_ready=ready.put_nowait))
    emulator = await asyncio.wait_for(ready.get(), 5)
    async with httpx.AsyncClient(base_url=emulator.url, headers=AUTH) as client:
        created = await client.post(
            "/v1/apps/other-app/machines", json={"config": {"image": IMAGE}}
        )
        assert created.status_code == 200
        assert (tmp_path / "machines" / created.json()["id"]).is_dir()
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        with pytest.raises(httpx.ConnectError):
            await client.get("/v1/apps/other-app/machines")
    assert (tmp_path / "machines").is_dir() and not any((tmp_path / "machines").iterdir())


@pytest.mark.parametrize(
    ("image", "registry", "repository", "tag"),
    [
        ("nginx", "docker-hub-mirror.fly.io", "library/nginx", "latest"),
        ("node:20-slim", "docker-hub-mirror.fly.io", "library/node", "20-slim"),
        ("acme/tool:1", "docker-hub-mirror.fly.io", "acme/tool", "1"),
        ("registry.fly.io/app:deployment-1", "registry.fly.io", "app", "deployment-1"),
        ("localhost:5000/a/b", "localhost:5000", "a/b", "latest"),
    ],
)
def test_image_refs_split_like_fly_reports_them(
    image: str, registry: str, repository: str, tag: str
) -> None:
    ref = image_ref(image)
    assert (ref["registry"], ref["repository"], ref["tag"]) == (registry, repository, tag)
    assert ref["digest"].startswith("sha256:")


def test_options_reject_impossible_values() -> None:
    with pytest.raises(ValueError, match=r"p_5xx must be within 0\.\.1"):
        EmulatorOptions(token=TOKEN, p_5xx=1.5)
    with pytest.raises(ValueError, match="token must not be empty"):
        EmulatorOptions(token="")
    with pytest.raises(ValueError, match="bursts must be >= 1"):
        EmulatorOptions(token=TOKEN, get_burst=0)
