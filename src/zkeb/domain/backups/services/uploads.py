"""tus uploads: finding, creating, discarding and terminating an upload session, and small uploads sent whole.

The rules behind `zkeb.domain.backups.controllers.uploads` (the protocol is `zkeb.domain.backups.tus`): a creation
checks the device, the nonce and the quota before any byte; a small upload sent whole in its creation request
commits in one transaction, as a single-shot upload does (`zkeb.domain.backups.services.finalize`). Receiving a PATCH is
`zkeb.domain.backups.services.upload_patch`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from litestar import Request
from opentelemetry import trace
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from zkeb.core.audit import record_event
from zkeb.core.auth import Principal
from zkeb.core.errors import NotFoundError
from zkeb.core.runtime import get_runtime
from zkeb.db.models import UploadSession
from zkeb.domain.backups.context import BackupsContext
from zkeb.domain.backups.envelope import BackupEnvelope, envelope_columns
from zkeb.domain.backups.errors import ChecksumMismatchError, UploadGoneError
from zkeb.domain.backups.metrics import TUS_SESSIONS_CREATED
from zkeb.domain.backups.services.backups import BackupService
from zkeb.domain.backups.services.finalize import InMemoryPayload, commit_in_memory
from zkeb.domain.backups.services.lifecycle import LifecycleService
from zkeb.domain.backups.store import upload_leases

__all__ = (
    "IN_MEMORY_UPLOAD_MAX",
    "UPLOAD_EXPIRY",
    "WholeUpload",
    "commit_whole_upload",
    "create_upload_session",
    "discard_upload",
    "load_upload",
    "terminate_upload",
)

logger = logging.getLogger("zkeb.backups.tus")
tracer = trace.get_tracer("zkeb.backups")

#: How long an upload stays resumable after its creation or the last bytes it stored.
UPLOAD_EXPIRY = timedelta(hours=24)
#: A creation-with-upload whose body is the whole payload and at most this long is stored and committed in one
#: transaction, like a single-shot upload (`services.finalize`); longer ones stream through a session.
IN_MEMORY_UPLOAD_MAX = 256 * 1024


async def load_upload(session: AsyncSession, principal: Principal, upload_id: UUID) -> UploadSession:
    """The principal's upload `upload_id`.

    Raises:
        NotFoundError: no such upload in the principal's project (or another device's) (404).
        UploadGoneError: the upload expired (410).
    """
    upload = await session.scalar(
        select(UploadSession).where(UploadSession.id == upload_id, UploadSession.project_id == principal.project_id)
    )
    if upload is None or (principal.kind == "device" and upload.device_id_hash != principal.device_id_hash):
        raise NotFoundError("upload not found")
    if upload.expires_at <= datetime.now(UTC):
        raise UploadGoneError("the upload expired")
    return upload


async def _unsent_identical(
    session: AsyncSession, principal: Principal, device_id: UUID, columns: dict[str, Any], length: int
) -> UploadSession | None:
    """An open upload of the device with this envelope (`columns`) and length that has received nothing yet."""
    candidate = await session.scalar(
        select(UploadSession)
        .where(
            UploadSession.organization_id == principal.organization_id,
            UploadSession.project_id == principal.project_id,
            UploadSession.device_id == device_id,
            UploadSession.payload_nonce == columns["payload_nonce"],
            UploadSession.upload_length == length,
            UploadSession.upload_offset == 0,
            UploadSession.expires_at > datetime.now(UTC),
        )
        .limit(1)
    )
    if candidate is None or any(getattr(candidate, column) != value for column, value in columns.items()):
        return None
    return candidate


async def create_upload_session(
    session: AsyncSession,
    context: BackupsContext,
    principal: Principal,
    envelope: BackupEnvelope,
    length: int,
    *,
    reuse_unsent: bool,
) -> UploadSession:
    """Admit a new upload of `length` bytes (device, nonce, quota, open uploads) and create its session.

    With `reuse_unsent` (a creation without a body), a creation identical to an open upload's that has received
    nothing yet (the same device, envelope and length) is that upload again: a client retrying a creation whose
    answer was lost gets the first one's `Location`, and the project does not reserve its length twice nor count a
    second open upload. An upload that has received bytes is left to its own client (a retried creation cannot know
    its offset, and a plain tus client starts at 0), and a creation with a body always gets an upload of its own: a
    refused body discards its upload, which must not be one another request is filling.

    Raises:
        NotFoundError, UnprocessableError: the device is unknown or revoked (see `BackupService.device_for_upload`).
        ConflictError: the payload nonce was used before (409).
        InsufficientStorageError: `length` does not fit under the project's quota (507).
        TooManyOpenUploadsError: the project has `MAX_OPEN_UPLOADS` uploads open (429).
    """
    assert principal.project_id is not None
    service = BackupService(session=session)
    device = await service.device_for_upload(principal, envelope.device_id_hash)
    await service.ensure_nonce_unused(
        principal.project_id, envelope.device_id_hash, envelope.payload_nonce, signature=envelope.signature
    )
    columns = envelope_columns(envelope)
    lifecycle = LifecycleService(session=session)
    # The project row is locked first, as every creation and commit of the project locks it: an identical creation
    # running at the same time has committed its upload (found here) or has not begun looking (it will find this one).
    project = await lifecycle.lock_project_for_upload(principal.project_id)
    if reuse_unsent and (unsent := await _unsent_identical(session, principal, device.id, columns, length)):
        await session.commit()
        return unsent
    await lifecycle.reserve_upload(
        project, principal.project_id, length, max_open_uploads=context.settings.max_open_uploads
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
        **columns,
        expires_at=datetime.now(UTC) + UPLOAD_EXPIRY,
    )
    session.add(upload)
    await session.commit()
    TUS_SESSIONS_CREATED.inc()
    return upload


async def terminate_upload(
    session: AsyncSession, principal: Principal, upload_id: UUID, *, request: Request[Any, Any, Any] | None = None
) -> None:
    """Delete an upload and what it received (tus termination), recorded as `upload.terminated` in the audit trail;
    a PATCH still open on it stores nothing more.

    Raises:
        NotFoundError: no such upload (404), or it ended meanwhile.
        UploadGoneError: the upload expired (410).
    """
    upload = await load_upload(session, principal, upload_id)
    # The session row first, as every writer locks it: a PATCH still open on the upload stores nothing more.
    if not await upload_leases.lock_session(session, upload.id):
        raise NotFoundError("upload not found")
    details = {
        "project_id": str(upload.project_id),
        "payload_id": str(upload.payload_id),
        "upload_length": upload.upload_length,
        "upload_offset": upload.upload_offset,
    }
    await upload_leases.delete_payload(session, upload.payload_id)
    await record_event(
        session,
        organization_id=principal.organization_id,
        action="upload.terminated",
        actor_type=principal.actor_type,
        actor_id=principal.actor_id,
        target_type="upload",
        target_id=str(upload_id),
        details=details,
        request=request,
    )
    await session.commit()


async def discard_upload(session: AsyncSession, upload_id: UUID, payload_id: UUID) -> None:
    """Delete an upload and its bytes, as termination does (nothing when it is already gone).

    Best effort, for a request that is being refused anyway: when the database fails now, the refusal still goes out
    and the sweeper removes the upload once it expires.
    """
    try:
        await session.rollback()  # whatever the refused request left open
        # The session row first, as every writer locks it.
        if await upload_leases.lock_session(session, upload_id):
            await upload_leases.delete_payload(session, payload_id)
        await session.commit()
    except Exception as exc:  # noqa: BLE001 - see above
        logger.warning("could not discard a refused upload; it expires", extra={"error": type(exc).__name__})


@dataclass(frozen=True, slots=True)
class WholeUpload:
    """An upload created and committed by one request: its length and its backup."""

    length: int
    backup_id: UUID


async def commit_whole_upload(
    request: Request[Any, Any, Any],
    context: BackupsContext,
    principal: Principal,
    envelope: BackupEnvelope,
    *,
    checksum: tuple[str, bytes] | None,
) -> WholeUpload:
    """A creation-with-upload that carries the whole (small) payload: one transaction, as a single-shot upload.

    Nothing is stored before the commit, so a refusal (460, 422, 409, 507) leaves nothing behind.

    Raises:
        ChecksumMismatchError: the body does not match `Upload-Checksum` (460).
        NotFoundError, UnprocessableError, ConflictError, InsufficientStorageError: see `commit_in_memory`.
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
    return WholeUpload(len(body), backup.id)
