"""Serving an ASGI app inside the caller's event loop on a bound socket; signals stay the host's."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

SHUTDOWN_GRACE_S = 2
STARTUP_TIMEOUT_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something already listens on host:port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def bind_socket(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A listening TCP socket (port 0 = any free port); OSError if the port is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    # Accepted connections inherit this: without it a response written as headers then body
    # waits ~40 ms for the client's delayed ACK (Nagle), which would swamp every latency figure.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.listen(1024)
    return sock


class _HostedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the process hosting it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AsgiServer:
    """One ASGI app served on a bound socket until `stop()`."""

    def __init__(self, app: Any, sock: socket.socket) -> None:
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level="warning",
            lifespan="off",
            access_log=False,
            ws_ping_interval=20.0,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
        self._server = _HostedServer(config)
        self._sock = sock
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        """Start serving; return once connections are accepted."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="asgi")
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            while not self._server.started:  # uvicorn offers a flag, not an event
                if self._task.done():
                    self._task.result()
                    raise RuntimeError("server stopped during start-up")
                await asyncio.sleep(0.005)

    async def wait_closed(self) -> None:
        """Return once the server no longer serves."""
        if self._task is not None:
            await asyncio.wait({self._task})

    async def stop(self) -> None:
        """Close connections and stop; safe to call twice."""
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, timeout=5)
            self._task = None
        self._sock.close()
