"""The Fly Machines API over HTTP: routes, auth, rate limits, injected faults and latency, and
thin handlers that parse a request, check its lease and hand it to the emulated host."""

from __future__ import annotations

import asyncio
import hmac
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from listener.local.fly_host import FlyHost
from listener.local.fly_knobs import Fault, RateLimits, draw_fault
from listener.local.fly_requests import (
    parse_create,
    parse_destroy,
    parse_exec,
    parse_lease,
    parse_list,
    parse_metadata_value,
    parse_stop,
    parse_wait,
)
from listener.local.fly_state import ApiError, MachineRecord, error, not_found
from listener.models import MachineState as S

log = structlog.get_logger(component="fly_emulator")

Handler = Callable[[Request], Awaitable[Response]]
NONCE_HEADER = "fly-machine-lease-nonce"


class FlyApi:
    """The `/v1/apps/{app}/machines...` routes; counts every call by (operation, status)."""

    def __init__(self, host: FlyHost, dice: random.Random) -> None:
        self.host = host
        self.dice = dice
        self.limits = RateLimits()
        self.calls: Counter[tuple[str, int]] = Counter()

    # -- routing and the cross-cutting rules (auth, app, rate limits, faults, latency) ----------

    def routes(self) -> list[Route]:
        one = "/v1/apps/{app}/machines/{machine_id}"
        api: list[tuple[str, str, str, Handler]] = [
            ("GET", "/v1/apps/{app}", "app_get", self._app_get),
            ("GET", "/v1/apps/{app}/machines", "list", self._list),
            ("POST", "/v1/apps/{app}/machines", "create", self._create),
            ("GET", one, "get", self._get),
            ("DELETE", one, "destroy", self._destroy),
            ("GET", f"{one}/wait", "wait", self._wait),
            ("POST", f"{one}/start", "start", self._start),
            ("POST", f"{one}/stop", "stop", self._stop),
            ("POST", f"{one}/suspend", "suspend", self._suspend),
            ("POST", f"{one}/exec", "exec", self._exec),
            ("GET", f"{one}/lease", "lease_get", self._lease_get),
            ("POST", f"{one}/lease", "lease_acquire", self._lease_acquire),
            ("DELETE", f"{one}/lease", "lease_release", self._lease_release),
            ("GET", f"{one}/metadata", "metadata_get", self._metadata_all),
            ("GET", f"{one}/metadata/{{key}}", "metadata_get", self._metadata_get),
            ("POST", f"{one}/metadata/{{key}}", "metadata_set", self._metadata_set),
            ("DELETE", f"{one}/metadata/{{key}}", "metadata_delete", self._metadata_delete),
        ]
        return [Route(p, self._endpoint(op, h), methods=[m]) for m, p, op, h in api]

    def _endpoint(self, operation: str, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            response = await answer(self._guarded(operation, handler, request))
            self.calls[(operation, response.status_code)] += 1
            return response

        return endpoint

    async def _guarded(self, operation: str, handler: Handler, request: Request) -> Response:
        options = self.host.options
        authorize(request, options.token)
        if request.path_params["app"] != options.app_name:
            raise error(404, "app not found")
        scope = request.path_params.get("machine_id", options.app_name)
        if options.rate_limits and not self.limits.allow(
            operation, scope, time.monotonic(), options
        ):
            raise error(429, "rate limit exceeded")
        fault = draw_fault(self.dice, options, operation)
        if fault is not None:
            log.debug("fly_fault_injected", operation=operation, fault=fault.value)
        if fault is Fault.SERVER_ERROR:
            raise error(self.dice.choice((500, 503)), "internal error")
        if fault is Fault.RATE_LIMITED:
            raise error(429, "rate limit exceeded")
        if fault is Fault.CAPACITY:
            message = "insufficient resources to create machine"
            raise error(options.capacity_status, message, status="insufficient_capacity")
        if (delay_s := options.latency_s.get(operation, 0.0)) > 0:
            await asyncio.sleep(delay_s)  # emulated network and control-plane latency
        response = await handler(request)
        if fault is Fault.TIMEOUT_AFTER_CREATE:
            raise error(408, "deadline_exceeded")
        return response

    def machine(self, request: Request, *, live: bool = True) -> MachineRecord:
        """The addressed machine; 404 if unknown or (when `live`) destroyed."""
        machine = self.host.machines.get(request.path_params["machine_id"])
        if machine is None or (live and machine.state == S.DESTROYED):
            raise not_found()
        return machine

    # -- Fly API handlers: parse, check the lease, hand over to the host, shape the answer ------

    async def _app_get(self, request: Request) -> Response:
        name = self.host.options.app_name
        live = sum(m.state != S.DESTROYED for m in self.host.machines.values())
        org = {"name": "Local", "slug": "personal"}
        return JSONResponse(
            {
                "id": name,
                "name": name,
                "status": "deployed",
                "organization": org,
                "machine_count": live,
                "volume_count": 0,
                "network": "default",
            }
        )

    async def _list(self, request: Request) -> Response:
        wanted = parse_list(request.query_params.multi_items())
        machines = self.host.machines.values()
        return JSONResponse(
            [m.to_json(summary=wanted.summary) for m in machines if wanted.matches(m)]
        )

    async def _create(self, request: Request) -> Response:
        spec = parse_create(await json_body(request), self.host.options.default_region)
        machine = self.host.create(spec)
        nonce = None
        if spec.lease_ttl_s is not None:
            lease = machine.acquire_lease(None, spec.lease_ttl_s, "", time.time(), self.host.ids)
            nonce = lease.nonce
        return JSONResponse(machine.to_json(nonce=nonce))

    async def _get(self, request: Request) -> Response:
        machine = self.machine(request, live=self.host.options.get_destroyed_404)
        return JSONResponse(machine.to_json())

    async def _wait(self, request: Request) -> Response:
        query = request.query_params
        spec = parse_wait(
            query.getlist("state"),
            query.get("timeout"),
            query.get("version") or query.get("instance_id"),
            strict=self.host.options.strict_stopped_wait,
        )
        machine = await self.host.wait(self.machine(request, live=False), spec)
        return JSONResponse(
            {
                "ok": True,
                "state": machine.state.value,
                "event_id": machine.events[0]["id"],
                "version": machine.instance_id,
            }
        )

    async def _start(self, request: Request) -> Response:
        previous = self.host.start(self._leased(request))
        return JSONResponse({"previous_state": previous.value, "migrated": False, "new_host": ""})

    async def _stop(self, request: Request) -> Response:
        parse_stop(await json_body(request))
        self.host.stop(self._leased(request))
        return JSONResponse({"ok": True})

    async def _suspend(self, request: Request) -> Response:
        self.host.suspend(self._leased(request))
        return JSONResponse({"ok": True})

    async def _destroy(self, request: Request) -> Response:
        force = parse_destroy(request.query_params.get("force"), request.query_params.get("kill"))
        self.host.destroy(self._leased(request), force)
        return JSONResponse({"ok": True})

    async def _exec(self, request: Request) -> Response:
        spec = parse_exec(await json_body(request), self.host.options.exec_max_s)
        return JSONResponse(await self.host.run(self.machine(request), spec))

    async def _lease_get(self, request: Request) -> Response:
        lease = self.machine(request).active_lease(time.time())
        if lease is None:
            raise not_found("lease")
        return JSONResponse({"status": "success", "data": lease.to_json()})

    async def _lease_acquire(self, request: Request) -> Response:
        ttl_s, description = parse_lease(await json_body(request), request.query_params.get("ttl"))
        machine = self.machine(request)
        lease = machine.acquire_lease(
            _nonce(request), ttl_s, description, time.time(), self.host.ids
        )
        return JSONResponse({"status": "success", "data": lease.to_json()}, status_code=201)

    async def _lease_release(self, request: Request) -> Response:
        self.machine(request).release_lease(_nonce(request), time.time())
        return JSONResponse({"status": "success", "data": {"ok": True}})

    async def _metadata_all(self, request: Request) -> Response:
        return JSONResponse(self.machine(request).metadata)

    async def _metadata_get(self, request: Request) -> Response:
        metadata = self.machine(request).metadata
        key = request.path_params["key"]
        if key not in metadata:
            raise not_found("metadata key")
        return JSONResponse({"value": metadata[key]})

    async def _metadata_set(self, request: Request) -> Response:
        value = parse_metadata_value(await json_body(request))
        machine = self._leased(request)
        machine.metadata[request.path_params["key"]] = value
        machine.updated_at = time.time()
        return Response(status_code=204)

    async def _metadata_delete(self, request: Request) -> Response:
        machine = self._leased(request)
        machine.metadata.pop(request.path_params["key"], None)
        machine.updated_at = time.time()
        return Response(status_code=204)

    def _leased(self, request: Request) -> MachineRecord:
        """The live machine, once the caller proved it may change it under a held lease."""
        machine = self.machine(request)
        machine.check_nonce(_nonce(request), time.time())
        return machine


class RequestIdMiddleware:
    """ASGI middleware: every HTTP response carries a unique `fly-request-id` header."""

    def __init__(self, app: ASGIApp, new_id: Callable[[], str]) -> None:
        self.app = app
        self.new_id = new_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self.new_id().encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"fly-request-id", request_id)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


async def answer(call: Awaitable[Response]) -> Response:
    """The handler's response, or its ApiError as Fly-shaped JSON."""
    try:
        return await call
    except ApiError as exc:
        return JSONResponse(exc.body, status_code=exc.status)


async def json_body(request: Request) -> object:
    """The JSON body, or None when there is none."""
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise error(400, "invalid_argument: the request body is not valid JSON") from None


def _nonce(request: Request) -> str | None:
    return request.headers.get(NONCE_HEADER) or None


def authorize(request: Request, token: str) -> None:
    """`Authorization: Bearer <token>` or `FlyV1 <token>`, else Fly's 401."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() not in {"bearer", "flyv1"} or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        raise error(401, "Authenticate: token validation error")
