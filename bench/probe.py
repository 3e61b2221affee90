"""The listener exactly as `python -m listener run` runs it, plus a timeline on stdout: one JSON
line per Realtime event reaching the dispatcher and per store or Fly call of a session, with
perf_counter times (CLOCK_MONOTONIC: comparable with the bench's and the emulator's stamps).

A bench instrument only: it wraps a few methods at class level before `listener.app.main()`
builds anything, so the code under measurement is the production code. Printing a line costs
~10 us, paid inside the measured intervals.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from listener import app
from listener.dispatcher import Dispatcher
from listener.fly import FlyClient
from listener.store import SandboxStore

STORE_CALLS = ("claim", "begin_provision", "set_machine", "mark_ready", "record_event")


def emit(kind: str, session_id: str, t0: float, t1: float | None = None) -> None:
    record: dict[str, Any] = {"kind": kind, "id": session_id, "t0": t0}
    if t1 is not None:
        record["t1"] = t1
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def session_of(kind: str, args: tuple[Any, ...]) -> str | None:
    """The session a wrapped call is about: first argument (id or Session), or for a create
    the metadata in its machine config."""
    if kind == "fly.create_machine":
        metadata = args[0].get("metadata") or {}
        return metadata.get("session_id")
    first = args[0]
    return first if isinstance(first, str) else getattr(first, "id", None)


def timed(kind: str, call: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """`call` with its start and end stamped for its session."""

    @functools.wraps(call)
    async def wrapper(self: object, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await call(self, *args, **kwargs)
        finally:
            session_id = session_of(kind, args)
            if session_id:
                emit(kind, session_id, started, time.perf_counter())

    return wrapper


def instrument() -> None:
    """Wrap the dispatcher's hint intake, the store's transitions and Fly's create."""
    submit = Dispatcher.submit

    def stamped_submit(self: Dispatcher, session_id: str, *, announced: bool = False) -> None:
        if announced:
            emit("event", session_id, time.perf_counter())
        submit(self, session_id, announced=announced)

    setattr(Dispatcher, "submit", stamped_submit)  # noqa: B010 - a bench-only patch
    for name in STORE_CALLS:
        setattr(SandboxStore, name, timed(f"store.{name}", getattr(SandboxStore, name)))
    setattr(FlyClient, "create_machine", timed("fly.create_machine", FlyClient.create_machine))  # noqa: B010


if __name__ == "__main__":
    instrument()
    raise SystemExit(app.main())
