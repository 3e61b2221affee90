"""What FlyClient costs per call on top of a bare httpx request.

Run: python bench/bench_fly_client.py [-n CALLS]. Logging is at info, as in production.

Two setups, same request (GET one machine, parse the JSON):
- in-process: httpx.MockTransport, no network, so the difference is all client code
  (limiter, retry wrapper, error mapping, logging call, pydantic parsing into a Machine);
- loopback: a real uvicorn server on 127.0.0.1, to see that overhead next to a real round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import statistics
import time
from collections.abc import Awaitable, Callable

import httpx
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tenacity import wait_none

from listener.fly import FlyClient
from listener.ratelimit import Rate, RateLimiter

APP = "bench"
TOKEN = "fo1_bench-token"
MACHINE = {
    "id": "m1",
    "name": "aged-thunder-7371",
    "state": "started",
    "region": "iad",
    "instance_id": "01H8ZQ4V3N6S0X9JQK2W7R5T1A",
    "private_ip": "fdaa:0:1::2",
    "config": {
        "image": "registry.fly.io/sandbox:1",
        "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 1024},
        "env": {"SESSION_ID": "s1"},
        "metadata": {"session_id": "s1", "epoch": "1", "managed_by": "sandbox-listener"},
        "auto_destroy": True,
        "restart": {"policy": "no"},
    },
    "created_at": "2024-05-01T12:00:00Z",
    "updated_at": "2024-05-01T12:00:05Z",
    "events": [{"type": "launch", "status": "created", "source": "user", "timestamp": 1}],
}
PATH = f"/v1/apps/{APP}/machines/m1"


async def timed(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    """Per-call latencies in microseconds, after a short warm-up."""
    for _ in range(min(200, n)):
        await call()
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        out.append((time.perf_counter() - started) * 1e6)
    return out


def client(http: httpx.AsyncClient, base_url: str) -> FlyClient:
    unlimited = RateLimiter(Rate(1e12, 10**12))
    return FlyClient(
        http, base_url=base_url, app_name=APP, token=TOKEN, limiter=unlimited, wait=wait_none()
    )


async def compare(label: str, http: httpx.AsyncClient, base_url: str, n: int) -> None:
    fly = client(http, base_url)
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def bare() -> object:
        response = await http.get(base_url + PATH, headers=headers)
        response.raise_for_status()
        return response.json()

    async def wrapped() -> object:
        return await fly.get_machine("m1")

    rounds = {"bare httpx": [], "FlyClient": []}  # type: dict[str, list[float]]
    for _ in range(3):  # interleave to share drift between both
        rounds["bare httpx"] += await timed(bare, n // 3)
        rounds["FlyClient"] += await timed(wrapped, n // 3)
    medians = {name: statistics.median(v) for name, v in rounds.items()}
    print(f"\n{label} ({len(rounds['FlyClient'])} calls each)")
    for name, values in rounds.items():
        p99 = statistics.quantiles(values, n=100)[98]
        print(f"  {name:<11} median {medians[name]:8.1f} us   p99 {p99:8.1f} us")
    overhead = medians["FlyClient"] - medians["bare httpx"]
    print(f"  overhead    median {overhead:8.1f} us per call")


def listening_socket() -> socket.socket:
    """Bound and listening before the server runs, so early connections wait in the backlog.

    proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on such sockets, and without it
    every response waits ~40 ms for a delayed ACK (Nagle).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


async def main(n: int) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=MACHINE)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await compare("in-process (MockTransport)", http, "http://fly.bench", n)

    async def machine(request: Request) -> JSONResponse:
        return JSONResponse(MACHINE)

    sock = listening_socket()
    port = sock.getsockname()[1]
    app = Starlette(routes=[Route(PATH, machine)])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient() as http:
            await compare("loopback (uvicorn on 127.0.0.1)", http, f"http://127.0.0.1:{port}", n)
    finally:
        server.should_exit = True
        await serving


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=3000, help="calls per variant (default 3000)")
    asyncio.run(main(parser.parse_args().n))
