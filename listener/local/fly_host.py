"""The emulated flyd: machine lifecycles with real delays, the main-process deadline, exec
subprocesses in per-machine working directories (see fly_exec), host failures and waits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog

from listener.local.fly_exec import (
    MachineUser,
    fresh_directory,
    machine_environment,
    machine_user,
    open_root,
    spawn,
)
from listener.local.fly_knobs import EmulatorOptions
from listener.local.fly_requests import CreateSpec, ExecSpec, WaitSpec
from listener.local.fly_state import (
    JSON,
    IdSource,
    MachineRecord,
    destroy_plan,
    error,
    not_found,
    rfc3339,
    start_plan,
    stop_plan,
    suspend_plan,
)
from listener.models import MachineState as S

log = structlog.get_logger(component="fly_emulator")

Steps = list[tuple[float, S, str]]  # (delay before, state entered, event type)
VANISH_TICK_S = 0.2


class FlyHost:
    """Owns the machine records and every asynchronous thing that happens to them."""

    def __init__(self, options: EmulatorOptions, ids: IdSource, dice: random.Random) -> None:
        """`dice` decides host failures; it is the host's own, so ticks do not shift API faults."""
        self.options = options
        self.machines: dict[str, MachineRecord] = {}
        self.ids = ids
        self._dice = dice
        self._changes: dict[str, asyncio.Event] = {}
        self._transitions: dict[str, asyncio.Task[None]] = {}
        self._deadlines: dict[str, asyncio.Task[None]] = {}
        self._procs: dict[str, set[asyncio.subprocess.Process]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._root: Path | None = None
        self._user: MachineUser | None = None
        self._closing = False

    # -- API operations (the HTTP layer has checked auth, leases and the request shape) ---------

    def create(self, spec: CreateSpec) -> MachineRecord:
        now = time.time()
        machine_id = self.ids.machine_id()
        machine = MachineRecord(
            id=machine_id,
            name=spec.name or self.ids.name(),
            region=spec.region,
            instance_id=self.ids.ulid(now),
            private_ip=self.ids.private_ip(),
            config=spec.config,
            workdir=self._workdir_root() / machine_id,
            created_at=now,
            updated_at=now,
        )
        fresh_directory(machine.workdir, self._user)
        self.machines[machine_id] = machine
        self._enter(machine, S.CREATED, "launch", "user")
        if not spec.skip_launch:
            options = self.options
            boot = [
                (options.launch_delay_s, S.STARTING, "start"),
                (options.start_delay_s, S.STARTED, "start"),
            ]
            self._schedule(machine, boot)
        log.info("machine_created", machine_id=machine_id, skip_launch=spec.skip_launch)
        return machine

    def start(self, machine: MachineRecord) -> S:
        """Boot the machine (a stopped one boots with a clean rootfs); return the prior state."""
        previous = machine.state
        if start_plan(previous, self.options.start_started_status):
            if previous == S.STOPPED:
                fresh_directory(machine.workdir, self._user)
            self._enter(machine, S.STARTING, "start", "user")
            self._schedule(machine, [(self.options.start_delay_s, S.STARTED, "start")])
        return previous

    def stop(self, machine: MachineRecord) -> None:
        if stop_plan(machine.state):
            self._enter(machine, S.STOPPING, "stop", "user")
            self._schedule(machine, [(self.options.stop_delay_s, S.STOPPED, "stop")])

    def suspend(self, machine: MachineRecord) -> None:
        if suspend_plan(machine.state):
            self._enter(machine, S.SUSPENDING, "suspend", "user")
            self._schedule(machine, [(self.options.stop_delay_s, S.SUSPENDED, "suspend")])

    def destroy(self, machine: MachineRecord, force: bool) -> None:
        if destroy_plan(machine.state, force, self.options.destroy_running_status):
            self._begin_destroy(machine, "user")

    def vanish(self, machine: MachineRecord) -> None:
        """Host failure: straight to destroyed, no API call involved."""
        if machine.state == S.DESTROYED:
            return
        exit_event = {"signal": 9, "requested_stop": False, "exited_at": rfc3339(time.time())}
        self._enter(machine, S.DESTROYED, "exit", exit_event=exit_event, host_failed=True)
        log.info("machine_vanished", machine_id=machine.id)

    async def wait(self, machine: MachineRecord, spec: WaitSpec) -> MachineRecord:
        """Return once the machine reaches a wanted state; 408 on timeout, 404 once destroyed."""
        if spec.version is not None and spec.version != machine.instance_id:
            raise not_found("machine version")
        deadline = asyncio.get_running_loop().time() + spec.timeout_s
        while not spec.reached(machine.state):
            if machine.state == S.DESTROYED:
                raise not_found()
            if self._closing:
                raise error(503, "emulator shutting down")
            changed = self._changes.setdefault(machine.id, asyncio.Event())
            try:
                async with asyncio.timeout_at(deadline):
                    await changed.wait()
            except TimeoutError:
                raise spec.timeout_error(machine.state) from None
        return machine

    async def run(self, machine: MachineRecord, spec: ExecSpec) -> JSON:
        """Run argv in the machine's directory (HOME too) as its user, with only the machine's
        environment; 408 `deadline_exceeded` on timeout."""
        if self._closing:
            raise error(503, "emulator shutting down")
        if machine.state != S.STARTED:
            raise error(412, f"machine is not started, currently {machine.state.value}")
        env = machine_environment(machine.config.get("env", {}), machine.workdir, self._user)
        try:
            proc = await spawn(
                spec.argv, machine.workdir, env, self._user, stdin=spec.stdin is not None
            )
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            return _exec_result(b"", f"{spec.argv[0]}: {exc.strerror}\n".encode(), code)
        procs = self._procs.setdefault(machine.id, set())
        procs.add(proc)
        try:
            async with asyncio.timeout(spec.timeout_s):
                stdout, stderr = await proc.communicate(spec.stdin)
        except TimeoutError:
            raise error(408, "deadline_exceeded") from None
        finally:
            procs.discard(proc)
            if proc.returncode is None:
                _kill(proc)
                await proc.wait()
        return _exec_result(stdout, stderr, proc.returncode or 0)

    # -- lifecycle -----------------------------------------------------------------------------

    def start_ticking(self) -> None:
        """Start the host-failure dice (p_vanish); needs a running loop."""
        self._spawn(self._vanish_loop(), "fly-emulator-vanish")

    def interrupt(self) -> None:
        """Answer pending waits (503), kill exec processes and refuse new ones."""
        self._closing = True
        for changed in self._changes.values():
            changed.set()
        for machine_id in self._procs:
            self._kill_processes(machine_id)

    async def close(self) -> None:
        """Interrupt, cancel every transition and timer, remove the working directories."""
        self.interrupt()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for machine in self.machines.values():
            shutil.rmtree(machine.workdir, ignore_errors=True)
        if self._root is not None and self.options.workdir_root is None:
            shutil.rmtree(self._root, ignore_errors=True)

    # -- internals -----------------------------------------------------------------------------

    def _enter(
        self, machine: MachineRecord, state: S, kind: str, source: str = "flyd", **request: Any
    ) -> None:
        """Record a state change, wake its waiters and apply what the new state implies."""
        machine.record(state, kind, source, time.time(), self.ids, **request)
        if (changed := self._changes.pop(machine.id, None)) is not None:
            changed.set()
        if state != S.STARTED:
            self._kill_processes(machine.id)
            self._cancel(self._deadlines, machine.id)
        if state == S.DESTROYED:
            self._cancel(self._transitions, machine.id)
            machine.lease = None
            shutil.rmtree(machine.workdir, ignore_errors=True)
        log.debug("machine_state_changed", machine_id=machine.id, state=state.value, cause=kind)

    def _begin_destroy(self, machine: MachineRecord, source: str) -> None:
        self._enter(machine, S.DESTROYING, "destroy", source)
        self._schedule(machine, [(self.options.destroy_delay_s, S.DESTROYED, "destroy")])

    def _schedule(self, machine: MachineRecord, steps: Steps) -> None:
        """Replace whatever transition was pending with `steps`."""
        self._cancel(self._transitions, machine.id)
        self._transitions[machine.id] = self._spawn(self._run_steps(machine, steps), machine.id)

    async def _run_steps(self, machine: MachineRecord, steps: Steps) -> None:
        for delay_s, state, kind in steps:
            await asyncio.sleep(delay_s)  # emulated boot/stop/destroy time
            self._enter(machine, state, kind)
            if state == S.STARTED and (deadline := machine.deadline_epoch_s) is not None:
                self._cancel(self._deadlines, machine.id)
                task = self._spawn(self._exit_at(machine, deadline), f"{machine.id}-deadline")
                self._deadlines[machine.id] = task

    async def _exit_at(self, machine: MachineRecord, deadline_epoch_s: float) -> None:
        """At the deadline the main process exits: restart (policy always), else stop and,
        with auto_destroy, destroy."""
        await asyncio.sleep(max(0.0, deadline_epoch_s - time.time()))
        exit_event = {"exit_code": 0, "requested_stop": False, "exited_at": rfc3339(time.time())}
        if machine.restart_policy == "always":
            self._enter(machine, S.STARTED, "restart", exit_event=exit_event)
            return
        self._enter(machine, S.STOPPED, "exit", exit_event=exit_event)
        if machine.config.get("auto_destroy"):
            self._begin_destroy(machine, "flyd")

    async def _vanish_loop(self) -> None:
        while True:
            await asyncio.sleep(VANISH_TICK_S)
            chance = 1 - (1 - self.options.p_vanish) ** VANISH_TICK_S
            if chance <= 0:
                continue
            for machine in list(self.machines.values()):
                if not machine.state.is_gone and self._dice.random() < chance:
                    self.vanish(machine)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("fly_emulator_task_failed", task=task.get_name(), exc_info=exc)

    @staticmethod
    def _cancel(tasks: dict[str, asyncio.Task[None]], machine_id: str) -> None:
        task = tasks.pop(machine_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _kill_processes(self, machine_id: str) -> None:
        for proc in self._procs.get(machine_id, ()):
            _kill(proc)

    def _workdir_root(self) -> Path:
        """The machines' directories' root, made on first use, with the user to run them as."""
        if self._root is None:
            self._user = machine_user()
            configured = self.options.workdir_root
            self._root = configured or Path(tempfile.mkdtemp(prefix="fly-emulator-"))
            self._root.mkdir(parents=True, exist_ok=True)
            open_root(self._root, self._user)
        return self._root


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _exec_result(stdout: bytes, stderr: bytes, returncode: int) -> JSON:
    """Fly's ExecResponse; a signal death reads as exit code 128+N with exit_signal N."""
    signal_number = max(0, -returncode)
    return {
        "stdout": stdout.decode(errors="replace"),
        "stderr": stderr.decode(errors="replace"),
        "exit_code": 128 + signal_number if signal_number else returncode,
        "exit_signal": signal_number,
    }
