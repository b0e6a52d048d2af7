"""Dependency probes with short timeouts: a dead dependency answers within `PROBE_TIMEOUT`, never hangs."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC

from sqlalchemy import text
from sqlalchemy.pool import QueuePool

from zkeb.core.database import VERSION_TABLE, RuntimeRoleError
from zkeb.core.migrations import schema_lacks
from zkeb.core.runtime import Runtime
from zkeb.domain.health.schemas import DatabaseCheck, RedisCheck

__all__ = ("PROBE_TIMEOUT", "HealthService")

PROBE_TIMEOUT = 1.5
#: The database's clock (the reference probe's `SELECT NOW()`) and the schema revision, in one round trip.
_PROBE_QUERY = text(f"SELECT now(), (SELECT version_num FROM {VERSION_TABLE})")  # noqa: S608 - a constant
#: What Redis answers to `PING` (redis-py reports it as `True`), shown as the reference probe shows it.
_PONG = "PONG"


class HealthService:
    """Probes the database and Redis of one running app."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def database(self) -> DatabaseCheck:
        """Connect, read the schema revision and compare it with the code's migration head."""
        started = time.perf_counter()
        head = self.runtime.schema_head
        pool = self.runtime.engine.pool
        pool_stats = (pool.size(), pool.checkedout()) if isinstance(pool, QueuePool) else (None, None)
        lacking: list[str] = []
        try:
            async with asyncio.timeout(PROBE_TIMEOUT), self.runtime.engine.connect() as connection:
                clock, revision = (await connection.execute(_PROBE_QUERY)).one()
                if revision is not None and revision not in self.runtime.schema_revisions:
                    lacking = await schema_lacks(connection)
        except TimeoutError:
            return DatabaseCheck(database="postgresql", status="unhealthy", detail="timed out", schema_head=head)
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy; the class name is enough
            return DatabaseCheck(
                database="postgresql",
                status="unhealthy",
                detail=f"unreachable ({type(exc).__name__})",
                schema_head=head,
            )
        latency = round((time.perf_counter() - started) * 1000, 2)
        check = DatabaseCheck(
            database="postgresql",
            timestamp=clock.astimezone(UTC),
            status="healthy",
            latency_ms=latency,
            schema_revision=revision,
            schema_head=head,
            pool_size=pool_stats[0],
            pool_checked_out=pool_stats[1],
        )
        if revision == head:
            return check
        if revision is not None and revision not in self.runtime.schema_revisions:
            if lacking:  # not a later release's schema: another application's database, or an unmerged branch
                check.status = "unhealthy"
                check.detail = "database schema is at a revision this release does not know and lacks its tables"
                return check
            # Migrated by a later release (this one was rolled back to, or is still draining while the next one
            # deploys): migrations are expand-only, so this release keeps working on it.
            check.detail = "database schema is ahead of this release's migrations (a later release migrated it)"
        else:
            check.status = "unhealthy"
            check.detail = "database schema is behind this release's migrations: run `zkeb db upgrade`"
        return check

    async def redis(self) -> RedisCheck:
        """PING Redis, or report `disabled` when no `REDIS_URL` is configured."""
        client = self.runtime.redis
        if client is None:
            return RedisCheck(
                cache="redis", status="disabled", detail="REDIS_URL is not set; in-process stores are used"
            )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await client.ping()
        except TimeoutError:
            return RedisCheck(cache="redis", status="unhealthy", detail="timed out")
        except Exception as exc:  # noqa: BLE001
            return RedisCheck(cache="redis", status="unhealthy", detail=f"unreachable ({type(exc).__name__})")
        latency = round((time.perf_counter() - started) * 1000, 2)
        return RedisCheck(cache="redis", status="healthy", latency_ms=latency, response=_PONG)

    async def readiness_reasons(self) -> list[str]:
        """Why this instance should not receive traffic (empty when ready)."""
        if self.runtime.draining:
            return ["draining: shutting down"]
        check = await self.database()
        if check.status != "healthy":
            return [f"database: {check.detail}"]
        try:
            await self.runtime.ensure_role_checked()
        except RuntimeRoleError as exc:
            return [str(exc)]
        except Exception as exc:  # noqa: BLE001 - a flapping database: not ready yet
            return [f"database: role check failed ({type(exc).__name__})"]
        reasons = [await check() for check in self.runtime.readiness_checks]
        return [reason for reason in reasons if reason]
