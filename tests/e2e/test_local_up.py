"""`sandbox-listener local up` as a user runs it: env file, the roundtrip example, clean exits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30


@contextmanager
def local_up(*args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "listener", "local", "up", "--port", "0", "--fly-port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_file(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        assert proc.poll() is None, (
            f"local up exited early: {proc.stdout.read() if proc.stdout else ''}"
        )
        assert time.monotonic() < deadline, "no env file within the start timeout"
        time.sleep(0.05)


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


def test_local_up_writes_the_env_file_and_the_roundtrip_example_works(tmp_path: Path) -> None:
    env_file = tmp_path / "stack.env"
    with local_up("--env-file", str(env_file)) as proc:
        wait_for_file(env_file, proc)
        env = read_env(env_file)
        assert {
            "SUPABASE_URL",
            "SUPABASE_ANON_KEY",
            "SUPABASE_SERVICE_ROLE_KEY",
            "SUPABASE_JWT_SECRET",
            "SUPABASE_DB_URL",
            "FLY_API_HOSTNAME",
            "FLY_API_TOKEN",
            "FLY_APP_NAME",
            "LOCAL_USER_ID",
            "LOCAL_USER_JWT",
        } <= env.keys()
        assert oct(env_file.stat().st_mode & 0o777) == "0o600", "the env file holds keys"
        example = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "roundtrip.py"), str(env_file)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert example.returncode == 0, example.stderr
        assert "service_role received INSERT" in example.stdout
        code, out = stop(proc)
    assert code == 0
    assert "Local stack started in" in out and "service_role key:" in out
    db_port = int(env["SUPABASE_DB_URL"].rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", db_port)) != 0, "Postgres still running after exit"


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "listener", "local", "up", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr


def test_a_foreign_non_empty_data_dir_is_refused_and_left_alone(tmp_path: Path) -> None:
    keep = tmp_path / "precious.txt"
    keep.write_text("mine")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "listener",
            "local",
            "up",
            "--port",
            "0",
            "--fly-port",
            "0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "is not empty and was not made by sandbox-listener" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
    assert keep.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() != 0, reason="checks the root-only ownership handling too")
def test_a_data_dir_keeps_keys_and_data_between_runs(tmp_path: Path) -> None:
    data, first_env, second_env = tmp_path / "data", tmp_path / "1.env", tmp_path / "2.env"
    with local_up("--data-dir", str(data), "--env-file", str(first_env)) as proc:
        wait_for_file(first_env, proc)
        assert stop(proc)[0] == 0
    with local_up("--data-dir", str(data), "--env-file", str(second_env)) as proc:
        wait_for_file(second_env, proc)
        assert stop(proc)[0] == 0
    first, second = read_env(first_env), read_env(second_env)
    assert first["SUPABASE_JWT_SECRET"] == second["SUPABASE_JWT_SECRET"]
    assert first["LOCAL_USER_ID"] == second["LOCAL_USER_ID"], "the database was not kept"
