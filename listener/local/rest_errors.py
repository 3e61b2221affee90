"""PostgREST-shaped errors of the local REST gateway: JSON body, HTTP status and headers."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from typing import Any

JSON_UTF8 = "application/json; charset=utf-8"
FUZZY_CUTOFF = 0.75  # PostgREST's minimum similarity for "Perhaps you meant" hints
PREFIX_STATUS = {  # SQLSTATE class -> HTTP status, after the exact codes (PostgREST mapSQLtoHTTP)
    "08": 503,
    "09": 500,
    "0L": 403,
    "0P": 403,
    "25": 500,
    "28": 403,
    "2D": 500,
    "38": 500,
    "39": 500,
    "3B": 500,
    "40": 500,
    "53": 503,
    "54": 500,
    "55": 500,
    "57": 500,
    "58": 500,
    "F0": 500,
    "HV": 500,
    "P0": 500,
    "XX": 500,
}
EXACT_STATUS = {
    "23503": 409,
    "23505": 409,
    "25006": 405,
    "53400": 500,
    "57P01": 503,
    "P0001": 400,
    "42883": 404,
    "42P01": 404,
    "42P17": 500,
}


class RestError(Exception):
    """An error answered the way PostgREST (or, with no code, Supabase's gateway) answers it."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        details: Any = None,
        hint: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.hint = hint
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        """The JSON body: {code, details, hint, message}; a gateway error has no code."""
        payload: dict[str, Any]
        if self.code is None:
            payload = {"message": self.message}
            if self.hint is not None:
                payload["hint"] = self.hint
        else:
            payload = {
                "code": self.code,
                "details": self.details,
                "hint": self.hint,
                "message": self.message,
            }
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()

    def response_headers(self) -> dict[str, str]:
        """Content type, `Proxy-Status` (PostgREST errors only) and the error's own headers."""
        headers = {"content-type": JSON_UTF8}
        if self.code is not None:
            headers["proxy-status"] = f"PostgREST; error={self.code}"
        headers.update(self.headers)
        return headers


def sqlstate_status(sqlstate: str, message: str, authenticated: bool) -> int:
    """HTTP status for a Postgres error as PostgREST maps it; `authenticated`: role is not anon."""
    if sqlstate in EXACT_STATUS:
        return EXACT_STATUS[sqlstate]
    if sqlstate == "42501":
        return 403 if authenticated else 401
    if sqlstate == "21000":
        return 400 if message.endswith("requires a WHERE clause") else 500
    if sqlstate == "22023":
        role_missing = message.startswith("role") and message.endswith("does not exist")
        return 401 if role_missing else 400
    if sqlstate.startswith("PT") and sqlstate[2:].isdigit():
        return int(sqlstate[2:])
    return PREFIX_STATUS.get(sqlstate[:2], 400)


def database_error(
    sqlstate: str, message: str, details: str | None, hint: str | None, authenticated: bool
) -> RestError:
    """A Postgres error passed through with its SQLSTATE, or a `RAISE SQLSTATE 'PGRST'` response."""
    if sqlstate == "PGRST":
        return _custom_error(message, details)
    status = sqlstate_status(sqlstate, message, authenticated)
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return RestError(status, sqlstate, message, details, hint, headers)


def _custom_error(message: str, details: str | None) -> RestError:
    """`RAISE SQLSTATE 'PGRST' USING message = <json>, detail = <json>`: full response control."""
    try:
        body = json.loads(message)
        meta = json.loads(details or "")
        status = int(meta["status"])
        headers = {str(k).lower(): str(v) for k, v in dict(meta.get("headers", {})).items()}
        return RestError(
            status,
            str(body["code"]),
            str(body["message"]),
            body.get("details"),
            body.get("hint"),
            headers,
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return RestError(
            500,
            "PGRST121",
            "Could not parse JSON in the \"RAISE SQLSTATE 'PGRST'\" error",
            "MESSAGE must be a JSON object with keys code and message; DETAIL a JSON object "
            "with keys status and headers.",
        )


def missing_api_key() -> RestError:
    """What Supabase's gateway answers when a request carries no API key."""
    return RestError(
        401,
        None,
        "No API key found in request",
        hint="No `apikey` request header or url param was found.",
    )


def invalid_api_key() -> RestError:
    """What Supabase's gateway answers for an API key it does not know."""
    return RestError(
        401,
        None,
        "Invalid API key",
        hint="Double check your Supabase `anon` or `service_role` API key.",
    )


def jwt_error(code: str, message: str, details: str | None = None) -> RestError:
    """PGRST301 (undecodable JWT) or PGRST303 (invalid claims), with the bearer challenge."""
    challenge = f'Bearer error="invalid_token", error_description={json.dumps(message)}'
    return RestError(401, code, message, details, headers={"www-authenticate": challenge})


def bad_query(message: str, details: str | None = None) -> RestError:
    """PGRST100: a query parameter PostgREST cannot parse."""
    return RestError(400, "PGRST100", message, details)


def bad_body(message: str) -> RestError:
    """PGRST102: a request body that is not the JSON the endpoint needs."""
    return RestError(400, "PGRST102", message)


def not_implemented(details: str) -> RestError:
    """PGRST127: PostgREST syntax this local gateway does not implement."""
    return RestError(400, "PGRST127", "Feature not implemented", details)


def not_singular(rows: int) -> RestError:
    """PGRST116: `Accept: application/vnd.pgrst.object+json` but not exactly one row."""
    return RestError(
        406,
        "PGRST116",
        "Cannot coerce the result to a single JSON object",
        f"The result contains {rows} rows",
    )


def table_not_found(name: str, known: Iterable[str]) -> RestError:
    """PGRST205: no such table or view in the exposed schema."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=FUZZY_CUTOFF)
    hint = f"Perhaps you meant the table 'public.{close[0]}'" if close else None
    return RestError(
        404,
        "PGRST205",
        f"Could not find the table 'public.{name}' in the schema cache",
        hint=hint,
    )


def column_not_found(table: str, column: str) -> RestError:
    """PGRST204: a body or `columns` key that is not a column of the table."""
    return RestError(
        400,
        "PGRST204",
        f"Could not find the '{column}' column of '{table}' in the schema cache",
    )


def function_not_found(
    name: str, arg_names: Iterable[str], known: Iterable[str], overloads: Iterable[Iterable[str]]
) -> RestError:
    """PGRST202: no function with that name accepts those argument names."""
    args = sorted(arg_names)
    shown = f"({', '.join(args)})" if args else " without parameters"
    searched = (
        f" with parameter{'s' if len(args) > 1 else ''} {', '.join(args)}"
        if args
        else " without parameters"
    )
    signatures = ["(" + ", ".join(sorted(params)) + ")" for params in overloads]
    if signatures:
        close = difflib.get_close_matches("(" + ", ".join(args) + ")", signatures, 1, 0.33)
        hint = f"Perhaps you meant to call the function public.{name}{close[0]}" if close else None
    else:
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=FUZZY_CUTOFF)
        hint = f"Perhaps you meant to call the function public.{close[0]}" if close else None
    return RestError(
        404,
        "PGRST202",
        f"Could not find the function public.{name}{shown} in the schema cache",
        f"Searched for the function public.{name}{searched} or with a single unnamed "
        "json/jsonb parameter, but no matches were found in the schema cache.",
        hint,
    )


def ambiguous_function(name: str, signatures: Iterable[str]) -> RestError:
    """PGRST203: several overloads accept the same argument names."""
    listed = ", ".join(f"public.{name}({sig})" for sig in signatures)
    return RestError(
        300,
        "PGRST203",
        f"Could not choose the best candidate function between: {listed}",
        hint="Try renaming the parameters or the function itself in the database so function "
        "overloading can be resolved",
    )
