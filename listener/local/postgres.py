"""Embedded PostgreSQL (pgserver's binaries): logical WAL, a Supabase bootstrap, migrations."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import structlog

from listener.server import free_port, port_in_use

log = structlog.get_logger(component="postgres")

BOOTSTRAP_SQL = Path(__file__).with_name("supabase_bootstrap.sql")
DEFAULT_MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "supabase" / "migrations"
MARKER = "sandbox-listener-stack"
SYSTEM_USER = "pgserver"  # postgres refuses to run as root; pgserver's convention
START_TIMEOUT_S = 20.0


class PostgresStartError(RuntimeError):
    """The embedded Postgres could not be started; the message says why and what to do."""


@dataclass
class EmbeddedPostgres:
    """A private Postgres 16 on 127.0.0.1 with wal_level=logical, owned by this process."""

    data_dir: Path | None = None
    port: int | None = None
    migrations_dir: Path = DEFAULT_MIGRATIONS_DIR
    _tmp: Path | None = field(default=None, init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def dsn(self) -> str:
        """Superuser connection string (the local stack's SUPABASE_DB_URL)."""
        return f"postgresql://postgres:postgres@127.0.0.1:{self.port}/postgres"

    def role_dsn(self, role: str) -> str:
        """Connection string for another login role (e.g. `authenticator`)."""
        return f"postgresql://{role}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Create or reuse the data dir, start the server, bootstrap it and apply migrations."""
        pgdata = self._prepare_data_dir()
        self.port = self.port or free_port()
        if port_in_use(self.port):
            raise PostgresStartError(
                f"port {self.port} on 127.0.0.1 is already in use; choose another with --db-port"
            )
        fresh = not (pgdata / "PG_VERSION").exists()
        if fresh:
            self._initdb(pgdata)
        self._launch(pgdata)
        try:
            self._wait_ready(pgdata)
            if fresh:
                self._run_sql_file(BOOTSTRAP_SQL)
            applied = self.apply_migrations()
        except BaseException:
            self.stop()
            raise
        log.info("postgres_started", port=self.port, data_dir=str(pgdata), migrations=applied)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove a temporary data dir."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: roll back, then exit
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def apply_migrations(self) -> list[str]:
        """Apply the project's migrations not yet recorded, in file-name order; return them."""
        files = sorted(self.migrations_dir.glob("*.sql"))
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            done = {
                row[0]
                for row in conn.execute("select version from supabase_migrations.schema_migrations")
            }
            applied: list[str] = []
            for path in files:
                version, _, name = path.stem.partition("_")
                if version in done:
                    continue
                sql = path.read_text()
                with conn.transaction():
                    conn.execute(sql.encode())
                    conn.execute(
                        "insert into supabase_migrations.schema_migrations"
                        "(version, name, statements) values (%s, %s, array[%s])",
                        (version, name, sql),
                    )
                applied.append(path.name)
        return applied

    # -- internals -------------------------------------------------------------------------

    def _prepare_data_dir(self) -> Path:
        if self.data_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="sandbox-listener-pg-"))
            pgdata = self._tmp / "pgdata"
            pgdata.mkdir()
            (self._tmp / MARKER).touch()
        else:
            root = self.data_dir.expanduser().resolve()
            root.mkdir(parents=True, exist_ok=True)
            if any(root.iterdir()) and not (root / MARKER).exists():
                raise PostgresStartError(
                    f"data dir {root} is not empty and was not made by sandbox-listener; "
                    "choose an empty or new directory (nothing was changed)"
                )
            (root / MARKER).touch()
            pgdata = root / "pgdata"
            pgdata.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            self._grant_to_system_user(pgdata)
        return pgdata

    def _grant_to_system_user(self, pgdata: Path) -> None:
        """As root, Postgres runs as an unprivileged user: it must reach the data dir and the
        binaries (a venv under a 0700 temp dir would hide them), as pgserver's own server does."""
        with warnings.catch_warnings():  # pgserver warns at import when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from pgserver.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        entry = ensure_user_exists(SYSTEM_USER)
        assert entry is not None  # useradd succeeded or raised
        ensure_prefix_permissions(pgdata)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
        os.chmod(pgdata, 0o700)
        bin_dir = Path(self._bin("postgres")).parent
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_prefix_permissions(bin_dir)
        ensure_folder_permissions(bin_dir, readable | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_dir.parent / "lib", readable)

    def _bin(self, name: str) -> str:
        spec = importlib.util.find_spec("pgserver")
        if spec is None or spec.origin is None:
            raise PostgresStartError(
                "pgserver is not installed: pip install 'sandbox-listener[local]'"
            )
        return str(Path(spec.origin).parent / "pginstall" / "bin" / name)

    def _user_kw(self) -> dict[str, str]:
        return {"user": SYSTEM_USER} if os.geteuid() == 0 else {}

    def _initdb(self, pgdata: Path) -> None:
        result = subprocess.run(
            [
                self._bin("initdb"),
                "-D",
                str(pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            check=False,
            **self._user_kw(),  # type: ignore[call-overload]  # user= is str
        )
        if result.returncode != 0:
            raise PostgresStartError(f"initdb failed: {result.stderr.strip()}")

    def _launch(self, pgdata: Path) -> None:
        logfile = open(pgdata / "server.log", "ab")  # noqa: SIM115  # kept open by the child
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "",
            "wal_level": "logical",
            "max_replication_slots": "32",
            "max_wal_senders": "32",
            "max_connections": "200",
            # fsync off (a throwaway dev database) makes commits cheap anyway; synchronous_commit
            # stays on because logical decoding only sees a commit once its WAL is flushed: off,
            # every change would reach Realtime ~200 ms (wal_writer_delay) late.
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "128MB",
        }
        args = [self._bin("postgres"), "-D", str(pgdata)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        self._proc = subprocess.Popen(  # type: ignore[call-overload]  # user= is str
            args, stdout=logfile, stderr=logfile, start_new_session=True, **self._user_kw()
        )
        logfile.close()

    def _wait_ready(self, pgdata: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = (pgdata / "server.log").read_text(errors="replace")[-2000:]
                raise PostgresStartError(f"postgres exited at start:\n{tail}")
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                time.sleep(0.02)
        raise PostgresStartError(f"postgres not ready after {START_TIMEOUT_S:.0f}s")

    def _run_sql_file(self, path: Path) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(path.read_bytes())
