"""Realtime's protocol decisions, pure: tokens, bindings and filters, frames, change payloads."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import jwt

from listener.local import keys
from listener.local.wal import RowChange, Table

ID_SPACE = 2**27 - 1  # :erlang.phash2/1 range; ids are 1..ID_SPACE
TOPIC_PREFIX = "realtime:"
EVENTS = frozenset({"*", "INSERT", "UPDATE", "DELETE"})
OPERATORS = {"eq": "=", "neq": "<>", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}


class TokenError(Exception):
    """A token Realtime would refuse; `code` prefixes join errors, `message` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def verify_token(secret: str, token: object, now: float) -> dict[str, Any]:
    """Verify an apikey/access token as Realtime does (HS256, `role` and `exp` required)."""
    if not isinstance(token, str) or not token:
        raise TokenError("MissingApiKey", "API key is missing")
    try:
        return keys.verify(secret, token)
    except jwt.ExpiredSignatureError as exc:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp", now)
        ago = max(0, int(now - float(exp)))
        raise TokenError("InvalidJWTToken", f"Token has expired {ago} seconds ago") from exc
    except jwt.MissingRequiredClaimError as exc:
        message = "Fields `role` and `exp` are required in JWT"
        raise TokenError("InvalidJWTToken", message) from exc
    except jwt.InvalidSignatureError as exc:
        raise TokenError("JwtSignatureError", "Failed to validate JWT signature") from exc
    except jwt.DecodeError as exc:
        raise TokenError("MalformedJWT", "The token provided is not a valid JWT") from exc
    except jwt.InvalidTokenError as exc:
        raise TokenError("InvalidJWTToken", str(exc)) from exc


def binding_id(raw: dict[str, Any]) -> int:
    """A stable id in 1..2^27-1 for a binding map (equal bindings get equal ids)."""
    digest = hashlib.blake2b(json.dumps(raw, sort_keys=True).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % ID_SPACE + 1


@dataclass(frozen=True, slots=True)
class Filter:
    column: str
    op: str  # eq neq lt lte gt gte in
    value: str  # for `in`: an array literal '{a,b}'

    def describe(self) -> str:
        """Elixir's inspect of Realtime's filter tuple, as its error messages show it."""
        return (
            f"{{{json.dumps(self.column)}, {json.dumps(self.op)}, {json.dumps(self.value)}, false}}"
        )


class FilterError(ValueError):
    """`filter` could not be parsed; the message is Realtime's."""


def parse_filter(text: str) -> Filter:
    """Parse `column=op.value` the way Realtime splits it (on the first two `=` or `.`)."""
    parts = re.split(r"[=.]", text, maxsplit=2)
    error = FilterError(f"Error parsing `filter` params: {json.dumps(parts, ensure_ascii=False)}")
    if len(parts) != 3 or not parts[0]:
        raise error
    column, op, value = parts
    if op == "in":
        inner = re.fullmatch(r"\((.*)\)", value, flags=re.DOTALL)
        if inner is None:
            raise error
        return Filter(column, op, "{" + inner.group(1) + "}")
    if op not in OPERATORS:
        raise error
    return Filter(column, op, value)


@dataclass(frozen=True, slots=True)
class Binding:
    """One postgres_changes entry of a join, normalised the way Realtime reads it."""

    id: int
    raw: dict[str, Any]
    event: str
    schema: str
    table: str | None
    filter: Filter | None
    filter_error: str | None

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Binding:
        event = str(raw.get("event", "*")).upper()
        table = raw.get("table")
        text = raw.get("filter")
        parsed, error = None, None
        if isinstance(text, str) and text.strip():
            try:
                parsed = parse_filter(text)
            except FilterError as exc:
                error = str(exc)
        return cls(
            id=binding_id(raw),
            raw=raw,
            event=event if event in EVENTS else "*",
            schema=str(raw.get("schema") or "public"),
            table=str(table) if table and table != "*" else None,
            filter=parsed,
            filter_error=error,
        )

    def matches(self, table: Table, change_type: str) -> bool:
        """Whether a change of `table` is in scope (schema, table, event; not the filter)."""
        return (
            self.schema in ("*", table.schema)
            and self.table in (None, table.name)
            and self.event in ("*", change_type)
        )

    def describe(self) -> str:
        """Realtime's rendering of the subscription params in its error messages."""
        filters = f"[{self.filter.describe()}]" if self.filter else "[]"
        select = self.raw.get("select")
        selected = json.dumps(select) if isinstance(select, list) else "nil"
        return (
            f"[event: {self.event}, schema: {self.schema}, table: {self.table or '*'}, "
            f"filters: {filters}, select: {selected}]"
        )

    def reply_entry(self) -> dict[str, Any]:
        """The binding echoed verbatim with its id (an Elixir map: atom key first, then sorted)."""
        return {"id": self.id, **dict(sorted(self.raw.items()))}


def frame(topic: str, event: str, payload: Any, ref: Any = None) -> str:
    """A Phoenix V1 server frame: exactly topic, event, payload, ref."""
    return json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref})


def reply(topic: str, ref: Any, status: str, response: dict[str, Any]) -> str:
    return frame(topic, "phx_reply", {"status": status, "response": response}, ref)


def system(topic: str, extension: str, status: str, message: str) -> str:
    name = topic.removeprefix(TOPIC_PREFIX)
    payload = {"extension": extension, "status": status, "message": message, "channel": name}
    return frame(topic, "system", payload)


def change_data(
    change: RowChange, commit_timestamp: str, visible: frozenset[str]
) -> dict[str, Any]:
    """The `data` of a postgres_changes frame for a role that can select `visible` columns."""
    table = change.table
    data: dict[str, Any] = {
        "type": change.type,
        "schema": table.schema,
        "table": table.name,
        "commit_timestamp": commit_timestamp,
        "errors": None,
        "columns": [
            {"name": c.name, "type": c.type_name} for c in table.columns if c.name in visible
        ],
    }
    if change.record is not None:
        data["record"] = {k: v for k, v in change.record.items() if k in visible}
    if change.old_record is not None:
        old = {k: v for k, v in change.old_record.items() if k in visible}
        if change.type == "DELETE" and table.rls_enabled:  # DELETE skips RLS: only the key goes out
            old = {k: v for k, v in old.items() if k in table.primary_key}
        data["old_record"] = old
    return data
