"""The runner when the result cannot be written: the exit code and a true reason survive."""

from __future__ import annotations

from collections.abc import Sequence

from listener.errors import StoreError
from listener.models import Command, CommandOutcome, CommandStatus, ExecResult
from listener.runner import CommandRunner

COMMAND = Command("c1", "s1", ("printf", "x"), 10, CommandStatus.RUNNING, machine_id="m1")


class Exec:
    """Fly exec answering one fixed result."""

    async def exec(
        self,
        machine_id: str,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        timeout_s: int,
        output_limit_bytes: int = 65536,
    ) -> ExecResult:
        return ExecResult(exit_code=4, stdout="out", stderr="err")


class Results:
    """A store whose first result write fails, as a 22P05 or a constraint would."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.written: list[CommandOutcome] = []

    async def claim_next_command(self, session_id: str, lease_s: int) -> Command | None:
        return None

    async def renew_command_lease(self, command: Command, lease_s: int) -> bool:
        return True

    async def finish_command(self, command: Command, outcome: CommandOutcome) -> bool:
        if self.failures:
            self.failures -= 1
            raise StoreError("finish_command failed: unsupported Unicode escape (code 22P05)")
        self.written.append(outcome)
        return True


async def test_a_failed_result_write_is_retried_without_the_output() -> None:
    store = Results(failures=1)
    await CommandRunner(Exec(), store).run_one(COMMAND)
    (written,) = store.written
    assert (written.status, written.exit_code, written.stdout) == (CommandStatus.FAILED, 4, None)
    assert written.error is not None and "22P05" in written.error


async def test_a_result_that_writes_is_written_once_with_its_output() -> None:
    store = Results(failures=0)
    await CommandRunner(Exec(), store).run_one(COMMAND)
    assert [(w.exit_code, w.stdout, w.stderr) for w in store.written] == [(4, "out", "err")]
