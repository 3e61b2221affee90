"""Composition root: read settings, configure logs, build clients, run the loops, handle signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass

import httpx
import structlog

from listener.config import Settings
from listener.dispatcher import Dispatcher
from listener.effects import Controller, utcnow
from listener.errors import ConfigError
from listener.fly import FlyClient
from listener.logs import configure_logging
from listener.metrics import Metrics
from listener.models import Session, StopReason
from listener.realtime import RealtimeIntake
from listener.reconciler import Policy
from listener.runner import CommandRunner
from listener.scanner import Scanner
from listener.store import SandboxStore, connect
from listener.sweeper import Sweeper

log = structlog.get_logger(component="app")

HTTP_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


def new_owner_id() -> str:
    """A name for this process's claims: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class Listener:
    """The assembled parts of one listener process."""

    settings: Settings
    metrics: Metrics
    fly: FlyClient
    store: SandboxStore
    controller: Controller
    dispatcher: Dispatcher
    scanner: Scanner
    intake: RealtimeIntake
    sweeper: Sweeper


@contextlib.asynccontextmanager
async def assemble(settings: Settings, *, owner: str | None = None) -> AsyncIterator[Listener]:
    """Build every part from settings; the HTTP client closes on exit."""
    metrics = Metrics()
    policy = Policy.from_settings(settings)
    async with (
        httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http,
        httpx.AsyncClient(timeout=HTTP_TIMEOUT) as supabase_http,
    ):
        fly = FlyClient.from_settings(settings, http, metrics=metrics)
        supabase = await connect(
            str(settings.supabase_url),
            settings.supabase_service_role_key.get_secret_value(),
            supabase_http,
        )
        store = SandboxStore(supabase, owner or new_owner_id(), metrics=metrics)
        controller = Controller(
            fly,
            store,
            policy,
            image=settings.sandbox_image,
            smoke_command=settings.sandbox_smoke_command,
            lease_s=settings.listener_lease_s,
            metrics=metrics,
        )
        runner = CommandRunner(
            fly,
            store,
            max_timeout_s=settings.sandbox_command_max_timeout_s,
            output_limit_bytes=settings.sandbox_command_output_limit_bytes,
            lease_s=settings.listener_lease_s,
            metrics=metrics,
        )
        dispatcher = Dispatcher(
            controller,
            run_commands=runner.run_queue,
            concurrency=settings.listener_concurrency,
            metrics=metrics,
        )
        controller.on_settled = dispatcher.submit_commands
        scanner = Scanner(
            store,
            dispatcher,
            interval_s=settings.listener_poll_interval_s,
            lease_s=settings.listener_lease_s,
            capacity=settings.listener_concurrency,  # claim only what can start at once
            release=controller.hand_back,
            bury_deleted=controller.bury_deleted,
            metrics=metrics,
        )
        intake = RealtimeIntake(
            str(settings.supabase_url).rstrip("/"),
            settings.supabase_service_role_key.get_secret_value(),
            on_change=lambda session_id: dispatcher.submit(session_id, announced=True),
            on_command=dispatcher.submit_commands,
            on_confirmed=scanner.trigger,
            on_unreadable=scanner.trigger,
            metrics=metrics,
        )
        sweeper = Sweeper(
            fly,
            store,
            policy,
            clock=utcnow,
            interval_s=settings.listener_sweep_interval_s,
            lease_s=settings.listener_lease_s,
            metrics=metrics,
        )
        yield Listener(
            settings, metrics, fly, store, controller, dispatcher, scanner, intake, sweeper
        )


async def run(settings: Settings, stop: asyncio.Event, *, owner: str | None = None) -> None:
    """Run the listener until `stop` is set; return after a graceful drain."""
    async with assemble(settings, owner=owner) as parts:
        log.info("listener_started", owner=parts.store.owner, app=settings.fly_app_name)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(parts.intake.run(stop), name="realtime")
            tg.create_task(parts.scanner.run(stop), name="scanner")
            tg.create_task(parts.sweeper.run(stop), name="sweeper")
            tg.create_task(
                parts.dispatcher.run(stop, settings.listener_shutdown_grace_s), name="consumer"
            )
            if settings.http_port:
                from listener.health import serve_health

                tg.create_task(serve_health(parts, settings.http_port, stop), name="http")
        if settings.listener_destroy_on_shutdown:
            await destroy_all(parts)
        log.info("listener_stopped")


async def destroy_all(parts: Listener) -> int:
    """Tear down every live sandbox (LISTENER_DESTROY_ON_SHUTDOWN); returns how many. One
    failure does not stop the others; the whole pass gets the shutdown grace."""
    settings = parts.settings
    slots = asyncio.Semaphore(settings.listener_concurrency)

    async def destroy(session: Session) -> bool:
        async with slots:
            try:
                row = await parts.store.claim(session.id, settings.listener_lease_s, force=True)
                if row is None or not row.claimed_by_me(parts.store.owner):
                    return False
                await parts.controller.teardown(row, StopReason.SHUTDOWN)
                return True
            except Exception as exc:  # the sweeper or the deadline reaps what is left
                log.warning("shutdown_destroy_failed", session_id=session.id, error=str(exc))
                return False

    done: list[bool] = []
    try:
        async with asyncio.timeout(max(settings.listener_shutdown_grace_s, 5.0)):
            done = await asyncio.gather(*map(destroy, await parts.store.live_sessions()))
    except TimeoutError:
        log.warning("shutdown_destroy_timed_out")
    count = sum(done)
    log.info("shutdown_destroyed", sandboxes=count)
    return count


def load_settings(env: Mapping[str, str]) -> Settings | None:
    """Settings from the environment, or None after printing every problem to stderr."""
    try:
        return Settings.from_env(env)
    except ConfigError as exc:
        print(f"sandbox-listener: {exc}", file=sys.stderr)
        return None


def main(env: Mapping[str, str] | None = None) -> int:
    """`sandbox-listener run`: exit 0 after a clean stop, 2 on bad config, 1 on a crash."""
    settings = load_settings(os.environ if env is None else env)
    if settings is None:
        return 2
    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(run_until_signalled(lambda stop: run(settings, stop)))


async def run_until_signalled(body: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run `body(stop)` with SIGTERM/SIGINT setting `stop`; the handlers do nothing else."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await body(stop)
    except Exception:  # a crashed task: exit non-zero so the platform restarts the process
        log.exception("listener_crashed")
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0
