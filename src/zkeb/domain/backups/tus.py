"""A tus 1.0.0 resumable-upload server for backups (https://tus.io/protocols/resumable-upload).

Implemented: core protocol, `creation`, `creation-with-upload`, `termination`, `checksum` (`sha1`, which the
spec requires, and `sha256`) and `expiration`. Not implemented: `creation-defer-length` and `concatenation`.

ZKEB specifics:

- `Upload-Metadata` carries every envelope field but the payload, each value base64 as tus requires:
  `container_id` and `backup_timestamp` are base64 of their text (UUID, RFC 3339); `device_id_hash`,
  `payload_nonce`, `payload_auth_tag`, `metadata`, `metadata_nonce`, `metadata_auth_tag` and `signature` are base64
  of either their raw bytes or their JSON text (standard base64, `device_id_hash` hex), so that string-only clients
  can send them; `zkeb.lib.byteforms` holds the exact rule. Other keys (e.g. a client's `filename`) are ignored.
  The envelope, the device and the nonce are checked at creation (400 malformed, 422 invalid naming the field, 409
  reused nonce, 507 when `Upload-Length` does not fit under the project's storage quota), so a bad upload fails
  before any byte.
- The commit charges the quota again, atomically: a completing PATCH may answer 507 when concurrent uploads took
  the room. The upload then stays (its offset unchanged), so the client can resend the last bytes once room is made.
- The PATCH that completes the upload verifies the device signature and commits the backup atomically; its
  response carries `Zkeb-Backup-Id`. A signature mismatch answers 422 and deletes the upload and its bytes.
- Bytes of a PATCH are stored as they arrive (pipelined, see `chunk_writes`); a PATCH cut off by the network keeps what
  was received (unless it carried `Upload-Checksum`, which can then not be verified), so `HEAD` + `PATCH` resume.
- One PATCH at a time per upload, through a lease on the session row that each chunk batch checks in its own
  transaction: a PATCH holds a pooled connection only while it writes, never while its client's bytes are on the
  way. A new PATCH takes the upload over from an earlier one still open (a retry sent before the server saw the
  first attempt fail, as tusd does); the earlier one stores nothing more and answers 409 (404 when the upload ended
  meanwhile: terminated, expired, or completed by the later PATCH). Without `Upload-Checksum`
  each stored batch also records the offset it reaches, short of `Upload-Length` (only the commit completes an
  upload), so a connection that dies unseen loses at most the batch in flight.
- Sessions expire `UPLOAD_EXPIRY` after their last stored bytes (`Upload-Expires`); `UploadSweeper` purges expired
  sessions, their chunks, and payloads orphaned by a crashed process, in bounded batches, safely from any number
  of processes (the maintenance runner, `zkeb.domain.backups.maintenance`, calls it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from litestar import Controller, MediaType, Request, Response, delete, head, patch, post, route
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.enums import HttpMethod
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from litestar.types import ExceptionHandlersMap
from opentelemetry import trace
from sqlalchemy import delete as sa_delete
from sqlalchemy import select, text
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from uuid_utils.compat import uuid7

from zkeb.core.audit import record_event
from zkeb.core.auth import Principal, principal_of, requires_backup_access
from zkeb.core.errors import (
    ConflictError,
    IncompleteBodyError,
    NotFoundError,
    ProblemError,
    RequestBodyTimeoutError,
    ServiceUnavailableError,
    UnprocessableError,
    database_out_of_space,
    exception_handlers,
    storage_full,
)
from zkeb.core.runtime import get_runtime
from zkeb.core.security import request_is_tls, trusted_proxies
from zkeb.core.tenancy import tenant_transaction
from zkeb.db.models import Payload, UploadSession
from zkeb.domain.backups.chunk_writes import ChunkPipeline, TransactionHook, hash_stored_chunks
from zkeb.domain.backups.context import BackupsContext, backups_context
from zkeb.domain.backups.crypto import PayloadKey
from zkeb.domain.backups.envelope import (
    BackupEnvelope,
    envelope_columns,
    envelope_from_metadata,
    envelope_of_row,
    invalid_field,
)
from zkeb.domain.backups.finalize import InMemoryPayload, commit_in_memory
from zkeb.domain.backups.lifecycle import SYSTEM_ACTOR, LifecycleService
from zkeb.domain.backups.metrics import ORPHAN_PAYLOADS_PURGED, TUS_SESSIONS_CREATED, TUS_SESSIONS_EXPIRED
from zkeb.domain.backups.services import (
    UPLOAD_ENDED,
    UPLOAD_LEASE_LOST,
    BackupService,
    UploadEndedError,
    UploadLease,
    UploadLeaseLostError,
    verify_backup_signature,
)
from zkeb.domain.backups.store.connection import pooled_connection, raw_tenant_transaction
from zkeb.domain.backups.store.payloads import PayloadStore
from zkeb.lib.atrest import ChunkCipher
from zkeb.lib.tus import (
    TUS_CHECKSUM_ALGORITHMS,
    TUS_EXTENSIONS,
    TUS_VERSION,
    TusHeaderError,
    format_upload_expires,
    parse_non_negative_int,
    parse_upload_checksum,
)
from zkeb.settings import Settings

if TYPE_CHECKING:
    import asyncpg

__all__ = (
    "UPLOAD_EXPIRY",
    "SweepResult",
    "UploadController",
    "UploadSweeper",
)

logger = logging.getLogger("zkeb.backups.tus")
tracer = trace.get_tracer("zkeb.backups")

UPLOADS_PATH = "/api/v1/uploads"
OFFSET_OCTET_STREAM = "application/offset+octet-stream"
#: How long an upload stays resumable after its creation or the last bytes it stored.
UPLOAD_EXPIRY = timedelta(hours=24)
#: Payloads no backup and no upload references (a process died mid single-shot upload) are purged after this.
ORPHAN_AGE = timedelta(hours=1)
SWEEP_BATCH = 100
BACKUP_ID_HEADER = "Zkeb-Backup-Id"
#: A creation-with-upload whose body is the whole payload and at most this long is stored and committed in one
#: transaction, like a single-shot upload (`zkeb.domain.backups.finalize`); longer ones stream through a session.
IN_MEMORY_UPLOAD_MAX = 256 * 1024

#: A `Host` header: a DNS name or IPv4 address, or a bracketed IPv6 address, and an optional port.
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")

# --- errors (tus status codes) ---------------------------------------------------------------------------------


class TusVersionError(ProblemError):
    """`Tus-Resumable` is missing or names a version this server does not speak (tus §Tus-Resumable)."""

    status_code: int = 412


class ChecksumMismatchError(ProblemError):
    """The PATCH body does not match its `Upload-Checksum` (checksum extension); nothing of it is kept."""

    status_code: int = 460


class UploadGoneError(ProblemError):
    """The upload expired (expiration extension)."""

    status_code: int = 410


class UploadTooLargeError(ProblemError):
    """`Upload-Length` (or a PATCH body) exceeds what this server accepts."""

    status_code: int = 413


class UnsupportedUploadMediaTypeError(ProblemError):
    """A PATCH must be `application/offset+octet-stream`."""

    status_code: int = 415


def _malformed(detail: str) -> ProblemError:
    return ProblemError(detail, status_code=400)


def _with_tus_headers(response: Response[Any], exc: Exception) -> Response[Any]:
    response.headers["Tus-Resumable"] = TUS_VERSION
    if isinstance(exc, TusVersionError):
        response.headers["Tus-Version"] = TUS_VERSION
    return response


def _tus_http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return _with_tus_headers(exception_handlers()[HTTPException](request, exc), exc)


def _tus_unexpected_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    return _with_tus_headers(exception_handlers()[Exception](request, exc), exc)


_TUS_EXCEPTION_HANDLERS: ExceptionHandlersMap = {HTTPException: _tus_http_error, Exception: _tus_unexpected_error}


# --- headers ---------------------------------------------------------------------------------------------------


def require_tus_resumable(request: Request[Any, Any, Any]) -> None:
    """Every request but OPTIONS must say `Tus-Resumable: 1.0.0`.

    Raises:
        TusVersionError: missing or another version (412 with `Tus-Version`).
    """
    if request.headers.get("tus-resumable") != TUS_VERSION:
        raise TusVersionError(f"this server speaks tus {TUS_VERSION}; send 'Tus-Resumable: {TUS_VERSION}'")


def _header_int(request: Request[Any, Any, Any], name: str) -> int:
    value = request.headers.get(name.lower())
    if value is None:
        raise _malformed(f"{name} is required")
    try:
        return parse_non_negative_int(value, name=name)
    except TusHeaderError as exc:
        raise _malformed(str(exc)) from None


def _checksum(request: Request[Any, Any, Any]) -> tuple[str, bytes] | None:
    value = request.headers.get("upload-checksum")
    if value is None:
        return None
    try:
        return parse_upload_checksum(value)
    except TusHeaderError as exc:
        raise _malformed(str(exc)) from None


def _media_type(request: Request[Any, Any, Any]) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _base_headers(upload: UploadSession | None = None, offset: int | None = None) -> dict[str, str]:
    headers = {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store"}
    if upload is not None:
        headers["Upload-Offset"] = str(upload.upload_offset if offset is None else offset)
        headers["Upload-Expires"] = format_upload_expires(upload.expires_at)
    return headers


def _uploads_url(request: Request[Any, Any, Any], context: BackupsContext) -> str:
    """The absolute URL of the uploads collection, which each upload's `Location` extends.

    Absolute, as some clients cannot resolve a relative `Location`: `PUBLIC_URL` when configured (what a deployment
    should do: `Host` is the client's to choose), else the request's `Host`, which must then name a host (400
    otherwise). The scheme is then https when the request came over TLS, directly or through a trusted proxy
    (`TRUSTED_PROXIES`).

    Raises:
        ProblemError: no `PUBLIC_URL` and no usable `Host` (400).
    """
    if context.settings.public_url is not None:
        return f"{context.settings.public_url}{UPLOADS_PATH}"
    host = request.headers.get("host")
    if host is None or not _HOST.fullmatch(host):
        raise _malformed("a Host header naming this server is required (the upload's Location is built from it)")
    tls = request_is_tls(request.scope, trusted_proxies(context.settings.trusted_proxies))
    return f"{'https' if tls else request.url.scheme}://{host}{UPLOADS_PATH}"


async def _load_upload(session: AsyncSession, principal: Principal, upload_id: UUID) -> UploadSession:
    upload = await session.scalar(
        select(UploadSession).where(UploadSession.id == upload_id, UploadSession.project_id == principal.project_id)
    )
    if upload is None or (principal.kind == "device" and upload.device_id_hash != principal.device_id_hash):
        raise NotFoundError("upload not found")
    if upload.expires_at <= datetime.now(UTC):
        raise UploadGoneError("the upload expired")
    return upload


# --- receiving bytes -------------------------------------------------------------------------------------------


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


#: The 408 of a PATCH (or creation-with-upload) whose body stalled; its headers carry the offset to resume from.
_STALLED = "the body made no progress for too long; what arrived is kept: resume from Upload-Offset"


class _AbandonedPatchError(Exception):
    """A PATCH with a checksum lost its connection: nothing of it can be verified, so nothing is kept."""

    def __init__(self, cut_off: IncompleteBodyError) -> None:
        super().__init__("a checksummed PATCH body ended early")
        self.cut_off = cut_off


# Every writer locks an upload's session row before its payload's rows: the claim and each chunk batch here, the
# commit (`BackupService.commit_backup`), termination and the sweeper.
_CLAIM = (
    "UPDATE upload_sessions s SET lease_id = $2, expires_at = now() + $3::interval, updated_at = now()"
    " WHERE s.id = $1 AND s.upload_offset = $4 AND s.expires_at > now()"
    " RETURNING s.expires_at, (SELECT p.chunk_count FROM payloads p WHERE p.id = s.payload_id)"
)
_UNCLAIMED = "SELECT upload_offset, expires_at <= now() AS expired FROM upload_sessions WHERE id = $1"
_KEEP = "UPDATE upload_sessions SET expires_at = now() + $3::interval WHERE id = $1 AND lease_id = $2 RETURNING 1"
_ADVANCE = (
    "UPDATE upload_sessions SET upload_offset = $3, expires_at = now() + $4::interval, updated_at = now()"
    " WHERE id = $1 AND lease_id = $2 RETURNING expires_at"
)
_RELEASE_AT = (
    "UPDATE upload_sessions SET upload_offset = $3, lease_id = NULL, updated_at = now()"
    " WHERE id = $1 AND lease_id = $2 RETURNING expires_at"
)
_RECORD_CHUNKS = "UPDATE payloads SET chunk_count = $2, size = $3, updated_at = now() WHERE id = $1"
_RELEASE = "UPDATE upload_sessions SET lease_id = NULL WHERE id = $1 AND lease_id = $2 RETURNING upload_offset"
_END_LEASED = "DELETE FROM upload_sessions WHERE id = $1 AND lease_id = $2 RETURNING id"
_DELETE_PAYLOAD_NOW = "DELETE FROM payloads WHERE id = $1"
_SESSION_EXISTS = "SELECT 1 FROM upload_sessions WHERE id = $1"
_LEASE_HOLDS = "SELECT 1 FROM upload_sessions WHERE id = $1 AND lease_id = $2"


async def _lease_lost(connection: asyncpg.Connection, upload_id: UUID) -> UploadLeaseLostError:
    """Why a PATCH's lease stopped holding: a later PATCH took the upload over (409) or the upload ended (404)."""
    if await connection.fetchval(_SESSION_EXISTS, upload_id) is None:
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
        payload = await self.session.get_one(Payload, payload_id)
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
            claimed = await connection.fetchrow(_CLAIM, upload.id, lease.lease_id, UPLOAD_EXPIRY, upload.upload_offset)
            if claimed is not None:
                # Chunks past the acknowledged offset were stored by a PATCH that failed or was taken over.
                await self.store.delete_chunks_from(
                    connection,
                    organization_id=organization_id,
                    payload_id=upload.payload_id,
                    offset=upload.upload_offset,
                )
                return claimed["chunk_count"], claimed["expires_at"]
            current = await connection.fetchrow(_UNCLAIMED, upload.id)
        if current is None:
            raise NotFoundError("upload not found")
        if current["expired"]:
            raise UploadGoneError("the upload expired")
        raise ProblemError(
            f"Upload-Offset {upload.upload_offset} does not match the upload's offset {current['upload_offset']}",
            status_code=409,
            headers={"Upload-Offset": str(current["upload_offset"])},
        )

    def _batch_hook(self, lease: UploadLease) -> TransactionHook:
        upload_id, payload_id, length = self.upload.id, self.upload.payload_id, self.upload.upload_length
        record_progress = self.checksum is None  # a checksummed body counts only once all of it is verified

        async def in_batch(connection: asyncpg.Connection, next_seq: int, next_offset: int) -> None:
            if record_progress and next_offset < length:
                kept = await connection.fetchval(_ADVANCE, upload_id, lease.lease_id, next_offset, UPLOAD_EXPIRY)
                if kept is not None:
                    await connection.execute(_RECORD_CHUNKS, payload_id, next_seq, next_offset)
            else:
                kept = await connection.fetchval(_KEEP, upload_id, lease.lease_id, UPLOAD_EXPIRY)
            if kept is None:
                raise await _lease_lost(connection, upload_id)

        return in_batch

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
                offset = await connection.fetchval(_RELEASE, lease.upload_id, lease.lease_id)
            else:
                offset, chunk_count = undo
                if await connection.fetchval(_RELEASE_AT, lease.upload_id, lease.lease_id, offset) is None:
                    return
                await connection.execute(_RECORD_CHUNKS, payload_id, chunk_count, offset)
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
            # The session row first, then the payload (its chunks go with it): the order every writer locks them in.
            if await connection.fetchval(_END_LEASED, lease.upload_id, lease.lease_id) is not None:
                await connection.execute(_DELETE_PAYLOAD_NOW, payload_id)

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
                expires_at = await connection.fetchval(_RELEASE_AT, upload.id, lease.lease_id, offset)
                if expires_at is None:
                    raise await _lease_lost(connection, upload.id)
                await connection.execute(_RECORD_CHUNKS, payload_id, pipeline.next_seq, offset)
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
                    if await connection.fetchval(_LEASE_HOLDS, lease.upload_id, lease.lease_id) is None:
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
        service = BackupService(session=self.session)
        envelope = envelope_of_row(upload)
        assert principal.project_id is not None
        try:
            device = await service.device_for_upload(principal, upload.device_id_hash)
            verify_backup_signature(
                envelope,
                project_id=principal.project_id,
                public_key=device.public_key,
                payload_sha256=payload_sha256,
                payload_size=upload.upload_length,
            )
            backup = await service.commit_backup(
                organization_id=principal.organization_id,
                project_id=principal.project_id,
                device=device,
                envelope=envelope,
                payload_id=upload.payload_id,
                payload_size=upload.upload_length,
                payload_sha256=payload_sha256,
                chunk_count=chunk_count,
                principal=principal,
                upload=lease,
                settings=self.context.settings,
                request=self.request,
            )
        except (UnprocessableError, ConflictError):
            # The envelope is fixed at creation: an upload that fails verification can never succeed.
            await asyncio.shield(self._discard(lease, payload_id))
            raise
        get_runtime(self.request.app.state).audit_linker.notify(principal.organization_id)
        return backup.id


# --- the controller --------------------------------------------------------------------------------------------


class UploadController(Controller):
    """tus 1.0.0 endpoints (creation at the collection, the rest at each upload's URL)."""

    path = UPLOADS_PATH
    tags = ["uploads (tus)"]  # noqa: RUF012 - Litestar's declared attribute
    security = [{"BearerAuth": []}]  # noqa: RUF012
    exception_handlers = _TUS_EXCEPTION_HANDLERS

    @route(
        "/",
        http_method=HttpMethod.OPTIONS,
        status_code=204,
        opt={"exclude_from_auth": True},
        security=[],
        summary="tus discovery",
        description="`Tus-Version`, `Tus-Extension`, `Tus-Max-Size`, `Tus-Checksum-Algorithm`; no credential needed.",
    )
    # Litestar registers a controller's handlers sorted by name and adds its own OPTIONS handler to a path whose
    # first handler lacks one; this handler's name must sort first so that it, not Litestar's, answers OPTIONS.
    async def advertise(self, state: State) -> Response[None]:
        """Advertise the protocol version, extensions, size limit and checksum algorithms."""
        return Response(
            None,
            status_code=204,
            headers={
                "Tus-Resumable": TUS_VERSION,
                "Tus-Version": TUS_VERSION,
                "Tus-Extension": ",".join(TUS_EXTENSIONS),
                "Tus-Max-Size": str(backups_context(state).settings.max_upload_size),
                "Tus-Checksum-Algorithm": ",".join(TUS_CHECKSUM_ALGORITHMS),
            },
        )

    @post(
        "/",
        status_code=201,
        guards=[requires_backup_access],
        request_max_body_size=None,
        summary="Create an upload (tus creation, creation-with-upload)",
        description=(
            "`Upload-Length` (1..`MAX_UPLOAD_SIZE`, else 413) and `Upload-Metadata` with every envelope field but the "
            "payload, validated now: 400 malformed, 422 naming an invalid field, 409 for a reused `payload_nonce` "
            "(naming `backup_id` when this very envelope was committed), "
            "507 when `Upload-Length` does not fit under the project's storage quota, which open uploads reserve "
            "their `Upload-Length` from; 429 when the project already has `MAX_OPEN_UPLOADS` uploads open; 400 "
            "without `PUBLIC_URL` configured and without a `Host` header. "
            "With `Content-Type: application/offset+octet-stream` the body is the upload's first bytes."
        ),
    )
    async def create_upload(
        self, request: Request[Any, Any, Any], db_session: NamedDependency[AsyncSession], state: State
    ) -> Response[bytes]:
        """Create an upload session for one backup."""
        require_tus_resumable(request)
        principal = principal_of(request)
        context = backups_context(state)
        if "upload-defer-length" in request.headers:
            raise _malformed("Upload-Defer-Length is not supported (the creation-defer-length extension)")
        length = _header_int(request, "Upload-Length")
        if length > context.settings.max_upload_size:
            raise UploadTooLargeError(
                f"Upload-Length exceeds MAX_UPLOAD_SIZE ({context.settings.max_upload_size} bytes)"
            )
        if length < 1:
            raise invalid_field("payload", "must not be empty (Upload-Length 0)")
        envelope = envelope_from_metadata(request.headers.get("upload-metadata", ""))
        with_upload = _media_type(request) == OFFSET_OCTET_STREAM
        checksum = _checksum(request) if with_upload else None
        if with_upload and (request.content_length or 0) > length:
            raise UploadTooLargeError(f"the body ({request.content_length} bytes) exceeds Upload-Length ({length})")
        uploads_url = _uploads_url(request, context)
        if with_upload and request.content_length == length <= IN_MEMORY_UPLOAD_MAX:
            return await _create_whole(
                request, context, principal, envelope, checksum=checksum, uploads_url=uploads_url
            )
        assert principal.project_id is not None
        service = BackupService(session=db_session)
        device = await service.device_for_upload(principal, envelope.device_id_hash)
        await service.ensure_nonce_unused(
            principal.project_id, envelope.device_id_hash, envelope.payload_nonce, signature=envelope.signature
        )
        await LifecycleService(session=db_session).reserve_upload(
            principal.project_id, length, max_open_uploads=context.settings.max_open_uploads
        )
        new = service.add_payload(
            organization_id=principal.organization_id,
            project_id=principal.project_id,
            crypto=context.crypto,
            store=context.stores.default.kind,
        )
        upload = UploadSession(
            id=uuid7(),
            organization_id=principal.organization_id,
            project_id=principal.project_id,
            device_id=device.id,
            payload_id=new.id,
            upload_length=length,
            upload_offset=0,
            **envelope_columns(envelope),
            expires_at=datetime.now(UTC) + UPLOAD_EXPIRY,
        )
        db_session.add(upload)
        await db_session.commit()
        TUS_SESSIONS_CREATED.inc()
        headers = _base_headers(upload)
        headers["Location"] = f"{uploads_url}/{upload.id}"
        if with_upload and request.content_length != 0:
            receiver = PatchReceiver(request, context, db_session, principal, upload, checksum)
            await _receive_first_bytes(receiver, headers)
        return Response(b"", status_code=201, headers=headers, media_type=MediaType.TEXT)  # no body, not `null`

    @head(
        "/{upload_id:uuid}",
        guards=[requires_backup_access],
        summary="An upload's offset (tus core)",
        description="`Upload-Offset`, `Upload-Length`, `Upload-Expires`; 404 unknown, 410 expired.",
    )
    async def upload_offset(
        self, request: Request[Any, Any, Any], db_session: NamedDependency[AsyncSession], upload_id: FromPath[UUID]
    ) -> Response[None]:
        """Where to resume."""
        require_tus_resumable(request)
        upload = await _load_upload(db_session, principal_of(request), upload_id)
        headers = _base_headers(upload)
        headers["Upload-Length"] = str(upload.upload_length)
        return Response(None, status_code=200, headers=headers)

    @patch(
        "/{upload_id:uuid}",
        status_code=204,
        guards=[requires_backup_access],
        request_max_body_size=None,
        summary="Append bytes (tus core, checksum)",
        description=(
            "`Content-Type: application/offset+octet-stream`; `Upload-Offset` must equal the upload's offset (409). "
            "The offset grows as each MiB is stored (not with `Upload-Checksum`, which counts only once verified), "
            "short of `Upload-Length` until the commit. A new PATCH takes the upload over from one still open, "
            "which then answers 409; a PATCH whose upload ends meanwhile (terminated, expired) answers 404. "
            "`Upload-Checksum` (`sha1` or `sha256`) covers this PATCH's body: 460 on mismatch, offset unchanged. "
            "The PATCH that completes the upload verifies the signature and commits: `Zkeb-Backup-Id`; 507 when the "
            "project's quota cannot take it any more (the upload stays, resend its last bytes after making room)."
        ),
    )
    async def append(
        self,
        request: Request[Any, Any, Any],
        db_session: NamedDependency[AsyncSession],
        state: State,
        upload_id: FromPath[UUID],
    ) -> Response[None]:
        """Receive the next bytes of an upload."""
        require_tus_resumable(request)
        if _media_type(request) != OFFSET_OCTET_STREAM:
            raise UnsupportedUploadMediaTypeError(f"a PATCH body must be {OFFSET_OCTET_STREAM}")
        offset = _header_int(request, "Upload-Offset")
        checksum = _checksum(request)
        principal = principal_of(request)
        upload = await _load_upload(db_session, principal, upload_id)
        if offset != upload.upload_offset:
            raise ProblemError(
                f"Upload-Offset {offset} does not match the upload's offset {upload.upload_offset}",
                status_code=409,
                headers={"Upload-Offset": str(upload.upload_offset)},
            )
        context = backups_context(state)
        outcome = await PatchReceiver(request, context, db_session, principal, upload, checksum).receive()
        headers = _base_headers()
        headers["Upload-Offset"] = str(outcome.offset)
        if outcome.backup_id is not None:
            headers[BACKUP_ID_HEADER] = str(outcome.backup_id)
        else:
            headers["Upload-Expires"] = format_upload_expires(outcome.expires_at)
        if outcome.timed_out:
            raise RequestBodyTimeoutError(_STALLED, headers=headers)
        return Response(None, status_code=204, headers=headers)

    @delete(
        "/{upload_id:uuid}",
        guards=[requires_backup_access],
        summary="Abandon an upload (tus termination)",
        description="204; the upload and its bytes are deleted. A PATCH still open on it stops and answers 404.",
    )
    async def terminate(
        self, request: Request[Any, Any, Any], db_session: NamedDependency[AsyncSession], upload_id: FromPath[UUID]
    ) -> Response[None]:
        """Delete an upload and what it received."""
        require_tus_resumable(request)
        principal = principal_of(request)
        upload = await _load_upload(db_session, principal, upload_id)
        # The session row first, as every writer locks it: a PATCH still open on the upload stores nothing more.
        if await db_session.scalar(_LOCK_SESSION, {"id": upload.id}) is None:
            raise NotFoundError("upload not found")
        await db_session.execute(sa_delete(Payload).where(Payload.id == upload.payload_id))
        await db_session.commit()
        return Response(None, status_code=204, headers={"Tus-Resumable": TUS_VERSION})


async def _create_whole(
    request: Request[Any, Any, Any],
    context: BackupsContext,
    principal: Principal,
    envelope: BackupEnvelope,
    *,
    checksum: tuple[str, bytes] | None,
    uploads_url: str,
) -> Response[bytes]:
    """A creation-with-upload that carries the whole (small) payload: one transaction, as a single-shot upload.

    Nothing is stored before the commit, so a refusal (460, 422, 409, 507) leaves nothing behind; the `Location`
    answered names an upload that is already complete (its `HEAD` is 404, as after any completed upload).
    """
    with tracer.start_as_current_span("backups.receive") as span:
        body = await request.body()
        span.set_attribute("zkeb.bytes", len(body))
    if checksum is not None and not hmac.compare_digest(hashlib.new(checksum[0], body).digest(), checksum[1]):
        raise ChecksumMismatchError(
            f"the body does not match Upload-Checksum ({checksum[0]}); nothing was stored",
            headers={"Upload-Offset": "0"},
        )
    backup = await commit_in_memory(
        context,
        principal,
        envelope,
        InMemoryPayload.of(body),
        method="tus",
        request=request,
        audit_committed=get_runtime(request.app.state).audit_linker.notify,
    )
    TUS_SESSIONS_CREATED.inc()
    headers = _base_headers()
    headers["Location"] = f"{uploads_url}/{uuid7()}"
    headers["Upload-Offset"] = str(len(body))
    headers[BACKUP_ID_HEADER] = str(backup.id)
    return Response(b"", status_code=201, headers=headers, media_type=MediaType.TEXT)


async def _receive_first_bytes(receiver: PatchReceiver, headers: dict[str, str]) -> None:
    """Store a creation-with-upload's body into the new upload; its offset (and backup, if complete) into `headers`.

    Raises:
        HTTPException: the body was refused (the creation is undone), or the upload stays and `Location` in the
            error's headers says where to resume it (503, 507, and 408 when the body stalled).
    """
    session, upload = receiver.session, receiver.upload
    # Read now: a rollback on the way (a refused commit) expires the ORM object.
    upload_id, payload_id = upload.id, upload.payload_id
    location = {"Location": headers["Location"]}
    try:
        outcome = await receiver.receive()
    except HTTPException as exc:
        if exc.status_code < 500:  # refused for its body (460, 422, a 409 nonce...): the creation is undone
            await _discard_upload(session, upload_id, payload_id)
        else:  # the upload stays (e.g. 507 at the commit): say where to resume it
            exc.headers = {**(exc.headers or {}), **location}
        raise
    except PoolTimeoutError:  # the upload stays: say where to resume it, as the pool-timeout 503 would
        raise ServiceUnavailableError(
            "the server is busy (no database connection free); resume the upload at its Location shortly",
            headers={"Retry-After": "1", **location},
        ) from None
    except Exception as exc:  # e.g. the database failed over mid-body: what was stored stays, resumable
        if database_out_of_space(exc):
            raise storage_full(location) from None
        logger.exception("creation-with-upload failed after its upload was created")
        raise ServiceUnavailableError(
            "the upload could not be finished; resume it at its Location", headers={"Retry-After": "1", **location}
        ) from None
    headers["Upload-Offset"] = str(outcome.offset)
    headers["Upload-Expires"] = format_upload_expires(outcome.expires_at)
    if outcome.timed_out:
        raise RequestBodyTimeoutError(_STALLED, headers=headers)
    if outcome.backup_id is not None:
        headers[BACKUP_ID_HEADER] = str(outcome.backup_id)


async def _discard_upload(session: AsyncSession, upload_id: UUID, payload_id: UUID) -> None:
    """Delete an upload and its bytes, as termination does (nothing when it is already gone).

    Best effort, for a request that is being refused anyway: when the database fails now, the refusal still goes out
    and the sweeper removes the upload once it expires.
    """
    try:
        await session.rollback()  # whatever the refused request left open
        # The session row first, as every writer locks it.
        if await session.scalar(_LOCK_SESSION, {"id": upload_id}) is not None:
            await session.execute(sa_delete(Payload).where(Payload.id == payload_id))
        await session.commit()
    except Exception as exc:  # noqa: BLE001 - see above
        logger.warning("could not discard a refused upload; it expires", extra={"error": type(exc).__name__})


# --- expiration ------------------------------------------------------------------------------------------------


_LOCK_SESSION = text("SELECT id FROM upload_sessions WHERE id = :id FOR UPDATE")
_SWEEPABLE = text("SELECT organization_id, payload_id FROM zkeb_sweepable_payloads(:limit, :orphan_before)")
_STILL_SWEEPABLE = text(
    "SELECT p.id, (SELECT s.id FROM upload_sessions s WHERE s.payload_id = p.id) AS upload_id"
    " FROM payloads p WHERE p.id = :id AND ("
    " EXISTS (SELECT 1 FROM upload_sessions s WHERE s.payload_id = p.id AND s.expires_at < now())"
    " OR (p.created_at < :orphan_before"
    "     AND NOT EXISTS (SELECT 1 FROM backups b WHERE b.payload_id = p.id)"
    "     AND NOT EXISTS (SELECT 1 FROM upload_sessions s WHERE s.payload_id = p.id)))"
    " FOR UPDATE OF p SKIP LOCKED"
)
#: The session row first, as every writer locks it (see `_CLAIM`); a PATCH storing a batch right now holds it.
_LOCK_SESSION_OF = text("SELECT id FROM upload_sessions WHERE payload_id = :id FOR UPDATE SKIP LOCKED")
_DELETE_PAYLOAD = text("DELETE FROM payloads WHERE id = :id")
#: `actor_id` of the audit events the sweeper records.
SWEEPER_ACTOR_ID = "maintenance"


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one sweep found and removed."""

    candidates: int
    expired_uploads: int
    orphaned_payloads: int

    @property
    def deleted(self) -> int:
        """Payloads deleted, both kinds."""
        return self.expired_uploads + self.orphaned_payloads


class UploadSweeper:
    """Purges expired tus uploads (and orphaned payloads) with their chunks, in bounded batches.

    Safe with several processes: each payload is deleted in its tenant's transaction after re-checking, under
    `FOR UPDATE SKIP LOCKED` of its upload session and itself, that it is still sweepable. A PATCH pushes the
    upload's expiry forward with each batch it stores, so an upload receiving bytes is never expired.
    Each deletion is audited (actor `system`) in the same transaction.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch: int = SWEEP_BATCH,
        settings: Settings | None = None,
    ) -> None:
        """Sweep at most `batch` payloads of each kind per pass (the maintenance runner schedules the passes)."""
        self._engine = engine
        self._batch = batch
        self._settings = settings

    async def sweep_once(self) -> int:
        """One pass; returns how many payloads it deleted."""
        return (await self.sweep()).deleted

    async def sweep(self) -> SweepResult:
        """One pass; says how many candidates it saw and what it deleted."""
        orphan_before = datetime.now(UTC) - ORPHAN_AGE
        expired = orphaned = 0
        with tracer.start_as_current_span("backups.sweep") as span:
            async with self._engine.connect() as connection:
                candidates = (
                    await connection.execute(_SWEEPABLE, {"limit": self._batch, "orphan_before": orphan_before})
                ).all()
                await connection.rollback()
            for organization_id, payload_id in candidates:
                async with tenant_transaction(self._engine, organization_id) as connection:
                    locked_session = await connection.scalar(_LOCK_SESSION_OF, {"id": payload_id})
                    still = (
                        await connection.execute(_STILL_SWEEPABLE, {"id": payload_id, "orphan_before": orphan_before})
                    ).first()
                    if still is None or (still.upload_id is not None and still.upload_id != locked_session):
                        continue
                    await connection.execute(_DELETE_PAYLOAD, {"id": payload_id})
                    is_upload = still.upload_id is not None
                    await record_event(
                        connection,
                        organization_id=organization_id,
                        action="upload.expired" if is_upload else "payload.orphan_purged",
                        actor_type=SYSTEM_ACTOR,
                        actor_id=SWEEPER_ACTOR_ID,
                        target_type="upload" if is_upload else "payload",
                        target_id=str(still.upload_id if is_upload else payload_id),
                        details={"payload_id": str(payload_id)},
                        settings=self._settings,
                    )
                if is_upload:
                    expired += 1
                    TUS_SESSIONS_EXPIRED.inc()
                else:
                    orphaned += 1
                    ORPHAN_PAYLOADS_PURGED.inc()
            result = SweepResult(len(candidates), expired, orphaned)
            span.set_attribute("zkeb.candidates", len(candidates))
            span.set_attribute("zkeb.deleted", result.deleted)
        if result.deleted:
            logger.info("purged %d expired uploads and %d orphaned payloads", expired, orphaned)
        return result
