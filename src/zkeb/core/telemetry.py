"""OpenTelemetry tracing, configured only through the standard `OTEL_*` variables.

Tracing is **off** unless asked for: with no `OTEL_TRACES_EXPORTER` and no `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`..._TRACES_ENDPOINT`), no tracer provider is installed, no instrumentation is added, and the OpenTelemetry API stays
the no-op it is by default. Every request still has a W3C trace context (`ServerSpanMiddleware` without a tracer,
a few µs): an incoming `traceparent`'s trace id, or a new one, in the logs, in problem+json bodies and in
`traceresponse`, so requests correlate across services whether or not this one exports spans.

When on:
- `OTEL_TRACES_EXPORTER`: `otlp` (the default once an OTLP endpoint is set), `console` (spans as JSON on
  stdout, for development), or both (`otlp,console`); `none` turns tracing off.
- `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`: `http/protobuf` (default) or `grpc`. Endpoint, headers, timeout,
  compression and certificates are read by the official exporters from `OTEL_EXPORTER_OTLP_[TRACES_]*`.
- `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` name the service (default `zkeb-api`; `service.version` and
  `deployment.environment.name` come from the settings unless given); `OTEL_TRACES_SAMPLER[_ARG]` pick the
  sampler (SDK default `parentbased_always_on`); `OTEL_BSP_*` tune the batch processor; `OTEL_SDK_DISABLED=true`
  wins over everything.
- `OTEL_PYTHON_EXCLUDED_URLS` (or `OTEL_PYTHON_LITESTAR_EXCLUDED_URLS`, the name Litestar's own OpenTelemetry
  plugin reads): comma-separated regular expressions searched in each request's URL, as the contrib ASGI
  middleware does (e.g. `/api/health/` keeps load-balancer probes out of the traces). A matching request makes no
  spans at all.

Per request: a server span from `ServerSpanMiddleware` (named `METHOD /route/{template}`, W3C `traceparent`
honoured, `traceresponse` header returned), client spans from the official SQLAlchemy (statement
text only, never parameters) and Redis (command names only) instrumentations, and whatever child spans the
domains open with `trace.get_tracer("zkeb.<domain>")`. The trace id goes into `trace_id_var` (problem+json
bodies) and the access log. Spans are flushed when the app shuts down (granian's SIGTERM included).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry import context, propagate, trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.instrumentation.sqlalchemy.version import __version__ as sqlalchemy_instrumentation_version
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.semconv.attributes.http_attributes import HTTP_ROUTE
from opentelemetry.trace import (
    SpanKind,
    Status,
    StatusCode,
    format_span_id,
    format_trace_id,
)
from opentelemetry.util.http import ExcludeList, get_excluded_urls, parse_excluded_urls
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.errors import failed_response, span_id_var, trace_id_var
from zkeb.lib.httpmethods import OTHER_METHOD, method_label
from zkeb.lib.redaction import redact
from zkeb.settings import Settings, SettingsError

__all__ = (
    "DEFAULT_SERVICE_NAME",
    "SPAN_CONTEXT_SCOPE_KEY",
    "TracingConfig",
    "active_tracer_provider",
    "install_tracer_provider",
    "instrument_app",
    "setup_tracing",
    "uninstall_tracer_provider",
)

logger = logging.getLogger("zkeb.telemetry")

DEFAULT_SERVICE_NAME = "zkeb-api"
#: Key in the ASGI scope under which the server span's `(trace_id, span_id)` (hex) are kept for the access log.
SPAN_CONTEXT_SCOPE_KEY = "zkeb.trace"
_EXPORTERS = frozenset({"otlp", "console", "none"})
_PROTOCOLS = frozenset({"http/protobuf", "grpc"})
_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """What the `OTEL_*` variables ask for."""

    exporters: tuple[str, ...]
    protocol: str = "http/protobuf"

    @property
    def enabled(self) -> bool:
        """Whether any exporter is configured."""
        return bool(self.exporters)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TracingConfig:
        """Read the standard variables (default: `os.environ`).

        Raises:
            SettingsError: an unknown exporter or protocol, or gRPC asked for without the `grpc` extra installed;
                the message names the variable.
        """
        env = os.environ if environ is None else environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
            return cls(exporters=())
        raw = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        if not raw:
            has_endpoint = any(env.get(n, "").strip() for n in _ENDPOINT_VARS)
            raw = "otlp" if has_endpoint else "none"
        names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
        unknown = [n for n in names if n not in _EXPORTERS]
        if unknown:
            msg = f"OTEL_TRACES_EXPORTER must be otlp, console or none (got {', '.join(unknown)!r})"
            raise SettingsError(msg)
        protocol_var = next((n for n in _PROTOCOL_VARS if env.get(n, "").strip()), None)
        protocol = env.get(protocol_var, "").strip().lower() if protocol_var else "http/protobuf"
        if protocol not in _PROTOCOLS:
            msg = f"{protocol_var} must be http/protobuf or grpc (got {protocol!r})"
            raise SettingsError(msg)
        config = cls(exporters=tuple(n for n in names if n != "none"), protocol=protocol)
        if "otlp" in config.exporters and protocol == "grpc" and not _grpc_exporter_installed():
            msg = (
                f"{protocol_var}=grpc needs the gRPC exporter, which is the optional 'grpc' extra "
                "(zkeb[grpc]; for the image: --build-arg EXTRAS=grpc); the default http/protobuf needs nothing more"
            )
            raise SettingsError(msg)
        if "otlp" in config.exporters and protocol == "http/protobuf":
            _check_http_endpoints(env)
        if config.enabled:
            _check_sampler(env)
            _check_excluded_urls(env)
        return config


#: The samplers the SDK builds from `OTEL_TRACES_SAMPLER` (any other name falls back, with a warning, to sampling
#: every request: the costly mode, see docs/observability.md).
_SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)


def _check_sampler(env: Mapping[str, str]) -> None:
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler and sampler not in _SAMPLERS:
        msg = f"OTEL_TRACES_SAMPLER must be one of {', '.join(sorted(_SAMPLERS))} (got {sampler!r})"
        raise SettingsError(msg)
    raw = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if sampler.endswith("traceidratio") and raw:  # unset: the SDK's default ratio, 1.0
        try:
            ratio = float(raw)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            msg = f"OTEL_TRACES_SAMPLER_ARG must be a ratio between 0 and 1 for {sampler} (got {raw!r})"
            raise SettingsError(msg)


def _check_excluded_urls(env: Mapping[str, str]) -> None:
    for name in ("OTEL_PYTHON_LITESTAR_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS"):
        try:
            parse_excluded_urls(env.get(name, ""))  # as the middleware will, so a bad pattern fails here, once
        except re.error as exc:
            msg = f"{name} must be comma-separated regular expressions ({exc})"
            raise SettingsError(msg) from None


_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def _check_http_endpoints(env: Mapping[str, str]) -> None:
    """OTLP over HTTP needs URLs: `host:4318` without a scheme started, then lost every batch (logged per batch)."""
    for name in _ENDPOINT_VARS:
        value = env.get(name, "").strip()
        if value and urlsplit(value).scheme not in {"http", "https"}:
            msg = f"{name} must be an http:// or https:// URL for OTLP over HTTP (got {value!r})"
            raise SettingsError(msg)


def _grpc_exporter_installed() -> bool:
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401, PLC0415 - only whether it is installed
    except ImportError:
        return False
    return True


def _otlp_exporter(protocol: str) -> SpanExporter:
    # Imported on demand: the gRPC exporter (the `grpc` extra) pulls in grpcio, which only its users should pay for.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter as GrpcSpanExporter,
        )

        return GrpcSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

    return OTLPSpanExporter()


def _resource(settings: Settings) -> Resource:
    from_env = OTELResourceDetector().detect().attributes
    defaults: dict[str, Any] = {
        "service.name": DEFAULT_SERVICE_NAME,
        "service.version": settings.version,
        "deployment.environment.name": settings.env,
    }
    # The environment wins over our defaults (Resource.create would let explicit attributes win instead).
    return Resource.create({**defaults, **dict(from_env)})


@dataclass(slots=True)
class _TracingState:
    provider: TracerProvider
    owned: bool


_state: _TracingState | None = None


def install_tracer_provider(provider: TracerProvider, *, owned: bool = False) -> None:
    """Make `provider` the one ZKEB apps created from now on instrument with (and the global one if none is).

    The OpenTelemetry API lets the global provider be set once per process; a later call here still changes
    what new apps use, but spans opened through the global API keep going to the first provider.
    """
    global _state  # noqa: PLW0603 - tracing is process-wide by nature
    _state = _TracingState(provider=provider, owned=owned)
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(provider)


def uninstall_tracer_provider() -> None:
    """Stop instrumenting apps created from now on (already-built apps keep their instrumentation)."""
    global _state  # noqa: PLW0603
    _state = None


def active_tracer_provider() -> TracerProvider | None:
    """The provider ZKEB instruments with, or None when tracing is off."""
    return _state.provider if _state else None


def setup_tracing(settings: Settings, environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Create the process's tracer provider from the `OTEL_*` variables, once; None when tracing is off.

    Raises:
        SettingsError: a tracing variable is invalid.
    """
    if _state is not None:
        return _state.provider
    config = TracingConfig.from_env(environ)
    if not config.enabled:
        return None
    provider = TracerProvider(resource=_resource(settings))
    processors: list[SpanProcessor] = []
    if "otlp" in config.exporters:
        processors.append(BatchSpanProcessor(_otlp_exporter(config.protocol)))
    if "console" in config.exporters:
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
    for processor in processors:
        provider.add_span_processor(processor)
    install_tracer_provider(provider, owned=True)
    logger.info(
        "tracing on",
        extra={"exporters": ",".join(config.exporters), "protocol": config.protocol},
    )
    return provider


class ServerSpanMiddleware:
    """Plain ASGI middleware: one SERVER span per HTTP request, as lean as the SDK allows.

    It does what Litestar's OpenTelemetry plugin (the contrib ASGI middleware) does for ZKEB's needs: continue
    an incoming W3C `traceparent` (through the global propagator, `OTEL_PROPAGATORS`), name the span
    `METHOD /route/{template}` once routing has run, record method, path, scheme, route and status (5xx marks the
    span as an error), add `traceresponse`, and expose the trace id to problem+json bodies and the access log.
    The contrib middleware cost several times more per request (see bench/tracing.py), which is why this exists.

    With no `tracer` (tracing off) each request still gets its trace context, without an SDK span: the incoming
    `traceparent`'s trace id or a new random one, and a span id of its own, not sampled (flags `00`).
    """

    def __init__(self, app: ASGIApp, tracer: trace.Tracer | None, excluded: ExcludeList | None = None) -> None:
        self.app = app
        self.tracer = tracer
        self.excluded = excluded or ExcludeList(())
        self.ids = RandomIdGenerator()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        carrier, host = _read_headers(scope)
        if self.tracer is None:
            await self._context_only(scope, receive, send, carrier)
            return
        if self.excluded.url_disabled(f"{scope.get('scheme', 'http')}://{host}{scope['path']}"):
            await self._untraced(scope, receive, send)
            return
        method = method_label(scope["method"])
        span = self._start_span(self.tracer, scope, carrier, scope["method"], host)
        span_context = span.get_span_context()
        trace_id = format_trace_id(span_context.trace_id)
        span_id = format_span_id(span_context.span_id)
        cast("dict[str, Any]", scope)[SPAN_CONTEXT_SCOPE_KEY] = (trace_id, span_id)
        traceresponse = f"00-{trace_id}-{span_id}-{int(span_context.trace_flags):02x}".encode()
        status = 0

        async def send_with_traceresponse(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"traceresponse", traceresponse)]
            await send(message)

        span_context_ctx = trace.set_span_in_context(span)
        if not span.is_recording():
            # Not sampled: every parent-based sampler (and a trace-id ratio one, which decides alike for the whole
            # trace) drops this request's child spans anyway, so the client instrumentations (SQLAlchemy, Redis) are
            # told to skip their per-call work, as the SDK's own exporters do for theirs.
            span_context_ctx = context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True, span_context_ctx)
        context_token = context.attach(span_context_ctx)
        trace_token = trace_id_var.set(trace_id)
        try:
            await self.app(scope, receive, send_with_traceresponse)
        except Exception as exc:
            if span.is_recording():
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            if span.is_recording():
                _record_outcome(span, method, scope.get("path_template"), status)
                if (failed := failed_response(scope)) is not None:
                    # The status went out, then the body failed: an error whatever the status (HTTP conventions).
                    span.set_attribute("error.type", failed)
                    span.set_status(Status(StatusCode.ERROR, f"the response failed after its status: {failed}"))
            span.end()
            trace_id_var.reset(trace_token)
            context.detach(context_token)

    async def _context_only(self, scope: Scope, receive: Receive, send: Send, carrier: dict[str, str] | None) -> None:
        """Tracing off: the request's trace context without the OpenTelemetry context machinery.

        The incoming `traceparent`'s trace id (or a new one) and a span id of this server's, not sampled, go to the
        scope (access log), the context variables (problem+json bodies, log lines) and `traceresponse`; nothing
        is attached to OpenTelemetry's context, which no instrumentation reads when tracing is off.
        """
        parent = trace.get_current_span(propagate.extract(carrier)).get_span_context() if carrier else None
        trace_id = parent.trace_id if parent is not None and parent.is_valid else self.ids.generate_trace_id()
        trace_hex, span_hex = format_trace_id(trace_id), format_span_id(self.ids.generate_span_id())
        cast("dict[str, Any]", scope)[SPAN_CONTEXT_SCOPE_KEY] = (trace_hex, span_hex)
        traceresponse = f"00-{trace_hex}-{span_hex}-00".encode()

        async def send_with_traceresponse(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"traceresponse", traceresponse)]
            await send(message)

        trace_token, span_token = trace_id_var.set(trace_hex), span_id_var.set(span_hex)
        try:
            await self.app(scope, receive, send_with_traceresponse)
        finally:
            span_id_var.reset(span_token)
            trace_id_var.reset(trace_token)

    @staticmethod
    def _start_span(
        tracer: trace.Tracer, scope: Scope, carrier: dict[str, str] | None, original_method: str, host: str
    ) -> trace.Span:
        parent_context = propagate.extract(carrier) if carrier else None
        method = method_label(original_method)
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "url.path": redact(scope["path"]),  # as the access log writes it
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        if query := scope.get("query_string", b""):
            attributes["url.query"] = redact(query.decode("latin-1"))
        address, port = _host_and_port(host)
        if address:
            attributes["server.address"] = address
            if port is not None:
                attributes["server.port"] = port
        if client := scope.get("client"):  # the socket's peer (behind a proxy, the proxy)
            attributes["network.peer.address"], attributes["network.peer.port"] = client[0], client[1]
        for name, value in scope["headers"]:
            if name == b"user-agent":
                attributes["user_agent.original"] = redact(value.decode("latin-1"))
                break
        if method == OTHER_METHOD:
            attributes["http.request.method_original"] = redact(original_method)
        span_name = "HTTP" if method == OTHER_METHOD else method  # low-cardinality, as HTTP conventions ask
        return tracer.start_span(span_name, context=parent_context, kind=SpanKind.SERVER, attributes=attributes)

    async def _untraced(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Excluded (OTEL_PYTHON_[LITESTAR_]EXCLUDED_URLS): no server span, and no client spans either, which would
        # otherwise each start a trace of their own.
        token = context.attach(context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            await self.app(scope, receive, send)
        finally:
            context.detach(token)


_PROPAGATION_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})


def _read_headers(scope: Scope) -> tuple[dict[str, str] | None, str]:
    """The trace-propagation headers (None when there are none) and the Host header."""
    carrier: dict[str, str] | None = None
    host = ""
    for name, value in scope["headers"]:
        if name in _PROPAGATION_HEADERS:
            carrier = carrier or {}
            carrier[name.decode("latin-1")] = value.decode("latin-1")
        elif name == b"host":
            host = value.decode("latin-1")
    return carrier, host


def _host_and_port(host: str) -> tuple[str, int | None]:
    """The `Host` header's name or address and its port, if it names one (`[::1]:3000`, `example.com`)."""
    name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if not name or not port.isdigit():
        name, port = host, ""
    return name.strip("[]"), int(port) if port else None


def _record_outcome(span: trace.Span, method: str, template: str | None, status: int) -> None:
    """Name the span after the route template and record the response status (5xx is an error, its `error.type`
    the status code, as HTTP semantic conventions say when no exception reached the span)."""
    if template:
        span.update_name(f"{'HTTP' if method == OTHER_METHOD else method} {template}")
        span.set_attribute(HTTP_ROUTE, template)
    if status:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            if not (getattr(span, "attributes", None) or {}).get("error.type"):  # a handler may have named the cause
                span.set_attribute("error.type", str(status))
            span.set_status(Status(StatusCode.ERROR))


def _wrap_at_startup(app_config: AppConfig, middleware: Callable[[ASGIApp], ASGIApp]) -> None:
    """Make `middleware` the app's outermost ASGI layer, once, when the app starts.

    At start-up, so that it wraps the request-id and security-header middleware that `create_app` adds after the
    plugins ran: routing errors (404, 405) and every log line of the request then carry the trace id too.
    """

    def wrap(app: Litestar) -> None:
        if not isinstance(app.asgi_handler, ServerSpanMiddleware):
            app.asgi_handler = middleware(app.asgi_handler)

    app_config.on_startup.insert(0, wrap)


def instrument_app(
    app_config: AppConfig, settings: Settings, engine: AsyncEngine, redis: Redis | None
) -> TracerProvider | None:
    """Add server spans, database and Redis client spans, and span flushing on shutdown when tracing is on.

    Returns:
        The tracer provider in use, or None when tracing is off (then `ServerSpanMiddleware` only sets each
        request's trace context).
    """
    provider = setup_tracing(settings)
    if provider is None:
        _wrap_at_startup(app_config, lambda app: ServerSpanMiddleware(app, None))
        return None
    server_tracer = trace.get_tracer("zkeb.http", settings.version, tracer_provider=provider)
    _wrap_at_startup(app_config, lambda app: ServerSpanMiddleware(app, server_tracer, get_excluded_urls("LITESTAR")))
    tracer = trace.get_tracer(
        "opentelemetry.instrumentation.sqlalchemy", sqlalchemy_instrumentation_version, tracer_provider=provider
    )
    meter = NoOpMeterProvider().get_meter("zkeb")
    EngineTracer(  # type: ignore[no-untyped-call]
        tracer, engine.sync_engine, meter.create_up_down_counter("db.client.connections.usage")
    )
    if redis is not None:
        RedisInstrumentor.instrument_client(redis, tracer_provider=provider)

    async def flush_spans() -> None:
        await asyncio.to_thread(provider.force_flush, 5000)

    app_config.on_shutdown.append(flush_spans)
    return provider
