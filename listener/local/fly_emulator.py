"""The Fly Machines API emulator: the API, the emulated host and control endpoints, served by
uvicorn on a real socket, plus a Python inventory API for tests and benchmarks."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from types import TracebackType

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from listener.local.fly_api import (
    FlyApi,
    Handler,
    RequestIdMiddleware,
    answer,
    authorize,
    json_body,
)
from listener.local.fly_host import FlyHost
from listener.local.fly_knobs import EmulatorOptions, knob_values, options_with
from listener.local.fly_requests import parse_list
from listener.local.fly_state import JSON, IdSource, MachineSnapshot, error
from listener.models import MachineState as S
from listener.server import AsgiServer, bind_socket

__all__ = ["EmulatorOptions", "FlyEmulator", "MachineSnapshot", "serve_forever"]

log = structlog.get_logger(component="fly_emulator")

SHUTDOWN_GRACE_S = 2
STARTUP_TIMEOUT_S = 10.0


class FlyEmulator:
    """A local Fly Machines API: `.app` is the ASGI app; `start()` serves it on a real socket."""

    def __init__(self, options: EmulatorOptions) -> None:
        self.url = ""
        self._dice = random.Random(options.seed)
        self._host_dice = random.Random(_derived_seed(options.seed, "host"))
        ids = IdSource(random.Random(_derived_seed(options.seed, "ids")))
        self._host = FlyHost(options, ids, self._host_dice)
        self._api = FlyApi(self._host, self._dice)
        self._request_ids = IdSource(random.SystemRandom())
        self._server: AsgiServer | None = None
        control: list[tuple[str, str, Handler]] = [
            ("GET", "/_emulator/machines", self._control_machines),
            ("POST", "/_emulator/machines/{machine_id}/vanish", self._control_vanish),
            ("GET", "/_emulator/faults", self._control_faults),
            ("POST", "/_emulator/faults", self._control_faults),
            ("GET", "/_emulator/stats", self._control_stats),
            ("DELETE", "/_emulator/stats", self._control_stats),
        ]
        routes = self._api.routes() + [
            Route(path, self._control(handler), methods=[method])
            for method, path, handler in control
        ]
        self.app = Starlette(
            routes=routes, middleware=[Middleware(RequestIdMiddleware, new_id=self._request_id)]
        )

    @property
    def options(self) -> EmulatorOptions:
        return self._host.options

    # -- serving -------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind host:port (0 picks a free port, see `.url`) and serve until `stop()`."""
        server = self._server = AsgiServer(self.app, bind_socket(port, host))
        await server.start()
        self.url = f"http://{host}:{server.port}"
        self._host.start_ticking()
        log.info("fly_emulator_started", url=self.url, app=self.options.app_name)

    async def wait_closed(self) -> None:
        """Return once the server no longer serves (after `stop()`, or if uvicorn failed)."""
        if self._server is not None:
            await self._server.wait_closed()

    async def stop(self) -> None:
        """Answer pending waits, kill exec processes, cancel transitions, close, remove workdirs."""
        self._host.interrupt()  # so in-flight waits and execs answer and the server can drain
        if self._server is not None:
            await self._server.stop()
        await self._host.close()
        log.info("fly_emulator_stopped", url=self.url)

    async def __aenter__(self) -> FlyEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- inventory API for tests and benchmarks -------------------------------------------------

    def machines(self, include_deleted: bool = False) -> list[MachineSnapshot]:
        live = (
            m for m in self._host.machines.values() if include_deleted or m.state != S.DESTROYED
        )
        return [m.snapshot() for m in live]

    def get(self, machine_id: str) -> MachineSnapshot:
        """The machine's current snapshot (destroyed ones too); KeyError if it never existed."""
        return self._host.machines[machine_id].snapshot()

    def vanish(self, machine_id: str) -> None:
        """Host failure: the machine is destroyed without any API call; KeyError if unknown."""
        self._host.vanish(self._host.machines[machine_id])

    def set_options(self, **changes: object) -> EmulatorOptions:
        """Change runtime knobs (fly_knobs.RUNTIME_KNOBS); a new `seed` restarts the dice."""
        self._host.options = options_with(self.options, changes)
        if "seed" in changes:
            self._dice.seed(self.options.seed)
            self._host_dice.seed(_derived_seed(self.options.seed, "host"))
        self._api.limits.reset()
        return self.options

    def call_counts(self) -> dict[tuple[str, int], int]:
        """API calls so far by (operation, HTTP status)."""
        return dict(self._api.calls)

    def calls(self, operation: str | None = None, status: int | None = None) -> int:
        """How many API calls matched the operation and/or status."""
        matching = (
            n
            for (op, st), n in self._api.calls.items()
            if operation in (None, op) and status in (None, st)
        )
        return sum(matching)

    def stats(self) -> JSON:
        calls = sorted(self._api.calls.items())
        return {
            "calls": [{"operation": op, "status": st, "count": n} for (op, st), n in calls],
            "total_calls": self.calls(),
            "machines": dict(Counter(m.state.value for m in self._host.machines.values())),
        }

    def reset_stats(self) -> None:
        self._api.calls.clear()

    # -- control endpoints (same token; not counted, never faulted or rate limited) -------------

    def _control(self, handler: Handler) -> Handler:
        async def endpoint(request: Request) -> Response:
            return await answer(self._authorized(handler, request))

        return endpoint

    async def _authorized(self, handler: Handler, request: Request) -> Response:
        authorize(request, self.options.token)
        return await handler(request)

    def _request_id(self) -> str:
        return f"{self._request_ids.ulid(time.time())}-{self.options.default_region}"

    async def _control_machines(self, request: Request) -> Response:
        wanted = parse_list(request.query_params.multi_items())
        machines = [m for m in self._host.machines.values() if wanted.matches(m)]
        return JSONResponse(
            [m.to_json(summary=wanted.summary) | {"workdir": str(m.workdir)} for m in machines]
        )

    async def _control_vanish(self, request: Request) -> Response:
        self._host.vanish(self._api.machine(request))
        return JSONResponse({"ok": True})

    async def _control_faults(self, request: Request) -> Response:
        if request.method == "POST":
            changes = await json_body(request)
            if not isinstance(changes, dict):
                raise error(400, "invalid_argument: knobs must be a JSON object")
            try:
                self.set_options(**changes)
            except ValueError as exc:
                raise error(400, f"invalid_argument: {exc}") from None
        return JSONResponse(knob_values(self.options))

    async def _control_stats(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.reset_stats()
        return JSONResponse(self.stats())


def _derived_seed(seed: int | None, purpose: str) -> str | None:
    """One seed, several independent generators (faults, host failures, ids)."""
    return None if seed is None else f"{purpose}-{seed}"


async def serve_forever(
    options: EmulatorOptions,
    host: str = "127.0.0.1",
    port: int = 0,
    on_ready: Callable[[FlyEmulator], None] | None = None,
) -> None:
    """Serve until cancelled (e.g. by Ctrl-C in `asyncio.run`); `on_ready` gets the running
    emulator, e.g. to print its URL."""
    emulator = FlyEmulator(options)
    await emulator.start(host, port)
    try:
        if on_ready is not None:
            on_ready(emulator)
        await emulator.wait_closed()
    finally:
        await emulator.stop()
