"""`zkeb storage reconcile`: compare the bucket's chunk objects with the chunk rows of S3 payloads, and report.

Organization by organization, the paginated listing of `{prefix}payloads/{organization}/` (in key order: payload
id, then the zero-padded `seq`) is merged with that organization's chunk rows of `s3` payloads read in the same order
(payload id, then `seq`; PostgreSQL orders uuids bytewise, as their lowercase hex sorts), so memory stays at a
listing page and a page of rows whatever the bucket holds. Two kinds of finding:

- **orphans**: objects with no row (a PUT whose row never committed, an unstage that failed, objects of a payload
  that left S3 and whose outbox record is gone). Objects of payloads the deletion outbox still lists are counted
  apart (`awaiting_deletion`): the maintenance pass frees them. Orphans younger than `min_age` are counted apart too
  (`recent`): an upload or a migration may be writing them right now.
- **missing**: rows of `s3` payloads whose object is not in the bucket (lost, deleted by hand): those restores fail.

Nothing is deleted unless asked (`delete_orphans`), and then only orphans older than `min_age`. Reports name keys,
ids and sizes, never a byte of a payload.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.database import pooled_connection
from zkeb.domain.backups.store.moves import ChunkRow, chunk_rows, organizations_in_store, payloads_awaiting_deletion
from zkeb.domain.backups.store.s3 import DELETE_BATCH, S3ChunkStore, StoredObject

__all__ = ("LISTED_FINDINGS", "ReconcileReport", "Reconciler")

#: Findings of each kind listed by key or id in a report (all are counted; a bucket gone wrong could hold millions).
LISTED_FINDINGS = 1000
#: Payloads whose rows are read per query.
_ROW_PAGE = 200


@dataclass(slots=True)
class _Tally:
    count: int = 0
    bytes: int = 0
    listed: list[dict[str, Any]] = field(default_factory=list)

    def add(self, size: int, item: dict[str, Any]) -> None:
        self.count += 1
        self.bytes += size
        if len(self.listed) < LISTED_FINDINGS:
            self.listed.append(item)

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "bytes": self.bytes, "items": self.listed}


@dataclass(slots=True)
class ReconcileReport:
    """What the bucket and the rows disagree on (counts and bytes complete, items up to `LISTED_FINDINGS`)."""

    objects: int = 0
    rows: int = 0
    orphans: _Tally = field(default_factory=_Tally)
    recent_orphans: _Tally = field(default_factory=_Tally)
    awaiting_deletion: _Tally = field(default_factory=_Tally)
    missing: _Tally = field(default_factory=_Tally)
    orphans_deleted: int = 0

    @property
    def clean(self) -> bool:
        """Nothing to worry about: no row without its object, no old orphan left in the bucket."""
        return self.missing.count == 0 and self.orphans.count == self.orphans_deleted

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "objects": self.objects,
            "rows": self.rows,
            "orphans": self.orphans.as_dict(),
            "recent_orphans": self.recent_orphans.as_dict(),
            "awaiting_deletion": self.awaiting_deletion.as_dict(),
            "missing": self.missing.as_dict(),
            "orphans_deleted": self.orphans_deleted,
            "clean": self.clean,
        }


class Reconciler:
    """Compares one bucket prefix with the chunk rows of `s3` payloads (see the module docstring)."""

    def __init__(self, engine: AsyncEngine, objects: S3ChunkStore) -> None:
        """Read rows through `engine` (each organization in its tenant's transactions) and objects through `objects`."""
        self._engine = engine
        self._objects = objects

    async def run(
        self,
        *,
        min_age: timedelta,
        delete_orphans: bool = False,
        on_organization: Callable[[UUID], None] | None = None,
    ) -> ReconcileReport:
        """Compare everything under the prefix; with `delete_orphans`, delete orphans older than `min_age`.

        Raises:
            PayloadStoreUnavailableError: the bucket could not be listed (or an orphan deleted).
        """
        report = ReconcileReport()
        organizations = set(await organizations_in_store(self._engine, "s3"))
        organizations.update([org async for org in self._objects.list_organizations()])
        cutoff = datetime.now(UTC) - min_age
        for organization_id in sorted(organizations, key=str):
            await self._organization(organization_id, report, cutoff=cutoff, delete_orphans=delete_orphans)
            if on_organization is not None:
                on_organization(organization_id)
        return report

    async def _organization(
        self, organization_id: UUID, report: ReconcileReport, *, cutoff: datetime, delete_orphans: bool
    ) -> None:
        to_delete: list[StoredObject] = []
        async with pooled_connection(self._engine) as connection:
            awaiting = await payloads_awaiting_deletion(connection, organization_id)
            objects = aiter(self._objects.list_organization(organization_id))
            rows = aiter(_rows(connection, organization_id))
            obj, row = await anext(objects, None), await anext(rows, None)
            while obj is not None or row is not None:
                if obj is not None and (row is None or _object_order(obj) < _row_order(row)):
                    report.objects += 1
                    self._orphan(obj, report, awaiting, cutoff=cutoff, to_delete=to_delete if delete_orphans else None)
                    obj = await anext(objects, None)
                elif row is not None and (obj is None or _row_order(row) < _object_order(obj)):
                    report.rows += 1
                    report.missing.add(
                        row.plain_size,
                        {"organization_id": str(organization_id), "payload_id": str(row.payload_id), "seq": row.seq},
                    )
                    row = await anext(rows, None)
                else:
                    report.objects += 1
                    report.rows += 1
                    obj, row = await anext(objects, None), await anext(rows, None)
                if len(to_delete) >= DELETE_BATCH:
                    await self._delete(to_delete, report)
        await self._delete(to_delete, report)

    def _orphan(
        self,
        obj: StoredObject,
        report: ReconcileReport,
        awaiting: set[UUID],
        *,
        cutoff: datetime,
        to_delete: list[StoredObject] | None,
    ) -> None:
        item = {
            "key": self._objects.key(obj.organization_id, obj.payload_id, obj.seq),
            "size": obj.size,
            "last_modified": obj.last_modified.isoformat() if obj.last_modified else None,
        }
        if obj.payload_id in awaiting:
            report.awaiting_deletion.add(obj.size, item)
        elif obj.last_modified is not None and obj.last_modified > cutoff:
            report.recent_orphans.add(obj.size, item)
        else:
            report.orphans.add(obj.size, item)
            if to_delete is not None:
                to_delete.append(obj)

    async def _delete(self, to_delete: list[StoredObject], report: ReconcileReport) -> None:
        if to_delete:
            await self._objects.delete_objects(to_delete)
            report.orphans_deleted += len(to_delete)
            to_delete.clear()


async def _rows(connection: asyncpg.Connection, organization_id: UUID) -> AsyncIterator[ChunkRow]:
    async for page in chunk_rows(connection, organization_id, page=_ROW_PAGE):
        for row in page:
            yield row


def _object_order(obj: StoredObject) -> tuple[str, int]:
    return str(obj.payload_id), obj.seq


def _row_order(row: ChunkRow) -> tuple[str, int]:
    return str(row.payload_id), row.seq
