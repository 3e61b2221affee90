"""Every request FlyClient builds fits Fly's published OpenAPI contract (paths, bodies, queries).

The spec is `fly-machines-openapi.json` beside this file: a byte-for-byte copy of
shared/reference/fly-machines-openapi.json (sha256 45efe4aa…), itself a mirror of
https://docs.machines.dev/spec/openapi3.json. Its object schemas allow unknown keys, so we
validate a strict copy (additionalProperties: false wherever properties are listed): a misspelt
field fails here instead of being silently ignored by Fly.

Deliberate deviations from the spec, each documented elsewhere by Fly:
- list filters `metadata.{key}={value}` are in the Machines docs (D-MACH) but not in the spec;
- the `fly-machine-lease-nonce` header is specified only on the lease endpoints; fly-go sends it
  on start/stop/suspend/destroy too (FG-MACH), and we also send it on metadata writes when given.
(`force` on DELETE, sometimes thought missing, is in the spec and validates as a boolean.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import respx
from referencing import Registry
from referencing.jsonschema import DRAFT4
from tenacity import wait_none

from listener.fly import FlyClient, machine_config
from listener.ratelimit import Rate, RateLimiter

SPEC = json.loads(Path(__file__).with_name("fly-machines-openapi.json").read_text())
SPEC_URI = "urn:fly-machines-openapi"
BASE = "http://fly.test"
APP = "sandboxes"
NONCE = "fly-machine-lease-nonce"
DOC_ONLY_QUERY = {"Machines_list": re.compile(r"metadata\.[^=]+")}
NONCE_BEYOND_SPEC = {
    "Machines_start",
    "Machines_stop",
    "Machines_suspend",
    "Machines_delete",
    "Machines_upsert_metadata",
    "Machines_delete_metadata",
}


def _strict(node: Any) -> Any:
    """A copy of a schema tree where every object with listed properties rejects unknown keys."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


REGISTRY = Registry().with_resource(SPEC_URI, DRAFT4.create_resource(_strict(SPEC)))


def validate_body(body: Any, ref: str) -> None:
    schema = {"$ref": SPEC_URI + ref}
    jsonschema.Draft4Validator(schema, registry=REGISTRY).validate(body)


def _operations() -> list[tuple[str, re.Pattern[str], dict[str, Any]]]:
    ops = []
    for template, item in SPEC["paths"].items():
        pattern = re.compile("^/v1" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$")
        for method, op in item.items():
            if method != "parameters":
                ops.append((method.upper(), pattern, op))
    return ops


OPERATIONS = _operations()


def check_request(request: httpx.Request) -> str:
    """Assert one request fits its operation in the spec; return the operationId."""
    matches = [
        op
        for method, pattern, op in OPERATIONS
        if method == request.method and pattern.match(request.url.path)
    ]
    assert len(matches) == 1, f"{request.method} {request.url.path} is not one spec operation"
    op = matches[0]
    op_id: str = op["operationId"]
    params = {(p["in"], p["name"].lower()): p["schema"] for p in op.get("parameters", [])}

    body_schema = op.get("requestBody", {}).get("content", {}).get("application/json", {})
    if request.content:
        assert "schema" in body_schema, f"{op_id} takes no body, got {request.content!r}"
        validate_body(json.loads(request.content), body_schema["schema"]["$ref"])

    for name, value in request.url.params.multi_items():
        schema = params.get(("query", name.lower()))
        if schema is None:
            extra = DOC_ONLY_QUERY.get(op_id)
            assert extra is not None and extra.fullmatch(name), f"{op_id}: query {name} not in spec"
            continue
        jsonschema.Draft4Validator(schema).validate(_typed(value, schema))

    if NONCE in request.headers:
        assert ("header", NONCE) in params or op_id in NONCE_BEYOND_SPEC, f"{op_id}: nonce header"
    return op_id


def _typed(value: str, schema: dict[str, Any]) -> Any:
    """A query string value as the JSON type its schema names (junk stays a string and fails)."""
    if schema.get("type") == "boolean":
        return {"true": True, "false": False}.get(value, value)
    if schema.get("type") == "integer":
        return int(value) if re.fullmatch(r"-?\d+", value) else value
    return value


class FakeFly:
    """Plausible answers for every endpoint; a wait moves the machine to the awaited state."""

    def __init__(self) -> None:
        self.state = "created"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix(f"/v1/apps/{APP}/machines")
        machine = {"id": "m1", "state": self.state, "region": "iad", "instance_id": "01V"}
        lease = {"status": "success", "data": {"nonce": "n1", "expires_at": 1}}
        answers: dict[tuple[str, str], Any] = {
            ("POST", ""): machine,
            ("GET", ""): [machine],
            ("GET", "/m1"): machine,
            ("POST", "/m1/exec"): {"stdout": "", "stderr": "", "exit_code": 0},
            ("POST", "/m1/lease"): lease,
            ("GET", "/m1/metadata"): {"session_id": "s1"},
        }
        if path == "/m1/wait":
            self.state = request.url.params.get_list("state")[-1]
            return httpx.Response(200, json={"ok": True, "state": self.state})
        body = answers.get((request.method, path))
        return httpx.Response(200) if body is None else httpx.Response(200, json=body)


Scenario = Callable[[FlyClient], Awaitable[object]]

SCENARIOS: dict[str, tuple[Scenario, set[str]]] = {
    "create-full": (
        lambda fly: fly.create_machine(
            machine_config(
                "registry.fly.io/sandbox:1",
                cpu_kind="shared",
                cpus=2,
                memory_mb=1024,
                env={"SESSION_ID": "s1"},
                metadata={"session_id": "s1", "epoch": "1"},
            ),
            region="iad",
            name="sbx-s1",
            lease_ttl_s=30,
            skip_launch=True,
        ),
        {"Machines_create"},
    ),
    "create-minimal": (
        lambda fly: fly.create_machine({"image": "img"}, region=None),
        {"Machines_create"},
    ),
    "list-filtered": (
        lambda fly: fly.list_machines(
            metadata={"session_id": "s1"},
            state=["started", "stopped"],
            include_deleted=True,
            region="iad",
            summary=True,
        ),
        {"Machines_list"},
    ),
    "list-bare": (lambda fly: fly.list_machines(), {"Machines_list"}),
    "get": (lambda fly: fly.get_machine("m1"), {"Machines_show"}),
    "wait-started": (
        lambda fly: fly.wait_for_state("m1", "started", timeout_s=90),
        {"Machines_show", "Machines_wait"},
    ),
    "wait-stopped": (
        lambda fly: fly.wait_for_state("m1", "stopped", timeout_s=5),
        {"Machines_show", "Machines_wait"},
    ),
    "wait-several": (
        lambda fly: fly.wait_for_state(
            "m1", ["destroyed", "failed"], timeout_s=30, instance_id="01V"
        ),
        {"Machines_show", "Machines_wait"},
    ),
    "start": (lambda fly: fly.start("m1", nonce="n1"), {"Machines_start"}),
    "stop-full": (
        lambda fly: fly.stop("m1", signal="SIGTERM", timeout_s=10, nonce="n1"),
        {"Machines_stop"},
    ),
    "stop-bare": (lambda fly: fly.stop("m1"), {"Machines_stop"}),
    "suspend": (lambda fly: fly.suspend("m1", nonce="n1"), {"Machines_suspend"}),
    "destroy-force": (lambda fly: fly.destroy("m1", nonce="n1"), {"Machines_delete"}),
    "destroy-gentle": (lambda fly: fly.destroy("m1", force=False), {"Machines_delete"}),
    "exec-stdin": (
        lambda fly: fly.exec("m1", ["sh", "-c", "cat"], stdin="hi", timeout_s=30),
        {"Machines_exec"},
    ),
    "exec-bare": (lambda fly: fly.exec("m1", ["true"], timeout_s=5), {"Machines_exec"}),
    "acquire-lease": (
        lambda fly: fly.acquire_lease("m1", 30, "claim"),
        {"Machines_create_lease"},
    ),
    "refresh-lease": (
        lambda fly: fly.refresh_lease("m1", "n1", 30),
        {"Machines_create_lease"},
    ),
    "release-lease": (
        lambda fly: fly.release_lease("m1", "n1"),
        {"Machines_release_lease"},
    ),
    "get-metadata": (lambda fly: fly.get_metadata("m1"), {"Machines_show_metadata"}),
    "set-metadata": (
        lambda fly: fly.set_metadata("m1", "epoch", "2", nonce="n1"),
        {"Machines_upsert_metadata"},
    ),
    "delete-metadata": (
        lambda fly: fly.delete_metadata("m1", "epoch"),
        {"Machines_delete_metadata"},
    ),
}


@pytest.fixture
def recorded() -> Iterator[respx.Route]:
    with respx.mock(base_url=f"{BASE}/v1/apps/{APP}/machines") as mock:
        yield mock.route().mock(side_effect=FakeFly())


@pytest.mark.parametrize("name", SCENARIOS)
async def test_requests_fit_the_openapi_contract(name: str, recorded: respx.Route) -> None:
    scenario, expected = SCENARIOS[name]
    async with httpx.AsyncClient() as http:
        fly = FlyClient(
            http,
            base_url=BASE,
            app_name=APP,
            token="t",
            limiter=RateLimiter(Rate(1e9, 10**9)),
            wait=wait_none(),
        )
        await scenario(fly)
    requests: list[httpx.Request] = [call.request for call in recorded.calls]
    assert {check_request(request) for request in requests} == expected


def test_scenarios_cover_every_endpoint_the_client_uses() -> None:
    covered = set().union(*(ops for _, ops in SCENARIOS.values()))
    assert covered == {
        "Machines_create",
        "Machines_list",
        "Machines_show",
        "Machines_wait",
        "Machines_start",
        "Machines_stop",
        "Machines_suspend",
        "Machines_delete",
        "Machines_exec",
        "Machines_create_lease",
        "Machines_release_lease",
        "Machines_show_metadata",
        "Machines_upsert_metadata",
        "Machines_delete_metadata",
    }


@pytest.mark.parametrize(
    ("body", "ref"),
    [
        ({"config": {"imag": "x"}}, "#/components/schemas/CreateMachineRequest"),
        (
            {"config": {"image": "x", "guest": {"cpus": "2"}}},
            "#/components/schemas/CreateMachineRequest",
        ),
        ({"command": "echo hi"}, "#/components/schemas/MachineExecRequest"),
        ({"ttl": "30"}, "#/components/schemas/CreateLeaseRequest"),
        ({"signal": "SIGSTOP"}, "#/components/schemas/StopRequest"),
        ({"timeout": 10}, "#/components/schemas/StopRequest"),
    ],
    ids=[
        "misspelt-field",
        "string-cpus",
        "string-command",
        "string-ttl",
        "bad-signal",
        "int-timeout",
    ],
)
def test_the_strict_contract_rejects_what_fly_would_not_understand(body: Any, ref: str) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validate_body(body, ref)


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", f"{BASE}/v1/apps/{APP}/machines?include_deleted=yes"),
        ("GET", f"{BASE}/v1/apps/{APP}/machines/m1/wait?state=settling"),
        ("GET", f"{BASE}/v1/apps/{APP}/machines/m1/wait?timeout=1m"),
        ("GET", f"{BASE}/v1/apps/{APP}/machines/m1?metadata.session_id=s1"),
        ("POST", f"{BASE}/v1/apps/{APP}/machines/m1/reboot"),
        ("GET", f"{BASE}/apps/{APP}/machines/m1"),
    ],
    ids=["bool-junk", "state-enum", "timeout-int", "metadata-outside-list", "no-path", "no-v1"],
)
def test_the_request_check_rejects_queries_and_paths_outside_the_spec(
    method: str, url: str
) -> None:
    with pytest.raises((AssertionError, jsonschema.ValidationError)):
        check_request(httpx.Request(method, url))


def test_the_request_check_rejects_a_nonce_where_neither_spec_nor_fly_go_sends_one() -> None:
    request = httpx.Request(
        "POST",
        f"{BASE}/v1/apps/{APP}/machines/m1/exec",
        json={"command": ["true"]},
        headers={NONCE: "n1"},
    )
    with pytest.raises(AssertionError, match="nonce header"):
        check_request(request)
