"""Receiving one tus PATCH: the body streamed into chunks under the upload's lease, then the offset or the commit.

A PATCH owns its upload through a lease (`upload_sessions.lease_id`, statements in
`zkeb.domain.backups.store.upload_leases`) and holds a pooled connection only to claim, store a batch or commit. The
PATCH that completes the upload has the backup committed (`zkeb.domain.backups.services.finalize.commit_stored`:
the signature verified, the upload ended and the backup made visible in one transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from litestar import Request
from litestar.exceptions import HTTPException
from opentelemetry import trace
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from zkeb.core.auth import Principal
from zkeb.core.database import pooled_connection
from zkeb.core.errors import (
    ConflictError,
    IncompleteBodyError,
    NotFoundError,
    ProblemError,
    RequestBodyTimeoutError,
    ServiceUnavailableError,
    UnprocessableError,
)
from zkeb.core.runtime import get_runtime
from zkeb.db.models import Payload, UploadSession
from zkeb.domain.backups.chunk_writes import ChunkPipeline, TransactionHook, hash_stored_chunks
from zkeb.domain.backups.context import BackupsContext
from zkeb.domain.backups.crypto import PayloadKey
from zkeb.domain.backups.envelope import envelope_of_row
from zkeb.domain.backups.errors import (
    UPLOAD_ENDED,
    UPLOAD_LEASE_LOST,
    ChecksumMismatchError,
    UploadEndedError,
    UploadGoneError,
    UploadLeaseLostError,
    UploadTooLargeError,
)
from zkeb.domain.backups.services.finalize import StoredPayload, commit_stored
from zkeb.domain.backups.services.uploads import UPLOAD_EXPIRY
from zkeb.domain.backups.store import upload_leases
from zkeb.domain.backups.store.connection import raw_tenant_transaction
from zkeb.domain.backups.store.payloads import PayloadStore, RowsHook
from zkeb.domain.backups.store.upload_leases import UploadLease
from zkeb.lib.atrest import ChunkCipher

if TYPE_CHECKING:
    import asyncpg

__all__ = ("PatchOutcome", "PatchReceiver")

tracer = trace.get_tracer("zkeb.backups")


@dataclass(frozen=True, slots=True)
class PatchOutcome:
    """Where an upload stands after a PATCH: its offset, and the backup if the PATCH completed it.

    `timed_out`: the body stopped making progress and was cut off (`RequestBodyTimeoutError`); what arrived is kept
    (unless the PATCH carried `Upload-Checksum`), and the answer is a 408 carrying the offset.
    """

    offset: int
    backup_id: UUID | None
    expires_at: datetime
    timed_out: bool = False


def _timed_out(cut_off: IncompleteBodyError | None) -> bool:
    return isinstance(cut_off, RequestBodyTimeoutError)


class _AbandonedPatchError(Exception):
    """A PATCH with a checksum lost its connection: nothing of it can be verified, so nothing is kept."""

    def __init__(self, cut_off: IncompleteBodyError) -> None:
        super().__init__("a checksummed PATCH body ended early")
        self.cut_off = cut_off


async def _lease_lost(connection: asyncpg.Connection, upload_id: UUID) -> UploadLeaseLostError:
    """Why a PATCH's lease stopped holding: a later PATCH took the upload over (409) or the upload ended (404)."""
    if not await upload_leases.session_exists(connection, upload_id):
        return UploadEndedError(UPLOAD_ENDED)
    return UploadLeaseLostError(UPLOAD_LEASE_LOST)


@dataclass(slots=True)
class PatchReceiver:
    """Receives one PATCH body at an upload's offset and, when it completes the upload, commits the backup.

    The PATCH owns the upload through a lease (`upload_sessions.lease_id`) that every chunk batch it stores checks,
    in the same transaction. It holds a pooled connection only to claim, store a batch or commit: a device sending
    slowly holds none while its bytes are on the way. A new PATCH takes the upload over from an earlier one still
    open (the client's retry, sent before the server saw the first attempt fail, as tusd does), which then stores
    nothing more. Without `Upload-Checksum`, each batch also records the offset it reaches (short of
    `Upload-Length`: only the commit completes an upload), so a takeover loses at most the batch not yet stored.
    """

    request: Request[Any, Any, Any]
    context: BackupsContext
    session: AsyncSession
    principal: Principal
    upload: UploadSession
    checksum: tuple[str, bytes] | None
    #: The payload's store, known once `receive` has read the payload.
    store: PayloadStore = field(init=False)

    async def receive(self) -> PatchOutcome:
        """Claim the upload, stream the body into chunks, and record the new offset or commit the backup.

        Raises:
            UploadTooLargeError: the body goes past `Upload-Length` (413).
            UploadLeaseLostError: a later PATCH took the upload over (409), or the upload ended meanwhile (404,
                `UploadEndedError`: terminated, expired, or completed by a later PATCH).
        """
        upload = self.upload
        # Read now: a rollback in the commit below expires the ORM object, and the cleanup must not reload it.
        payload_id, start = upload.payload_id, upload.upload_offset
        payload = await self.session.get(Payload, payload_id)
        if payload is None:  # terminated (or swept) since the upload was loaded: its payload goes first
            raise UploadEndedError(UPLOAD_ENDED)
        cipher = self.context.crypto.cipher(upload.payload_id, PayloadKey(payload.key_id, payload.wrapped_key))
        self.store = self.context.stores.for_kind(payload.store)
        await self.session.commit()  # release the session's connection: the bytes go through short transactions
        remaining = upload.upload_length - upload.upload_offset
        announced = self.request.content_length
        if announced is not None and announced > remaining:
            raise UploadTooLargeError(f"the body ({announced} bytes) exceeds the {remaining} bytes the upload needs")
        attributes: dict[str, str | int] = {
            "zkeb.project_id": str(upload.project_id),
            "zkeb.upload_offset": upload.upload_offset,
        }
        with tracer.start_as_current_span("backups.tus_patch", attributes=attributes) as span:
            lease = UploadLease(upload.id, uuid7())
            chunk_count, expires_at = await self._claim(lease)
            try:
                outcome = await self._receive_leased(lease, cipher, chunk_count, expires_at)
            except BaseException as exc:
                # Refused for the client's own fault (e.g. a body past Upload-Length): the PATCH changes nothing.
                # Otherwise (a server failure, a shutdown) the batches it recorded stay, and the client resumes.
                # With the pool exhausted, waiting for it again would only delay the 503: the next claim cleans up.
                undo = (start, chunk_count) if isinstance(exc, HTTPException) and exc.status_code < 500 else None
                if not isinstance(exc, PoolTimeoutError):
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._release(lease, payload_id, undo=undo))
                raise
            span.set_attribute("zkeb.upload_offset_after", outcome.offset)
            span.set_attribute("zkeb.outcome", "committed" if outcome.backup_id else "partial")
            if outcome.backup_id is not None:
                span.set_attribute("zkeb.backup_id", str(outcome.backup_id))
        return outcome

    async def _claim(self, lease: UploadLease) -> tuple[int, datetime]:
        """Take the upload over and drop chunks past its offset; its chunk count and new expiry.

        Raises:
            ProblemError: the offset moved since the request was checked (409), or the upload is gone (404, 410).
        """
        upload, organization_id = self.upload, self.principal.organization_id
        async with (
            pooled_connection(self.context.engine) as connection,
            raw_tenant_transaction(connection, organization_id),
        ):
            claimed = await upload_leases.claim(connection, lease, offset=upload.upload_offset, expiry=UPLOAD_EXPIRY)
            if claimed is not None:
                # Chunks past the acknowledged offset were stored by a PATCH that failed or was taken over.
                await self.store.delete_chunks_from(
                    connection,
                    organization_id=organization_id,
                    payload_id=upload.payload_id,
                    offset=upload.upload_offset,
                )
                return claimed
            current = await upload_leases.unclaimed_state(connection, upload.id)
        if current is None:
            raise NotFoundError("upload not found")
        current_offset, expired = current
        if expired:
            raise UploadGoneError("the upload expired")
        raise ProblemError(
            f"Upload-Offset {upload.upload_offset} does not match the upload's offset {current_offset}",
            status_code=409,
            headers={"Upload-Offset": str(current_offset)},
        )

    def _batch_hook(self, lease: UploadLease) -> TransactionHook:
        upload_id, payload_id, length = self.upload.id, self.upload.payload_id, self.upload.upload_length
        record_progress = self.checksum is None  # a checksummed body counts only once all of it is verified

        async def in_batch(connection: asyncpg.Connection, next_seq: int, next_offset: int) -> None:
            if record_progress and next_offset < length:
                kept = await upload_leases.advance(connection, lease, offset=next_offset, expiry=UPLOAD_EXPIRY)
                if kept:
                    await upload_leases.record_chunks(connection, payload_id, chunk_count=next_seq, size=next_offset)
            else:
                kept = await upload_leases.keep(connection, lease, expiry=UPLOAD_EXPIRY)
            if not kept:
                raise await _lease_lost(connection, upload_id)

        return in_batch

    def _lease_fence(self, lease: UploadLease) -> RowsHook:
        upload_id = self.upload.id

        async def still_leased(connection: asyncpg.Connection) -> None:
            # An UPDATE of the session row under the lease: the row stays locked until the caller's transaction
            # ends, so no later PATCH can claim the upload meanwhile.
            if not await upload_leases.keep(connection, lease, expiry=UPLOAD_EXPIRY):
                raise await _lease_lost(connection, upload_id)

        return still_leased

    async def _release(self, lease: UploadLease, payload_id: UUID, *, undo: tuple[int, int] | None) -> None:
        """Give the upload back after a failure, dropping the chunks stored past its recorded offset.

        With `undo` (the offset and chunk count the PATCH started from), the upload goes back to where it was.
        Does nothing once the lease is gone: released, committed, or taken over by a later PATCH.
        """
        organization_id = self.principal.organization_id
        async with (
            pooled_connection(self.context.engine) as connection,
            raw_tenant_transaction(connection, organization_id),
        ):
            if undo is None:
                offset = await upload_leases.release(connection, lease)
            else:
                offset, chunk_count = undo
                if await upload_leases.release_at(connection, lease, offset=offset) is None:
                    return
                await upload_leases.record_chunks(connection, payload_id, chunk_count=chunk_count, size=offset)
            if offset is not None:
                await self.store.delete_chunks_from(
                    connection, organization_id=organization_id, payload_id=payload_id, offset=offset
                )

    async def _discard(self, lease: UploadLease, payload_id: UUID) -> None:
        """Delete an upload that can never succeed, with its bytes, if this PATCH still owns it."""
        async with (
            pooled_connection(self.context.engine) as connection,
            raw_tenant_transaction(connection, self.principal.organization_id),
        ):
            await upload_leases.discard_leased(connection, lease, payload_id)

    async def _receive_leased(
        self, lease: UploadLease, cipher: ChunkCipher, chunk_count: int, expires_at: datetime
    ) -> PatchOutcome:
        organization_id, upload = self.principal.organization_id, self.upload
        payload_id, start = upload.payload_id, upload.upload_offset
        payload_hash = hashlib.sha256()
        if start > 0:
            await self._hash_stored_prefix(lease, cipher, chunk_count, payload_hash)
        patch_digest = hashlib.new(self.checksum[0]) if self.checksum else None
        pipeline = ChunkPipeline(
            self.context.engine,
            store=self.store,
            organization_id=organization_id,
            payload_id=payload_id,
            cipher=cipher,
            first_seq=chunk_count,
            first_offset=start,
            digests=[payload_hash] if patch_digest is None else [payload_hash, patch_digest],
            in_transaction=self._batch_hook(lease),
            fence=self._lease_fence(lease),
        )
        try:
            cut_off = await self._stream_into(pipeline)
        except _AbandonedPatchError as abandoned:
            await asyncio.shield(self._release(lease, payload_id, undo=None))
            return PatchOutcome(start, None, expires_at, _timed_out(abandoned.cut_off))
        self._check_digest(patch_digest)
        offset = start + pipeline.received
        if offset < upload.upload_length:
            async with (
                pooled_connection(self.context.engine) as connection,
                raw_tenant_transaction(connection, organization_id),
            ):
                released = await upload_leases.release_at(connection, lease, offset=offset)
                if released is None:
                    raise await _lease_lost(connection, upload.id)
                expires_at = released
                await upload_leases.record_chunks(connection, payload_id, chunk_count=pipeline.next_seq, size=offset)
            return PatchOutcome(offset, None, expires_at, _timed_out(cut_off))
        backup_id = await self._complete(lease, payload_hash.digest(), pipeline.next_seq)
        return PatchOutcome(offset, backup_id, expires_at)

    async def _hash_stored_prefix(self, lease: UploadLease, cipher: ChunkCipher, chunk_count: int, digest: Any) -> None:
        """Feed the plaintext of the chunks stored before this PATCH to `digest`.

        Raises:
            UploadLeaseLostError: the chunks went with the upload, ended or taken over since the claim (404, 409).
            ServiceUnavailableError: a stored chunk is missing while the upload is still this PATCH's (503).
        """
        organization_id = self.principal.organization_id
        async with pooled_connection(self.context.engine) as connection:
            try:
                await hash_stored_chunks(
                    connection,
                    store=self.store,
                    organization_id=organization_id,
                    payload_id=self.upload.payload_id,
                    cipher=cipher,
                    chunk_count=chunk_count,
                    digest=digest,
                )
            except ServiceUnavailableError:
                # A termination or the commit of a takeover between the claim and this read deletes the chunks.
                async with raw_tenant_transaction(connection, organization_id, readonly=True):
                    if not await upload_leases.lease_holds(connection, lease):
                        raise await _lease_lost(connection, lease.upload_id) from None
                raise

    async def _stream_into(self, pipeline: ChunkPipeline) -> IncompleteBodyError | None:
        """Store the body; why it ended early (the client went away, or it stalled), or None when it came whole."""
        async with pipeline:
            with tracer.start_as_current_span("backups.receive") as span:
                cut_off = await pipeline.feed(self._read_body(pipeline))
                span.set_attribute("zkeb.bytes", pipeline.received)
                span.set_attribute("zkeb.disconnected", cut_off is not None)
            if cut_off is not None and self.checksum is not None:
                raise _AbandonedPatchError(cut_off)
            await pipeline.close()
        return cut_off

    async def _read_body(self, pipeline: ChunkPipeline) -> IncompleteBodyError | None:
        """Write the body into `pipeline`; why it ended early, or None when it came whole."""
        remaining = self.upload.upload_length - self.upload.upload_offset
        try:
            async for piece in self.request.stream():
                if not piece:
                    continue
                if pipeline.received + len(piece) > remaining:
                    raise UploadTooLargeError("the body goes past Upload-Length")
                await pipeline.write(piece)
        except IncompleteBodyError as exc:
            # The client went away mid-body, broke its chunked encoding or stalled: keep what arrived (tus resumes).
            return exc
        return None

    def _check_digest(self, patch_digest: Any) -> None:
        if self.checksum is None or patch_digest is None:
            return
        algorithm, expected = self.checksum
        if not hmac.compare_digest(patch_digest.digest(), expected):
            raise ChecksumMismatchError(
                f"the body does not match Upload-Checksum ({algorithm}); the offset is unchanged",
                headers={"Upload-Offset": str(self.upload.upload_offset)},
            )

    async def _complete(self, lease: UploadLease, payload_sha256: bytes, chunk_count: int) -> UUID:
        """Verify the signature and commit the backup; when that can never succeed, delete the upload."""
        upload, principal = self.upload, self.principal
        payload_id = upload.payload_id  # read now: a rollback below expires the ORM object
        try:
            backup = await commit_stored(
                self.context,
                principal,
                envelope_of_row(upload),
                StoredPayload(lease, payload_id, upload.upload_length, payload_sha256, chunk_count),
                request=self.request,
                audit_committed=get_runtime(self.request.app.state).audit_linker.notify,
            )
        except (UnprocessableError, ConflictError):
            # The envelope is fixed at creation: an upload that fails verification can never succeed.
            await asyncio.shield(self._discard(lease, payload_id))
            raise
        return backup.id
