"""The listener's error tree and which errors are worth retrying."""

from __future__ import annotations


class ListenerError(Exception):
    """Base of every error the listener raises on purpose."""


class ConfigError(ListenerError):
    """The configuration is invalid; `problems` names every bad variable (never a value)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem(s)):\n{lines}")


class FlyError(ListenerError):
    """A Fly Machines API call failed; carries status, Fly's status code and request id."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.request_id = request_id
        self.message = message
        detail = ", ".join(
            f"{k}={v}"
            for k, v in (("status", status), ("code", code), ("request_id", request_id))
            if v
        )
        super().__init__(f"{message} ({detail})" if detail else message)


class FlyClientError(FlyError):
    """Fly rejected the request (4xx)."""


class FlyNotFoundError(FlyClientError):
    """The machine (or app) does not exist (404)."""


class FlyConflictError(FlyClientError):
    """A lease is held, a version mismatched or the state forbids the call (409/412)."""


class FlyRateLimitedError(FlyClientError):
    """Fly answered 429; `retry_after_s` is set when Fly said how long to wait."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw: object) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message, **kw)  # type: ignore[arg-type]  # kw are FlyError's keywords


class FlyCapacityError(FlyClientError):
    """Fly had no capacity for the requested size or region (`insufficient_capacity`)."""


class FlyTimeoutError(FlyError):
    """Fly answered 408: the operation did not finish within the server's deadline."""


class FlyServerError(FlyError):
    """Fly failed on its side (5xx)."""


class FlyUnavailableError(FlyError):
    """Fly could not be reached (transport failure after retries) or answered unparseably."""


class FlyConnectError(FlyUnavailableError):
    """Fly could not be reached before the request was sent (connect/DNS/pool): safe to repeat."""


class FlyStateError(FlyError):
    """The machine reached `state`, from which the awaited state can no longer be reached."""

    def __init__(self, message: str, *, state: str, **kw: object) -> None:
        self.state = state
        super().__init__(message, **kw)  # type: ignore[arg-type]  # kw are FlyError's keywords


class FlyOutcomeUnknownError(FlyError):
    """A create may or may not have happened (timeout/5xx after sending): adopt by metadata."""


class StoreError(ListenerError):
    """A Supabase (PostgREST) call failed."""


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed idempotent call may be repeated as it is."""
    return isinstance(
        exc,
        FlyRateLimitedError | FlyServerError | FlyUnavailableError | FlyTimeoutError,
    )


class ClaimLostError(ListenerError):
    """This process no longer holds the session's claim (another epoch took over)."""

    def __init__(self, session_id: str, epoch: int) -> None:
        self.session_id = session_id
        self.epoch = epoch
        super().__init__(f"claim on session {session_id} at epoch {epoch} was lost")


class SessionGoneError(ClaimLostError):
    """The session's row no longer exists (deleted while being worked on)."""
