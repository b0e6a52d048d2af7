"""`zkeb storage migrate`: move every complete payload to the other store, one payload at a time, resumably.

For each payload of the source store: free what a previous life or a killed run left at the target, copy its
at-rest chunks as they are (no re-encryption: the data key stays, so key rotation still rewrites no chunk), read
them back from the target and check them against the digest the server keeps (each chunk authenticates under the
payload's data key, and the SHA-256 and size of the decrypted whole must equal `payloads.sha256` and `size`),
then switch the payload in one transaction (`payloads.store` and its rows' `data`). The source is freed afterwards:
PostgreSQL bytes in the switching transaction, S3 objects through the deletion outbox (the switch records them;
this run drains each batch's records, and at its end whatever the outbox still holds). Nothing else is recorded: a
run that is stopped or killed resumes by running again, and a payload copied halfway is copied again from its start.
One migration runs at a time (an advisory lock).

Restores keep working: a reader follows `payloads.store`, which changes atomically. A restore planned before the
switch reads the old location; if the old bytes go while it reads, it finds the payload again and reads on from the
new location (`chunk_reads.py`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.database import pooled_connection
from zkeb.core.errors import ServiceUnavailableError
from zkeb.domain.backups.crypto import PayloadCrypto, PayloadKey
from zkeb.domain.backups.store.moves import (
    MovingPayload,
    clear_chunk_data,
    fill_chunk_data,
    load_payload,
    migration_lock,
    payloads_in_store,
    switch_store,
)
from zkeb.domain.backups.store.outbox import ObjectDeletionDrain, free_payload_objects, store_usage
from zkeb.domain.backups.store.payloads import PostgresPayloadStore, StoreKind
from zkeb.domain.backups.store.s3 import PayloadStoreUnavailableError, S3ChunkStore, S3PayloadStore
from zkeb.lib.atrest import ChunkCipher, ChunkIntegrityError

__all__ = ("COPY_BATCH", "MigrationReport", "PayloadMover")

logger = logging.getLogger("zkeb.backups.moves")

#: Chunks read and written at once (memory: this many at-rest chunks).
COPY_BATCH = 8
#: Most outbox passes at the end of a run (a record the store keeps refusing would otherwise be tried forever).
_DRAIN_PASSES = 100


class _VerificationError(Exception):
    """The copy read back from the target does not match the payload's digest."""


@dataclass(slots=True)
class MigrationReport:
    """What a migration did, and what it left."""

    moved: int = 0
    moved_bytes: int = 0
    incomplete_skipped: int = 0
    failed: dict[UUID, str] = field(default_factory=dict)
    remaining: int = 0
    pending_object_deletions: int = 0


class PayloadMover:
    """Moves payloads between the PostgreSQL store and one S3 bucket (see the module docstring)."""

    def __init__(self, engine: AsyncEngine, objects: S3ChunkStore, crypto: PayloadCrypto) -> None:
        """Act through `engine` (the runtime role, each payload in its tenant's transaction) and `objects` (open)."""
        self._engine = engine
        self._objects = objects
        self._crypto = crypto
        self._stores = {"postgres": PostgresPayloadStore(), "s3": S3PayloadStore(objects)}

    async def migrate(
        self,
        target: StoreKind,
        *,
        batch: int = 100,
        limit: int | None = None,
        on_payload: Callable[[int], None] | None = None,
    ) -> MigrationReport:
        """Move every complete payload (at most `limit`) of the other store to `target`, `batch` ids per listing.

        `on_payload` is called with each moved payload's size (skipped and failed ones are in the report).

        Raises:
            MigrationRunningError: another migration is running.
        """
        source: StoreKind = "s3" if target == "postgres" else "postgres"
        report = MigrationReport()
        async with migration_lock(self._engine):
            after: UUID | None = None
            while limit is None or report.moved < limit:
                listed = await payloads_in_store(self._engine, source, after=after, limit=batch)
                if not listed:
                    break
                moved_here: list[tuple[UUID, UUID]] = []
                for organization_id, payload_id in listed:
                    if limit is not None and report.moved >= limit:
                        break
                    size = await self._move_one(organization_id, payload_id, source, target, report)
                    if size is not None:
                        moved_here.append((organization_id, payload_id))
                        if on_payload is not None:
                            on_payload(size)
                if source == "s3":
                    await self._free_sources(moved_here)
                after = listed[-1][1]
            if source == "s3":
                await self._drain_outbox(batch)
        usage = await store_usage(self._engine)
        report.remaining = usage.stores.get(source, {}).get("payloads", 0)
        report.pending_object_deletions = usage.pending_object_deletions
        return report

    async def _free_sources(self, moved: list[tuple[UUID, UUID]]) -> None:
        """Drain the outbox records the switches to PostgreSQL wrote; one the store refuses stays for a later pass."""
        for organization_id, payload_id in moved:
            try:
                await free_payload_objects(self._engine, self._objects, organization_id, payload_id)
            except PayloadStoreUnavailableError:
                logger.warning("objects of moved payload %s stay in the deletion outbox for now", payload_id)

    async def _drain_outbox(self, batch: int) -> None:
        """Free what earlier runs (or deletions) left in the outbox: moving to PostgreSQL, no server may drain it."""
        drain = ObjectDeletionDrain(self._engine, self._objects, batch=batch)
        try:
            for _ in range(_DRAIN_PASSES):
                if not (await drain.drain_once())[1]:
                    break
        except PayloadStoreUnavailableError:
            logger.warning("the deletion outbox could not be drained now; run the migration again later")

    async def _move_one(
        self, organization_id: UUID, payload_id: UUID, source: StoreKind, target: StoreKind, report: MigrationReport
    ) -> int | None:
        """Move one payload; its size when moved, None when skipped or failed (noted in `report`)."""
        async with pooled_connection(self._engine) as connection:
            payload = await load_payload(connection, organization_id, payload_id)
        if payload is None or payload.store != source:
            return None  # deleted, or moved by someone else, since it was listed
        if payload.sha256 is None:
            report.incomplete_skipped += 1  # an open upload: it keeps writing to the store it started in
            return None
        if payload.rows != payload.chunk_count:  # committed, yet chunk rows are missing: damaged, not moved
            reason = f"{payload.rows} of its {payload.chunk_count} chunk rows are in the database"
            logger.error("payload %s not moved to %s: %s", payload_id, target, reason)
            report.failed[payload_id] = reason
            return None
        try:
            cipher = self._crypto.cipher(payload_id, PayloadKey(payload.key_id, payload.wrapped_key))
            await self._copy(organization_id, payload_id, payload, source, target)
            await self._verify(organization_id, payload_id, payload, cipher, target)
        except (ServiceUnavailableError, _VerificationError) as exc:
            reason = str(exc.detail) if isinstance(exc, ServiceUnavailableError) else str(exc)
            logger.error("payload %s not moved to %s: %s", payload_id, target, reason)  # noqa: TRY400
            report.failed[payload_id] = reason
            await self._discard_copy(organization_id, payload_id, target)
            return None
        async with pooled_connection(self._engine) as connection:
            now = await switch_store(
                connection,
                organization_id,
                payload_id,
                source=source,
                target=target,
                chunk_count=payload.chunk_count,
            )
        if now != target:
            if now is None or now == source:  # deleted meanwhile: what was copied is nobody's
                await self._discard_copy(organization_id, payload_id, target)
            return None
        report.moved += 1
        report.moved_bytes += payload.size
        return payload.size

    async def _copy(
        self, organization_id: UUID, payload_id: UUID, payload: MovingPayload, source: StoreKind, target: StoreKind
    ) -> None:
        if target == "s3":
            # Objects a previous life in S3 left for the outbox, then whatever a killed run copied: the payload is in
            # PostgreSQL and this run holds the migration lock, so nothing under its prefix is anyone else's.
            await free_payload_objects(self._engine, self._objects, organization_id, payload_id)
            await self._objects.delete_payload(organization_id, payload_id)
        reader = self._stores[source]
        for first in range(0, payload.chunk_count, COPY_BATCH):
            stop = min(first + COPY_BATCH, payload.chunk_count)
            async with pooled_connection(self._engine) as connection:
                blobs = await reader.read_stored(
                    connection, organization_id=organization_id, payload_id=payload_id, first=first, stop=stop
                )
                chunks = list(zip(range(first, stop), blobs, strict=True))
                if target == "s3":
                    await self._objects.put_chunks(organization_id, payload_id, chunks)
                else:
                    await fill_chunk_data(connection, organization_id, payload_id, chunks)

    async def _verify(
        self,
        organization_id: UUID,
        payload_id: UUID,
        payload: MovingPayload,
        cipher: ChunkCipher,
        target: StoreKind,
    ) -> None:
        """Read the copy back from `target`: every chunk must authenticate, and the whole match the stored digest."""
        digest, size = hashlib.sha256(), 0
        reader = self._stores[target]
        for first in range(0, payload.chunk_count, COPY_BATCH):
            stop = min(first + COPY_BATCH, payload.chunk_count)
            async with pooled_connection(self._engine) as connection:
                blobs = await reader.read_stored(
                    connection, organization_id=organization_id, payload_id=payload_id, first=first, stop=stop
                )
            for seq, blob in zip(range(first, stop), blobs, strict=True):
                try:
                    plaintext = cipher.decrypt(seq, blob)
                except ChunkIntegrityError:
                    raise _VerificationError(
                        f"chunk {seq} read back from {target} failed its integrity check"
                    ) from None
                digest.update(plaintext)
                size += len(plaintext)
        if size != payload.size or digest.digest() != payload.sha256:
            raise _VerificationError(f"the copy read back from {target} does not match the payload's SHA-256")

    async def _discard_copy(self, organization_id: UUID, payload_id: UUID, target: StoreKind) -> None:
        """Remove a copy that will not be switched to (best effort: a rerun starts the payload over anyway)."""
        try:
            if target == "s3":
                await self._objects.delete_payload(organization_id, payload_id)
            else:
                async with pooled_connection(self._engine) as connection:
                    await clear_chunk_data(connection, organization_id, payload_id)
        except ServiceUnavailableError:
            logger.warning("the copy of payload %s at %s stays until the next run or reconcile", payload_id, target)
