"""PostgREST subset at /rest/v1: tables and RPC with JWT role switching, over a psycopg pool."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from listener.local import rest_errors, rest_query, rest_sql
from listener.local.rest_auth import Authenticator, Identity
from listener.local.rest_errors import JSON_UTF8, RestError
from listener.local.rest_query import Preferences, QueryParams, SelectItem
from listener.local.rest_sql import CallArgs, Catalog, Function, Relation, ReturnKind, Statement

log = structlog.get_logger(component="rest")

METHODS = ["GET", "HEAD", "POST", "PATCH", "PUT", "DELETE", "OPTIONS"]
TABLE_METHODS = ("OPTIONS", "GET", "HEAD", "POST", "PATCH", "DELETE")
RPC_METHODS = ("OPTIONS", "GET", "HEAD", "POST")
SINGLE_UTF8 = "application/vnd.pgrst.object+json; charset=utf-8"
EXPOSED_HEADERS = [
    "Content-Range",
    "Content-Location",
    "Location",
    "Preference-Applied",
    "Proxy-Status",
    "Range-Unit",
]
STATEMENT_CACHE_SIZE = 512
# Errors that may mean the schema cache is out of date: reload it on the next request.
STALE_SQLSTATES = frozenset({"42P01", "42883", "42703", "42804"})
SETUP = sql.SQL(
    "SELECT set_config('role', %s, true), set_config('request.jwt.claims', %s, true), "
    "set_config('request.method', %s, true), set_config('request.path', %s, true), "
    "set_config('request.headers', %s, true), "
    "set_config('search_path', 'public, extensions', true), "
    "set_config('transaction_read_only', %s, true)"
)


class SchemaCache:
    """The catalog of `public`, loaded on first use and reloaded when a name is not found."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        self._catalog: Catalog | None = None
        self._stale = True
        self._lock = asyncio.Lock()
        self._listening: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()

    def invalidate(self) -> None:
        """Reload before the next lookup."""
        self._stale = True

    def on_notify(self, notify: psycopg.Notify) -> None:
        """`NOTIFY pgrst, 'reload schema'` (or an empty payload), as PostgREST listens for it."""
        if notify.payload in ("", "reload schema"):
            self.invalidate()

    async def listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Make a pool connection hear `pgrst` notifications (once per connection). They
        arrive with the connection's next result, so at most one request per connection
        still runs on the old cache."""
        if conn in self._listening:
            return
        await conn.execute("LISTEN pgrst")
        await conn.commit()
        conn.add_notify_handler(self.on_notify)
        self._listening.add(conn)

    async def _current(self) -> Catalog:
        if self._catalog is None or self._stale:
            return await self._reload(self._catalog)
        return self._catalog

    async def _reload(self, seen: Catalog | None) -> Catalog:
        async with self._lock:
            if self._catalog is not None and self._catalog is not seen and not self._stale:
                return self._catalog  # another request reloaded it while this one waited
            try:
                async with self._pool.connection() as conn:
                    cur = await conn.execute(rest_sql.CATALOG_QUERY)
                    row = await cur.fetchone()
            except psycopg.Error as exc:
                raise RestError(
                    503,
                    "PGRST002",
                    "Could not query the database for the schema cache. Retrying.",
                    str(exc),
                ) from None
            assert row is not None
            self._catalog = rest_sql.catalog_from_json(json.loads(row[0]))
            self._stale = False
            log.debug(
                "rest_schema_cache_loaded",
                relations=len(self._catalog.relations),
                functions=len(self._catalog.functions),
            )
            return self._catalog

    async def relation(self, name: str, columns: tuple[str, ...] = ()) -> Relation:
        """The table or view `name` having `columns`; PGRST205 / PGRST204 when it has not."""
        catalog = await self._current()
        rel = catalog.relations.get(name)
        if rel is None or not rel.columns.issuperset(columns):
            catalog = await self._reload(catalog)
            rel = catalog.relations.get(name)
        if rel is None:
            raise rest_errors.table_not_found(name, catalog.relations)
        missing = [c for c in columns if c not in rel.columns]
        if missing:
            raise rest_errors.column_not_found(name, missing[0])
        return rel

    async def function(self, name: str, arg_names: frozenset[str] | None) -> Function:
        """The overload of `name` these arguments call (PGRST202/PGRST203 otherwise)."""
        catalog = await self._current()
        try:
            return rest_sql.resolve_function(catalog, name, arg_names)
        except RestError:
            return rest_sql.resolve_function(await self._reload(catalog), name, arg_names)


@dataclass(frozen=True, slots=True)
class Result:
    """What a statement answered: the counted total (if asked), the page's rows, the JSON."""

    total: int | None
    rows: int
    body: str | None


class RestGateway:
    """The request handlers: authenticate, parse, build one statement, run it, shape the answer."""

    def __init__(self, pool: AsyncConnectionPool, jwt_secret: str) -> None:
        self._pool = pool
        self._auth = Authenticator(jwt_secret)
        self._schema = SchemaCache(pool)
        # POST /rpc statements by everything but the body: the listener's calls repeat.
        self._calls: dict[tuple[object, ...], Statement] = {}

    async def table(self, request: Request) -> Response:
        """/<table>: GET/HEAD read, POST insert (upsert), PATCH update, DELETE."""
        return await _guarded(request, self._table)

    async def rpc(self, request: Request) -> Response:
        """/rpc/<function>: POST with named arguments in a JSON object, GET/HEAD in the query."""
        return await _guarded(request, self._rpc)

    async def _table(self, request: Request) -> Response:
        method = request.method
        if method == "OPTIONS":
            return Response(headers={"allow": ",".join(TABLE_METHODS)})
        if method not in TABLE_METHODS:
            raise RestError(405, "PGRST117", f"Unsupported HTTP method: {method}")
        identity, q, prefs, single = _prepare(request, self._auth)
        if method in ("GET", "HEAD"):
            rel = await self._schema.relation(request.path_params["name"])
            lower, limit = rest_query.page_bounds(q, request.headers.get("range"))
            st = rest_sql.read_statement(rel, q, lower, limit, prefs.count is not None)
            result = await self._run(request, identity, st, read_only=True, single=single)
            return _read_response(request, result, lower, prefs, single)
        return await self._write(request, identity, q, prefs, single)

    async def _write(
        self,
        request: Request,
        identity: Identity,
        q: QueryParams,
        prefs: Preferences,
        single: bool,
    ) -> Response:
        """POST (insert, upsert), PATCH and DELETE on a table."""
        method, name = request.method, request.path_params["name"]
        representation = prefs.returning == "representation"
        select = (q.select or (SelectItem("*"),)) if representation else None
        conflict = None
        if method == "POST":
            columns, rows_json = rest_query.parse_rows(await request.body(), q.columns)
            rel = await self._schema.relation(name, columns)
            targets = q.on_conflict or rel.primary_key
            conflict = (prefs.resolution, targets) if prefs.resolution and targets else None
            st = rest_sql.insert_statement(rel, columns, rows_json, conflict, select)
        elif method == "PATCH":
            _reject_limited_write(q)
            columns, row_json = rest_query.parse_row(await request.body())
            rel = await self._schema.relation(name, columns)
            st = rest_sql.update_statement(rel, columns, row_json, q, select)
        else:  # DELETE; its body (supabase-py sends `{}`) is ignored
            _reject_limited_write(q)
            rel = await self._schema.relation(name)
            st = rest_sql.delete_statement(rel, q, select)
        result = await self._run(request, identity, st, read_only=False, single=single)
        counted = result.rows if prefs.count else None
        if method == "PATCH":
            content_range = rest_query.content_range(0, result.rows, counted)
        else:  # PostgREST gives no span for inserts and deletes: */total
            content_range = rest_query.content_range(1, 0, counted)
        headers = {"content-range": content_range}
        applied = prefs.applied(write=True, resolution=conflict is not None)
        if applied:
            headers["preference-applied"] = applied
        if not representation:
            return Response(status_code=201 if method == "POST" else 204, headers=headers)
        status = 201 if method == "POST" else 200
        return _json_response(request, status, _shaped(result.body, single), headers, single)

    async def _rpc(self, request: Request) -> Response:
        method = request.method
        if method == "OPTIONS":
            return Response(headers={"allow": ",".join(RPC_METHODS)})
        if method not in RPC_METHODS:
            raise RestError(405, "PGRST101", f"Cannot use the {method} method on RPC")
        identity, q, prefs, single = _prepare(request, self._auth, rpc_read=method != "POST")
        range_header = request.headers.get("range")
        lower, limit = rest_query.page_bounds(q, range_header)
        count = prefs.count is not None
        if method == "POST":
            names, body = rest_query.parse_args(await request.body())
            fn = await self._schema.function(request.path_params["name"], names)
            if names is None and not fn.takes_body:
                raise rest_errors.bad_body("The body of an RPC call must be a JSON object")
            key = (fn, names, request.scope["query_string"], range_header, count)
            template = self._calls.get(key)
            if template is None:
                args = CallArgs(names or frozenset(), body)
                template = rest_sql.call_statement(fn, args, q, lower, limit, count)
                if len(self._calls) >= STATEMENT_CACHE_SIZE:
                    self._calls.clear()
                self._calls[key] = template
            st = template.with_body(body)
        else:
            names = frozenset(q.args)
            fn = await self._schema.function(request.path_params["name"], names)
            st = rest_sql.call_statement(fn, CallArgs(names, None, q.args), q, lower, limit, count)
        read_only = method != "POST" or not fn.volatile
        result = await self._run(request, identity, st, read_only=read_only, single=single)
        if fn.returns is ReturnKind.VOID:
            return Response(status_code=204)
        if not fn.returns_set:
            headers = {"content-range": rest_query.content_range(0, 1, None)}
            return _json_response(request, 200, result.body or "null", headers, single)
        return _read_response(request, result, lower, prefs, single)

    async def _run(
        self, request: Request, identity: Identity, st: Statement, *, read_only: bool, single: bool
    ) -> Result:
        """One transaction: switch role and set the request GUCs, run the statement."""
        setup = (
            identity.role,
            identity.claims,
            request.method,
            request.scope["path"].removeprefix(request.scope.get("root_path", "")),
            json.dumps(dict(request.headers), separators=(",", ":")),
            "on" if read_only else "off",
        )
        try:
            async with self._pool.connection() as conn:
                await self._schema.listen(conn)
                await conn.execute(SETUP, setup)
                cur = await conn.execute(st.query, st.params)
                row = await cur.fetchone()
                assert row is not None
                result = Result(row[0], row[1], row[2])
                if single and result.rows != 1:
                    raise rest_errors.not_singular(result.rows)  # rolls the transaction back
                return result
        except PoolTimeout:
            raise RestError(
                504, "PGRST003", "Timed out acquiring connection from connection pool."
            ) from None
        except psycopg.Error as exc:
            raise self._database_error(exc, identity) from None

    def _database_error(self, exc: psycopg.Error, identity: Identity) -> RestError:
        if exc.sqlstate is None:
            return RestError(503, "PGRST001", "Database client error. Retrying the connection.")
        if exc.sqlstate in STALE_SQLSTATES:
            self._schema.invalidate()
        diag = exc.diag
        return rest_errors.database_error(
            exc.sqlstate,
            diag.message_primary or str(exc),
            diag.message_detail,
            diag.message_hint,
            identity.authenticated,
        )


def _prepare(
    request: Request, auth: Authenticator, *, rpc_read: bool = False
) -> tuple[Identity, QueryParams, Preferences, bool]:
    """What every data request needs first: identity, parsed query, preferences, media type."""
    identity = auth.identity(request)
    headers = request.headers
    rest_query.check_profile(headers.get("accept-profile"), headers.get("content-profile"))
    single = rest_query.wants_single_object(headers.get("accept"))
    items = rest_query.query_items(request.scope["query_string"])
    return (
        identity,
        rest_query.parse_query([(k, v) for k, v in items if k != "apikey"], rpc_read=rpc_read),
        rest_query.parse_prefer(headers.getlist("prefer")),
        single,
    )


def _reject_limited_write(q: QueryParams) -> None:
    if q.limit is not None or q.offset or q.order:
        raise rest_errors.not_implemented("limit, offset and order on PATCH/DELETE")


def _shaped(body: str | None, single: bool) -> str:
    """The JSON array, or its only element when one object was asked for."""
    array = body or "[]"
    return array[1:-1] if single else array


def _read_response(
    request: Request, result: Result, lower: int, prefs: Preferences, single: bool
) -> Response:
    status = rest_query.range_status(lower, result.rows, result.total)
    if status == 416:
        raise RestError(
            416,
            "PGRST103",
            "Requested range not satisfiable",
            f"An offset of {lower} was requested, but there are only {result.total} rows.",
        )
    headers = {"content-range": rest_query.content_range(lower, result.rows, result.total)}
    applied = prefs.applied(write=False, resolution=False)
    if applied:
        headers["preference-applied"] = applied
    return _json_response(request, status, _shaped(result.body, single), headers, single)


def _json_response(
    request: Request, status: int, body: str, headers: dict[str, str], single: bool
) -> Response:
    content = b"" if request.method == "HEAD" else body.encode()
    media_type = SINGLE_UTF8 if single else JSON_UTF8
    response = Response(content, status_code=status, headers=headers, media_type=media_type)
    if request.method == "HEAD":
        response.headers["content-length"] = str(len(body.encode()))
    return response


async def _guarded(request: Request, handler: Callable[[Request], Awaitable[Response]]) -> Response:
    """Answer every failure as PostgREST JSON; never a traceback."""
    try:
        return await handler(request)
    except RestError as exc:
        return _error_response(request, exc)
    except Exception:
        log.exception("rest_request_failed", method=request.method, path=request.url.path)
        return _error_response(
            request, RestError(500, "PGRSTX00", "Internal error in the local REST gateway")
        )


def _error_response(request: Request, exc: RestError) -> Response:
    content = b"" if request.method == "HEAD" else exc.body()
    return Response(content, status_code=exc.status, headers=exc.response_headers())


async def _invalid_path(request: Request) -> Response:
    return _error_response(
        request, RestError(404, "PGRST125", "Invalid path specified in request URL")
    )


def create_rest_app(pool: AsyncConnectionPool, jwt_secret: str) -> Starlette:
    """The REST gateway's ASGI app (mounted at /rest/v1)."""
    gateway = RestGateway(pool, jwt_secret)
    return Starlette(
        routes=[
            Route("/rpc/{name}", gateway.rpc, methods=METHODS),
            Route("/{name}", gateway.table, methods=METHODS),
            Route("/{path:path}", _invalid_path, methods=METHODS),
        ],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=["*"],
                allow_methods=METHODS,
                allow_headers=["*"],
                expose_headers=EXPOSED_HEADERS,
            )
        ],
    )
