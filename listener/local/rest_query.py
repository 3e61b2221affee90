"""PostgREST requests, parsed: query string (filters, select, order), Prefer, Range, bodies."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from listener.local import rest_errors
from listener.local.rest_errors import RestError

RESERVED = frozenset({"select", "columns", "on_conflict", "order", "limit", "offset"})
LOGIC = frozenset({"and", "or"})
OPERATORS = {
    "eq": "=",
    "neq": "<>",
    "gt": ">",
    "gte": ">=",
    "lt": "<",
    "lte": "<=",
    "like": "LIKE",
    "ilike": "ILIKE",
    "match": "~",
    "imatch": "~*",
    "cs": "@>",
    "cd": "<@",
    "ov": "&&",
    "sl": "<<",
    "sr": ">>",
    "nxr": "&<",
    "nxl": "&>",
    "adj": "-|-",
    "isdistinct": "IS DISTINCT FROM",
}
QUANTIFIABLE = frozenset({"eq", "gt", "gte", "lt", "lte", "like", "ilike", "match", "imatch"})
# The order PostgREST's parser tries them in (QueryParams.hs), which decides where it fails.
SIMPLE_OPERATORS = ("neq", "cs", "cd", "ov", "sl", "sr", "nxr", "nxl", "adj")
QUANT_OPERATORS = ("eq", "gte", "gt", "lte", "lt", "like", "ilike", "match", "imatch")
OPERATOR_LABEL = "operator (eq, gt, ...)"
IS_LABEL = "isVal: (null, not_null, true, false, unknown)"
# Values that commit PostgREST's operator parser: past them a failure is an error, even where a
# plain value would be an RPC argument.
COMMITTING_PREFIXES = ("not.", "in.", "is.")
FTS_FUNCTIONS = {
    "fts": "to_tsquery",
    "plfts": "plainto_tsquery",
    "phfts": "phraseto_tsquery",
    "wfts": "websearch_to_tsquery",
}
IS_VALUES = {
    "null": "NULL",
    "not_null": "NOT NULL",
    "true": "TRUE",
    "false": "FALSE",
    "unknown": "UNKNOWN",
}
NAME_CHARS = frozenset("_ $")
RANGE_HEADER = re.compile(r"^\s*(\d+)-(\d*)\s*$")


@dataclass(frozen=True, slots=True)
class SelectItem:
    """A column of `select=` (`*` for all), with its output alias."""

    column: str
    alias: str | None = None


@dataclass(frozen=True, slots=True)
class Filter:
    """`column=[not.]op.value`; `values` holds the items of `in.(...)`."""

    column: str
    op: str
    value: str = ""
    values: tuple[str, ...] = ()
    negate: bool = False
    quantifier: str | None = None
    language: str | None = None


@dataclass(frozen=True, slots=True)
class Logic:
    """`and=(...)` / `or=(...)` and their nested forms."""

    conjunction: str
    children: tuple[Filter | Logic, ...]
    negate: bool = False


@dataclass(frozen=True, slots=True)
class OrderTerm:
    """One term of `order=`."""

    column: str
    descending: bool | None = None
    nulls_first: bool | None = None


@dataclass(frozen=True, slots=True)
class QueryParams:
    """Everything the query string says; `args` are non-filter params (GET RPC arguments)."""

    select: tuple[SelectItem, ...] | None = None
    conditions: tuple[Filter | Logic, ...] = ()
    order: tuple[OrderTerm, ...] = ()
    limit: int | None = None
    offset: int = 0
    columns: tuple[str, ...] | None = None
    on_conflict: tuple[str, ...] | None = None
    args: Mapping[str, str] = field(default_factory=dict)


class _Cursor:
    """A position in one query-string value, for the small recursive-descent parsers below."""

    def __init__(self, text: str, what: str) -> None:
        self.text = text
        self.pos = 0
        self.what = what

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def done(self) -> bool:
        return self.pos >= len(self.text)

    def take(self, literal: str) -> bool:
        if self.text.startswith(literal, self.pos):
            self.pos += len(literal)
            return True
        return False

    def expect(self, literal: str) -> None:
        if not self.take(literal):
            raise self.fail(f'"{literal}"')

    def skip_spaces(self) -> None:
        while self.peek() in (" ", "\t") and not self.done():
            self.pos += 1

    def fail(self, expecting: str) -> RestError:
        """PGRST100 at the current position (raise it)."""
        return _parse_error(self.what, self.text, self.pos, self.pos, expecting)

    def quoted(self) -> str:
        """A double-quoted value; backslash escapes the next character."""
        self.expect('"')
        out: list[str] = []
        while not self.done():
            char = self.text[self.pos]
            self.pos += 1
            if char == '"':
                return "".join(out)
            if char == "\\" and not self.done():
                char = self.text[self.pos]
                self.pos += 1
            out.append(char)
        raise self.fail('closing "')

    def name(self) -> str:
        """A field name: quoted, or [letters digits _ $ space] runs joined by `-` (not `->`)."""
        self.skip_spaces()
        if self.peek() == '"':
            return _checked_name(self.quoted(), self)
        parts: list[str] = []
        while True:
            start = self.pos
            while not self.done() and (self.text[self.pos].isalnum() or self.peek() in NAME_CHARS):
                self.pos += 1
            if self.pos == start:
                raise self.fail("field name (* or [a..z0..9_$])")
            parts.append(self.text[start : self.pos].strip())
            if self.peek() == "-" and self.peek(2) != "->":
                self.pos += 1
                continue
            return _checked_name("-".join(parts), self)

    def until(self, stops: str) -> str:
        start = self.pos
        while not self.done() and self.text[self.pos] not in stops:
            self.pos += 1
        return self.text[start : self.pos]


def _checked_name(name: str, cur: _Cursor) -> str:
    # psycopg reads `%` inside composed SQL as a placeholder, so such names cannot be quoted safely.
    if "%" in name or "\x00" in name:
        raise cur.fail("a name without '%' or NUL (a limit of the local gateway)")
    return name


def _reject_json_path_or_cast(cur: _Cursor) -> None:
    if cur.peek(2) == "->":
        raise rest_errors.not_implemented("JSON paths (->, ->>) are not supported")
    if cur.peek(2) == "::":
        raise rest_errors.not_implemented("casts (::type) are not supported")


def parse_select(text: str) -> tuple[SelectItem, ...]:
    """`select=a,alias:b,*`; embedding, casts and JSON paths are not supported."""
    cur = _Cursor(text, f"select parameter ({text})")
    items: list[SelectItem] = []
    while True:
        cur.skip_spaces()
        if cur.take("*"):
            items.append(SelectItem("*"))
        else:
            if cur.peek(2) == "..":
                raise rest_errors.not_implemented("spread embedding (...) is not supported")
            column = cur.name()
            alias = None
            if cur.peek() == ":" and cur.peek(2) != "::":
                cur.pos += 1
                alias, column = column, cur.name()
            if cur.peek() in ("(", "!"):
                raise rest_errors.not_implemented(
                    f"embedding resources or aggregates ({column}) is not supported"
                )
            _reject_json_path_or_cast(cur)
            items.append(SelectItem(column, alias))
        cur.skip_spaces()
        if cur.done():
            return tuple(items)
        cur.expect(",")


def parse_names(text: str, what: str) -> tuple[str, ...]:
    """A comma list of field names (`columns=`, `on_conflict=`)."""
    cur = _Cursor(text, f"{what} parameter ({text})")
    names = [cur.name()]
    cur.skip_spaces()
    while cur.take(","):
        names.append(cur.name())
        cur.skip_spaces()
    if not cur.done():
        raise cur.fail('"," or end of input')
    return tuple(names)


def parse_order(text: str) -> tuple[OrderTerm, ...]:
    """`order=a.desc.nullslast,b`."""
    cur = _Cursor(text, f"order ({text})")
    terms: list[OrderTerm] = []
    while True:
        column = cur.name()
        if cur.peek() == "(":
            raise rest_errors.not_implemented("ordering by embedded resources is not supported")
        _reject_json_path_or_cast(cur)
        descending = nulls_first = None
        if cur.take(".asc"):
            descending = False
        elif cur.take(".desc"):
            descending = True
        if cur.take(".nullsfirst"):
            nulls_first = True
        elif cur.take(".nullslast"):
            nulls_first = False
        terms.append(OrderTerm(column, descending, nulls_first))
        cur.skip_spaces()
        if cur.done():
            return tuple(terms)
        if not cur.take(","):
            raise cur.fail('"asc", "desc", "nullsfirst", "nullslast", "," or end of input')


def _list_value(cur: _Cursor) -> tuple[str, ...]:
    """`(a,"b,c",d)` of `in.`; a lone empty item means the empty list."""
    cur.skip_spaces()
    cur.expect("(")
    cur.skip_spaces()
    items: list[str] = []
    while True:
        if cur.peek() == '"':
            items.append(cur.quoted())
            if cur.peek() not in (",", ")"):
                raise cur.fail('"," or ")" after a quoted value')
        else:
            items.append(cur.until(",)"))
        if not cur.take(","):
            break
    cur.expect(")")
    cur.skip_spaces()
    return () if items == [""] else tuple(items)


def _logic_value(cur: _Cursor) -> str:
    """A value inside `or=(...)`: quoted, a `{...}` array, or text up to `,` or `)`."""
    if cur.peek() == '"':
        value = cur.quoted()
        if cur.peek() not in (",", ")"):
            raise cur.fail('"," or ")" after a quoted value')
        return value
    if cur.peek() == "{":
        start = cur.pos
        cur.until("}")
        cur.expect("}")
        return cur.text[start : cur.pos]
    return cur.until(",)")


def _operation(cur: _Cursor, column: str, nested: bool) -> Filter:
    """`[not.]op.value` after the column; `nested` values stop at `,` or `)`."""
    start = cur.pos
    negate = cur.take("not.")
    if cur.take("in."):
        return Filter(column, "in", values=_list_value(cur), negate=negate)
    if cur.take("is."):
        return Filter(column, "is", _is_value(cur), negate=negate)
    op = cur.until(".(")
    quantifier = language = None
    if cur.take("("):
        inner = cur.until(")")
        if not cur.take(")"):
            raise _operator_error(cur, start, negate)
        if op in FTS_FUNCTIONS and inner and all(_is_identifier_char(c) for c in inner):
            language = inner.strip()
        elif op in QUANTIFIABLE and inner in ("any", "all"):
            quantifier = inner
        else:
            raise _operator_error(cur, start, negate)
    if (op not in OPERATORS and op not in FTS_FUNCTIONS) or not cur.take("."):
        raise _operator_error(cur, start, negate)
    value = _logic_value(cur) if nested else cur.until("")
    return Filter(column, op, value, negate=negate, quantifier=quantifier, language=language)


def _is_value(cur: _Cursor) -> str:
    """The first IS value the text starts with, any case (PostgREST ignores what follows)."""
    rest = cur.text[cur.pos :].lower()
    for word in IS_VALUES:  # in PostgREST's order: null, not_null, true, false, unknown
        if rest.startswith(word):
            cur.pos += len(word)
            return word
    reach = cur.pos + max(_matched(rest, 0, word) for word in IS_VALUES)
    raise _parse_error(cur.what, cur.text, reach, reach, IS_LABEL)


def _is_identifier_char(char: str) -> bool:
    """PostgREST's pIdentifierChar (an FTS language): a letter, a digit, `_`, ` ` or `$`."""
    return char.isalnum() or char in NAME_CHARS


def _matched(text: str, start: int, word: str) -> int:
    """How many characters of `word` the text has at `start`."""
    n = 0
    while n < len(word) and text.startswith(word[n], start + n):
        n += 1
    return n


def _operator_error(cur: _Cursor, start: int, negate: bool) -> RestError:
    """PGRST100 for `[not.]op.value` at `start` that has no operator, where PostgREST's parser
    reports it: its alternatives (in, is, isdistinct, fts, simple and quantified operators)
    are each tried in turn and the error of the one that got furthest wins; a `string` that
    does not match fails at its own start, naming the first character that differs."""
    text = cur.text
    base = start + 4 if negate else start
    tried = [(base, base + _matched(text, base, "in"))]  # (where it failed, char it names)
    tried += [
        (base + len(word), base + len(word))  # the word, then no "." delimiter
        for word in ("in", "is", "isdistinct")
        if text.startswith(word, base)
    ]
    for words in (tuple(FTS_FUNCTIONS), SIMPLE_OPERATORS, QUANT_OPERATORS):
        word = next((w for w in words if text.startswith(w, base)), None)
        if word is not None:
            tried.append(_past_operator(text, base + len(word), word in FTS_FUNCTIONS))
    at, found = max(tried, key=lambda t: t[0])  # max keeps the first of equals, as Parsec
    expecting = [OPERATOR_LABEL]
    if not negate:  # `not` was tried first, at the start
        if text.startswith("not", start):
            tried_not = (start + 3, start + 3, "delimiter (.)")
        else:
            tried_not = (start, start + _matched(text, start, "not"), '"not"')
        if tried_not[0] > at:
            at, found, expecting = tried_not[0], tried_not[1], [tried_not[2]]
        elif tried_not[0] == at:
            found, expecting = tried_not[1], [tried_not[2], OPERATOR_LABEL]
    return _parse_error(cur.what, text, at, found, " or ".join(expecting))


def _past_operator(text: str, end: int, fts: bool) -> tuple[int, int]:
    """Where an operator's optional `(language)` / `(any|all)` and its `.` fail."""
    if not text.startswith("(", end):
        return end, end
    inner = end + 1
    if fts:
        close = inner
        while close < len(text) and _is_identifier_char(text[close]):
            close += 1
        if close == inner:
            return inner, inner
    elif text.startswith(("any", "all"), inner):
        close = inner + 3
    else:
        return inner, inner + _matched(text, inner, "any")
    return (close + 1, close + 1) if text.startswith(")", close) else (close, close)


def _parse_error(what: str, text: str, at: int, found: int, expecting: str) -> RestError:
    """PGRST100 shaped as PostgREST shows a Parsec error: the parser's name and position as the
    message, `unexpected X expecting Y` as the details."""
    line = text.count("\n", 0, at) + 1
    column = at - (text.rfind("\n", 0, at) + 1) + 1
    shown = json.dumps(text[found], ensure_ascii=False) if found < len(text) else "end of input"
    return rest_errors.bad_query(
        f'"failed to parse {what}" (line {line}, column {column})',
        f"unexpected {shown} expecting {expecting}",
    )


def _logic_tree(cur: _Cursor) -> Filter | Logic:
    """One element of a logic tree: a nested `[not.]and(...)`/`or(...)` or `column.op.value`."""
    start = cur.pos
    negate = cur.take("not.")
    for conjunction in ("and", "or"):
        if cur.take(conjunction + "("):
            cur.pos -= 1
            return Logic(conjunction, _logic_children(cur), negate)
    cur.pos = start
    column = cur.name()
    _reject_json_path_or_cast(cur)
    cur.expect(".")
    return _operation(cur, column, nested=True)


def _logic_children(cur: _Cursor) -> tuple[Filter | Logic, ...]:
    cur.skip_spaces()
    cur.expect("(")
    children = [_logic_tree(cur)]
    cur.skip_spaces()
    while cur.take(","):
        cur.skip_spaces()
        children.append(_logic_tree(cur))
        cur.skip_spaces()
    cur.expect(")")
    return tuple(children)


def parse_filter(column_key: str, value: str) -> Filter:
    """`column=[not.]op.value` (the key may be a quoted name)."""
    column = _filter_column(column_key)
    # No end-of-input check: PostgREST ignores what follows in.(...) and is.<value>.
    return _operation(_Cursor(value, f"filter ({value})"), column, nested=False)


def parse_logic(key: str, value: str) -> Logic:
    """`or=(a.eq.1,and(b.gt.2,c.is.null))`, `not.and=(...)`."""
    negate = key.startswith("not.")
    conjunction = key.removeprefix("not.")
    cur = _Cursor(value, f"logic tree ({value})")
    logic = Logic(conjunction, _logic_children(cur), negate)
    if not cur.done():
        raise cur.fail("end of input")
    return logic


def _filter_column(key: str) -> str:
    cur = _Cursor(key, f"tree path ({key})")
    column = cur.name()
    _reject_json_path_or_cast(cur)
    if cur.peek() == ".":
        raise rest_errors.not_implemented(
            f"filters on embedded resources ({key}) are not supported"
        )
    if not cur.done():
        raise cur.fail("end of input")
    return column


def _filter_or_argument(key: str, value: str, rpc_read: bool) -> Filter | None:
    """The filter `key=value`, or None for an RPC argument: a value PostgREST's operator parser
    gave up on before committing to it (past `not.`, `in.` or `is.` it is an error)."""
    column = _filter_column(key)
    try:
        return _operation(_Cursor(value, f"filter ({value})"), column, nested=False)
    except RestError:
        if rpc_read and not value.startswith(COMMITTING_PREFIXES):
            return None
        raise


def _non_negative_int(name: str, text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise rest_errors.bad_query(
            f'"failed to parse {name} parameter ({text})"', "expecting an integer"
        ) from None
    if number < 0:
        raise RestError(
            416,
            "PGRST103",
            "Requested range not satisfiable",
            f"{name.capitalize()} should be greater than or equal to zero.",
        )
    return number


def query_items(query_string: bytes) -> list[tuple[str, str]]:
    """The parameters as PostgREST reads them: `&key` with no `=` is no parameter at all."""
    present = b"&".join(part for part in query_string.split(b"&") if b"=" in part)
    return parse_qsl(present.decode("latin-1"), keep_blank_values=True)  # as Starlette decodes


def parse_query(items: Iterable[tuple[str, str]], *, rpc_read: bool = False) -> QueryParams:
    """Split the query string into select/filters/order/range/columns/on_conflict/RPC args.

    As in PostgREST, every parameter that is not a reserved one is a filter and must parse as
    one; only a GET/HEAD RPC call (`rpc_read`) takes a value without an operator as an argument.
    """
    singles: dict[str, str] = {}
    conditions: list[Filter | Logic] = []
    args: dict[str, str] = {}
    for key, value in items:
        base = key.removeprefix("not.")
        if key in RESERVED:
            singles.setdefault(key, value)
        elif base in LOGIC:
            conditions.append(parse_logic(key, value))
        elif "." in key and key.rsplit(".", 1)[-1] in RESERVED | LOGIC:
            raise rest_errors.not_implemented(f"{key} on embedded resources is not supported")
        elif (flt := _filter_or_argument(key, value, rpc_read)) is not None:
            conditions.append(flt)
        else:
            args.setdefault(key, value)
    select = singles.get("select")
    order = singles.get("order")
    columns = singles.get("columns")
    on_conflict = singles.get("on_conflict")
    limit = singles.get("limit")
    return QueryParams(
        select=None if select is None else parse_select(select),
        conditions=tuple(conditions),
        order=() if not order else parse_order(order),
        limit=None if limit is None else _non_negative_int("limit", limit),
        offset=_non_negative_int("offset", singles.get("offset", "0")),
        columns=None if columns is None else parse_names(columns, "columns"),
        on_conflict=None if on_conflict is None else parse_names(on_conflict, "on_conflict"),
        args=args,
    )


# ---------------------------------------------------------------- Prefer and ranges


@dataclass(frozen=True, slots=True)
class Preferences:
    """The `Prefer` header; `invalid` lists what it could not understand."""

    returning: str | None = None
    count: str | None = None
    resolution: str | None = None
    handling: str | None = None
    invalid: tuple[str, ...] = ()

    def applied(self, *, write: bool, resolution: bool) -> str | None:
        """`Preference-Applied`: what this request honoured."""
        parts = [
            f"resolution={self.resolution}" if resolution and self.resolution else "",
            f"return={self.returning}" if write and self.returning else "",
            f"count={self.count}" if self.count else "",
            f"handling={self.handling}" if self.handling else "",
        ]
        return ", ".join(p for p in parts if p) or None


PREFERENCES = {
    "return": ("minimal", "headers-only", "representation"),
    "count": ("exact", "planned", "estimated"),
    "resolution": ("merge-duplicates", "ignore-duplicates"),
    "handling": ("strict", "lenient"),
}
ACCEPTED_UNAPPLIED = ("missing=", "tx=", "timezone=", "max-affected=")


def parse_prefer(values: Iterable[str]) -> Preferences:
    """Parse every `Prefer` header; with handling=strict, unknown preferences are an error."""
    found: dict[str, str] = {}
    invalid: list[str] = []
    for header in values:
        for item in header.split(","):
            pref = item.strip()
            key, _, val = pref.partition("=")
            if val in PREFERENCES.get(key, ()):
                found.setdefault(key, val)
            elif pref and not pref.startswith(ACCEPTED_UNAPPLIED):
                invalid.append(pref)
    prefs = Preferences(
        found.get("return"),
        found.get("count"),
        found.get("resolution"),
        found.get("handling"),
        tuple(invalid),
    )
    if prefs.handling == "strict" and invalid:
        raise RestError(
            400,
            "PGRST122",
            "Invalid preferences given with handling=strict",
            "Invalid preferences: " + ", ".join(invalid),
        )
    return prefs


def page_bounds(q: QueryParams, range_header: str | None) -> tuple[int, int | None]:
    """(offset, limit) from limit/offset intersected with a `Range: first-last` header."""
    lower = q.offset
    upper = None if q.limit is None else q.offset + q.limit - 1
    match = RANGE_HEADER.match(range_header or "")
    if match:
        first, last = int(match[1]), int(match[2]) if match[2] else None
        if last is not None and first > last:
            raise RestError(
                416,
                "PGRST103",
                "Requested range not satisfiable",
                "The lower boundary must be lower than or equal to the upper boundary in the "
                "Range header.",
            )
        lower = max(lower, first)
        if last is not None:
            upper = last if upper is None else min(upper, last)
    return lower, None if upper is None else max(upper - lower + 1, 0)


def content_range(lower: int, rows: int, total: int | None) -> str:
    """`first-last/total`, with `*` for an empty page and for an unknown total."""
    upper = lower + rows - 1
    span = f"{lower}-{upper}" if total != 0 and lower <= upper else "*"
    return f"{span}/{'*' if total is None else total}"


def range_status(lower: int, rows: int, total: int | None) -> int:
    """200, 206 when the page is part of a counted total, 416 when it starts past the end."""
    if total is None:
        return 200
    if lower > total:
        return 416
    return 206 if rows < total else 200


# ---------------------------------------------------------------- headers and bodies

SINGLE_OBJECT = "application/vnd.pgrst.object+json"
ARRAY_TYPES = frozenset(
    {"application/json", "application/vnd.pgrst.array+json", "application/*", "*/*", ""}
)


def wants_single_object(accept: str | None) -> bool:
    """Whether `Accept` asks for one object; 406 PGRST107 for media types this gateway lacks."""
    types = [part.split(";")[0].strip().lower() for part in (accept or "").split(",")]
    if SINGLE_OBJECT in types:
        return True
    if ARRAY_TYPES.intersection(types):
        return False
    raise RestError(406, "PGRST107", "None of these media types are available: " + ", ".join(types))


def check_profile(accept_profile: str | None, content_profile: str | None) -> None:
    """Only the `public` schema is exposed; another profile is 406 PGRST106."""
    for profile in (accept_profile, content_profile):
        if profile is not None and profile != "public":
            raise RestError(
                406,
                "PGRST106",
                f"Invalid schema: {profile}",
                hint="Only the following schemas are exposed: public",
            )


def _json(body: bytes) -> tuple[Any, str]:
    try:
        text = body.decode()
        return json.loads(text), text
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise rest_errors.bad_body("Empty or invalid json") from None


def parse_rows(body: bytes, columns: tuple[str, ...] | None) -> tuple[tuple[str, ...], str]:
    """An insert body (object or array of objects) -> (columns, JSON array text)."""
    value, text = _json(body)
    rows = [value] if isinstance(value, dict) else value
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise rest_errors.bad_body("The body must be a JSON object or an array of JSON objects")
    if columns is not None:
        return tuple(dict.fromkeys(columns)), text if isinstance(value, list) else f"[{text}]"
    keys = tuple(rows[0]) if rows else ()
    if any(set(row) != set(keys) for row in rows[1:]):
        raise rest_errors.bad_body("All object keys must match")
    return keys, text if isinstance(value, list) else f"[{text}]"


def parse_row(body: bytes) -> tuple[tuple[str, ...], str]:
    """An update body (one JSON object) -> (columns, JSON text)."""
    value, text = _json(body)
    if not isinstance(value, dict):
        raise rest_errors.bad_body("The body of an update must be a JSON object")
    return tuple(value), text


def parse_args(body: bytes) -> tuple[frozenset[str] | None, str]:
    """An RPC body -> (argument names, or None when not a JSON object; JSON text)."""
    if not body.strip():
        return frozenset(), "{}"
    value, text = _json(body)
    return (frozenset(value) if isinstance(value, dict) else None), text
