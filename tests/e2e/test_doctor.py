"""`sandbox-listener doctor` on the local stack: all pass when healthy, each fault named."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from listener.doctor import doctor
from listener.local import keys
from listener.local.stack import StackThread
from tests.e2e.harness import listener_env

PINNED = "registry.fly.io/sandbox@sha256:" + "ab" * 32
CHECKS = ["config", "image", "supabase", "schema", "publication", "realtime", "fly"]


def free_port() -> int:
    """A port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def verdicts(output: str) -> dict[str, str]:
    """{check: verdict} from the `VERDICT check: detail` lines."""
    found: dict[str, str] = {}
    for line in output.splitlines():
        verdict, _, rest = line.partition(" ")
        if verdict in {"PASS", "WARN", "FAIL", "SKIP"}:
            found[rest.partition(":")[0]] = verdict
    return found


def line_of(output: str, check: str) -> str:
    """The verdict line of `check`, with the hint line after it when there is one."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.split(" ", 1)[-1].startswith(f"{check}:"):
            hint = lines[i + 1] if i + 1 < len(lines) and "hint:" in lines[i + 1] else ""
            return f"{line}\n{hint}".strip()
    raise AssertionError(f"no line for {check} in:\n{output}")


def assert_no_secrets(stack: StackThread, output: str, *more: str) -> None:
    info = stack.info
    for secret in (info.service_role_key, info.fly_api_token, info.jwt_secret, *more):
        assert secret not in output


async def run_doctor(stack: StackThread, **overrides: str) -> tuple[int, str]:
    out = io.StringIO()
    env = listener_env(stack.info, **{"SANDBOX_IMAGE": PINNED, **overrides})
    code = await doctor(env, out, realtime_timeout_s=5)
    return code, out.getvalue()


@contextlib.contextmanager
def changed(stack: StackThread, change: str, undo: str) -> Iterator[None]:
    """Break the shared database for one test and put it back whatever happens."""
    with psycopg.connect(stack.info.db_url, autocommit=True) as conn:
        conn.execute(change)
        try:
            yield
        finally:
            conn.execute(undo)


def test_a_healthy_stack_passes_every_check(stack: StackThread, tmp_path: Path) -> None:
    env_file = tmp_path / "stack.env"
    env_file.write_text(
        "".join(f"{k}={v}\n" for k, v in listener_env(stack.info, SANDBOX_IMAGE=PINNED).items())
    )
    done = subprocess.run(
        [sys.executable, "-m", "listener", "doctor", "--env-file", str(env_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert verdicts(done.stdout) == dict.fromkeys(CHECKS, "PASS")
    assert "All good: 0 failed, 0 warning(s), 7 check(s)." in done.stdout
    assert "hint:" not in done.stdout
    assert done.stderr == ""
    assert_no_secrets(stack, done.stdout)


async def test_an_image_not_pinned_by_digest_is_a_warning_not_a_failure(
    stack: StackThread,
) -> None:
    code, output = await run_doctor(stack, SANDBOX_IMAGE="registry.fly.io/sandbox:latest")
    assert code == 0
    assert verdicts(output)["image"] == "WARN"
    assert "WARN image: registry.fly.io/sandbox:latest is not pinned by digest" in output
    assert "hint: pin it as <repository>@sha256:<digest>" in line_of(output, "image")


async def test_an_empty_image_is_a_configuration_error(stack: StackThread) -> None:
    code, output = await run_doctor(stack, SANDBOX_IMAGE="", FLY_APP_NAME="")
    assert code == 2
    assert list(verdicts(output).values()) == ["FAIL"]  # one check name: config
    assert "FAIL config: SANDBOX_IMAGE: String should have at least 1 character" in output
    assert "FAIL config: FLY_APP_NAME: String should have at least 1 character" in output
    assert "hint: set it in the environment or the --env-file" in output
    assert_no_secrets(stack, output)


async def test_an_unreachable_supabase_fails_and_skips_what_needs_it(stack: StackThread) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, output = await run_doctor(stack, SUPABASE_URL=url)
    assert code == 1
    assert verdicts(output) == {
        "config": "PASS",
        "image": "PASS",
        "supabase": "FAIL",
        "schema": "SKIP",
        "publication": "SKIP",
        "realtime": "SKIP",
        "fly": "PASS",
    }
    line = line_of(output, "supabase")
    assert line.startswith(f"FAIL supabase: {url} is unreachable (ConnectError")
    assert "hint: check SUPABASE_URL" in line
    assert_no_secrets(stack, output)


async def test_a_wrong_service_key_is_rejected(stack: StackThread) -> None:
    wrong = keys.api_key(keys.new_secret(), "service_role")
    code, output = await run_doctor(stack, SUPABASE_SERVICE_ROLE_KEY=wrong)
    assert code == 1
    line = line_of(output, "supabase")
    assert line.startswith("FAIL supabase: the key was rejected (HTTP 401: Invalid API key)")
    assert "hint: set SUPABASE_SERVICE_ROLE_KEY to the service_role key" in line
    assert verdicts(output)["realtime"] == "SKIP"
    assert_no_secrets(stack, output, wrong)


async def test_the_anon_key_in_place_of_the_service_key_is_named(stack: StackThread) -> None:
    code, output = await run_doctor(stack, SUPABASE_SERVICE_ROLE_KEY=stack.info.anon_key)
    assert code == 1
    assert line_of(output, "supabase").startswith(
        "FAIL supabase: the key is not the service_role key (permission denied"
    )
    assert_no_secrets(stack, output, stack.info.anon_key)


@pytest.mark.parametrize(
    ("change", "undo", "missing"),
    [
        (
            "alter function sandbox_live_sessions(integer) rename to sandbox_live_sessions_x",
            "alter function sandbox_live_sessions_x(integer) rename to sandbox_live_sessions",
            "sandbox_live_sessions()",
        ),
        (
            "revoke execute on function claim_sessions(text, integer, integer) from service_role",
            "grant execute on function claim_sessions(text, integer, integer) to service_role",
            "claim_sessions()",
        ),
        (
            "alter view sandbox_stats rename to sandbox_stats_x",
            "alter view sandbox_stats_x rename to sandbox_stats",
            "sandbox_stats",
        ),
    ],
    ids=["function-missing", "function-not-granted", "view-missing"],
)
async def test_a_missing_function_or_view_fails_the_schema_check(
    stack: StackThread, change: str, undo: str, missing: str
) -> None:
    with changed(stack, change, undo):
        code, output = await run_doctor(stack)
    assert code == 1
    line = line_of(output, "schema")
    assert line.startswith(f"FAIL schema: missing or not granted to service_role: {missing}\n")
    assert "hint: apply supabase/migrations" in line
    others = {k: v for k, v in verdicts(output).items() if k != "schema"}
    assert set(others.values()) == {"PASS"}


async def test_an_unapplied_doctor_migration_is_named(stack: StackThread) -> None:
    with changed(
        stack,
        "alter function sandbox_doctor() rename to sandbox_doctor_x",
        "alter function sandbox_doctor_x() rename to sandbox_doctor",
    ):
        code, output = await run_doctor(stack)
    assert code == 1
    assert line_of(output, "schema").startswith(
        "FAIL schema: function sandbox_doctor() not found: the migrations are not (all) applied"
    )
    assert verdicts(output)["publication"] == "SKIP"
    assert verdicts(output)["realtime"] == "PASS"


async def test_a_table_left_out_of_the_publication_fails_publication_and_realtime(
    stack: StackThread,
) -> None:
    with changed(
        stack,
        "alter publication supabase_realtime drop table public.coding_sessions",
        "alter publication supabase_realtime add table public.coding_sessions",
    ):
        code, output = await run_doctor(stack)
    assert code == 1
    publication = line_of(output, "publication")
    assert publication.startswith(
        "FAIL publication: coding_sessions not in publication supabase_realtime"
    )
    assert "hint: alter publication supabase_realtime add table public.coding_sessions;" in (
        publication
    )
    realtime = line_of(output, "realtime")
    assert realtime.startswith("FAIL realtime: subscription refused: Unable to subscribe")
    assert "table: coding_sessions" in realtime
    assert verdicts(output)["schema"] == "PASS"


async def test_a_bad_fly_token_is_rejected(stack: StackThread) -> None:
    wrong = keys.new_secret()
    code, output = await run_doctor(stack, FLY_API_TOKEN=wrong)
    assert code == 1
    line = line_of(output, "fly")
    assert line.startswith("FAIL fly: the token was rejected (HTTP 401)")
    assert "hint: create a token" in line
    assert verdicts(output)["supabase"] == "PASS"
    assert_no_secrets(stack, output, wrong)


async def test_an_unknown_fly_app_is_named(stack: StackThread) -> None:
    code, output = await run_doctor(stack, FLY_APP_NAME="no-such-app")
    assert code == 1
    line = line_of(output, "fly")
    assert line.startswith("FAIL fly: app no-such-app not found (HTTP 404)")
    assert "hint: fix FLY_APP_NAME" in line
    assert_no_secrets(stack, output)


async def test_an_unreachable_fly_api_is_named(stack: StackThread) -> None:
    hostname = f"http://127.0.0.1:{free_port()}"
    code, output = await run_doctor(stack, FLY_API_HOSTNAME=hostname)
    assert code == 1
    assert line_of(output, "fly").startswith(f"FAIL fly: {hostname} is unreachable")
    assert_no_secrets(stack, output)
