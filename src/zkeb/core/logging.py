"""Structured logs: one JSON object a line (or readable console lines in development), and the access log.

Every line carries `time` (RFC 3339 UTC), `level`, `logger`, `event`, and, when known, `request_id`, `trace_id`
and `span_id`; `extra={...}` members of a log call become fields. `LOG_LEVEL` sets the level; `LOG_FORMAT`
(`json` or `console`) overrides the default format (console in development, JSON otherwise). granian's own
loggers go through the same handler (`logging_dictconfig()` is handed to granian by `zkeb serve`).

The access log (`zkeb.access`) writes one line per request: method, route template, status, duration, bytes
in and out, client address and the principal's credential *id* (never the credential). Request and response
bodies are never logged, and a last-resort filter masks anything shaped like an API key, a JWT or a bearer
credential in every line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPScope, Message, Receive, ReceiveMessage, Scope, Send
from opentelemetry import trace

from zkeb.core.errors import failed_response, request_id_var, span_id_var, trace_id_var
from zkeb.lib.redaction import redact

__all__ = (
    "ACCESS_LOGGER",
    "AccessLogMiddleware",
    "AccessRecord",
    "ConsoleFormatter",
    "JsonFormatter",
    "configure_logging",
    "install_access_log",
    "log_format",
    "logging_dictconfig",
)

ACCESS_LOGGER = "zkeb.access"
_access_logger = logging.getLogger(ACCESS_LOGGER)
_HANDLER_MARK = "_zkeb_handler"
_SPAN_CONTEXT_SCOPE_KEY = "zkeb.trace"  # kept in sync with zkeb.core.telemetry.SPAN_CONTEXT_SCOPE_KEY

# Attributes every LogRecord has; anything else on a record came from `extra=` and becomes a field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 (e.g. CSI, \x9b)


def _printable(text: str) -> str:
    """`text` with control characters written as escapes: a request path must not drive the developer's terminal."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def _trace_fields() -> tuple[str | None, str | None]:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        return format(context.trace_id, "032x"), format(context.span_id, "016x")
    return trace_id_var.get(), span_id_var.get()


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": record.getMessage(),
    }
    request_id = getattr(record, "request_id", None) or request_id_var.get()
    if request_id:
        fields["request_id"] = request_id
    trace_id, span_id = getattr(record, "trace_id", None), getattr(record, "span_id", None)
    if trace_id is None:
        trace_id, span_id = _trace_fields()
    if trace_id:
        fields["trace_id"] = trace_id
    if span_id:
        fields["span_id"] = span_id
    for key, value in record.__dict__.items():
        if key not in _RECORD_ATTRS and key not in fields and not key.startswith("_") and value is not None:
            fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as a JSON line, secrets masked."""
        fields = _fields(record)
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            fields["exception"] = record.exc_text
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        # Masked before encoding too: JSON escapes (a tab written as `\t`) would hide a secret's shape from `redact`.
        fields = {key: redact(value) if isinstance(value, str) else value for key, value in fields.items()}
        return redact(json.dumps(fields, default=str, ensure_ascii=False, separators=(",", ":")))


class ConsoleFormatter(logging.Formatter):
    """Readable lines for a developer's terminal: time, level, logger, event, then `key=value` fields."""

    _LEVEL_COLORS: ClassVar[dict[str, str]] = {
        "debug": "\x1b[2m",
        "info": "\x1b[32m",
        "warning": "\x1b[33m",
        "error": "\x1b[31m",
    }
    _ALARM = "\x1b[1;31m"
    _RESET = "\x1b[0m"

    def __init__(self, *, colors: bool | None = None) -> None:
        super().__init__()
        self.colors = sys.stderr.isatty() if colors is None else colors

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` for humans, secrets masked."""
        fields = _fields(record)
        stamp = fields.pop("time")[11:23]
        level = fields.pop("level")
        logger_name, event = fields.pop("logger"), fields.pop("event")
        shown_level = f"{level.upper():<7}"
        if self.colors:
            shown_level = f"{self._LEVEL_COLORS.get(level, self._ALARM)}{shown_level}{self._RESET}"
        # Masked, then escaped: an escaped tab (`\x09`) would hide a secret's shape from `redact`.
        extras = " ".join(f"{k}={_printable(redact(str(v)))}" for k, v in fields.items())
        line = f"{stamp} {shown_level} {logger_name:<14} {_printable(redact(event))}" + (
            f"  {extras}" if extras else ""
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def log_format(env: str, environ: dict[str, str] | None = None) -> str:
    """`json` or `console`: `LOG_FORMAT` when set, else console in development and JSON elsewhere."""
    configured = (environ if environ is not None else os.environ).get("LOG_FORMAT", "").strip().lower()
    if configured in {"json", "console"}:
        return configured
    return "console" if env == "development" else "json"


def _formatter(fmt: str) -> logging.Formatter:
    return ConsoleFormatter() if fmt == "console" else JsonFormatter()


_BAGGAGE_LOGGER = "opentelemetry.baggage.propagation"


def configure_logging(level: str, fmt: str) -> None:
    """Route every logger (ours, Litestar's, SQLAlchemy's, granian's) through one stdout handler.

    Idempotent: re-running replaces the handler it added before and leaves other handlers (pytest's) alone.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        # Ours: added by an earlier call, or by granian from `logging_dictconfig()`.
        if getattr(handler, _HANDLER_MARK, False) or isinstance(handler.formatter, (JsonFormatter, ConsoleFormatter)):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_formatter(fmt))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("_granian", "granian.access", "granian", "litestar"):
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
    # granian's own access log would duplicate ours and carries no request id or trace id.
    logging.getLogger("granian.access").setLevel(logging.WARNING)
    # OpenTelemetry's propagator warns about each malformed `baggage` entry a client sends, echoing the header: a few
    # KiB of log per request that anyone can send, and nothing for an operator to do about it.
    logging.getLogger(_BAGGAGE_LOGGER).setLevel(logging.ERROR)


def logging_dictconfig(level: str, fmt: str) -> dict[str, Any]:
    """The same configuration as `configure_logging`, as the `logging.config` dict granian applies itself."""
    formatter: dict[str, Any] = (
        {"()": "zkeb.core.logging.ConsoleFormatter"} if fmt == "console" else {"()": "zkeb.core.logging.JsonFormatter"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"zkeb": formatter},
        "handlers": {"zkeb": {"class": "logging.StreamHandler", "formatter": "zkeb", "stream": "ext://sys.stdout"}},
        "root": {"handlers": ["zkeb"], "level": level},
        "loggers": {
            "_granian": {"handlers": [], "level": level, "propagate": True},
            "granian.access": {"handlers": [], "level": "WARNING", "propagate": True},
            _BAGGAGE_LOGGER: {"handlers": [], "level": "ERROR", "propagate": True},
        },
    }


@dataclass(slots=True)
class AccessRecord:
    """What the access log and the request metrics know about one finished request."""

    method: str
    route: str
    path: str
    status: int
    duration_s: float
    bytes_in: int
    bytes_out: int
    client: str | None
    principal_id: str | None
    principal_kind: str | None
    #: Why the answer failed after its status went out (an exception's class), or None (`record_failed_response`).
    failed: str | None = None
    #: Whether the body sent falls short of the `Content-Length` the response declared (failed, or the client left).
    incomplete: bool = False
    #: Whether the client went away before the request ended (the app read `http.disconnect`).
    disconnected: bool = False


@dataclass(slots=True)
class _Counts:
    status: int
    bytes_in: int
    bytes_out: int
    request_id: str | None
    declared_length: int | None = None
    disconnected: bool = False


class AccessLogMiddleware:
    """Plain ASGI middleware: one access line per HTTP request, then each `on_complete` observer (metrics).

    It wraps the whole app, outside the request-id middleware (so 404s of unknown paths are logged too, and the
    request id is read from the response's `X-Request-Id`), and never touches a body beyond counting its bytes.
    """

    def __init__(self, app: ASGIApp, *, on_complete: Sequence[Callable[[AccessRecord], None]] = ()) -> None:
        self.app = app
        self.on_complete = tuple(on_complete)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        bytes_in = 0
        bytes_out = 0
        request_id: str | None = None
        declared_length: int | None = None
        disconnected = False

        async def counting_receive() -> ReceiveMessage:
            nonlocal bytes_in, disconnected
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            elif message["type"] == "http.disconnect":
                disconnected = True
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, bytes_out, request_id, declared_length
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    lowered = name.lower()
                    if lowered == b"x-request-id":
                        request_id = value.decode("latin-1")
                    elif lowered == b"content-length" and value.isdigit():
                        declared_length = int(value)
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            self._finish(
                scope, started, _Counts(status, bytes_in, bytes_out, request_id, declared_length, disconnected)
            )

    def _finish(self, scope: HTTPScope, started: float, counts: _Counts) -> None:
        user = scope.get("user")
        client = scope.get("client")
        record = AccessRecord(
            method=scope["method"],
            route=scope.get("path_template") or "unmatched",
            path=scope["path"],
            status=counts.status,
            duration_s=time.perf_counter() - started,
            bytes_in=counts.bytes_in,
            bytes_out=counts.bytes_out,
            client=client[0] if client else None,
            principal_id=getattr(user, "credential_id", None),
            principal_kind=getattr(user, "kind", None),
            failed=failed_response(scope),
            incomplete=(
                counts.declared_length is not None
                and scope["method"] != "HEAD"
                and counts.status not in (204, 304)
                and counts.bytes_out < counts.declared_length
            ),
            disconnected=counts.disconnected,
        )
        for observer in self.on_complete:
            observer(record)
        if not _access_logger.isEnabledFor(logging.INFO):
            return
        span_ids: tuple[str, str] | None = scope.get(_SPAN_CONTEXT_SCOPE_KEY)  # type: ignore[assignment]
        outcome: dict[str, object] = {}
        if record.failed is not None:
            outcome["failed"] = record.failed
        if record.incomplete:
            outcome["incomplete"] = True
        if record.disconnected:
            outcome["disconnected"] = True
        _access_logger.info(
            "%s %s %s%s",
            record.method,
            record.route,
            record.status,
            " (failed after the status was sent)"
            if record.failed
            else " (body incomplete)"
            if record.incomplete
            else "",
            extra={
                **outcome,
                "method": record.method,
                "route": record.route,
                "path": record.path,
                "status": record.status,
                "duration_ms": round(record.duration_s * 1000, 3),
                "bytes_in": record.bytes_in,
                "bytes_out": record.bytes_out,
                "client": record.client,
                "principal_id": record.principal_id,
                "principal_kind": record.principal_kind,
                "request_id": counts.request_id,
                "trace_id": span_ids[0] if span_ids else None,
                "span_id": span_ids[1] if span_ids else None,
            },
        )


def install_access_log(app_config: AppConfig, *, on_complete: Sequence[Callable[[AccessRecord], None]] = ()) -> None:
    """Wrap the app's outermost ASGI handler in `AccessLogMiddleware` when the app starts.

    Done at start-up because `create_app` adds the request-id middleware after the plugins ran; the access log
    must sit outside it to see routing errors (unknown path, wrong method) too.
    """

    def wrap(app: Litestar) -> None:
        if not isinstance(app.asgi_handler, AccessLogMiddleware):
            app.asgi_handler = AccessLogMiddleware(app.asgi_handler, on_complete=on_complete)

    app_config.on_startup.insert(0, wrap)
