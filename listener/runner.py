"""The command runner: a session's queued commands, in order, one at a time, through Fly exec."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from listener.errors import FlyError, StoreError
from listener.metrics import Metrics
from listener.models import Command, CommandOutcome, CommandStatus, ExecResult
from listener.reconciler import (
    command_failure,
    command_outcome,
    refuse_command,
    unstored_outcome,
)

log = structlog.get_logger(component="runner")


class ExecApi(Protocol):
    """What the runner needs from Fly (FlyClient satisfies it)."""

    async def exec(
        self,
        machine_id: str,
        argv: Sequence[str],
        *,
        stdin: str | None = None,
        timeout_s: int,
        output_limit_bytes: int = ...,
    ) -> ExecResult: ...


class CommandRepo(Protocol):
    """What the runner needs from the store (SandboxStore satisfies it)."""

    async def claim_next_command(self, session_id: str, lease_s: int) -> Command | None: ...
    async def renew_command_lease(self, command: Command, lease_s: int) -> bool: ...
    async def finish_command(self, command: Command, outcome: CommandOutcome) -> bool: ...


@dataclass
class CommandRunner:
    """Runs what claim_next_command hands out until the session's queue is empty."""

    fly: ExecApi
    store: CommandRepo
    max_timeout_s: int = 300
    output_limit_bytes: int = 65536
    lease_s: int = 120
    metrics: Metrics = field(default_factory=Metrics)

    async def run_queue(self, session_id: str) -> int:
        """Run (or settle) the session's commands now; return how many were run."""
        ran = 0
        while (
            command := await self.store.claim_next_command(session_id, self.lease_s)
        ) is not None:
            await self.run_one(command)
            ran += 1
        return ran

    async def run_one(self, command: Command) -> CommandOutcome:
        """Run one claimed command and write its outcome."""
        with structlog.contextvars.bound_contextvars(
            session_id=command.session_id, command_id=command.id
        ):
            started = time.monotonic()
            outcome = refuse_command(command, self.max_timeout_s) or await self._execute(command)
            written = await self._finish(command, outcome)
            self.metrics.commands.labels(status=outcome.status.value).inc()
            log.info(
                "command_finished",
                status=outcome.status.value,
                exit_code=outcome.exit_code,
                seconds=round(time.monotonic() - started, 3),
                written=written,
            )
            return outcome

    async def _finish(self, command: Command, outcome: CommandOutcome) -> bool:
        """Write the result; if that fails, write it again without the output, so the exit
        code and a true reason are kept (the lease lapsing is the last resort)."""
        try:
            return await self.store.finish_command(command, outcome)
        except StoreError as exc:
            log.warning("command_result_write_failed", error=str(exc))
            return await self.store.finish_command(command, unstored_outcome(outcome, exc))

    async def _execute(self, command: Command) -> CommandOutcome:
        if not command.machine_id:
            return CommandOutcome(CommandStatus.FAILED, error="The session has no sandbox now.")
        failure: FlyError | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                keeper = tg.create_task(self._keep_lease(command), name=f"cmd-lease-{command.id}")
                result = await self.fly.exec(
                    command.machine_id,
                    list(command.argv),
                    stdin=command.stdin,
                    timeout_s=command.timeout_s,
                    output_limit_bytes=self.output_limit_bytes,
                )
                keeper.cancel()
        except* FlyError as group:
            failure = group.exceptions[0]  # type: ignore[assignment]  # one task: a FlyError, not a group
        if failure is not None:
            return command_failure(failure, command)
        return command_outcome(result, self.output_limit_bytes)

    async def _keep_lease(self, command: Command) -> None:
        """Renew every lease/3 while the command runs: it is activity, the sandbox stays."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                if not await self.store.renew_command_lease(command, self.lease_s):
                    log.warning("command_lease_lost")
                    return
            except StoreError as exc:  # a blip: try again next tick, the command keeps running
                log.warning("command_lease_renew_failed", error=str(exc))
