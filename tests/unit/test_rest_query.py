"""The REST gateway's pure parts: query parsing, Prefer/Range, SQL building, error mapping."""

from __future__ import annotations

import json

import pytest

from listener.local import rest_errors, rest_sql
from listener.local.rest_errors import RestError
from listener.local.rest_query import (
    Filter,
    Logic,
    OrderTerm,
    QueryParams,
    SelectItem,
    check_profile,
    content_range,
    page_bounds,
    parse_args,
    parse_filter,
    parse_logic,
    parse_names,
    parse_order,
    parse_prefer,
    parse_query,
    parse_row,
    parse_rows,
    parse_select,
    query_items,
    range_status,
    wants_single_object,
)
from listener.local.rest_sql import (
    CallArgs,
    Catalog,
    Function,
    Param,
    Relation,
    ReturnKind,
    array_literal,
    catalog_from_json,
    resolve_function,
)


def code_of(exc: pytest.ExceptionInfo[RestError]) -> tuple[int, str | None]:
    return exc.value.status, exc.value.code


# ---------------------------------------------------------------- filters


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("eq.1", Filter("c", "eq", "1")),
        ("neq.a", Filter("c", "neq", "a")),
        ("gt.1", Filter("c", "gt", "1")),
        ("gte.1", Filter("c", "gte", "1")),
        ("lt.1", Filter("c", "lt", "1")),
        ("lte.1", Filter("c", "lte", "1")),
        ("like.*ab*", Filter("c", "like", "*ab*")),
        ("ilike.AB*", Filter("c", "ilike", "AB*")),
        ("isdistinct.x", Filter("c", "isdistinct", "x")),
        ("cs.{a,b}", Filter("c", "cs", "{a,b}")),
        ("eq.a.b.c", Filter("c", "eq", "a.b.c")),
        ("eq.", Filter("c", "eq", "")),
        ("not.eq.1", Filter("c", "eq", "1", negate=True)),
        ("is.null", Filter("c", "is", "null")),
        ("is.NOT_NULL", Filter("c", "is", "not_null")),
        ("not.is.true", Filter("c", "is", "true", negate=True)),
        ("is.unknown", Filter("c", "is", "unknown")),
        ("in.(1,2,3)", Filter("c", "in", values=("1", "2", "3"))),
        ("not.in.(a)", Filter("c", "in", values=("a",), negate=True)),
        ("eq(any).{1,2}", Filter("c", "eq", "{1,2}", quantifier="any")),
        ("like(all).{a*,*b}", Filter("c", "like", "{a*,*b}", quantifier="all")),
        ("fts.cat", Filter("c", "fts", "cat")),
        ("wfts(english).the cat", Filter("c", "wfts", "the cat", language="english")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_parse_filter_reads_operator_and_value(value: str, expected: Filter) -> None:
    assert parse_filter("c", value) == expected


@pytest.mark.parametrize(
    ("value", "items"),
    [
        ('in.(a,"b,c",d)', ("a", "b,c", "d")),
        ('in.("say \\"hi\\"","back\\\\slash")', ('say "hi"', "back\\slash")),
        ('in.("(x)",")")', ("(x)", ")")),
        ("in.()", ()),
        ("in.(,)", ("", "")),
        ("in.( 1, 2 )", ("1", " 2 ")),
        ('in.("")', ()),
    ],
)
def test_in_list_quoting(value: str, items: tuple[str, ...]) -> None:
    assert parse_filter("c", value).values == items


@pytest.mark.parametrize(
    "value",
    [
        "in.(a",
        "in.a,b",
        'in.("a"b)',
        'in.("a',
        "is.maybe",
        "not.not.eq.1",
        "nope.1",
        "eq(some).{1}",
        "eq",
    ],
)
def test_malformed_filter_is_pgrst100(value: str) -> None:
    with pytest.raises(RestError) as exc:
        parse_filter("c", value)
    assert code_of(exc) == (400, "PGRST100")


@pytest.mark.parametrize(
    ("value", "column", "details"),
    [  # positions and texts as PostgREST's Parsec parser gives them (QueryParams.hs doctests)
        ("eqq.5", 3, 'unexpected "q" expecting operator (eq, gt, ...)'),
        ("noop.0", 1, 'unexpected "o" expecting "not" or operator (eq, gt, ...)'),
        ("val", 1, 'unexpected "v" expecting "not" or operator (eq, gt, ...)'),
        ("eq().value", 4, 'unexpected ")" expecting operator (eq, gt, ...)'),
        ("is().value", 3, 'unexpected "(" expecting operator (eq, gt, ...)'),
        ("in().value", 3, 'unexpected "(" expecting operator (eq, gt, ...)'),
        ("fts().value", 5, 'unexpected ")" expecting operator (eq, gt, ...)'),
        ("not.nope.1", 5, 'unexpected "n" expecting operator (eq, gt, ...)'),
        ("notx", 4, 'unexpected "x" expecting delimiter (.)'),
        ("eq", 3, "unexpected end of input expecting operator (eq, gt, ...)"),
        ("gtex.1", 4, 'unexpected "x" expecting operator (eq, gt, ...)'),
        ("is.maybe", 4, 'unexpected "m" expecting isVal: (null, not_null, true, false, unknown)'),
        ("in.1,2", 4, 'unexpected "1" expecting "("'),
    ],
)
def test_filter_error_says_where_and_what_as_postgrest(
    value: str, column: int, details: str
) -> None:
    with pytest.raises(RestError) as exc:
        parse_filter("c", value)
    assert exc.value.message == f'"failed to parse filter ({value})" (line 1, column {column})'
    assert exc.value.details == details


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("in.(a)x", Filter("c", "in", values=("a",))),
        ("is.nullx", Filter("c", "is", "null")),
    ],
)
def test_text_after_an_in_list_or_is_value_is_ignored_as_postgrest_does(
    value: str, expected: Filter
) -> None:
    assert parse_filter("c", value) == expected


@pytest.mark.parametrize(
    ("value", "is_filter"),
    [
        ("eqq.1", False),
        ("nope", False),
        ("5", False),
        ("{1,2}", False),
        ("hello.world", False),
        ("", False),
        ("not.eq.1", True),
        ("in.(1)", True),
    ],
)
def test_every_unreserved_parameter_of_a_table_request_is_a_filter(
    value: str, is_filter: bool
) -> None:
    if is_filter:
        assert len(parse_query([("c", value)]).conditions) == 1
        return
    with pytest.raises(RestError) as exc:
        parse_query([("c", value)])
    assert code_of(exc) == (400, "PGRST100")


@pytest.mark.parametrize(
    ("value", "is_filter"),
    [
        ("eq.1", True),
        ("not.eq.1", True),
        ("is.null", True),
        ("in.(1)", True),
        ("like(any).{a}", True),
        ("fts(english).x", True),
        ("5", False),
        ("{1,2}", False),
        ("eq", False),
        ("eqq.1", False),
        ("hello.world", False),
    ],
)
def test_rpc_reads_take_values_without_an_operator_as_arguments(
    value: str, is_filter: bool
) -> None:
    q = parse_query([("p", value)], rpc_read=True)
    assert (len(q.conditions), dict(q.args)) == ((1, {}) if is_filter else (0, {"p": value}))


@pytest.mark.parametrize("value", ["not.x", "in.1,2", "is.maybe"])
def test_rpc_read_values_past_not_in_or_is_are_malformed_filters(value: str) -> None:
    with pytest.raises(RestError) as exc:
        parse_query([("p", value)], rpc_read=True)
    assert code_of(exc) == (400, "PGRST100")


def test_query_items_drop_keys_without_a_value_as_postgrest_does() -> None:
    assert query_items(b"id&x=&y=eq.%C3%A9+a") == [("x", ""), ("y", "eq.\u00e9 a")]


def test_quoted_filter_column_may_hold_dots_and_commas() -> None:
    assert parse_filter('"a.b,c"', "eq.1").column == "a.b,c"


@pytest.mark.parametrize(
    ("key", "code"),
    [
        ("rel.col", "PGRST127"),
        ("data->>key", "PGRST127"),
        ("bad%name", "PGRST100"),
        ("", "PGRST100"),
    ],
)
def test_unsupported_filter_keys_are_rejected(key: str, code: str) -> None:
    with pytest.raises(RestError) as exc:
        parse_filter(key, "eq.1")
    assert exc.value.code == code


# ---------------------------------------------------------------- logic trees


def test_parse_logic_nests_and_negates() -> None:
    logic = parse_logic("or", '(a.eq.1,not.and(b.gt.2,c.in.(x,"y,z")),d.is.null,e.eq."q,)")')
    assert logic == Logic(
        "or",
        (
            Filter("a", "eq", "1"),
            Logic(
                "and",
                (Filter("b", "gt", "2"), Filter("c", "in", values=("x", "y,z"))),
                negate=True,
            ),
            Filter("d", "is", "null"),
            Filter("e", "eq", "q,)"),
        ),
    )


def test_parse_logic_reads_arrays_and_negated_key() -> None:
    assert parse_logic("not.and", "(tags.cs.{a,b},n.lt.3)") == Logic(
        "and", (Filter("tags", "cs", "{a,b}"), Filter("n", "lt", "3")), negate=True
    )


@pytest.mark.parametrize("value", ["()", "(a.eq.1", "a.eq.1", "(a.eq.1,)", "(a.eq.1)x", "(a)"])
def test_malformed_logic_is_pgrst100(value: str) -> None:
    with pytest.raises(RestError) as exc:
        parse_logic("or", value)
    assert code_of(exc) == (400, "PGRST100")


# ---------------------------------------------------------------- select, order, names


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("*", (SelectItem("*"),)),
        ("a,b", (SelectItem("a"), SelectItem("b"))),
        (" a , b ", (SelectItem("a"), SelectItem("b"))),
        ("x:a,*", (SelectItem("a", "x"), SelectItem("*"))),
        ('"odd, name":"we:ird"', (SelectItem("we:ird", "odd, name"),)),
        ("first-name,$x", (SelectItem("first-name"), SelectItem("$x"))),
    ],
)
def test_parse_select(text: str, items: tuple[SelectItem, ...]) -> None:
    assert parse_select(text) == items


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("a,rel(*)", "PGRST127"),
        ("a,rel!inner(*)", "PGRST127"),
        ("...rel(*)", "PGRST127"),
        ("a::text", "PGRST127"),
        ("data->key", "PGRST127"),
        ("count()", "PGRST127"),
        ("", "PGRST100"),
        ("a,", "PGRST100"),
        ("a b,", "PGRST100"),
    ],
)
def test_unsupported_or_bad_select(text: str, code: str) -> None:
    with pytest.raises(RestError) as exc:
        parse_select(text)
    assert exc.value.code == code


@pytest.mark.parametrize(
    ("text", "terms"),
    [
        ("a", (OrderTerm("a"),)),
        ("a.desc", (OrderTerm("a", True),)),
        ("a.asc.nullsfirst", (OrderTerm("a", False, True),)),
        ("a.nullslast", (OrderTerm("a", None, False),)),
        ("a.desc,b", (OrderTerm("a", True), OrderTerm("b"))),
        ('"x.y".desc', (OrderTerm("x.y", True),)),
    ],
)
def test_parse_order(text: str, terms: tuple[OrderTerm, ...]) -> None:
    assert parse_order(text) == terms


@pytest.mark.parametrize("text", ["a.up", "a.desc.nulls", "a.descc", "a,", "rel(a).desc"])
def test_bad_order_is_rejected(text: str) -> None:
    with pytest.raises(RestError) as exc:
        parse_order(text)
    assert exc.value.status == 400


def test_parse_names_reads_quoted_columns_as_supabase_py_sends_them() -> None:
    assert parse_names('"a","b c",d', "columns") == ("a", "b c", "d")


# ---------------------------------------------------------------- the whole query string


def test_parse_query_sorts_params_into_their_roles() -> None:
    q = parse_query(
        [
            ("select", "id,name"),
            ("status", "eq.active"),
            ("or", "(a.eq.1,b.eq.2)"),
            ("order", "created_at.desc"),
            ("limit", "10"),
            ("offset", "5"),
            ("columns", '"a","b"'),
            ("on_conflict", "id"),
            ("p_id", "abc"),
            ("n", "{1,2}"),
        ],
        rpc_read=True,
    )
    assert q == QueryParams(
        select=(SelectItem("id"), SelectItem("name")),
        conditions=(
            Filter("status", "eq", "active"),
            Logic("or", (Filter("a", "eq", "1"), Filter("b", "eq", "2"))),
        ),
        order=(OrderTerm("created_at", True),),
        limit=10,
        offset=5,
        columns=("a", "b"),
        on_conflict=("id",),
        args={"p_id": "abc", "n": "{1,2}"},
    )


def test_parse_query_keeps_the_first_of_repeated_singles_and_every_filter() -> None:
    q = parse_query([("limit", "1"), ("limit", "2"), ("a", "gt.1"), ("a", "lt.5")])
    assert q.limit == 1
    assert q.conditions == (Filter("a", "gt", "1"), Filter("a", "lt", "5"))


@pytest.mark.parametrize(
    ("items", "status", "code"),
    [
        ([("limit", "ten")], 400, "PGRST100"),
        ([("offset", "1.5")], 400, "PGRST100"),
        ([("limit", "-1")], 416, "PGRST103"),
        ([("rel.order", "a")], 400, "PGRST127"),
        ([("rel.limit", "1")], 400, "PGRST127"),
        ([("rel.col", "eq.1")], 400, "PGRST127"),
        ([("a", "not.nope.x")], 400, "PGRST100"),
    ],
)
def test_parse_query_rejects(items: list[tuple[str, str]], status: int, code: str) -> None:
    with pytest.raises(RestError) as exc:
        parse_query(items)
    assert code_of(exc) == (status, code)


# ---------------------------------------------------------------- Prefer, Range, Accept


def test_parse_prefer_reads_every_header_and_item() -> None:
    prefs = parse_prefer(["return=representation, count=exact", "resolution=merge-duplicates"])
    assert (prefs.returning, prefs.count, prefs.resolution) == (
        "representation",
        "exact",
        "merge-duplicates",
    )
    assert prefs.applied(write=True, resolution=True) == (
        "resolution=merge-duplicates, return=representation, count=exact"
    )
    assert prefs.applied(write=False, resolution=False) == "count=exact"


def test_parse_prefer_ignores_unknown_unless_strict() -> None:
    assert parse_prefer(["return=everything, missing=default, tx=commit"]).invalid == (
        "return=everything",
    )
    assert parse_prefer([]).applied(write=True, resolution=True) is None
    with pytest.raises(RestError) as exc:
        parse_prefer(["handling=strict, bogus=1"])
    assert code_of(exc) == (400, "PGRST122")
    assert exc.value.details == "Invalid preferences: bogus=1"


@pytest.mark.parametrize(
    ("limit", "offset", "header", "bounds"),
    [
        (None, 0, None, (0, None)),
        (10, 5, None, (5, 10)),
        (None, 0, "0-9", (0, 10)),
        (None, 0, "5-", (5, None)),
        (5, 0, "2-20", (2, 3)),
        (None, 0, "junk", (0, None)),
        (0, 0, None, (0, 0)),
    ],
)
def test_page_bounds_intersect_limit_offset_and_range_header(
    limit: int | None, offset: int, header: str | None, bounds: tuple[int, int | None]
) -> None:
    assert page_bounds(QueryParams(limit=limit, offset=offset), header) == bounds


def test_inverted_range_header_is_416() -> None:
    with pytest.raises(RestError) as exc:
        page_bounds(QueryParams(), "9-1")
    assert code_of(exc) == (416, "PGRST103")


@pytest.mark.parametrize(
    ("lower", "rows", "total", "header", "status"),
    [
        (0, 3, None, "0-2/*", 200),
        (0, 0, None, "*/*", 200),
        (0, 3, 3, "0-2/3", 200),
        (0, 2, 10, "0-1/10", 206),
        (5, 2, 10, "5-6/10", 206),
        (0, 0, 0, "*/0", 200),
        (20, 0, 10, "*/10", 416),
        (1, 0, 4, "*/4", 206),
    ],
)
def test_content_range_and_status(
    lower: int, rows: int, total: int | None, header: str, status: int
) -> None:
    assert content_range(lower, rows, total) == header
    assert range_status(lower, rows, total) == status


@pytest.mark.parametrize(
    ("accept", "single"),
    [
        (None, False),
        ("*/*", False),
        ("application/json", False),
        ("application/vnd.pgrst.object+json", True),
        ("application/vnd.pgrst.object+json;nulls=stripped", True),
        ("text/html, application/json;q=0.9", False),
    ],
)
def test_wants_single_object(accept: str | None, single: bool) -> None:
    assert wants_single_object(accept) is single


def test_unavailable_media_type_is_406() -> None:
    with pytest.raises(RestError) as exc:
        wants_single_object("text/csv")
    assert code_of(exc) == (406, "PGRST107")


def test_only_the_public_profile_is_exposed() -> None:
    check_profile("public", None)
    with pytest.raises(RestError) as exc:
        check_profile(None, "private")
    assert code_of(exc) == (406, "PGRST106")


# ---------------------------------------------------------------- bodies


def test_parse_rows_wraps_an_object_and_keeps_array_text() -> None:
    assert parse_rows(b'{"a":1,"b":2}', None) == (("a", "b"), '[{"a":1,"b":2}]')
    assert parse_rows(b'[{"a":1},{"a":2}]', None) == (("a",), '[{"a":1},{"a":2}]')
    assert parse_rows(b"[]", None) == ((), "[]")
    assert parse_rows(b'[{"a":1},{"b":2}]', ("a", "b", "a")) == (
        ("a", "b"),
        '[{"a":1},{"b":2}]',
    )


@pytest.mark.parametrize("body", [b"", b"{bad", b"\xff", b"3", b'["x"]', b'[{"a":1},{"b":1}]'])
def test_parse_rows_rejects_bad_bodies(body: bytes) -> None:
    with pytest.raises(RestError) as exc:
        parse_rows(body, None)
    assert code_of(exc) == (400, "PGRST102")


def test_parse_row_and_args() -> None:
    assert parse_row(b'{"a":null}') == (("a",), '{"a":null}')
    with pytest.raises(RestError):
        parse_row(b"[]")
    assert parse_args(b"") == (frozenset(), "{}")
    assert parse_args(b"  ") == (frozenset(), "{}")
    assert parse_args(b'{"x":1}') == (frozenset({"x"}), '{"x":1}')
    assert parse_args(b"[1]") == (None, "[1]")
    with pytest.raises(RestError):
        parse_args(b"{")


# ---------------------------------------------------------------- SQL


REL = Relation("items", frozenset({"id", "name"}), ("id",))


def test_array_literal_quotes_every_item() -> None:
    assert array_literal(["a", 'b"c', "d\\e", "x,y"]) == '{"a","b\\"c","d\\\\e","x,y"}'


def test_read_statement_quotes_names_and_passes_values_as_parameters() -> None:
    q = parse_query(
        [("select", 'x:"a\\"b"'), ('"we\\"ird"', "eq.1'; drop table items;--"), ("limit", "2")]
    )
    st = rest_sql.read_statement(REL, q, 0, 2, count=False)
    text = st.query.as_string(None)
    assert '"public"."items"."a""b" AS "x"' in text
    assert '"public"."items"."we""ird" = %(p0)s' in text
    assert "drop table" not in text
    assert st.params == {"p0": "1'; drop table items;--", "p1": 2, "p2": 0}


def test_read_statement_counts_with_the_same_filters() -> None:
    q = parse_query([("name", "in.(a,b)"), ("name", "like.*x*"), ("id", "is.null")])
    st = rest_sql.read_statement(REL, q, 0, None, count=True)
    assert list(st.params.values()) == ['{"a","b"}', "%x%"] * 2
    text = st.query.as_string(None)
    assert text.count('"public"."items"."id" IS NULL') == 2
    assert "LIMIT" not in text


def test_empty_in_list_matches_nothing_without_a_parameter() -> None:
    st = rest_sql.read_statement(REL, parse_query([("id", "in.()")]), 0, None, count=False)
    assert "= ANY('{}')" in st.query.as_string(None)
    assert st.params == {}


def test_insert_upsert_and_minimal_return() -> None:
    st = rest_sql.insert_statement(
        REL, ("id", "name"), "[]", ("merge-duplicates", ("id",)), select=None
    )
    text = st.query.as_string(None)
    assert 'ON CONFLICT ("id") DO UPDATE SET "id" = EXCLUDED."id", "name" = EXCLUDED."name"' in text
    assert "RETURNING 1" in text
    ignore = rest_sql.insert_statement(REL, ("id",), "[]", ("ignore-duplicates", ("id",)), None)
    assert "DO NOTHING" in ignore.query.as_string(None)


def test_update_with_no_columns_changes_nothing() -> None:
    st = rest_sql.update_statement(REL, (), "{}", QueryParams(), (SelectItem("*"),))
    assert "WHERE false" in st.query.as_string(None)


def test_call_statement_by_get_casts_each_argument_to_its_type() -> None:
    fn = Function("f", (Param("n", "integer"), Param("tags", "text[]")), ReturnKind.SCALAR)
    args = CallArgs(frozenset({"n", "tags"}), None, {"n": "5", "tags": "{a,b}"})
    st = rest_sql.call_statement(fn, args, QueryParams(), 0, None, count=False)
    text = st.query.as_string(None)
    assert '"public"."f"("n" := %(p0)s::integer, "tags" := %(p1)s::text[])' in text
    assert st.params == {"p0": "5", "p1": "{a,b}"}


def test_call_statement_by_post_reads_named_arguments_from_the_body_parameter() -> None:
    fn = Function("f", (Param("n", "integer"), Param("m", "integer")), ReturnKind.COMPOSITE, True)
    q = parse_query([("a", "gt.1")])
    st = rest_sql.call_statement(fn, CallArgs(frozenset({"n"}), '{"n":1}'), q, 0, 5, False)
    text = st.query.as_string(None)
    assert 'json_to_record(%(body)s::json) AS pgrst_body("n" integer)' in text
    assert 'LATERAL "public"."f"("n" := pgrst_body."n") "pgrst_call"' in text
    assert '"pgrst_call"."a" > %(p1)s' in text
    assert st.params == {"body": '{"n":1}', "p1": "1", "p2": 5, "p3": 0}
    assert st.with_body('{"n":2}').params == {"body": '{"n":2}', "p1": "1", "p2": 5, "p3": 0}


def test_call_statement_passes_a_body_to_a_single_json_parameter() -> None:
    fn = Function("f", (Param("", "jsonb"),), ReturnKind.SCALAR)
    st = rest_sql.call_statement(fn, CallArgs(json_body="[1]"), QueryParams(), 0, None, False)
    assert '"public"."f"(%(body)s::jsonb)' in st.query.as_string(None)
    assert st.with_body("[2]").params == {"body": "[2]"}


# ---------------------------------------------------------------- the schema cache


def catalog(*functions: Function) -> Catalog:
    by_name: dict[str, tuple[Function, ...]] = {}
    for fn in functions:
        by_name[fn.name] = (*by_name.get(fn.name, ()), fn)
    return Catalog({"items": REL}, by_name)


ADD = Function(
    "add", (Param("a", "integer"), Param("b", "integer", required=False)), ReturnKind.SCALAR
)


def test_resolve_function_honours_defaults() -> None:
    cat = catalog(ADD)
    assert resolve_function(cat, "add", frozenset({"a"})) is ADD
    assert resolve_function(cat, "add", frozenset({"a", "b"})) is ADD


@pytest.mark.parametrize("names", [frozenset(), frozenset({"b"}), frozenset({"a", "c"}), None])
def test_resolve_function_rejects_wrong_argument_names(names: frozenset[str] | None) -> None:
    with pytest.raises(RestError) as exc:
        resolve_function(catalog(ADD), "add", names)
    assert code_of(exc) == (404, "PGRST202")
    assert exc.value.hint == "Perhaps you meant to call the function public.add(a, b)"


def test_unknown_function_gets_a_fuzzy_hint() -> None:
    with pytest.raises(RestError) as exc:
        resolve_function(catalog(ADD), "ad", frozenset({"a"}))
    assert exc.value.message == "Could not find the function public.ad(a) in the schema cache"
    assert exc.value.hint == "Perhaps you meant to call the function public.add"


def test_overloads_resolve_by_exact_names_or_are_ambiguous() -> None:
    one = Function("f", (Param("a", "integer"),), ReturnKind.SCALAR)
    two = Function("f", (Param("a", "text"), Param("b", "text", required=False)), ReturnKind.SCALAR)
    assert resolve_function(catalog(one, two), "f", frozenset({"a"})) is one
    twin = Function("f", (Param("a", "bigint"),), ReturnKind.SCALAR)
    with pytest.raises(RestError) as exc:
        resolve_function(catalog(one, twin), "f", frozenset({"a"}))
    assert code_of(exc) == (300, "PGRST203")


def test_catalog_from_json_classifies_functions() -> None:
    def fn(
        name: str, params: list[tuple[str, str, str | None]], **extra: object
    ) -> dict[str, object]:
        return {
            "name": name,
            "params": [{"name": n, "type": t, "mode": m} for n, t, m in params],
            "defaults": 0,
            "returns_set": False,
            "return_type": "integer",
            "return_typtype": "b",
            "volatile": True,
            **extra,
        }

    data = {
        "relations": [
            {"name": "items", "columns": ["id", "name"], "primary_key": ["id"]},
            {"name": "odd%name", "columns": ["a"], "primary_key": []},
        ],
        "functions": [
            fn("scalar", [("a", "integer", None), ("b", "text", None)], defaults=1),
            fn("nothing", [], return_type="void", return_typtype="p"),
            fn("row", [("a", "integer", "i"), ("x", "integer", "o")], return_type="record"),
            fn("trig", [], return_type="trigger", return_typtype="p"),
            fn("rows", [("a", "integer", "v")], returns_set=True, return_typtype="c"),
        ],
    }
    cat = catalog_from_json(json.loads(json.dumps(data)))
    assert set(cat.relations) == {"items"}
    assert cat.relations["items"] == Relation("items", frozenset({"id", "name"}), ("id",))
    assert set(cat.functions) == {"scalar", "nothing", "row", "rows"}
    (scalar,) = cat.functions["scalar"]
    assert scalar.params == (Param("a", "integer"), Param("b", "text", required=False))
    assert cat.functions["nothing"][0].returns is ReturnKind.VOID
    assert cat.functions["row"][0].returns is ReturnKind.COMPOSITE
    assert cat.functions["row"][0].params == (Param("a", "integer"),)
    rows = cat.functions["rows"][0]
    assert (rows.returns, rows.returns_set, rows.params[0].variadic) == (
        ReturnKind.COMPOSITE,
        True,
        True,
    )


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("sqlstate", "message", "authenticated", "status"),
    [
        ("23505", "duplicate key", True, 409),
        ("23503", "fk", True, 409),
        ("23502", "not null", True, 400),
        ("23514", "check", True, 400),
        ("P0001", "raise", True, 400),
        ("P0002", "no data", True, 500),
        ("42501", "permission denied", True, 403),
        ("42501", "permission denied", False, 401),
        ("42883", "function x does not exist", True, 404),
        ("42P01", "relation does not exist", True, 404),
        ("42703", "column does not exist", True, 400),
        ("25006", "read-only transaction", True, 405),
        ("22023", 'role "x" does not exist', True, 401),
        ("22023", "invalid parameter", True, 400),
        ("21000", "UPDATE requires a WHERE clause", True, 400),
        ("21000", "more than one row", True, 500),
        ("08006", "connection failure", True, 503),
        ("53300", "too many connections", True, 503),
        ("53400", "config limit", True, 500),
        ("57P01", "admin shutdown", True, 503),
        ("57014", "canceling statement", True, 500),
        ("PT402", "payment required", True, 402),
        ("22P02", "invalid input syntax", True, 400),
        ("XX000", "internal", True, 500),
    ],
)
def test_sqlstate_status(sqlstate: str, message: str, authenticated: bool, status: int) -> None:
    assert rest_errors.sqlstate_status(sqlstate, message, authenticated) == status


def test_database_error_body_headers_and_challenge() -> None:
    err = rest_errors.database_error("42501", "permission denied for table t", None, None, False)
    assert err.status == 401
    assert json.loads(err.body()) == {
        "code": "42501",
        "details": None,
        "hint": None,
        "message": "permission denied for table t",
    }
    assert err.response_headers() == {
        "content-type": "application/json; charset=utf-8",
        "proxy-status": "PostgREST; error=42501",
        "www-authenticate": "Bearer",
    }


def test_raise_pgrst_gives_full_response_control() -> None:
    err = rest_errors.database_error(
        "PGRST",
        '{"code":"123","message":"Payment Required","hint":"pay"}',
        '{"status":402,"headers":{"X-Powered-By":"Nerd Rage"}}',
        None,
        True,
    )
    assert (err.status, err.code, err.message, err.hint) == (402, "123", "Payment Required", "pay")
    assert err.response_headers()["x-powered-by"] == "Nerd Rage"
    broken = rest_errors.database_error("PGRST", "not json", None, None, True)
    assert (broken.status, broken.code) == (500, "PGRST121")


def test_gateway_errors_have_no_code_and_no_proxy_status() -> None:
    err = rest_errors.missing_api_key()
    assert json.loads(err.body()) == {
        "message": "No API key found in request",
        "hint": "No `apikey` request header or url param was found.",
    }
    assert "proxy-status" not in err.response_headers()


def test_jwt_error_challenge() -> None:
    err = rest_errors.jwt_error("PGRST303", "JWT expired")
    assert err.response_headers()["www-authenticate"] == (
        'Bearer error="invalid_token", error_description="JWT expired"'
    )


def test_table_not_found_hint() -> None:
    err = rest_errors.table_not_found("itemz", ["items", "other"])
    assert (err.status, err.code) == (404, "PGRST205")
    assert err.hint == "Perhaps you meant the table 'public.items'"
    assert rest_errors.table_not_found("zzzz", ["items"]).hint is None
