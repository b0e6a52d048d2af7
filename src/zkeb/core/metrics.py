"""Prometheus metrics and the `/metrics` endpoint.

Exposure: `/metrics` is **not public by default**. Either
- `METRICS_TOKEN` is set: `GET /metrics` on the API port answers to `Authorization: Bearer <METRICS_TOKEN>`
  (401 otherwise), or
- `METRICS_PORT` is set: `zkeb serve` serves `/metrics` on that port (bind it to a private network only),
  and `/metrics` on the API port answers 404 unless a token is also set.
With neither, `/metrics` answers 404.

Several granian workers: `zkeb serve` points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory whenever it runs
more than one worker or `METRICS_PORT` is set (a worker is a separate process even when alone), so every
scrape aggregates every worker (prometheus_client's multiprocess mode). Set it yourself to choose the directory;
it must be empty at start and writable.

Domains define their own metric objects beside their code (e.g. `zkeb.domain.backups.metrics`), in the same
default registry, and register in `Runtime.metric_samplers` the gauges they sample from the database; this module
records request, pool and process metrics, and runs the samplers before a scrape (and every 15 s in multiprocess
mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from litestar import Controller, Request, Response, get
from litestar.config.app import AppConfig
from litestar.datastructures import State
from litestar.exceptions import NotAuthorizedException
from litestar.openapi.spec import Components, SecurityScheme
from opentelemetry.instrumentation.utils import suppress_instrumentation
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from zkeb.core.auth import bearer_credential
from zkeb.core.errors import NotFoundError
from zkeb.core.logging import AccessRecord
from zkeb.core.runtime import Runtime, get_runtime
from zkeb.lib.httpmethods import method_label
from zkeb.prometheus_multiprocess import multiprocess_dir
from zkeb.settings import Settings

__all__ = (
    "DB_CONNECTIONS_OPENED",
    "METRICS_SECURITY_SCHEME",
    "MetricsController",
    "install_metrics",
    "observe_request",
    "render_metrics",
    "serve_metrics_for_workers",
    "start_metrics_listener",
)

logger = logging.getLogger("zkeb.metrics")

METRICS_SECURITY_SCHEME = "MetricsToken"

# --- HTTP -------------------------------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "zkeb_http_requests_total", "HTTP requests answered, by route template and status.", ["method", "route", "status"]
)
HTTP_REQUEST_DURATION = Histogram(
    "zkeb_http_request_duration_seconds",
    "Time from request start to the last response byte, by route template and status.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
HTTP_REQUEST_BYTES = Counter("zkeb_http_request_body_bytes_total", "Request body bytes received.", ["route"])
HTTP_RESPONSE_BYTES = Counter("zkeb_http_response_body_bytes_total", "Response body bytes sent.", ["route"])
HTTP_RESPONSES_FAILED = Counter(
    "zkeb_http_responses_failed_total",
    "Answers that failed after their status was sent (a body cut short by a server fault), by route template.",
    ["route"],
)

# --- dependencies -----------------------------------------------------------------------------------------------
DB_POOL_IN_USE = Gauge(
    "zkeb_db_pool_connections_in_use", "Database connections checked out of the pool.", multiprocess_mode="livesum"
)
DB_POOL_SIZE = Gauge("zkeb_db_pool_size", "Configured pool size (DB_POOL_SIZE).", multiprocess_mode="livesum")
DB_POOL_MAX = Gauge(
    "zkeb_db_pool_connections_max",
    "Most connections the pool may open (the pool is fixed: its size).",
    multiprocess_mode="livesum",
)
DB_CONNECTIONS_OPENED = Counter(
    "zkeb_db_connections_opened_total", "Database connections the request pool has opened (logins; churn shows here)."
)

# --- process ------------------------------------------------------------------------------------------------------
PROCESS_MEMORY = Gauge(
    "zkeb_process_resident_memory_bytes", "Resident memory of the serving processes.", multiprocess_mode="livesum"
)
PROCESS_CPU = Counter("zkeb_process_cpu_seconds_total", "CPU time (user + system) of the serving processes.")
CPU_LIMIT = Gauge(
    "zkeb_cpu_limit_cores",
    "CPUs the service may use: its cgroup quota, else the CPUs it may run on (the CPU alert's denominator).",
    multiprocess_mode="livemax",
)
BUILD_INFO = Gauge(
    "zkeb_build_info", "Version and commit of the running build.", ["version", "commit"], multiprocess_mode="max"
)

#: How many label combinations are kept resolved.
_SERIES_CACHE_SIZE = 4096
_series_cache: dict[tuple[Any, ...], Any] = {}


def _series(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, resolved once: `labels()` takes a lock and validates on every call."""
    key = (metric, *labels)
    series = _series_cache.get(key)
    if series is None:
        if len(_series_cache) >= _SERIES_CACHE_SIZE:
            _series_cache.clear()
        series = _series_cache[key] = metric.labels(*labels)
    return series


def observe_request(record: AccessRecord) -> None:
    """Record one finished request (an access-log observer)."""
    status, method = str(record.status), method_label(record.method)
    _series(HTTP_REQUESTS, method, record.route, status).inc()
    _series(HTTP_REQUEST_DURATION, method, record.route, status).observe(record.duration_s)
    if record.bytes_in:
        _series(HTTP_REQUEST_BYTES, record.route).inc(record.bytes_in)
    if record.bytes_out:
        _series(HTTP_RESPONSE_BYTES, record.route).inc(record.bytes_out)
    if record.failed is not None:
        _series(HTTP_RESPONSES_FAILED, record.route).inc()


class _ProcessSampler:
    """Resident memory and CPU time of this process, from /proc when available."""

    def __init__(self) -> None:
        self._cpu_seen = 0.0
        self._page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def sample(self) -> None:
        times = os.times()
        cpu = times.user + times.system
        if cpu > self._cpu_seen:
            PROCESS_CPU.inc(cpu - self._cpu_seen)
            self._cpu_seen = cpu
        PROCESS_MEMORY.set(self._resident_bytes())

    def _resident_bytes(self) -> int:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(Path("/proc/self/statm").read_text().split()[1]) * self._page_size
        import resource  # noqa: PLC0415 - only where /proc is missing

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_sampler = _ProcessSampler()


def available_cpus() -> float:
    """CPUs this process may use: the cgroup v2 quota when one is set (containers), else the CPUs it may run on."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
    if hasattr(os, "sched_getaffinity"):
        return float(len(os.sched_getaffinity(0)))
    return float(os.cpu_count() or 1)


def render_metrics() -> bytes:
    """The Prometheus text exposition: this process's registry, or every worker's in multiprocess mode."""
    _sampler.sample()
    if multiprocess_dir():
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


async def _run_samplers(samplers: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Each domain's database-sampled gauges, each within 2 s: a scrape answers even when the database does not."""
    for sampler in samplers:
        try:
            async with asyncio.timeout(2):
                await sampler()
        except Exception as exc:  # noqa: BLE001 - the gauge keeps its last value
            logger.debug(
                "could not sample a gauge", extra={"sampler": sampler.__qualname__, "error": type(exc).__name__}
            )


def _bearer_matches(request: Request[Any, Any, Any], token: str) -> bool:
    credential = bearer_credential(request.headers.get("authorization", ""))
    return credential is not None and hmac.compare_digest(credential.encode(), token.encode())


class MetricsController(Controller):
    """`GET /metrics`: Prometheus text behind `METRICS_TOKEN`."""

    path = "/metrics"
    tags = ["observability"]  # noqa: RUF012 - Litestar's declared attribute
    security = [{METRICS_SECURITY_SCHEME: []}]  # noqa: RUF012
    opt = {"exclude_from_auth": True, "exclude_from_rate_limit": True}  # noqa: RUF012
    include_in_schema = True

    @get(
        "/",
        summary="Prometheus metrics",
        description=(
            "Prometheus text exposition format. Answers only to `Authorization: Bearer <METRICS_TOKEN>`; "
            "404 when `METRICS_TOKEN` is not set (then metrics are served on `METRICS_PORT` only, if at all)."
        ),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )
    async def metrics(self, request: Request[Any, Any, Any], state: State) -> Response[bytes]:
        """Render every metric of every worker."""
        runtime = get_runtime(state)
        token = runtime.settings.metrics_token
        if not token:
            raise NotFoundError("metrics are not served on this port")
        if not _bearer_matches(request, token):
            raise NotAuthorizedException(
                "metrics need 'Authorization: Bearer <METRICS_TOKEN>'", headers={"WWW-Authenticate": "Bearer"}
            )
        await _run_samplers(runtime.metric_samplers)
        body = await asyncio.to_thread(render_metrics)
        return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


def _watch_pool(engine: AsyncEngine) -> None:
    pool = engine.sync_engine.pool
    if not isinstance(pool, QueuePool):
        return
    DB_POOL_SIZE.set(pool.size())
    DB_POOL_MAX.set(pool.size())

    def checked_out(*_: Any) -> None:
        DB_POOL_IN_USE.set(pool.checkedout())

    def checked_in(*_: Any) -> None:
        # SQLAlchemy fires `checkin` before the connection is back in the pool: it still counts as checked out.
        DB_POOL_IN_USE.set(max(pool.checkedout() - 1, 0))

    def opened(*_: Any) -> None:
        DB_CONNECTIONS_OPENED.inc()

    event.listen(pool, "checkout", checked_out)
    event.listen(pool, "checkin", checked_in)
    event.listen(pool, "connect", opened)


def install_metrics(app_config: AppConfig, runtime: Runtime) -> None:
    """Add `/metrics`, pool gauges and, in multiprocess mode, a sampler that keeps this worker's gauges fresh."""
    settings = runtime.settings
    app_config.route_handlers.append(MetricsController)
    _watch_pool(runtime.engine)
    BUILD_INFO.labels(version=settings.version, commit=settings.commit).set(1)
    CPU_LIMIT.set(available_cpus())
    sampler: asyncio.Task[None] | None = None

    async def sample_forever() -> None:
        while True:
            _sampler.sample()
            with suppress_instrumentation():  # a poll: its statements would each be a trace of their own
                await _run_samplers(runtime.metric_samplers)
            await asyncio.sleep(15)

    async def start_sampler() -> None:
        nonlocal sampler
        # Only multiprocess mode needs it: otherwise each scrape samples its own process.
        if multiprocess_dir():
            sampler = asyncio.get_running_loop().create_task(sample_forever())

    async def stop_sampler() -> None:
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        if multiprocess_dir():
            prometheus_multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    app_config.on_startup.append(start_sampler)
    app_config.on_shutdown.append(stop_sampler)
    components = app_config.openapi_config.components if app_config.openapi_config else None
    if isinstance(components, Components) and components.security_schemes is not None:
        components.security_schemes[METRICS_SECURITY_SCHEME] = SecurityScheme(
            type="http", scheme="bearer", description="`METRICS_TOKEN`, for Prometheus scrapes of `/metrics`."
        )


def start_metrics_listener(host: str, port: int) -> None:
    """Serve every worker's metrics on `host:port` from a daemon thread (the `zkeb serve` parent process).

    Requires multiprocess mode (`prepare_multiprocess_dir`).
    """
    from prometheus_client import start_http_server  # noqa: PLC0415

    registry = CollectorRegistry()
    prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)


def serve_metrics_for_workers(settings: Settings, host: str) -> None:
    """`zkeb serve`, before granian starts: the `METRICS_PORT` listener, if configured.

    `zkeb.prometheus_multiprocess.prepare_multiprocess_dir` must have run before this module was imported.
    """
    if settings.metrics_port is not None:
        start_metrics_listener(host, settings.metrics_port)
        logger.info("metrics on a private port", extra={"port": settings.metrics_port, "path": "/metrics"})
