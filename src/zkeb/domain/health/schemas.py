"""Response bodies of the health domain."""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ("DependencyCheck", "HealthReport", "Liveness", "Readiness", "VersionInfo")

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


class HealthReport(msgspec.Struct):
    """Overall health: `healthy` only when every configured dependency is."""

    status: Literal["healthy", "unhealthy"]
    version: str
    uptime_seconds: float
    checks: dict[str, DependencyCheck]


class Liveness(msgspec.Struct):
    """The process is serving."""

    status: Literal["alive"] = "alive"


class Readiness(msgspec.Struct):
    """Whether this instance should receive traffic, and why not."""

    status: Literal["ready", "not_ready"]
    reasons: list[str] = msgspec.field(default_factory=list)


class VersionInfo(msgspec.Struct):
    """Build and schema information."""

    version: str
    commit: str
    build_date: str
    schema_revision: str | None
    schema_head: str | None
