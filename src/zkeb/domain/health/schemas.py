"""Response bodies of the health domain.

The database and Redis probes keep the reference deployment's fields (`database: "postgresql"` and `timestamp`;
`cache: "redis"` and `response`) beside ZKEB's own, because its deploy scripts and dashboards read them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

__all__ = (
    "DatabaseCheck",
    "DependencyCheck",
    "HealthChecks",
    "HealthReport",
    "Liveness",
    "Readiness",
    "RedisCheck",
    "VersionInfo",
)

CheckStatus = Literal["healthy", "unhealthy", "disabled"]


class DependencyCheck(msgspec.Struct, omit_defaults=True):
    """The result of probing one dependency."""

    status: CheckStatus
    latency_ms: float | None = None
    detail: str | None = None
    schema_revision: str | None = None
    schema_head: str | None = None
    pool_size: int | None = None
    pool_checked_out: int | None = None


class DatabaseCheck(DependencyCheck, kw_only=True):
    """`/api/health/db`: the dependency check, plus the reference design's `database` and `timestamp`.

    `timestamp` is the database's own clock (`now()`, RFC 3339 UTC), present whenever the database answered.
    """

    database: Literal["postgresql"]  # required, so that omitting defaults never drops it
    timestamp: datetime | None = None


class RedisCheck(DependencyCheck, kw_only=True):
    """`/api/health/redis`: the dependency check, plus the reference design's `cache` and `response`.

    `response` is Redis's reply to `PING` (`"PONG"`), present when Redis answered.
    """

    cache: Literal["redis"]  # required, so that omitting defaults never drops it
    response: str | None = None


class HealthChecks(msgspec.Struct):
    """Every dependency's check, by name."""

    database: DatabaseCheck
    redis: RedisCheck


class HealthReport(msgspec.Struct):
    """Overall health: `healthy` only when every configured dependency is."""

    status: Literal["healthy", "unhealthy"]
    version: str
    uptime_seconds: float
    checks: HealthChecks


class Liveness(msgspec.Struct):
    """The process is serving."""

    status: Literal["alive"] = "alive"


class Readiness(msgspec.Struct):
    """Whether this instance should receive traffic, and why not."""

    status: Literal["ready", "not_ready"]
    reasons: list[str] = msgspec.field(default_factory=list)
    #: Where new payloads' chunks go (`PAYLOAD_STORE`; docs/storage.md).
    payload_store: Literal["postgres", "s3"] = "postgres"


class VersionInfo(msgspec.Struct):
    """Build and schema information."""

    version: str
    commit: str
    build_date: str
    schema_revision: str | None
    schema_head: str | None
