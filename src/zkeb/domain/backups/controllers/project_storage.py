"""A project's storage HTTP API: its usage against its quota, and its trash (`/api/v1/projects/{id}/...`)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, Parameter

from zkeb.core.auth import principal_of, requires_org_admin
from zkeb.db.models import Backup
from zkeb.domain.backups.context import backups_context
from zkeb.domain.backups.guards import requires_backup_or_org_admin
from zkeb.domain.backups.schemas import DeviceUsage, ProjectUsage, TrashedBackupRead, TrashPage
from zkeb.domain.backups.services.backups import backup_read
from zkeb.domain.backups.services.lifecycle import LifecycleService

__all__ = ("ProjectStorageController",)


def _trashed_read(backup: Backup, trash_retention: timedelta) -> TrashedBackupRead:
    body = backup_read(backup)
    assert backup.deleted_at is not None
    return TrashedBackupRead(
        **{name: getattr(body, name) for name in body.__struct_fields__},
        deleted_at=backup.deleted_at,
        deleted_by=backup.deleted_by,
        purge_after=backup.deleted_at + trash_retention,
    )


class ProjectStorageController(Controller):
    """A project's storage: usage against its quota, and its trash."""

    path = "/api/v1/projects"
    tags = ["backups"]  # noqa: RUF012

    @get(
        "/{project_id:uuid}/usage",
        guards=[requires_backup_or_org_admin],
        summary="A project's storage usage",
        description=(
            "`used_bytes` counts every backup until it is purged (the trash included) and is what the quota "
            "(`quota_bytes`, null: unlimited) limits. `backups` are visible ones, `trashed_backups` those in the "
            "trash. `reserved_bytes` is what the `open_uploads` (tus) reserve of the quota until they complete, "
            "are terminated or expire. "
            "Org admins and project keys see every device in `by_device`; a device token sees its own share only."
        ),
    )
    async def project_usage(
        self,
        request: Request[Any, Any, Any],
        lifecycle_service: NamedDependency[LifecycleService],
        project_id: FromPath[UUID],
    ) -> ProjectUsage:
        """Storage used by one project, per device."""
        report = await lifecycle_service.usage(principal_of(request), project_id)
        return ProjectUsage(
            used_bytes=report.used_bytes,
            backups=report.backups,
            trashed_backups=report.trashed_backups,
            quota_bytes=report.quota_bytes,
            reserved_bytes=report.reserved_bytes,
            open_uploads=report.open_uploads,
            by_device=[
                DeviceUsage(
                    device_id_hash=d.device_id_hash.hex(),
                    used_bytes=d.used_bytes,
                    backups=d.backups,
                    trashed_backups=d.trashed_backups,
                )
                for d in report.by_device
            ],
        )

    @get(
        "/{project_id:uuid}/trash",
        guards=[requires_org_admin],
        summary="A project's trash (org admin)",
        description=(
            "Backups deleted (or removed by retention) and not yet purged, most recently deleted first, with "
            "`deleted_by` and `purge_after`. Pass `next_cursor` back as `cursor`; `limit` is 1..100."
        ),
    )
    async def project_trash(
        self,
        request: Request[Any, Any, Any],
        lifecycle_service: NamedDependency[LifecycleService],
        state: State,
        project_id: FromPath[UUID],
        *,
        cursor: str | None = Parameter(default=None, max_length=200),
        limit: int = Parameter(default=50, ge=1, le=100),
    ) -> TrashPage:
        """A page of one project's trash."""
        backups, next_cursor = await lifecycle_service.trash_page(
            principal_of(request), project_id, cursor=cursor, limit=limit
        )
        retention = timedelta(days=backups_context(state).settings.trash_retention_days)
        return TrashPage(items=[_trashed_read(b, retention) for b in backups], next_cursor=next_cursor)
