"""Background maintenance: expired tus uploads, trash purge and retention catch-up, in bounded batches.

One `MaintenanceRunner` runs in every server process (started by the backups plugin, every `MAINTENANCE_INTERVAL`
seconds) and as `zkeb maintenance run [--once]` for cron-style platforms. Any number of them may run at once, in
one process or many replicas: candidates come from SECURITY DEFINER lookups outside any tenant, then each
tenant's rows are re-checked and locked in that tenant's transaction with `FOR UPDATE SKIP LOCKED`, so two runners
never remove the same thing twice and never wait for each other. Every removal is audited (actor `system`) in the
transaction that makes it, and counted in Prometheus.

- Uploads: `zkeb.domain.backups.jobs.upload_sweeper.UploadSweeper` (expired tus sessions and orphaned payloads).
- Trash: backups in the trash for longer than `TRASH_RETENTION_DAYS` are purged (payload, chunks, quota).
- Retention: projects with a retention policy get it applied to every container, a page of projects per pass,
  so a policy tightened by an org admin takes effect without waiting for the next upload.
- Objects: with the S3 payload store, the objects of payloads deleted by any of the above (or by the API) are
  deleted from the bucket (`zkeb.domain.backups.store.outbox`), last, so one pass frees what it removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg
from opentelemetry import trace
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.audit import record_event
from zkeb.core.tenancy import tenant_transaction
from zkeb.db.models import Backup
from zkeb.domain.backups.jobs.upload_sweeper import SWEEPER_ACTOR_ID, UploadSweeper
from zkeb.domain.backups.metrics import BACKUPS_PURGED, MAINTENANCE_PASSES
from zkeb.domain.backups.services.lifecycle import (
    SYSTEM_ACTOR,
    RetentionPolicy,
    apply_retention,
    purge_backups,
    record_retention_events,
)
from zkeb.domain.backups.store.outbox import ObjectDeletionDrain
from zkeb.domain.backups.store.s3 import S3ChunkStore
from zkeb.settings import Settings

__all__ = ("MAINTENANCE_BATCH", "MaintenanceReport", "MaintenanceRunner", "RetentionSweeper", "TrashPurger")

logger = logging.getLogger("zkeb.backups.maintenance")
tracer = trace.get_tracer("zkeb.backups")

#: Most items each task handles per pass (and per transaction).
MAINTENANCE_BATCH = 100
#: Pause between passes while a task still has a full batch to do.
BACKLOG_PAUSE_SECONDS = 1.0

_EXPIRED_TRASH = text("SELECT organization_id, backup_id FROM zkeb_expired_trash(:limit, :before)")
_RETENTION_PROJECTS = text("SELECT organization_id, project_id FROM zkeb_retention_projects(:after, :limit)")
_LOCK_PROJECT_POLICY = text(
    "SELECT retention_keep_last, retention_days FROM projects WHERE id = :p FOR UPDATE SKIP LOCKED"
)


class TrashPurger:
    """Purges backups that have been in the trash for `TRASH_RETENTION_DAYS`."""

    def __init__(self, engine: AsyncEngine, settings: Settings, *, batch: int = MAINTENANCE_BATCH) -> None:
        """Purge at most `batch` backups per pass."""
        self._engine = engine
        self._settings = settings
        self._batch = batch

    async def purge_once(self) -> tuple[int, bool]:
        """One pass: how many backups it purged, and whether more may be waiting (a full batch of candidates)."""
        before = datetime.now(UTC) - timedelta(days=self._settings.trash_retention_days)
        with tracer.start_as_current_span("backups.purge_trash") as span:
            async with self._engine.connect() as connection:
                candidates = (await connection.execute(_EXPIRED_TRASH, {"limit": self._batch, "before": before})).all()
                await connection.rollback()
            by_organization: dict[UUID, list[UUID]] = defaultdict(list)
            for organization_id, backup_id in candidates:
                by_organization[organization_id].append(backup_id)
            purged = 0
            for organization_id, backup_ids in by_organization.items():
                purged += await self._purge(organization_id, backup_ids, before)
            span.set_attribute("zkeb.candidates", len(candidates))
            span.set_attribute("zkeb.purged", purged)
        if purged:
            logger.info("purged %d backups from the trash", purged)
        return purged, len(candidates) >= self._batch

    async def _purge(self, organization_id: UUID, backup_ids: list[UUID], before: datetime) -> int:
        async with tenant_transaction(self._engine, organization_id) as connection:
            # Rows another runner (or an admin purge) holds are skipped: whoever holds them deletes them.
            locked = (
                await connection.scalars(
                    select(Backup.id)
                    .where(Backup.id.in_(backup_ids), Backup.deleted_at < before)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            purged = await purge_backups(connection, list(locked))
            for item in purged:
                await record_event(
                    connection,
                    organization_id=organization_id,
                    action="backup.purged",
                    actor_type=SYSTEM_ACTOR,
                    actor_id=SWEEPER_ACTOR_ID,
                    target_type="backup",
                    target_id=str(item.id),
                    details={"reason": "trash_expired", "project_id": str(item.project_id), "size": item.size},
                    settings=self._settings,
                )
        if purged:
            BACKUPS_PURGED.labels(reason="trash_expired").inc(len(purged))
        return len(purged)


class RetentionSweeper:
    """Applies each project's retention policy to all its containers, a page of projects per pass."""

    def __init__(self, engine: AsyncEngine, settings: Settings, *, batch: int = MAINTENANCE_BATCH) -> None:
        """Visit at most `batch` projects per pass, trashing at most `batch` backups in each."""
        self._engine = engine
        self._settings = settings
        self._batch = batch
        self._after: UUID | None = None

    async def sweep_once(self) -> tuple[int, bool]:
        """One pass: how many backups it moved to the trash, and whether more may be waiting.

        Projects are visited in id order from where the previous pass stopped; a project whose row is locked (a
        commit or another runner is at it) is skipped for this round.
        """
        trashed_total, more = 0, False
        with tracer.start_as_current_span("backups.retention_sweep") as span:
            async with self._engine.connect() as connection:
                projects = (
                    await connection.execute(_RETENTION_PROJECTS, {"after": self._after, "limit": self._batch})
                ).all()
                await connection.rollback()
            for organization_id, project_id in projects:
                trashed = await self._apply(organization_id, project_id)
                trashed_total += trashed
                more = more or trashed >= self._batch
            # A short page means the end of the project list: start over next pass.
            self._after = projects[-1].project_id if len(projects) >= self._batch else None
            span.set_attribute("zkeb.projects", len(projects))
            span.set_attribute("zkeb.trashed", trashed_total)
        if trashed_total:
            logger.info("retention moved %d backups to the trash", trashed_total)
        return trashed_total, more or self._after is not None

    async def _apply(self, organization_id: UUID, project_id: UUID) -> int:
        async with tenant_transaction(self._engine, organization_id) as connection:
            row = (await connection.execute(_LOCK_PROJECT_POLICY, {"p": project_id})).first()
            if row is None:
                return 0
            policy = RetentionPolicy(row.retention_keep_last, row.retention_days)
            trashed = await apply_retention(connection, project_id=project_id, policy=policy, limit=self._batch)
            await record_retention_events(
                connection,
                organization_id=organization_id,
                project_id=project_id,
                trashed=trashed,
                settings=self._settings,
            )
        return len(trashed)


@dataclass(slots=True)
class MaintenanceReport:
    """What one maintenance pass removed, whether work is left, and which tasks failed."""

    expired_uploads: int = 0
    orphaned_payloads: int = 0
    trash_purged: int = 0
    retention_trashed: int = 0
    #: Objects deleted from the S3 payload store (of payloads deleted this pass or before).
    objects_deleted: int = 0
    more: bool = False
    failed: list[str] = field(default_factory=list)


_UNAVAILABLE = (
    OSError,
    TimeoutError,
    PoolTimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
)


def _database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database could not be reached or went away (not a defect worth a traceback)."""
    if isinstance(exc, DBAPIError):
        return (
            exc.connection_invalidated or isinstance(exc.orig, _UNAVAILABLE) or isinstance(exc.__cause__, _UNAVAILABLE)
        )
    return isinstance(exc, _UNAVAILABLE)


class MaintenanceRunner:
    """Runs the upload sweeper, the trash purger and the retention sweeper, once or on an interval."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        *,
        batch: int = MAINTENANCE_BATCH,
        interval: float | None = None,
        objects: S3ChunkStore | None = None,
    ) -> None:
        """Sweep `batch` items per task and pass, every `interval` seconds (default `MAINTENANCE_INTERVAL`).

        `objects` (the open S3 chunk store, when payloads go to S3) deletes the objects of deleted payloads.
        """
        self.interval = settings.maintenance_interval_seconds if interval is None else interval
        self.batch = batch
        self.uploads = UploadSweeper(engine, batch=batch, settings=settings)
        self.trash = TrashPurger(engine, settings, batch=batch)
        self.retention = RetentionSweeper(engine, settings, batch=batch)
        self.objects = None if objects is None else ObjectDeletionDrain(engine, objects, batch=batch)
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> MaintenanceReport:
        """One pass of every task; a failing task is logged and reported, the others still run."""
        report = MaintenanceReport()

        async def uploads() -> None:
            result = await self.uploads.sweep()
            report.expired_uploads, report.orphaned_payloads = result.expired_uploads, result.orphaned_payloads
            report.more = report.more or result.candidates >= self.batch

        async def trash() -> None:
            report.trash_purged, more = await self.trash.purge_once()
            report.more = report.more or more

        async def retention() -> None:
            report.retention_trashed, more = await self.retention.sweep_once()
            report.more = report.more or more

        async def objects() -> None:
            assert self.objects is not None
            report.objects_deleted, more = await self.objects.drain_once()
            report.more = report.more or more

        tasks: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("uploads", uploads),
            ("trash", trash),
            ("retention", retention),
            *((("objects", objects),) if self.objects is not None else ()),
        )
        with tracer.start_as_current_span("backups.maintenance"):
            for name, task in tasks:
                try:
                    await task()
                except Exception as exc:
                    if _database_unavailable(exc):  # one line, not a traceback per task every pass of an outage
                        logger.warning(
                            "maintenance task %s skipped: database unavailable (%s)", name, type(exc).__name__
                        )
                    else:
                        logger.exception("maintenance task %s failed", name)
                    report.failed.append(name)
                    MAINTENANCE_PASSES.labels(task=name, outcome="error").inc()
                else:
                    MAINTENANCE_PASSES.labels(task=name, outcome="ok").inc()
        return report

    async def _run(self) -> None:
        while True:
            try:
                report = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - run_once already isolates each task
                logger.exception("maintenance pass failed")
                report = MaintenanceReport()
            # Catch up a backlog quickly; otherwise wait the interval, jittered so replicas drift apart.
            pause = BACKLOG_PAUSE_SECONDS if report.more else self.interval * random.uniform(0.9, 1.1)  # noqa: S311
            await asyncio.sleep(pause)

    def start(self) -> None:
        """Run in the background of this process, a first pass right away (no-op when the interval is 0)."""
        if self._task is None and self.interval > 0:
            self._task = asyncio.create_task(self._run(), name="zkeb-maintenance")

    async def stop(self) -> None:
        """Stop the background task (a pass in progress is cancelled; its open transaction rolls back)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
