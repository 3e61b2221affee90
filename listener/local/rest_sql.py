"""SQL for the local REST gateway: the schema cache's shapes and one statement per request."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from psycopg import sql

from listener.local import rest_errors
from listener.local.rest_query import (
    FTS_FUNCTIONS,
    IS_VALUES,
    OPERATORS,
    Filter,
    Logic,
    QueryParams,
    SelectItem,
)

SCHEMA = "public"
JSONS = frozenset({"json", "jsonb"})
TABLE_ALIAS = "pgrst_source"
CALL_ALIAS = "pgrst_call"
BODY = "body"
ARRAY_BODY = sql.SQL("coalesce(json_agg(_postgrest_t), '[]')::text")
NO_BODY = sql.SQL("NULL::text")


class ReturnKind(StrEnum):
    """What a function returns, which decides the shape of its JSON answer."""

    SCALAR = "scalar"
    COMPOSITE = "composite"
    VOID = "void"


@dataclass(frozen=True, slots=True)
class Relation:
    """A table or view of the exposed schema."""

    name: str
    columns: frozenset[str]
    primary_key: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Param:
    """One input parameter of a function ('' when unnamed); `type` is SQL from format_type()."""

    name: str
    type: str
    required: bool = True
    variadic: bool = False


@dataclass(frozen=True, slots=True)
class Function:
    """A function of the exposed schema callable at /rpc/<name>."""

    name: str
    params: tuple[Param, ...]
    returns: ReturnKind
    returns_set: bool = False
    volatile: bool = True

    def accepts(self, arg_names: frozenset[str]) -> bool:
        """Whether these argument names can call it: every required one given, none unknown."""
        names = {p.name for p in self.params}
        required = {p.name for p in self.params if p.required}
        return "" not in names and required <= arg_names <= names

    @property
    def takes_body(self) -> bool:
        """A single unnamed json/jsonb parameter, which receives the whole request body."""
        return len(self.params) == 1 and self.params[0].name == "" and self.params[0].type in JSONS


@dataclass(frozen=True, slots=True)
class Catalog:
    """The schema cache: tables/views and functions of the exposed schema, by name."""

    relations: Mapping[str, Relation] = field(default_factory=dict)
    functions: Mapping[str, tuple[Function, ...]] = field(default_factory=dict)


def resolve_function(catalog: Catalog, name: str, arg_names: frozenset[str] | None) -> Function:
    """The overload these argument names call (None: the body is not a JSON object, so only a
    function taking the whole body fits); PGRST202 when none fits, PGRST203 when several do."""
    overloads = catalog.functions.get(name, ())
    matches = [] if arg_names is None else [f for f in overloads if f.accepts(arg_names)]
    if not matches:
        matches = [f for f in overloads if f.takes_body]
    if len(matches) > 1 and arg_names is not None:
        matches = [
            f for f in matches if frozenset(p.name for p in f.params) == arg_names
        ] or matches
    if len(matches) == 1:
        return matches[0]
    if matches:
        signatures = [", ".join(f"{p.name} => {p.type}" for p in f.params) for f in matches]
        raise rest_errors.ambiguous_function(name, signatures)
    raise rest_errors.function_not_found(
        name, arg_names or (), catalog.functions, [[p.name for p in f.params] for f in overloads]
    )


# One round trip for the whole schema cache: tables/views with columns and primary key, and
# functions with their input/output parameters, as JSON.
CATALOG_QUERY = """
select json_build_object(
  'relations', (
    select coalesce(json_agg(json_build_object(
      'name', c.relname,
      'columns', (
        select coalesce(json_agg(a.attname), '[]') from pg_attribute a
        where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped),
      'primary_key', (
        select coalesce(json_agg(a.attname order by k.ord), '[]')
        from pg_index i
        cross join unnest(i.indkey) with ordinality as k(attnum, ord)
        join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
        where i.indrelid = c.oid and i.indisprimary))), '[]')
    from pg_class c
    where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'v', 'm', 'f', 'p')),
  'functions', (
    select coalesce(json_agg(json_build_object(
      'name', p.proname,
      'params', (
        select coalesce(json_agg(json_build_object(
          'name', coalesce(a.name, ''), 'type', format_type(a.type, null), 'mode', a.mode
        ) order by a.ord), '[]')
        from unnest(coalesce(p.proallargtypes, p.proargtypes::oid[]),
                    coalesce(p.proargnames, '{}'::text[]),
                    coalesce(p.proargmodes, '{}'::"char"[]))
          with ordinality as a(type, name, mode, ord)),
      'defaults', p.pronargdefaults,
      'returns_set', p.proretset,
      'return_type', format_type(p.prorettype, null),
      'return_typtype', t.typtype,
      'volatile', p.provolatile = 'v')), '[]')
    from pg_proc p join pg_type t on t.oid = p.prorettype
    where p.pronamespace = 'public'::regnamespace and p.prokind = 'f')
)::text
"""
INPUT_MODES = frozenset({"i", "b", "v"})
OUTPUT_MODES = frozenset({"o", "b", "t"})


def catalog_from_json(data: Mapping[str, Any]) -> Catalog:
    """Build the schema cache from CATALOG_QUERY's answer. Names holding `%` are left out:
    psycopg would read them as placeholders inside composed SQL."""
    relations = {
        r["name"]: Relation(r["name"], frozenset(r["columns"]), tuple(r["primary_key"]))
        for r in data["relations"]
        if "%" not in r["name"]
    }
    functions: dict[str, list[Function]] = {}
    for f in data["functions"]:
        fn = _function_from_json(f)
        if fn is not None:
            functions.setdefault(fn.name, []).append(fn)
    return Catalog(relations, {name: tuple(fns) for name, fns in functions.items()})


def _function_from_json(f: Mapping[str, Any]) -> Function | None:
    modes = [p["mode"] or "i" for p in f["params"]]
    inputs = [p for p, mode in zip(f["params"], modes, strict=True) if mode in INPUT_MODES]
    names = [f["name"], *(p["name"] for p in inputs), *(p["type"] for p in inputs)]
    if any("%" in n for n in names):
        return None
    if f["return_type"] == "void":
        returns = ReturnKind.VOID
    elif f["return_typtype"] == "c" or (
        f["return_type"] == "record" and any(m in OUTPUT_MODES for m in modes)
    ):
        returns = ReturnKind.COMPOSITE
    elif f["return_typtype"] == "p" and f["return_type"] != "record":
        return None  # trigger, event_trigger, internal...: not callable over RPC
    else:
        returns = ReturnKind.SCALAR
    first_default = len(inputs) - int(f["defaults"])
    params = tuple(
        Param(p["name"], p["type"], required=i < first_default, variadic=p["mode"] == "v")
        for i, p in enumerate(inputs)
    )
    return Function(f["name"], params, returns, bool(f["returns_set"]), bool(f["volatile"]))


@dataclass(slots=True)
class Statement:
    """One SQL statement answering (total, page_total, body), with named parameters. An RPC's
    JSON body is the parameter BODY, so one statement serves every body (`with_body`)."""

    query: sql.Composed
    params: dict[str, Any] = field(default_factory=dict)

    def add(self, value: Any) -> sql.Placeholder:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return sql.Placeholder(name)

    def add_body(self, value: str) -> sql.Placeholder:
        self.params[BODY] = value
        return sql.Placeholder(BODY)

    def with_body(self, value: str) -> Statement:
        """The same statement for another JSON body."""
        return Statement(self.query, {**self.params, BODY: value})


def _table(rel: Relation) -> sql.Identifier:
    return sql.Identifier(SCHEMA, rel.name)


def _column(qualifier: tuple[str, ...], column: str) -> sql.Composable:
    if column == "*":
        return sql.SQL("{}.*").format(sql.Identifier(*qualifier))
    return sql.Identifier(*qualifier, column)


def _type(sql_type: str) -> sql.SQL:
    """A type from the catalog (format_type output), trusted as SQL."""
    return sql.SQL(sql_type.replace("%", "%%"))


def array_literal(values: Sequence[str]) -> str:
    """A Postgres array literal with every item quoted (as PostgREST builds `in.(...)`)."""
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return "{" + ",".join(quoted) + "}"


def _filter_sql(flt: Filter, qualifier: tuple[str, ...], st: Statement) -> sql.Composable:
    column = _column(qualifier, flt.column)
    if flt.op == "in":
        if not flt.values:
            return sql.SQL("{} = ANY('{{}}')").format(column)
        return sql.SQL("{} = ANY({})").format(column, st.add(array_literal(flt.values)))
    if flt.op == "is":
        return sql.SQL("{} IS " + IS_VALUES[flt.value]).format(column)
    if flt.op in FTS_FUNCTIONS:
        function = sql.Identifier(FTS_FUNCTIONS[flt.op])
        if flt.language is None:
            return sql.SQL("{} @@ {}({})").format(column, function, st.add(flt.value))
        language = st.add(flt.language)
        return sql.SQL("{} @@ {}({}, {})").format(column, function, language, st.add(flt.value))
    value = flt.value.replace("*", "%") if flt.op in ("like", "ilike") else flt.value
    operator = sql.SQL(OPERATORS[flt.op])
    if flt.quantifier:
        quantifier = sql.SQL("ANY" if flt.quantifier == "any" else "ALL")
        return sql.SQL("{} {} {}({})").format(column, operator, quantifier, st.add(value))
    return sql.SQL("{} {} {}").format(column, operator, st.add(value))


def _condition_sql(
    cond: Filter | Logic, qualifier: tuple[str, ...], st: Statement
) -> sql.Composable:
    if isinstance(cond, Logic):
        joiner = sql.SQL(" AND " if cond.conjunction == "and" else " OR ")
        parts = [_condition_sql(c, qualifier, st) for c in cond.children]
        expr: sql.Composable = sql.SQL("({})").format(joiner.join(parts))
    else:
        expr = _filter_sql(cond, qualifier, st)
    return sql.SQL("NOT {}").format(expr) if cond.negate else expr


def _where(q: QueryParams, qualifier: tuple[str, ...], st: Statement) -> sql.Composable:
    if not q.conditions:
        return sql.SQL("")
    parts = [_condition_sql(c, qualifier, st) for c in q.conditions]
    return sql.SQL(" WHERE {}").format(sql.SQL(" AND ").join(parts))


def _order(q: QueryParams, qualifier: tuple[str, ...]) -> sql.Composable:
    if not q.order:
        return sql.SQL("")
    terms = []
    for term in q.order:
        direction = {None: "", True: " DESC", False: " ASC"}[term.descending]
        nulls = {None: "", True: " NULLS FIRST", False: " NULLS LAST"}[term.nulls_first]
        terms.append(
            sql.SQL("{}{}{}").format(
                _column(qualifier, term.column), sql.SQL(direction), sql.SQL(nulls)
            )
        )
    return sql.SQL(" ORDER BY {}").format(sql.SQL(", ").join(terms))


def _page(lower: int, limit: int | None, st: Statement) -> sql.Composable:
    if limit is None and lower == 0:
        return sql.SQL("")
    limit_sql = sql.SQL("ALL") if limit is None else st.add(limit)
    return sql.SQL(" LIMIT {} OFFSET {}").format(limit_sql, st.add(lower))


def _select_list(
    select: tuple[SelectItem, ...] | None, qualifier: tuple[str, ...]
) -> sql.Composable:
    if not select:
        return _column(qualifier, "*")
    parts: list[sql.Composable] = []
    for item in select:
        column = _column(qualifier, item.column)
        if item.alias is None or item.column == "*":
            parts.append(column)
        else:
            parts.append(sql.SQL("{} AS {}").format(column, sql.Identifier(item.alias)))
    return sql.SQL(", ").join(parts)


def read_statement(
    rel: Relation, q: QueryParams, lower: int, limit: int | None, count: bool
) -> Statement:
    """GET on a table or view."""
    st = Statement(sql.Composed([]))
    qualifier = (SCHEMA, rel.name)
    total: sql.Composable = sql.SQL("NULL::bigint")
    if count:
        total = sql.SQL("(SELECT pg_catalog.count(*) FROM {}{})").format(
            _table(rel), _where(q, qualifier, st)
        )
    st.query = sql.SQL(
        "SELECT {}, pg_catalog.count(_postgrest_t), {} FROM (SELECT {} FROM {}{}{}{}) _postgrest_t"
    ).format(
        total,
        ARRAY_BODY,
        _select_list(q.select, qualifier),
        _table(rel),
        _where(q, qualifier, st),
        _order(q, qualifier),
        _page(lower, limit, st),
    )
    return st


def _returning(rel: Relation, select: tuple[SelectItem, ...] | None) -> sql.Composable:
    qualifier = (SCHEMA, rel.name)
    if select is None:
        return sql.SQL("1")
    if not select or any(item.column == "*" for item in select):
        return _column(qualifier, "*")
    columns = dict.fromkeys(item.column for item in select)
    return sql.SQL(", ").join(_column(qualifier, c) for c in columns)


def _mutation(st: Statement, source: sql.Composable, select: tuple[SelectItem, ...] | None) -> None:
    """Wrap a data-modifying statement in a CTE; `select` None means return=minimal."""
    cte = sql.Identifier(TABLE_ALIAS)
    if select is None:
        st.query = sql.SQL(
            "WITH {cte} AS ({source}) "
            "SELECT NULL::bigint, pg_catalog.count(*), NULL::text FROM {cte}"
        ).format(cte=cte, source=source)
        return
    st.query = sql.SQL(
        "WITH {cte} AS ({source}) SELECT NULL::bigint, pg_catalog.count(_postgrest_t), {body} "
        "FROM (SELECT {select} FROM {cte}) _postgrest_t"
    ).format(cte=cte, source=source, body=ARRAY_BODY, select=_select_list(select, (TABLE_ALIAS,)))


def insert_statement(
    rel: Relation,
    columns: tuple[str, ...],
    rows_json: str,
    conflict: tuple[str, tuple[str, ...]] | None,
    select: tuple[SelectItem, ...] | None,
) -> Statement:
    """POST on a table: rows from a JSON array; `conflict` is (resolution, conflict columns)."""
    st = Statement(sql.Composed([]))
    names = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    if columns:
        source = sql.SQL(
            "INSERT INTO {table} ({names}) SELECT {names} "
            "FROM json_populate_recordset(NULL::{table}, {rows}::json) pgrst_body"
        ).format(table=_table(rel), names=names, rows=st.add(rows_json))
    else:
        source = sql.SQL("INSERT INTO {} SELECT FROM json_array_elements({}::json)").format(
            _table(rel), st.add(rows_json)
        )
    if conflict is not None:
        resolution, targets = conflict
        action: sql.Composable = sql.SQL("DO NOTHING")
        if resolution == "merge-duplicates" and columns:
            action = sql.SQL("DO UPDATE SET {}").format(
                sql.SQL(", ").join(
                    sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in columns
                )
            )
        source = sql.SQL("{} ON CONFLICT ({}) {}").format(
            source, sql.SQL(", ").join(sql.Identifier(c) for c in targets), action
        )
    _mutation(st, sql.SQL("{} RETURNING {}").format(source, _returning(rel, select)), select)
    return st


def update_statement(
    rel: Relation,
    columns: tuple[str, ...],
    row_json: str,
    q: QueryParams,
    select: tuple[SelectItem, ...] | None,
) -> Statement:
    """PATCH on a table: the body's columns set on every row the filters match."""
    st = Statement(sql.Composed([]))
    qualifier = (SCHEMA, rel.name)
    if not columns:
        source = sql.SQL("SELECT {} FROM {} WHERE false").format(
            _returning(rel, select), _table(rel)
        )
    else:
        assignments = sql.SQL(", ").join(
            sql.SQL("{0} = pgrst_body.{0}").format(sql.Identifier(c)) for c in columns
        )
        source = sql.SQL(
            "UPDATE {} SET {} FROM (SELECT * FROM json_populate_record(NULL::{}, {}::json)) "
            "pgrst_body{} RETURNING {}"
        ).format(
            _table(rel),
            assignments,
            _table(rel),
            st.add(row_json),
            _where(q, qualifier, st),
            _returning(rel, select),
        )
    _mutation(st, source, select)
    return st


def delete_statement(
    rel: Relation, q: QueryParams, select: tuple[SelectItem, ...] | None
) -> Statement:
    """DELETE on a table: every row the filters match."""
    st = Statement(sql.Composed([]))
    source = sql.SQL("DELETE FROM {}{} RETURNING {}").format(
        _table(rel), _where(q, (SCHEMA, rel.name), st), _returning(rel, select)
    )
    _mutation(st, source, select)
    return st


@dataclass(frozen=True, slots=True)
class CallArgs:
    """The arguments given: `names` from a JSON body (POST) or text `values` (GET)."""

    names: frozenset[str] = frozenset()
    json_body: str | None = None
    values: Mapping[str, str] = field(default_factory=dict)


def _call_source(fn: Function, args: CallArgs, st: Statement) -> sql.Composable:
    function = sql.Identifier(SCHEMA, fn.name)
    arg_sql: list[sql.Composable] = []
    body_defs: list[sql.Composable] = []
    from_body: sql.Composable = sql.SQL("")
    if fn.takes_body:
        arg_sql.append(
            sql.SQL("{}::{}").format(st.add_body(args.json_body or "{}"), _type(fn.params[0].type))
        )
    else:
        for param in fn.params:
            if param.name not in args.names:
                continue
            name = sql.Identifier(param.name)
            variadic = sql.SQL("VARIADIC " if param.variadic else "")
            if args.json_body is not None:
                value: sql.Composable = sql.SQL("pgrst_body.{}").format(name)
                body_defs.append(sql.SQL("{} {}").format(name, _type(param.type)))
            else:
                value = sql.SQL("{}::{}").format(st.add(args.values[param.name]), _type(param.type))
            arg_sql.append(sql.SQL("{}{} := {}").format(variadic, name, value))
        if body_defs:
            from_body = sql.SQL("json_to_record({}::json) AS pgrst_body({})").format(
                st.add_body(args.json_body or "{}"), sql.SQL(", ").join(body_defs)
            )
    call = sql.SQL("{}({})").format(function, sql.SQL(", ").join(arg_sql))
    if fn.returns is ReturnKind.COMPOSITE:
        lateral = sql.SQL("{}, LATERAL ").format(from_body) if body_defs else sql.SQL("")
        return sql.SQL("SELECT {call_alias}.* FROM {lateral}{call} {call_alias}").format(
            call_alias=sql.Identifier(CALL_ALIAS), lateral=lateral, call=call
        )
    source = sql.SQL("SELECT {} AS pgrst_scalar").format(call)
    return sql.SQL("{} FROM {}").format(source, from_body) if body_defs else source


def call_statement(
    fn: Function, args: CallArgs, q: QueryParams, lower: int, limit: int | None, count: bool
) -> Statement:
    """/rpc/<fn>: call once (in a CTE), then filter, order, page and shape the result."""
    st = Statement(sql.Composed([]))
    source = _call_source(fn, args, st)
    qualifier = (CALL_ALIAS,)
    from_source = sql.SQL("{} {}").format(sql.Identifier(TABLE_ALIAS), sql.Identifier(CALL_ALIAS))
    total: sql.Composable = sql.SQL("NULL::bigint")
    if count:
        total = sql.SQL("(SELECT pg_catalog.count(*) FROM {}{})").format(
            from_source, _where(q, qualifier, st)
        )
    scalar = fn.returns is not ReturnKind.COMPOSITE
    aggregated = sql.SQL("_postgrest_t.pgrst_scalar" if scalar else "_postgrest_t")
    if fn.returns is ReturnKind.VOID:
        body: sql.Composable = NO_BODY
    elif fn.returns_set:
        body = sql.SQL("coalesce(json_agg({}), '[]')::text").format(aggregated)
    else:
        body = sql.SQL("coalesce((json_agg({})->0)::text, 'null')").format(aggregated)
    select = sql.SQL("pgrst_call.pgrst_scalar") if scalar else _select_list(q.select, qualifier)
    st.query = sql.SQL(
        "WITH {} AS ({}) SELECT {}, pg_catalog.count(_postgrest_t), {} "
        "FROM (SELECT {} FROM {}{}{}{}) _postgrest_t"
    ).format(
        sql.Identifier(TABLE_ALIAS),
        source,
        total,
        body,
        select,
        from_source,
        _where(q, qualifier, st),
        _order(q, qualifier),
        _page(lower, limit, st),
    )
    return st
