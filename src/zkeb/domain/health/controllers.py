"""Health endpoints. None needs a credential; all are cheap and bounded by the probe timeout."""

from __future__ import annotations

import asyncio
import time

from litestar import Controller, Response, get
from litestar.datastructures import State

from zkeb.core.runtime import get_runtime
from zkeb.domain.health.schemas import (
    DatabaseCheck,
    HealthChecks,
    HealthReport,
    Liveness,
    Readiness,
    RedisCheck,
    VersionInfo,
)
from zkeb.domain.health.services import HealthService

__all__ = ("HealthController",)

_NO_STORE = {"Cache-Control": "no-store"}


def _status_code(healthy: bool) -> int:
    return 200 if healthy else 503


class HealthController(Controller):
    """Liveness, readiness and dependency probes in the reference deployment's layout."""

    path = "/api"
    tags = ["health"]  # noqa: RUF012 - Litestar's declared attribute
    security = []  # noqa: RUF012
    opt = {"exclude_from_rate_limit": True}  # noqa: RUF012

    @get("/health", summary="Overall health", description="`healthy` (200) or `unhealthy` (503) with every check.")
    async def health(self, state: State) -> Response[HealthReport]:
        """Probe every dependency."""
        runtime = get_runtime(state)
        service = HealthService(runtime)
        database, redis = await asyncio.gather(service.database(), service.redis())
        healthy = database.status == "healthy" and redis.status != "unhealthy" and not runtime.draining
        report = HealthReport(
            status="healthy" if healthy else "unhealthy",
            version=runtime.settings.version,
            uptime_seconds=round(time.monotonic() - runtime.started_at, 3),
            checks=HealthChecks(database=database, redis=redis),
        )
        return Response(report, status_code=_status_code(healthy), headers=_NO_STORE)

    @get("/health/live", summary="Liveness", description="200 while the process serves requests.")
    async def live(self) -> Response[Liveness]:
        """Answer while the event loop runs."""
        return Response(Liveness(), headers=_NO_STORE)

    @get(
        "/health/ready",
        summary="Readiness",
        description=(
            "503 with `reasons` when the database is unreachable, its schema is behind the code, stored data keys "
            "need a master key that is not configured, the S3 payload store cannot be used, or the server is "
            "draining. `payload_store` names where new payloads go."
        ),
    )
    async def ready(self, state: State) -> Response[Readiness]:
        """Whether a load balancer should route traffic here."""
        runtime = get_runtime(state)
        reasons = await HealthService(runtime).readiness_reasons()
        body = Readiness(
            status="not_ready" if reasons else "ready",
            reasons=reasons,
            payload_store=runtime.settings.payload_store.kind,
        )
        return Response(body, status_code=_status_code(not reasons), headers=_NO_STORE)

    @get(
        "/health/db",
        summary="Database probe",
        description=(
            "200 `healthy` or 503 `unhealthy` with latency, schema revision and pool usage; `database` is always "
            "`postgresql` and `timestamp` the database's clock (RFC 3339 UTC) whenever it answered, as in the "
            "reference deployment."
        ),
    )
    async def database(self, state: State) -> Response[DatabaseCheck]:
        """Connectivity, latency, the database's clock, schema revision and pool usage."""
        check = await HealthService(get_runtime(state)).database()
        return Response(check, status_code=_status_code(check.status == "healthy"), headers=_NO_STORE)

    @get(
        "/health/redis",
        summary="Redis probe",
        description=(
            '200 `healthy` with `response: "PONG"` (Redis\'s answer), 503 `unhealthy`, or `disabled` (200) when no '
            "Redis is configured; `cache` is always `redis`, as in the reference deployment."
        ),
    )
    async def redis(self, state: State) -> Response[RedisCheck]:
        """PING latency."""
        check = await HealthService(get_runtime(state)).redis()
        return Response(check, status_code=_status_code(check.status != "unhealthy"), headers=_NO_STORE)

    @get("/version", summary="Version", description="Version, commit, build date and database schema revision.")
    async def version(self, state: State) -> VersionInfo:
        """Build metadata and the schema revision the database is at."""
        runtime = get_runtime(state)
        check = await HealthService(runtime).database()
        settings = runtime.settings
        return VersionInfo(
            version=settings.version,
            commit=settings.commit,
            build_date=settings.build_date,
            schema_revision=check.schema_revision,
            schema_head=runtime.schema_head,
        )
