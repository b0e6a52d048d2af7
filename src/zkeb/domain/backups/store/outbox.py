"""Objects of deleted S3 payloads: the outbox a trigger on `payloads` fills, drained by the maintenance pass.

Whatever deletes a payload whose chunks are in S3 (a purge, retention, an expired, terminated or abandoned tus
upload, a project's or an organization's deletion), the trigger records it in `payload_object_deletions` in the same
transaction (migration d4a7); so does a payload that moves from S3 to PostgreSQL (migration e9b2).
`free_payload_objects` deletes one recorded payload's objects inside the transaction that deletes its record, which
holds the record's row lock while the objects go: a store that fails rolls the record back for the next pass, so
objects are freed late, never leaked silently, and a second drain (or a migration back to S3, which frees a payload's
old objects before copying new ones) waits for the first and then finds nothing left to delete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from uuid import UUID

from opentelemetry import trace
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.tenancy import tenant_transaction
from zkeb.domain.backups.store.s3 import PayloadStoreUnavailableError, S3ChunkStore

__all__ = ("ObjectDeletionDrain", "StoreUsage", "free_payload_objects", "store_usage")

logger = logging.getLogger("zkeb.backups.s3")
tracer = trace.get_tracer("zkeb.backups")

_PENDING = text("SELECT organization_id, payload_id FROM zkeb_payload_object_deletions(:limit)")
_CLAIM = text("DELETE FROM payload_object_deletions WHERE payload_id = :payload_id RETURNING payload_id")
_USAGE = text("SELECT store, payloads, bytes, chunks FROM zkeb_payload_store_usage()")
_PENDING_COUNT = text("SELECT count(*) FROM zkeb_payload_object_deletions(2147483647)")


@dataclass(frozen=True, slots=True)
class StoreUsage:
    """Where payloads live: per store, payloads, their bytes and chunks; payloads whose objects await deletion."""

    stores: dict[str, dict[str, int]]
    pending_object_deletions: int


async def store_usage(engine: AsyncEngine) -> StoreUsage:
    """Totals across tenants (a SECURITY DEFINER function: counts only, no ids)."""
    async with engine.connect() as connection:
        rows = (await connection.execute(_USAGE)).all()
        pending = int((await connection.execute(_PENDING_COUNT)).scalar_one())
    stores = {str(row[0]): {"payloads": int(row[1]), "bytes": int(row[2]), "chunks": int(row[3])} for row in rows}
    return StoreUsage(stores, pending)


class ObjectDeletionDrain:
    """Deletes the objects of deleted S3 payloads, a batch of payloads per pass."""

    def __init__(self, engine: AsyncEngine, objects: S3ChunkStore, *, batch: int) -> None:
        """Handle at most `batch` payloads per pass."""
        self._engine = engine
        self._objects = objects
        self._batch = batch

    async def drain_once(self) -> tuple[int, bool]:
        """(objects deleted, whether a full batch was found) in one pass.

        Raises:
            PayloadStoreUnavailableError: the store failed for every recorded payload tried (the records stay).
        """
        async with self._engine.connect() as connection:
            pending = [(row[0], row[1]) for row in (await connection.execute(_PENDING, {"limit": self._batch})).all()]
        deleted, failures = 0, 0
        with tracer.start_as_current_span("backups.delete_objects", attributes={"zkeb.payloads": len(pending)}):
            for organization_id, payload_id in pending:
                try:
                    deleted += await self._drain(organization_id, payload_id)
                except PayloadStoreUnavailableError:
                    failures += 1
        if pending and failures == len(pending):
            raise PayloadStoreUnavailableError("the object store refused every deletion of this pass")
        if deleted:
            logger.info("deleted %d objects of %d deleted payloads", deleted, len(pending) - failures)
        return deleted, len(pending) >= self._batch

    async def _drain(self, organization_id: UUID, payload_id: UUID) -> int:
        deleted = await free_payload_objects(self._engine, self._objects, organization_id, payload_id)
        return deleted or 0


async def free_payload_objects(
    engine: AsyncEngine, objects: S3ChunkStore, organization_id: UUID, payload_id: UUID
) -> int | None:
    """Delete the objects of a payload recorded in the outbox, and its record; None when there was no record.

    Raises:
        PayloadStoreUnavailableError: the store failed (the record stays).
    """
    async with tenant_transaction(engine, organization_id) as connection:
        if (await connection.execute(_CLAIM, {"payload_id": payload_id})).first() is None:
            return None  # freed by another drain meanwhile, or never recorded
        return await objects.delete_payload(organization_id, payload_id)
