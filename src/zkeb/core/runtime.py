"""What one running app holds: settings, the database engine, the Redis client and its lifecycle flags."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from advanced_alchemy.extensions.litestar import SQLAlchemyAsyncConfig
from litestar.datastructures import State
from opentelemetry.instrumentation.utils import suppress_instrumentation
from redis.asyncio import Redis
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.audit_linker import AuditLinker
from zkeb.core.database import check_runtime_role, sqlalchemy_config
from zkeb.core.migrations import head_revision, known_revisions, provision_runtime_login, run_alembic
from zkeb.settings import Settings

__all__ = ("Runtime", "get_runtime")

logger = logging.getLogger("zkeb.runtime")


@dataclass
class Runtime:
    """The process-wide resources of one app instance, kept in `app.state.runtime`."""

    settings: Settings
    database_url: str
    engine: AsyncEngine
    redis: Redis | None
    schema_head: str | None = field(default_factory=head_revision)
    #: Every revision this release's migrations know; a database at another one is ahead of it.
    schema_revisions: frozenset[str] = field(default_factory=known_revisions)
    started_at: float = field(default_factory=time.monotonic)
    draining: bool = False
    role_checked: bool = False
    #: Domains' own readiness conditions: each answers why this process is not ready, or None.
    readiness_checks: list[Callable[[], Awaitable[str | None]]] = field(default_factory=list)
    #: Domains' own gauges sampled from the database before a scrape (see `zkeb.core.metrics`).
    metric_samplers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: Domains' own parts of the OpenAPI document, each completing it in place (see `zkeb.core.openapi`).
    openapi_additions: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    #: Links the audit events that busy transactions leave unchained (see `zkeb.core.audit_linker`).
    audit_linker: AuditLinker = field(init=False)
    #: advanced-alchemy's configuration around `engine`: it provides each request's `db_session`.
    db_config: SQLAlchemyAsyncConfig = field(init=False)

    def __post_init__(self) -> None:
        """The audit linker and the request sessions work through the app's engine."""
        self.audit_linker = AuditLinker(self.engine)
        self.db_config = sqlalchemy_config(self.engine)

    async def startup(self) -> None:
        """Migrate when configured to, then refuse to serve unless row-level security cannot be bypassed.

        A database that is unreachable at start is not fatal: readiness answers 503 and the role check
        runs once the database answers. A role that could bypass row-level security is fatal.
        """
        if self.settings.auto_migrate:
            await asyncio.to_thread(run_alembic, self.settings, self.database_url, "upgrade", "head")
        try:
            try:
                with suppress_instrumentation():  # start-up's own statements: no trace of their own
                    await self.ensure_role_checked()
            except DBAPIError as exc:
                if _sqlstate(exc) not in _LOGIN_REFUSED:
                    raise
                # First start against this server, or the owner's credentials changed: (re)set the password.
                await provision_runtime_login(self.settings, self.database_url)
                await self.ensure_role_checked()
        except (OSError, TimeoutError, DBAPIError) as exc:
            if isinstance(exc, DBAPIError) and not exc.connection_invalidated and not _is_connect_error(exc):
                raise
            logger.warning("database unreachable at start (%s); readiness answers 503 until it is", type(exc).__name__)
        self.audit_linker.start()

    async def ensure_role_checked(self) -> None:
        """Run the runtime-role self-check once per process.

        Raises:
            RuntimeRoleError: the role could bypass tenant isolation.
        """
        if self.role_checked:
            return
        async with asyncio.timeout(5), self.engine.connect() as connection:
            await check_runtime_role(connection)
        self.role_checked = True

    async def shutdown(self) -> None:
        """Stop answering ready, link the audit events still waiting, then release the pools."""
        self.draining = True
        await self.audit_linker.stop()
        if self.redis is not None:
            await self.redis.aclose()
        await self.engine.dispose()


_LOGIN_REFUSED = frozenset({"28P01", "28000"})  # invalid_password, invalid_authorization_specification


def _sqlstate(exc: DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


def _is_connect_error(exc: DBAPIError) -> bool:
    return isinstance(exc.orig, OSError) or "connect" in type(exc.orig).__name__.lower()


def get_runtime(state: State) -> Runtime:
    """The app's `Runtime` from its state."""
    runtime: Runtime = state.runtime
    return runtime
