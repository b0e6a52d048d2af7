"""Registers the audit domain: its routes and the periodic chain-head log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.plugins import InitPluginProtocol
from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.errors import database_connection_lost, database_timed_out
from zkeb.core.runtime import get_runtime
from zkeb.domain.audit.controllers import AuditController
from zkeb.domain.audit.services import log_chain_heads

__all__ = ("AuditPlugin", "ChainHeadLogger")

logger = logging.getLogger("zkeb.audit")

_TAG = {"name": "audit", "description": "The hash-chained audit log (org admin)."}

#: How often every organization's chain head is logged (seconds).
HEAD_LOG_INTERVAL_SECONDS = 900.0


def _add_audit_openapi(document: dict[str, Any]) -> None:
    document["tags"].append(dict(_TAG))


class ChainHeadLogger:
    """Logs every chain head every `interval` seconds and once at shutdown, for anchoring outside the database.

    Each worker process logs; the lines are identical apart from timing, so duplicates are harmless.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    async def log_once(engine: AsyncEngine) -> None:
        """Log every chain head now; a database that cannot be reached is one warning line, not a traceback."""
        try:
            with suppress_instrumentation():  # a periodic log line, not a trace of one statement
                await log_chain_heads(engine)
        except Exception as exc:
            if database_connection_lost(exc) or database_timed_out(exc):  # the database is down: one line says so
                logger.warning("could not log audit chain heads: the database is unreachable (%s)", type(exc).__name__)
            else:
                logger.warning("could not log audit chain heads", exc_info=True)

    async def _run(self, app: Litestar) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.log_once(get_runtime(app.state).engine)

    async def start(self, app: Litestar) -> None:
        """Start the periodic task (startup hook)."""
        if get_runtime(app.state).settings.enable_audit_logs and self.interval > 0:
            self._task = asyncio.create_task(self._run(app), name="zkeb-audit-head-logger")

    async def stop(self, app: Litestar) -> None:
        """Stop the task and log the heads one last time (shutdown hook, before the engine is disposed).

        The process's audit linker stops first, so the heads logged include the events it linked last.
        """
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        await get_runtime(app.state).audit_linker.stop()
        await self.log_once(get_runtime(app.state).engine)


class AuditPlugin(InitPluginProtocol):
    """The audit log's routes and its chain-head logger."""

    def __init__(self, head_log_interval: float = HEAD_LOG_INTERVAL_SECONDS) -> None:
        self.head_logger = ChainHeadLogger(head_log_interval)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the audit controller, its OpenAPI tag and the head logger's lifespan hooks."""
        app_config.route_handlers.append(AuditController)
        app_config.state["runtime"].openapi_additions.append(_add_audit_openapi)
        app_config.on_startup.append(self.head_logger.start)
        # Litestar runs shutdown hooks in list order; the core's (which disposes the engine) is already in the list,
        # so a domain puts its own first: the last head is logged while the pool is still there.
        app_config.on_shutdown.insert(0, self.head_logger.stop)
        return app_config
