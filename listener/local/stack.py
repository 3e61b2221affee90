"""The local stack's runner: Postgres, the Supabase-shaped API server and the Fly emulator."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.routing import Mount, WebSocketRoute

from listener.local import keys
from listener.local.fly_emulator import EmulatorOptions, FlyEmulator
from listener.local.postgres import EmbeddedPostgres, PostgresStartError
from listener.local.realtime_gateway import RealtimeGateway
from listener.local.rest import create_rest_app
from listener.server import AsgiServer, bind_socket, port_in_use

log = structlog.get_logger(component="stack")

T = TypeVar("T")
DEV_USER_EMAIL = "dev@example.com"
SECRETS_FILE = "stack-secrets.json"


class StackError(RuntimeError):
    """The local stack could not start; the message says why."""


@dataclass(frozen=True)
class StackInfo:
    """Where the running stack is and the keys to use it (what `local up` prints)."""

    supabase_url: str
    db_url: str
    jwt_secret: str
    anon_key: str
    service_role_key: str
    fly_api_hostname: str
    fly_api_token: str
    fly_app_name: str

    def env(self) -> dict[str, str]:
        """The variables a listener or a frontend script needs, by their conventional names."""
        return {
            "SUPABASE_URL": self.supabase_url,
            "SUPABASE_ANON_KEY": self.anon_key,
            "SUPABASE_SERVICE_ROLE_KEY": self.service_role_key,
            "SUPABASE_JWT_SECRET": self.jwt_secret,
            "SUPABASE_DB_URL": self.db_url,
            "FLY_API_HOSTNAME": self.fly_api_hostname,
            "FLY_API_TOKEN": self.fly_api_token,
            "FLY_APP_NAME": self.fly_app_name,
        }

    def write_env_file(self, path: Path, extra: dict[str, str] | None = None) -> None:
        """Write the env file atomically (readable by the owner only: it holds keys)."""
        tmp = path.with_name(path.name + ".tmp")
        values = {**self.env(), **(extra or {})}
        tmp.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        tmp.chmod(0o600)
        tmp.replace(path)


def create_user(db_url: str, email: str) -> uuid.UUID:
    """Create (or find) an auth.users row for `email`; return its id."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "insert into auth.users(email) values (%s)"
            " on conflict (email) do update set updated_at = now() returning id",
            (email,),
        ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


@dataclass
class LocalStack:
    """Everything a listener needs on 127.0.0.1: Postgres, REST + Realtime, the Fly emulator."""

    data_dir: Path | None = None
    api_port: int = 0
    db_port: int | None = None
    fly_port: int = 0
    fly_options: EmulatorOptions | None = None
    postgres: EmbeddedPostgres | None = None
    info: StackInfo | None = field(default=None, init=False)
    realtime: RealtimeGateway | None = field(default=None, init=False)
    fly: FlyEmulator | None = field(default=None, init=False)
    _api: AsgiServer | None = field(default=None, init=False)
    _pool: AsyncConnectionPool | None = field(default=None, init=False)
    _owns_postgres: bool = field(default=False, init=False)

    async def __aenter__(self) -> StackInfo:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> StackInfo:
        """Start every part; return the URLs and keys once all of them answer."""
        try:
            api_sock = bind_socket(self.api_port)
        except OSError as exc:
            raise StackError(
                f"port {self.api_port} on 127.0.0.1 is already in use ({exc})"
            ) from exc
        if self.fly_port and port_in_use(self.fly_port):
            api_sock.close()
            raise StackError(f"port {self.fly_port} on 127.0.0.1 is already in use; choose another")
        if self.postgres is None:
            self.postgres = EmbeddedPostgres(data_dir=self.data_dir, port=self.db_port)
            self._owns_postgres = True
            try:
                await asyncio.to_thread(self.postgres.start)
            except PostgresStartError as exc:
                api_sock.close()
                raise StackError(str(exc)) from exc
        secret, fly_token = self._secrets()
        self._pool = AsyncConnectionPool(
            self.postgres.role_dsn("authenticator"), min_size=2, max_size=20, open=False
        )
        await self._pool.open(wait=True, timeout=10)
        self.realtime = RealtimeGateway(self.postgres.dsn, secret)
        await self.realtime.start()
        api = Starlette(
            routes=[
                Mount("/rest/v1", app=create_rest_app(self._pool, secret)),
                WebSocketRoute("/realtime/v1/websocket", self.realtime.endpoint),
            ]
        )
        self._api = AsgiServer(api, api_sock)
        await self._api.start()
        options = self.fly_options or EmulatorOptions(token=fly_token)
        self.fly = FlyEmulator(options)
        await self.fly.start(port=self.fly_port)
        api_port = self._api.port
        self.info = StackInfo(
            supabase_url=f"http://127.0.0.1:{api_port}",
            db_url=self.postgres.dsn,
            jwt_secret=secret,
            anon_key=keys.api_key(secret, "anon"),
            service_role_key=keys.api_key(secret, "service_role"),
            fly_api_hostname=self.fly.url,
            fly_api_token=options.token,
            fly_app_name=options.app_name,
        )
        log.info("stack_started", supabase_url=self.info.supabase_url, fly=self.fly.url)
        return self.info

    async def stop(self) -> None:
        """Stop every part that started, newest first; safe to call twice."""
        if self.fly is not None:
            await self.fly.stop()
            self.fly = None
        if self._api is not None:
            await self._api.stop()
            self._api = None
        if self.realtime is not None:
            await self.realtime.stop()
            self.realtime = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._owns_postgres and self.postgres is not None:
            await asyncio.to_thread(self.postgres.stop)
            self.postgres = None

    def _secrets(self) -> tuple[str, str]:
        """The JWT secret and Fly token: kept in a chosen data dir, fresh for a temporary one."""
        if self.data_dir is None:
            return keys.new_secret(), keys.new_secret()
        path = self.data_dir.expanduser().resolve() / SECRETS_FILE
        if path.exists():
            saved = json.loads(path.read_text())
            return str(saved["jwt_secret"]), str(saved["fly_api_token"])
        secret, token = keys.new_secret(), keys.new_secret()
        path.write_text(json.dumps({"jwt_secret": secret, "fly_api_token": token}))
        path.chmod(0o600)
        return secret, token


class StackThread:
    """A LocalStack on its own event loop in a background thread (for tests and benchmarks)."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="local-stack", daemon=True
        )
        self._thread.start()
        self.info: StackInfo = self.call(self.stack.__aenter__)

    def call(self, fn: Callable[[], Awaitable[T]], timeout_s: float = 60) -> T:
        """Run a coroutine function on the stack's loop and return its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(_await(fn), self._loop)
        return future.result(timeout=timeout_s)

    def close(self) -> None:
        """Stop the stack and its loop."""
        try:
            self.call(self.stack.stop)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


async def _await(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()
