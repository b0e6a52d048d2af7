"""Backup lifecycle: per-project storage quotas, per-container retention, the trash and append-only projects.

Quota. A project's usage counts the payload bytes of every committed backup of the project, trashed ones
included, until they are purged: `projects.used_bytes` plus its usage shards. A commit charges the payload in the
commit's own transaction (`zkeb.domain.backups.services.finalize`): on the shard of its connection when the project
has no quota, so commits of one project never wait for each other; with a quota, on the project row, locked, by a
conditional `UPDATE` that counts every committed charge, so no two uploads can both squeeze under the limit.
Uploads are also checked when they start (single-shot before any byte is stored, tus at creation from
`Upload-Length`).

Open tus uploads reserve their `Upload-Length`: a creation locks the project row and is refused (507) unless
`used_bytes` plus what the project's open (unexpired) uploads reserve plus the new length fits under the quota,
and (429) once the project has `MAX_OPEN_UPLOADS` open uploads. A reservation ends with its upload: at the
commit, which charges the length in the transaction that deletes the session, at termination, and at expiry
(an expired session reserves nothing, before the sweeper even deletes it). Every check and charge counts the
reservations of the other open uploads, so an upload that reserved its room can always commit (unless an org
admin lowered the quota meanwhile), and stored bytes never exceed the quota.

Retention. In the commit's transaction, under an advisory lock of the (container, device) it ranks, the backups
of the same device in the same container beyond the newest `retention_keep_last`, and those older than
`retention_days`, go to the trash (`deleted_by = 'retention'`): retention ranks per (container, device), whoever
uploaded (a device token or a project key acting for the device), so one device's upload never trashes another
device's backup. Age never removes a (container, device)'s newest backup, and a backup an org admin restored from
the trash is left alone (it was brought back on purpose). The maintenance runner applies the same rule to projects
whose policy changed since their last commit.

Trash. Deleting moves a backup to the trash: it disappears from listings, reads, `latest` and restore, but still
counts against the quota. Org admins list the trash, restore from it, and purge (payload and chunks deleted,
`used_bytes` decremented; the payload nonce stays recorded, so it can never be reused). The maintenance runner
purges what has been in the trash for `TRASH_RETENTION_DAYS`.

Append-only projects. Project keys and devices may create and read but not delete; only an org admin may
delete or purge, and only backups older than `append_only_min_age_days`. Retention still runs.

Lock order, everywhere: the project row, then backup rows, then the organization's audit chain head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
from litestar.connection import ASGIConnection
from opentelemetry import trace
from sqlalchemy import Row, and_, delete, func, literal, or_, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from zkeb.core.audit import record_event
from zkeb.core.audit_linker import append_unchained_event
from zkeb.core.auth import Principal
from zkeb.core.cursors import decode_keyset_cursor, encode_keyset_cursor, listing_name
from zkeb.core.errors import NotFoundError
from zkeb.db.models import Backup, Payload, Project
from zkeb.domain.backups.errors import AppendOnlyError, InsufficientStorageError, TooManyOpenUploadsError
from zkeb.domain.backups.metrics import BACKUPS_PURGED, BACKUPS_RESTORED, BACKUPS_TRASHED
from zkeb.domain.backups.repository import BackupRepositoryService
from zkeb.domain.backups.store.commits import USED_BYTES_SQL
from zkeb.settings import Settings

__all__ = (
    "RETENTION",
    "SYSTEM_ACTOR",
    "DeviceUsageRow",
    "LifecycleService",
    "ProjectUsageReport",
    "PurgedBackup",
    "RetentionPolicy",
    "TrashedBackup",
    "apply_retention",
    "deleted_by_of",
    "purge_backups",
    "quota_exceeded",
    "record_retention_events",
)

tracer = trace.get_tracer("zkeb.backups")

#: `deleted_by` of backups the retention policy moved to the trash.
RETENTION = "retention"
#: The audit log's actor type for what the service does by itself (retention, sweepers).
SYSTEM_ACTOR = "system"

Executor = AsyncSession | AsyncConnection

#: Locks the project row (creations of its uploads are serialized with each other and with its commits).
_LOCK_FOR_UPLOAD = text(
    f"SELECT {USED_BYTES_SQL} AS used_bytes, p.storage_quota_bytes FROM projects p WHERE p.id = :p FOR UPDATE"  # noqa: S608
)
_OPEN_UPLOADS = text(
    "SELECT count(*) AS open, CAST(coalesce(sum(upload_length), 0) AS bigint) AS reserved FROM upload_sessions"
    " WHERE project_id = :p AND expires_at > now()"
)
#: Usage is the project's counter plus its usage shards, so the counter alone may go below zero.
_REFUND = text("UPDATE projects SET used_bytes = used_bytes - :n WHERE id = :p")
_LOCK_PROJECT = text(
    "SELECT append_only, append_only_min_age_days FROM projects WHERE id = :p AND organization_id = :o FOR UPDATE"
)


def quota_exceeded(*, used: int, quota: int, requested: int) -> InsufficientStorageError:
    """The 507 answered when `requested` more bytes do not fit under `quota`."""
    return InsufficientStorageError(
        f"the project's storage quota ({quota} bytes, {used} used) cannot take {requested} more bytes; "
        "delete and purge backups, or ask an org admin to raise the quota",
        extra={"used": used, "quota": quota, "requested": requested},
    )


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Keep each device's newest `keep_last` backups per container and/or those younger than `days` (None: no limit)."""

    keep_last: int | None = None
    days: int | None = None

    @property
    def active(self) -> bool:
        """Whether the policy removes anything at all."""
        return self.keep_last is not None or self.days is not None


@dataclass(frozen=True, slots=True)
class TrashedBackup:
    """A backup the retention policy just moved to the trash."""

    id: UUID
    container_id: UUID


async def apply_retention(
    executor: Executor,
    *,
    project_id: UUID,
    policy: RetentionPolicy,
    container_id: UUID | None = None,
    device_id_hash: bytes | None = None,
    limit: int | None = None,
) -> list[TrashedBackup]:
    """Move the backups `policy` no longer keeps to the trash; one (container, device)'s, or every one's.

    Ranks each device's visible backups in a container newest first (`created_at`, then id), so one device's
    uploads never send another device's backups to the trash; restored backups are neither ranked nor removed.
    The caller holds the project row lock (commit or maintenance), so rankings do not race.
    """
    if not policy.active:
        return []
    rank = (
        func.row_number()
        .over(
            partition_by=(Backup.container_id, Backup.device_id_hash),
            order_by=(Backup.created_at.desc(), Backup.id.desc()),
        )
        .label("rank")
    )
    ranked_query = select(Backup.id, Backup.created_at, rank).where(
        Backup.project_id == project_id, Backup.deleted_at.is_(None), Backup.restored_at.is_(None)
    )
    if container_id is not None:
        ranked_query = ranked_query.where(Backup.container_id == container_id)
    if device_id_hash is not None:
        ranked_query = ranked_query.where(Backup.device_id_hash == device_id_hash)
    ranked = ranked_query.subquery("ranked")
    removed: list[Any] = []
    if policy.keep_last is not None:
        removed.append(ranked.c.rank > policy.keep_last)
    if policy.days is not None:
        removed.append(and_(ranked.c.rank > 1, ranked.c.created_at < func.now() - timedelta(days=policy.days)))
    doomed = select(ranked.c.id).where(or_(*removed)).order_by(ranked.c.created_at)
    if limit is not None:
        doomed = doomed.limit(limit)
    statement = (
        update(Backup)
        .where(Backup.id.in_(doomed), Backup.deleted_at.is_(None))
        .values(deleted_at=func.now(), deleted_by=RETENTION)
        .returning(Backup.id, Backup.container_id)
        .execution_options(synchronize_session=False)
    )
    rows = (await executor.execute(statement)).all()
    if rows:
        BACKUPS_TRASHED.labels(reason=RETENTION).inc(len(rows))
    return [TrashedBackup(row.id, row.container_id) for row in rows]


async def record_retention_events(
    executor: Executor | asyncpg.Connection,
    *,
    organization_id: UUID,
    project_id: UUID,
    trashed: Sequence[TrashedBackup],
    settings: Settings | None = None,
    chained: bool = True,
) -> None:
    """Audit each backup retention moved to the trash (actor `system`), in the caller's transaction.

    `chained=False` (a backup's commit) leaves the events for the audit linker instead of taking the chain head
    (`zkeb.core.audit_linker`); an asyncpg connection is only accepted then.
    """
    for item in trashed:
        event: dict[str, Any] = {
            "organization_id": organization_id,
            "action": "backup.trashed",
            "actor_type": SYSTEM_ACTOR,
            "actor_id": RETENTION,
            "target_type": "backup",
            "target_id": str(item.id),
            "details": {"reason": RETENTION, "project_id": str(project_id), "container_id": str(item.container_id)},
            "settings": settings,
        }
        if not chained:
            await append_unchained_event(executor, **event)
        else:
            assert not isinstance(executor, asyncpg.Connection)
            await record_event(executor, **event)


@dataclass(frozen=True, slots=True)
class PurgedBackup:
    """A backup deleted for good, with the payload bytes it freed."""

    id: UUID
    project_id: UUID
    size: int


async def purge_backups(executor: Executor, backup_ids: Sequence[UUID]) -> list[PurgedBackup]:
    """Delete backups, their payloads and chunks, and give their bytes back to their projects' usage.

    Only rows this statement actually deletes are refunded, so two purges of one backup free its bytes once.
    Payload nonces stay recorded. Projects are updated in id order (no deadlock between two purges).
    """
    if not backup_ids:
        return []
    rows = (
        await executor.execute(
            delete(Backup)
            .where(Backup.id.in_(list(backup_ids)))
            .returning(Backup.id, Backup.project_id, Backup.payload_id, Backup.encrypted_payload_size)
            .execution_options(synchronize_session=False)
        )
    ).all()
    if not rows:
        return []
    await executor.execute(
        delete(Payload)
        .where(Payload.id.in_([row.payload_id for row in rows]))
        .execution_options(synchronize_session=False)
    )
    freed: dict[UUID, int] = {}
    for row in rows:
        freed[row.project_id] = freed.get(row.project_id, 0) + row.encrypted_payload_size
    for project_id in sorted(freed):
        await executor.execute(_REFUND, {"n": freed[project_id], "p": project_id})
    return [PurgedBackup(row.id, row.project_id, row.encrypted_payload_size) for row in rows]


@dataclass(frozen=True, slots=True)
class DeviceUsageRow:
    """One device's share of a project's storage."""

    device_id_hash: bytes
    used_bytes: int
    backups: int
    trashed_backups: int


@dataclass(frozen=True, slots=True)
class ProjectUsageReport:
    """A project's storage: bytes charged, backups visible and in the trash, the quota, and per device."""

    used_bytes: int
    backups: int
    trashed_backups: int
    quota_bytes: int | None
    by_device: list[DeviceUsageRow]
    reserved_bytes: int
    open_uploads: int


def deleted_by_of(principal: Principal) -> str:
    """`deleted_by` for a backup this principal deleted: its kind and audit id (never the credential)."""
    return f"{principal.actor_type}:{principal.actor_id}"[:80]


class LifecycleService(BackupRepositoryService):
    """Quota checks, usage, the trash (delete, list, restore, purge) and append-only rules, for one request."""

    async def lock_project_for_upload(self, project_id: UUID) -> Row[Any]:
        """Lock the project row until the caller's commit (the lock every creation and commit of the project takes);
        its used bytes and quota.

        Raises:
            NotFoundError: no such project.
        """
        project = (await self.session.execute(_LOCK_FOR_UPLOAD, {"p": project_id})).first()
        if project is None:
            raise NotFoundError("project not found")
        return project

    async def reserve_upload(self, project: Row[Any], project_id: UUID, length: int, *, max_open_uploads: int) -> None:
        """Check that a new tus upload of `length` bytes may open; the caller then adds it in this transaction.

        `project` is the row `lock_project_for_upload` returned: locked until the caller's commit, so the upload's
        reservation (its `Upload-Length`, counted while it is open) is in place before another creation or commit of
        the project checks the room.

        Raises:
            InsufficientStorageError: the length does not fit beside the usage and the open uploads (507).
            TooManyOpenUploadsError: the project has `max_open_uploads` uploads open already (429).
        """
        uploads = (await self.session.execute(_OPEN_UPLOADS, {"p": project_id})).one()
        if uploads.open >= max_open_uploads:
            raise TooManyOpenUploadsError(
                f"the project has {uploads.open} open uploads, the most it may have (MAX_OPEN_UPLOADS); finish, "
                "terminate or let expire one first",
                headers={"Retry-After": "60"},
            )
        quota, used = project.storage_quota_bytes, project.used_bytes + uploads.reserved
        if quota is not None and used + length > quota:
            raise quota_exceeded(used=used, quota=quota, requested=length)

    async def _project(self, principal: Principal, project_id: UUID) -> Project:
        principal.require_project(project_id)
        project = await self.session.scalar(
            select(Project).where(Project.id == project_id, Project.organization_id == principal.organization_id)
        )
        if project is None:
            raise NotFoundError("project not found")
        return project

    async def usage(self, principal: Principal, project_id: UUID) -> ProjectUsageReport:
        """A project's storage usage; a device sees only its own share in `by_device`.

        Raises:
            NotFoundError: not a project of the principal.
        """
        project = await self._project(principal, project_id)
        visible = func.count().filter(Backup.deleted_at.is_(None))
        trashed = func.count().filter(Backup.deleted_at.is_not(None))
        query = (
            select(
                Backup.device_id_hash,
                func.coalesce(func.sum(Backup.encrypted_payload_size), 0).label("used"),
                visible.label("backups"),
                trashed.label("trashed"),
            )
            .where(Backup.project_id == project_id)
            .group_by(Backup.device_id_hash)
            .order_by(Backup.device_id_hash)
        )
        rows = (await self.session.execute(query)).all()
        uploads = (await self.session.execute(_OPEN_UPLOADS, {"p": project_id})).one()
        devices = [DeviceUsageRow(bytes(r.device_id_hash), int(r.used), int(r.backups), int(r.trashed)) for r in rows]
        report_devices = devices
        if principal.kind == "device":
            report_devices = [d for d in devices if d.device_id_hash == principal.device_id_hash]
        return ProjectUsageReport(
            used_bytes=project.total_used_bytes,
            backups=sum(d.backups for d in devices),
            trashed_backups=sum(d.trashed_backups for d in devices),
            quota_bytes=project.storage_quota_bytes,
            by_device=report_devices,
            reserved_bytes=int(uploads.reserved),
            open_uploads=int(uploads.open),
        )

    async def trash_page(
        self, principal: Principal, project_id: UUID, *, cursor: str | None, limit: int
    ) -> tuple[list[Backup], str | None]:
        """A page of a project's trash, most recently deleted first, and the next page's cursor.

        Raises:
            NotFoundError: not a project of the principal's organization.
        """
        await self._project(principal, project_id)
        query = select(Backup).where(Backup.project_id == project_id, Backup.deleted_at.is_not(None))
        listing = listing_name("trash", project_id)
        if cursor:
            deleted_at, after_id = decode_keyset_cursor(listing, cursor)
            query = query.where(tuple_(Backup.deleted_at, Backup.id) < tuple_(literal(deleted_at), literal(after_id)))
        query = query.order_by(Backup.deleted_at.desc(), Backup.id.desc()).limit(limit + 1)
        rows = list((await self.session.scalars(query)).all())
        if len(rows) > limit:
            last = rows[limit - 1]
            assert last.deleted_at is not None
            return rows[:limit], encode_keyset_cursor(listing, last.deleted_at, last.id)
        return rows, None

    async def _find(self, principal: Principal, backup_id: UUID, *, include_trashed: bool) -> Backup:
        query = select(Backup).where(Backup.id == backup_id, Backup.organization_id == principal.organization_id)
        if principal.kind != "org_admin":
            query = query.where(Backup.project_id == principal.project_id)
            if principal.kind == "device":
                query = query.where(Backup.device_id_hash == principal.device_id_hash)
        if not include_trashed:
            query = query.where(Backup.deleted_at.is_(None))
        backup = await self.session.scalar(query)
        if backup is None:
            raise NotFoundError("backup not found")
        return backup

    async def delete_backup(
        self,
        principal: Principal,
        backup_id: UUID,
        *,
        purge: bool,
        request: ASGIConnection[Any, Any, Any, Any] | None = None,
    ) -> None:
        """Move a backup to the trash or, for an org admin with `purge`, delete it for good; then commit.

        Raises:
            NotFoundError: the backup is unknown to the principal (or, without `purge`, already in the trash).
            AppendOnlyError: purge by a project key or device; a delete in an append-only project by one, or by an
                org admin before the backup reached the project's minimum age.
        """
        found = await self._find(principal, backup_id, include_trashed=purge and principal.kind == "org_admin")
        project_id = found.project_id
        if purge and principal.kind != "org_admin":
            raise AppendOnlyError(
                "only an org admin key may purge a backup; without purge=true it goes to the trash",
                extra={"reason": "purge_requires_org_admin"},
            )
        # Project row first (the lock order of commits), then the backup row, re-read under its lock.
        policy = (await self.session.execute(_LOCK_PROJECT, {"p": project_id, "o": principal.organization_id})).first()
        if policy is None:
            raise NotFoundError("backup not found")
        backup = await self.session.scalar(
            select(Backup).where(Backup.id == backup_id).with_for_update().execution_options(populate_existing=True)
        )
        if backup is None or (backup.deleted_at is not None and not purge):
            raise NotFoundError("backup not found")
        if policy.append_only:
            self._check_append_only(principal, backup, policy.append_only_min_age_days)
        attributes: dict[str, str | bool] = {
            "zkeb.backup_id": str(backup_id),
            "zkeb.project_id": str(project_id),
            "zkeb.purge": purge,
        }
        with tracer.start_as_current_span("backups.delete", attributes=attributes):
            if purge:
                purged = await purge_backups(self.session, [backup_id])
                if not purged:
                    raise NotFoundError("backup not found")
                action, details = "backup.purged", {"reason": "admin", "size": purged[0].size}
            else:
                backup.deleted_at = datetime.now(UTC)
                backup.deleted_by = deleted_by_of(principal)
                await self.session.flush()
                action, details = "backup.trashed", {"reason": "deleted"}
            await record_event(
                self.session,
                organization_id=principal.organization_id,
                action=action,
                actor_type=principal.actor_type,
                actor_id=principal.actor_id,
                target_type="backup",
                target_id=str(backup_id),
                details={**details, "project_id": str(project_id)},
                request=request,
            )
            await self.session.commit()
        if purge:
            BACKUPS_PURGED.labels(reason="admin").inc()
        else:
            BACKUPS_TRASHED.labels(reason="deleted").inc()

    @staticmethod
    def _check_append_only(principal: Principal, backup: Backup, min_age_days: int) -> None:
        if principal.kind != "org_admin":
            raise AppendOnlyError(
                "append-only project: project keys and devices cannot delete backups; an org admin can, "
                "once a backup is older than the project's append_only_min_age_days",
                extra={"reason": "append_only"},
            )
        deletable_after = backup.created_at + timedelta(days=min_age_days)
        if datetime.now(UTC) < deletable_after:
            raise AppendOnlyError(
                f"append-only project: this backup can be deleted after {deletable_after.isoformat()} "
                f"(append_only_min_age_days = {min_age_days})",
                extra={"reason": "append_only_min_age", "deletable_after": deletable_after.isoformat()},
            )

    async def restore(
        self, principal: Principal, backup_id: UUID, *, request: ASGIConnection[Any, Any, Any, Any] | None = None
    ) -> Backup:
        """Bring a backup back from the trash (org admins); retention leaves it alone from then on; commits.

        Raises:
            NotFoundError: unknown, another organization's, or not in the trash.
        """
        restored = await self.session.scalar(
            update(Backup)
            .where(
                Backup.id == backup_id,
                Backup.organization_id == principal.organization_id,
                Backup.deleted_at.is_not(None),
            )
            .values(deleted_at=None, deleted_by=None, restored_at=func.now())
            .returning(Backup)
            .execution_options(populate_existing=True, synchronize_session=False)
        )
        if restored is None:
            raise NotFoundError("backup not found in the trash")
        await record_event(
            self.session,
            organization_id=principal.organization_id,
            action="backup.restored",
            actor_type=principal.actor_type,
            actor_id=principal.actor_id,
            target_type="backup",
            target_id=str(backup_id),
            details={"project_id": str(restored.project_id)},
            request=request,
        )
        await self.session.commit()
        BACKUPS_RESTORED.inc()
        return restored
