"""RFC 9457 problem details for every error the service answers.

Domains raise `ProblemError` subclasses (or Litestar's HTTP exceptions); one handler turns each into
`application/problem+json` carrying the request id. Unexpected exceptions become a 500 whose body says
nothing about the failure beyond the request id; the traceback goes to the log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator, Iterator
from contextvars import ContextVar
from http import HTTPStatus
from traceback import walk_tb
from types import UnionType
from typing import Any, ClassVar, cast

from advanced_alchemy.exceptions import IntegrityError as RepositoryIntegrityError
from advanced_alchemy.exceptions import NotFoundError as RepositoryNotFoundError
from advanced_alchemy.exceptions import RepositoryError
from asyncpg.exceptions import (
    DiskFullError,
    InterfaceError,
    InternalClientError,
    LockNotAvailableError,
    OperatorInterventionError,
    PostgresConnectionError,
    QueryCanceledError,
)
from litestar import MediaType, Request, Response
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, InternalServerException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.types import ExceptionHandlersMap, Scope
from opentelemetry import trace
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from zkeb.lib.redaction import redact

__all__ = (
    "FAILED_RESPONSE_SCOPE_KEY",
    "PROBLEM_JSON",
    "BoundedRequest",
    "ConflictError",
    "IncompleteBodyError",
    "NotFoundError",
    "ProblemError",
    "RequestBodyTimeoutError",
    "ServiceUnavailableError",
    "UnprocessableError",
    "UnsupportedMediaTypeError",
    "database_connection_lost",
    "database_out_of_space",
    "database_timed_out",
    "exception_handlers",
    "failed_response",
    "problem_response",
    "record_failed_response",
    "request_id_var",
    "request_path",
    "span_id_var",
    "status_phrase",
    "storage_full",
    "trace_id_var",
)

logger = logging.getLogger("zkeb.errors")

PROBLEM_JSON = "application/problem+json"
#: The current request's id, set by the request-id middleware.
request_id_var: ContextVar[str | None] = ContextVar("zkeb_request_id", default=None)
#: The current trace id (hex), set by the telemetry middleware on every request.
trace_id_var: ContextVar[str | None] = ContextVar("zkeb_trace_id", default=None)
#: The server's span id (hex) of the current request when tracing is off (no SDK span carries it then).
span_id_var: ContextVar[str | None] = ContextVar("zkeb_span_id", default=None)


#: Where a handler whose streamed body failed after its status was sent records why (see `record_failed_response`).
FAILED_RESPONSE_SCOPE_KEY = "zkeb.failed_response"


def record_failed_response(scope: Scope, exc: BaseException) -> None:
    """Note that this request's answer failed after its status went out (its body ends short of `Content-Length`).

    The status line cannot change any more, so the access log (`failed`), the request metrics
    (`zkeb_http_responses_failed_total`) and the server span (an error, `error.type` the exception's class) say it
    instead: otherwise a restore cut by a server fault would count as one more 200.
    """
    cast("dict[str, Any]", scope)[FAILED_RESPONSE_SCOPE_KEY] = type(exc).__name__


def failed_response(scope: Scope) -> str | None:
    """Why this request's answer failed after its status went out (an exception's class name), or None."""
    reason: str | None = cast("dict[str, Any]", scope).get(FAILED_RESPONSE_SCOPE_KEY)
    return reason


class ProblemError(HTTPException):
    """An HTTP error answered as problem details; `extra` members are added to the body."""

    status_code: int = 400
    problem_type: ClassVar[str] = "about:blank"
    #: The problem's `title` for a status HTTP gives no phrase (e.g. tus's 460); None: the status's phrase.
    title: ClassVar[str | None] = None

    def __init__(
        self,
        detail: str = "",
        *,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail=detail, status_code=status_code or self.status_code, headers=headers)
        self.problem_extra = extra or {}


#: What Litestar's `Request.stream()` raises (as a 500) on `http.disconnect` before the body's end.
_CLIENT_DISCONNECTED = "client disconnected prematurely"


class IncompleteBodyError(ProblemError):
    """The request body ended before its end: the client went away, or its chunked encoding was malformed (400)."""

    status_code: int = 400


class RequestBodyTimeoutError(IncompleteBodyError):
    """The request body stopped making progress: nothing, or too little, arrived for too long (408).

    An `IncompleteBodyError`, so whoever keeps what arrived of a body cut short (a tus PATCH) keeps it here too.
    """

    status_code: int = 408


class UnsupportedMediaTypeError(ProblemError):
    """The body's content type is not one this endpoint reads (415)."""

    status_code: int = 415


class BoundedRequest(Request[Any, Any, Any]):
    """Litestar's request, except for four kinds of bad body.

    - A JSON body declared as another content type: 415 (Litestar decodes it whatever its `Content-Type`).
    - A JSON body nested past the decoder's depth: 400, not 500. Litestar decodes a `data` body without a target
      type first (`Request.json()`), and msgspec raises `RecursionError` for a document nested a thousand levels
      deep; Litestar catches only `DecodeError`.
    - A JSON body with a string that is not valid UTF-8 (a stray 0xFF byte, an overlong or a surrogate encoding):
      400, not 500. msgspec raises `UnicodeDecodeError` for it, which Litestar does not catch either.
    - A body that ends early (`IncompleteBodyError`): 400, not 500. The server reports a truncated body or a
      malformed chunked encoding as `http.disconnect`, which Litestar's `stream()` raises as a 500 ("client
      disconnected prematurely").
    """

    async def stream(self) -> AsyncGenerator[bytes, None]:
        """The body, piece by piece (`IncompleteBodyError` when it ends early)."""
        try:
            async for piece in super().stream():
                yield piece
        except InternalServerException as exc:
            if exc.detail != _CLIENT_DISCONNECTED:  # e.g. "stream consumed": a server defect, not the client's
                raise
            raise IncompleteBodyError(
                "the request body ended before its end (the connection closed, or the chunked encoding is malformed)"
            ) from None

    async def json(self) -> Any:
        """The decoded JSON body: 415 when it is declared as something else, 400 when nested too deeply or not UTF-8.

        A body without a `Content-Type` is read as JSON.
        """
        media_type = self.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type and media_type != "application/json" and not media_type.endswith("+json"):
            raise UnsupportedMediaTypeError("send the body as application/json")
        try:
            return await super().json()
        except RecursionError:
            raise ProblemError("the JSON body is nested too deeply") from None
        except UnicodeDecodeError:
            raise ProblemError("the JSON body is not valid UTF-8") from None


class NotFoundError(ProblemError):
    """The resource does not exist, or belongs to another tenant (which must not be revealed)."""

    status_code: int = 404


class ConflictError(ProblemError):
    """The request conflicts with the resource's state."""

    status_code: int = 409


class UnprocessableError(ProblemError):
    """The request is well-formed but its content is invalid."""

    status_code: int = 422


class ServiceUnavailableError(ProblemError):
    """A dependency is down; the client may retry."""

    status_code: int = 503


def request_path(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The request's path, from its scope: `request.url` parses `Host` too, and fails on a port that is no port."""
    return str(connection.scope.get("root_path", "")) + connection.scope["path"]


def _masked(value: Any) -> Any:
    """`value` with every string in it (through dicts and lists) masked by `redact`."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(item) for item in value]
    return value


def problem_response(
    request: Request[Any, Any, Any],
    status: int,
    detail: str | None,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    problem_type: str = "about:blank",
    title: str | None = None,
) -> Response[dict[str, Any]]:
    """A problem+json response for `request`; `title` defaults to the status's phrase ("Error" when it has none)."""
    if title is None:
        title = status_phrase(status)
    body: dict[str, Any] = {"type": problem_type, "title": title, "status": status}
    # A detail may quote the request (a field name, a value) and the instance is its path, as may the members that
    # name a field (`field`, `errors`): a credential a client put there is not sent back (proxies and clients log
    # error bodies).
    if detail and detail != title:
        body["detail"] = redact(detail)
    body["instance"] = redact(request_path(request))
    if extra:
        body.update(_masked(extra))
    request_id = request_id_var.get()
    if request_id:
        body["request_id"] = request_id
    trace_id = trace_id_var.get()
    if trace_id:
        body["trace_id"] = trace_id
    return Response(content=body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


_FIELD_IN_MESSAGE = re.compile(r"field `([^`]{1,100})`")


def _named_errors(extra: object) -> list[dict[str, Any]]:
    """Litestar's error list, with whole-body errors (`missing field`, `unknown field`) keyed by their field."""
    errors: list[dict[str, Any]] = []
    for item in extra if isinstance(extra, list) else []:
        if not isinstance(item, dict):
            continue
        error = dict(item)
        named = _FIELD_IN_MESSAGE.search(str(error.get("message", "")))
        if error.get("key") in {None, "data"} and named:
            error["key"] = named.group(1)
            error["source"] = "body"
        errors.append(error)
    return errors


def _validation_problem(request: Request[Any, Any, Any], exc: ValidationException) -> Response[dict[str, Any]]:
    """Body validation errors answer 422 naming each field; malformed requests and parameters stay 400."""
    errors = _named_errors(exc.extra)
    from_body = bool(errors) and all(e.get("source") == "body" for e in errors)
    status = 422 if from_body else 400
    names = ", ".join(f"{e['key']}: {e.get('message')}" for e in errors if e.get("key"))
    detail = names or (exc.detail if status == 400 else "the request body is invalid")
    return problem_response(request, status, detail, extra={"errors": errors} if errors else None)


def _repository_problem(request: Request[Any, Any, Any], exc: RepositoryError) -> Response[dict[str, Any]]:
    """advanced-alchemy's repository errors that escaped a service: 404 or 409, never a leak of the SQL."""
    if isinstance(exc, RepositoryNotFoundError):
        return problem_response(request, 404, "not found")
    if isinstance(exc, RepositoryIntegrityError):
        return problem_response(request, 409, "the request conflicts with existing data")
    if isinstance(exc.__cause__, PoolTimeoutError):
        return _pool_timeout_problem(request, exc.__cause__)
    return _unexpected_exception_handler(request, exc)


def _http_exception_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    if isinstance(exc, ValidationException):
        return _validation_problem(request, exc)
    extra: dict[str, Any] = {}
    title = None
    if isinstance(exc, ProblemError):
        extra.update(exc.problem_extra)
        problem_type, title = exc.problem_type, exc.title
    else:
        problem_type = "about:blank"
    detail = exc.detail
    if exc.status_code == 413 and detail in {"", HTTPStatus(413).phrase}:
        detail = _too_large_detail(request)
    headers = dict(exc.headers or {})
    return problem_response(
        request, exc.status_code, detail, headers=headers, extra=extra, problem_type=problem_type, title=title
    )


def _too_large_detail(request: Request[Any, Any, Any]) -> str:
    """Litestar's bare 413, with the route's limit and, where the route names one, where larger bodies go."""
    detail = "The request body is larger than this endpoint accepts"
    handler = request.scope.get("route_handler")
    if not isinstance(handler, HTTPRouteHandler):
        return detail
    if limit := handler.resolve_request_max_body_size():
        detail += f" ({limit} bytes at most)"
    hint = handler.opt.get("too_large_hint")
    return f"{detail}; {hint}" if hint else detail


def _pool_timeout_problem(request: Request[Any, Any, Any], exc: PoolTimeoutError) -> Response[dict[str, Any]]:
    """Every pooled database connection stayed busy for the pool's whole timeout: overloaded, retry shortly."""
    _record_on_span(exc)
    logger.warning("database pool exhausted on %s %s: %s", request.method, request_path(request), exc)
    return problem_response(
        request, 503, "the server is busy (no database connection free); retry shortly", headers={"Retry-After": "1"}
    )


#: Where Python's phrases are older than the ones granian writes on the status line (RFC 9110's, but for 413's name).
_STATUS_LINE_PHRASES = {413: "Payload Too Large", 414: "URI Too Long", 416: "Range Not Satisfiable"}


def status_phrase(status: int) -> str:
    """The phrase of `status` as the status line carries it ("Error" for a status HTTP names none, e.g. 460)."""
    if status in _STATUS_LINE_PHRASES:
        return _STATUS_LINE_PHRASES[status]
    return HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"


def database_connection_lost(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, is a lost database connection (retryable, not a defect).

    A backend terminated (`pg_terminate_backend`, a failover, a restart: SQLSTATE class 57 but a cancelled query),
    a connection closed mid-operation or found closed (asyncpg says so only in an `InterfaceError`'s message, as
    SQLAlchemy's dialect also reads it), or one that cannot be opened; SQLAlchemy marks the ones it detects as
    `connection_invalidated`.

    One more: a backend terminated while its connection sat idle in the pool sends its FATAL error before closing
    the socket. asyncpg, not expecting a message while idle, leaves the protocol waiting for a sync point that never
    comes, and until the close is read the connection looks open: the next statement fails with asyncpg's
    `InternalClientError` "cannot switch to state …; another operation … is in progress". That connection is lost
    too (a use of one connection by two tasks at once is asyncpg's `InterfaceError`, not this).
    """
    return any(
        (isinstance(current, DBAPIError) and current.connection_invalidated)
        or isinstance(current, PostgresConnectionError | ConnectionError)
        or (isinstance(current, OperatorInterventionError) and not isinstance(current, QueryCanceledError))
        or (isinstance(current, InterfaceError) and "connection is closed" in str(current))
        or (isinstance(current, InternalClientError) and "another operation" in str(current))
        for current in _chain(exc)
    )


def database_timed_out(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, is a statement or lock timeout (retryable, not a defect).

    `statement_timeout` (asyncpg's command timeout is `REQUEST_TIMEOUT`) and `lock_timeout` cancel the statement: its
    transaction rolled back, so nothing it wrote is visible, and the same request may succeed a moment later. A
    connection attempt that got no answer in time is one too.
    """
    return any(
        isinstance(current, QueryCanceledError | LockNotAvailableError)
        or (isinstance(current, TimeoutError) and _raised_in_asyncpg(current))
        for current in _chain(exc)
    )


def _raised_in_asyncpg(exc: BaseException) -> bool:
    """Whether `exc` passed through asyncpg's code: asyncpg ends a statement that outlasts its command timeout (after
    cancelling it on the server), and a connection attempt that gets no answer (a database that accepts connections
    and hangs), with a bare `TimeoutError`."""
    return any(frame.f_globals.get("__name__", "").startswith("asyncpg.") for frame, _ in walk_tb(exc.__traceback__))


def database_out_of_space(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, is PostgreSQL running out of disk (SQLSTATE 53100).

    "could not extend file ...: No space left on device": the statement failed and its transaction rolled back, so
    nothing it wrote is visible; the same request succeeds once the operator has made room.
    """
    return _raised_from(exc, DiskFullError)


def _raised_from(exc: BaseException, kind: type[BaseException] | UnionType) -> bool:
    """Whether `exc`, or an error it was raised from (its cause or context, all the way down), is a `kind`."""
    return any(isinstance(current, kind) for current in _chain(exc))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then each error it was raised from (its cause, else its context), each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def storage_full(headers: dict[str, str] | None = None) -> ProblemError:
    """The 507 answered when PostgreSQL is out of disk (`database_out_of_space`), with `Retry-After` and `headers`.

    Retry in a minute: making room is an operator's work, not a moment's.
    """
    return ProblemError(
        "the server's storage is full; what this request was writing was not stored: retry later",
        status_code=507,
        headers={"Retry-After": "60", **(headers or {})},
    )


def _record_on_span(exc: BaseException) -> None:
    """Record a server-side failure on the request's server span (the current one while a handler answers it).

    Its exception event and `error.type` (the deepest cause's class: `ConnectionDoesNotExistError`, not the
    wrappers around it) say in the trace what the log line says; the server span would otherwise carry only the
    status code.
    """
    span = trace.get_current_span()
    if span.is_recording():
        span.record_exception(exc)
        span.set_attribute("error.type", _root_cause_name(exc))


def _root_cause_name(exc: BaseException) -> str:
    """The class name of the deepest error `exc` was raised from (the cause, not the wrappers around it)."""
    return type(list(_chain(exc))[-1]).__name__


def _unexpected_exception_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    _record_on_span(exc)
    if database_connection_lost(exc):
        logger.warning(
            "database connection lost on %s %s: %s", request.method, request_path(request), _root_cause_name(exc)
        )
        return problem_response(
            request,
            503,
            "the database cannot be reached or the connection was lost; retry shortly",
            headers={"Retry-After": "1"},
        )
    if database_timed_out(exc):
        logger.warning("database timeout on %s %s: %s", request.method, request_path(request), _root_cause_name(exc))
        return problem_response(
            request, 503, "the database did not answer in time; retry shortly", headers={"Retry-After": "1"}
        )
    if database_out_of_space(exc):
        logger.error("database out of disk space on %s %s", request.method, request_path(request))
        return _http_exception_handler(request, storage_full())
    logger.error("unhandled error on %s %s", request.method, request_path(request), exc_info=exc)
    return problem_response(request, 500, "An unexpected error occurred; quote the request id when reporting it")


def exception_handlers() -> ExceptionHandlersMap:
    """The handlers every ZKEB app registers."""
    return {
        HTTPException: _http_exception_handler,
        RepositoryError: _repository_problem,
        PoolTimeoutError: _pool_timeout_problem,
        Exception: _unexpected_exception_handler,
    }


_ = MediaType
