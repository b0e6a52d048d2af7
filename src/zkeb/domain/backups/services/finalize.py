"""A backup's commit: admission, the signature, the rows, usage, retention and the audit, in one durable transaction.

Every backup is committed here, in one transaction on one pooled connection that reads the project's policy, the
device and the nonce in one statement, verifies the signature, writes the rows (the nonce, the backup and the usage
in one statement with the payload's), applies retention, records `backup.created` for the audit trail, and commits:
one WAL flush per backup. Two ways in:

- `commit_in_memory`: a payload received whole (a single-shot upload, a tus upload whose whole body comes with its
  creation). Nothing is gained by staging it: its payload row and chunks are written in the same transaction
  (further chunks one statement each, encrypted as they go, so memory stays at the body plus one chunk).
- `commit_stored`: a tus upload whose last PATCH stored the rest of its chunks. The transaction also ends the upload
  (its session row goes, provided the PATCH's lease still holds it) and seals the stored payload.

Nothing here takes a lock another project's commit, or another device's, waits for: usage goes to the
connection's usage shard (`zkeb.domain.backups.store.commits`) unless the project has a quota, retention ranks
under an advisory lock of one (container, device), and the audit event waits unchained for the linker
(`zkeb.core.audit_linker`). See docs/backups-commit.md for the measurements behind this.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from opentelemetry import trace
from uuid_utils.compat import uuid7

from zkeb.core.audit_linker import append_unchained_event
from zkeb.core.auth import INVALID_TOKEN_CHALLENGE, Principal
from zkeb.core.database import pooled_connection
from zkeb.core.errors import ConflictError, NotFoundError
from zkeb.db.models import Backup
from zkeb.domain.backups.context import BackupsContext
from zkeb.domain.backups.crypto import PayloadKey
from zkeb.domain.backups.envelope import BackupEnvelope, envelope_columns, invalid_field
from zkeb.domain.backups.errors import UPLOAD_ENDED, UPLOAD_LEASE_LOST, UploadEndedError, UploadLeaseLostError
from zkeb.domain.backups.metrics import BACKUPS_TRASHED, record_backup_created, record_backup_failed
from zkeb.domain.backups.services.backups import nonce_conflict, verify_backup_signature
from zkeb.domain.backups.services.lifecycle import RETENTION, TrashedBackup, quota_exceeded, record_retention_events
from zkeb.domain.backups.store import upload_leases
from zkeb.domain.backups.store.commits import (
    Admission,
    BackupRow,
    PayloadKeyColumns,
    TrashedRow,
    charge_project_row,
    insert_backup,
    insert_chunk,
    lock_project_row,
    lock_retention_scope,
    nonce_owner,
    project_usage,
    read_admission,
    seal_stored_backup,
    share_project_row,
    trash_beyond_retention,
)
from zkeb.domain.backups.store.connection import raw_tenant_transaction
from zkeb.domain.backups.store.payloads import PayloadStore
from zkeb.domain.backups.store.upload_leases import UploadLease
from zkeb.lib.atrest import ChunkCipher

__all__ = ("InMemoryPayload", "StoredPayload", "commit_in_memory", "commit_stored")

tracer = trace.get_tracer("zkeb.backups")

_NONCE_CONSTRAINT = "uq_payload_nonces"
#: Chunks encrypted and staged at once when the store keeps bytes outside PostgreSQL.
STAGE_BATCH = 8


@dataclass(frozen=True, slots=True)
class InMemoryPayload:
    """A payload received whole: its bytes (a view into the request body is fine) and their SHA-256."""

    data: bytes | memoryview
    sha256: bytes

    @classmethod
    def of(cls, data: bytes | memoryview) -> InMemoryPayload:
        """Hash `data`."""
        with tracer.start_as_current_span("backups.hash", attributes={"zkeb.bytes": len(data)}):
            return cls(data, hashlib.sha256(data).digest())


@dataclass(frozen=True, slots=True)
class StoredPayload:
    """A tus upload's payload, every chunk stored under the lease of the PATCH that completes it."""

    lease: UploadLease
    payload_id: UUID
    size: int
    sha256: bytes
    chunk_count: int


@dataclass(frozen=True, slots=True)
class _Commit:
    """What one commit writes: who for, which envelope and payload, and the backup's id."""

    context: BackupsContext
    principal: Principal
    organization_id: UUID
    project_id: UUID
    envelope: BackupEnvelope
    method: str
    payload_id: UUID
    size: int
    sha256: bytes
    backup_id: UUID = field(default_factory=uuid7)

    @classmethod
    def of(
        cls,
        context: BackupsContext,
        principal: Principal,
        envelope: BackupEnvelope,
        *,
        method: str,
        payload_id: UUID,
        size: int,
        sha256: bytes,
    ) -> _Commit:
        """The commit of `envelope` for `principal`.

        Raises:
            UnprocessableError: a device token acting for another device (422 naming `device_id_hash`).
        """
        if not principal.can_act_for_device(envelope.device_id_hash):
            raise invalid_field("device_id_hash", "a device token may only upload for its own device")
        assert principal.project_id is not None  # backup access: project keys and devices only
        return cls(
            context,
            principal,
            principal.organization_id,
            principal.project_id,
            envelope,
            method,
            payload_id,
            size,
            sha256,
        )

    def row(self, device_id: UUID, chunk_count: int) -> BackupRow:
        """The backup's columns, with the admitted device's id and the payload's chunk count."""
        return BackupRow(
            id=self.backup_id,
            organization_id=self.organization_id,
            project_id=self.project_id,
            device_id=device_id,
            payload_id=self.payload_id,
            size=self.size,
            sha256=self.sha256,
            chunk_count=chunk_count,
            envelope=self.envelope,
        )


#: Writes a commit's rows once it is admitted and locked: (connection, admission, device id) -> the backup's time.
_WriteRows = Callable[[asyncpg.Connection, Admission, UUID], Awaitable[datetime]]


async def commit_in_memory(
    context: BackupsContext,
    principal: Principal,
    envelope: BackupEnvelope,
    payload: InMemoryPayload,
    *,
    method: str,
    request: ASGIConnection[Any, Any, Any, Any] | None = None,
    audit_committed: Callable[[UUID], None] | None = None,
) -> Backup:
    """Admit, verify, store and commit one backup in one transaction; the committed backup (not in any session).

    `method` labels the metrics (`single`, `tus`). `audit_committed(organization_id)` is called after the commit
    when an audit event waits to be linked.

    Raises:
        UnprocessableError: another device than the token's, an unknown or revoked device, a bad signature (422).
        ConflictError: the device used `payload_nonce` before in this project (409; naming `backup_id` when this
            very envelope was committed).
        InsufficientStorageError: the payload does not fit under the project's quota (507).
        NotFoundError: the project is gone.
        NotAuthorizedException: the request's API key was revoked while it ran (401).
    """
    commit = _Commit.of(
        context, principal, envelope, method=method, payload_id=uuid7(), size=len(payload.data), sha256=payload.sha256
    )
    store = context.stores.default
    key, cipher = context.crypto.new_key(commit.payload_id)

    async def write_rows(connection: asyncpg.Connection, admission: Admission, device_id: UUID) -> datetime:
        return await _write_in_memory(connection, commit, payload, admission, device_id, store, key, cipher)

    # Bytes kept outside PostgreSQL are stored before its transaction opens, never while it is open; a refused or
    # failed commit deletes them again.
    try:
        await _stage(store, commit, payload, cipher)
        return await _run(commit, write_rows, request=request, audit_committed=audit_committed)
    except BaseException:
        if store.stages_bytes:
            await asyncio.shield(store.unstage(commit.organization_id, commit.payload_id))
        raise


async def commit_stored(
    context: BackupsContext,
    principal: Principal,
    envelope: BackupEnvelope,
    payload: StoredPayload,
    *,
    request: ASGIConnection[Any, Any, Any, Any] | None = None,
    audit_committed: Callable[[UUID], None] | None = None,
) -> Backup:
    """Admit, verify and commit a tus upload whose chunks are stored, ending the upload, in one transaction.

    The upload's own reservation (its `Upload-Length`) counts as room under the quota.

    Raises:
        UnprocessableError, ConflictError, InsufficientStorageError, NotFoundError: as `commit_in_memory`.
        UploadLeaseLostError: a later PATCH took the upload over (409), or it ended meanwhile (404,
            `UploadEndedError`); nothing changed.
    """
    commit = _Commit.of(
        context,
        principal,
        envelope,
        method="tus",
        payload_id=payload.payload_id,
        size=payload.size,
        sha256=payload.sha256,
    )

    async def write_rows(connection: asyncpg.Connection, admission: Admission, device_id: UUID) -> datetime:
        # The session row first, then the payload's: the order every writer locks them in.
        if not await upload_leases.end_leased(connection, payload.lease):
            raise _lease_lost(exists=await upload_leases.session_exists(connection, payload.lease.upload_id))
        return await seal_stored_backup(
            connection,
            commit.row(device_id, payload.chunk_count),
            nonce_id=uuid7(),
            shard_id=uuid7(),
            charge_shard=admission.quota is None,
        )

    return await _run(commit, write_rows, request=request, audit_committed=audit_committed, lease=payload.lease)


async def _stage(store: PayloadStore, commit: _Commit, payload: InMemoryPayload, cipher: ChunkCipher) -> None:
    """Encrypt and stage the chunks a few at a time (memory: the body plus `STAGE_BATCH` chunks)."""
    if not store.stages_bytes:
        return  # the rows carry the bytes
    view = memoryview(payload.data).cast("B")
    chunk_size = store.chunk_size
    chunk_count = max(1, -(-commit.size // chunk_size))
    with tracer.start_as_current_span("backups.stage", attributes={"zkeb.chunk_count": chunk_count}):
        for first in range(0, chunk_count, STAGE_BATCH):
            chunks = [
                (seq, cipher.encrypt(seq, view[seq * chunk_size : (seq + 1) * chunk_size]))
                for seq in range(first, min(first + STAGE_BATCH, chunk_count))
            ]
            await store.stage(commit.organization_id, commit.payload_id, chunks)


async def _run(
    commit: _Commit,
    write_rows: _WriteRows,
    *,
    request: ASGIConnection[Any, Any, Any, Any] | None,
    audit_committed: Callable[[UUID], None] | None,
    lease: UploadLease | None = None,
) -> Backup:
    """The one transaction: admit, verify, lock, write the rows, charge, apply retention, audit.

    With `lease` (a tus upload's), a lease that no longer holds the upload is refused before anything else: a PATCH
    taken over, or whose upload a later PATCH completed, answers as such rather than with that commit's nonce.
    """
    envelope = commit.envelope
    attributes: dict[str, str | int] = {
        "zkeb.backup_id": str(commit.backup_id),
        "zkeb.project_id": str(commit.project_id),
        "zkeb.bytes": commit.size,
    }
    with tracer.start_as_current_span("backups.commit", attributes=attributes) as span:
        async with pooled_connection(commit.context.engine) as connection:
            try:
                async with raw_tenant_transaction(connection, commit.organization_id):
                    admission = await read_admission(
                        connection,
                        project_id=commit.project_id,
                        device_id_hash=envelope.device_id_hash,
                        nonce=envelope.payload_nonce,
                        upload_id=lease.upload_id if lease is not None else None,
                        api_key_id=None if commit.principal.kind == "device" else UUID(commit.principal.credential_id),
                    )
                    if lease is not None and admission is not None and admission.upload_lease_id != lease.lease_id:
                        raise _lease_lost(exists=admission.upload_exists)
                    device_id, public_key = _admit(admission, envelope, commit.size, commit.method)
                    verify_backup_signature(
                        envelope,
                        project_id=commit.project_id,
                        public_key=public_key,
                        payload_sha256=commit.sha256,
                        payload_size=commit.size,
                        method=commit.method,
                    )
                    assert admission is not None
                    await _lock(connection, commit, admission, before_other_locks=lease is not None)
                    created_at = await write_rows(connection, admission, device_id)
                    trashed = await _charge_and_retain(connection, commit, admission)
                    audited = await _audit(connection, commit, device_id, trashed, request)
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name != _NONCE_CONSTRAINT:
                    raise
                span.set_attribute("zkeb.outcome", "conflict")
                record_backup_failed("nonce_reuse", commit.method)
                # Committed meanwhile: by this very envelope (a concurrent retry), the conflict names its backup.
                async with raw_tenant_transaction(connection, commit.organization_id, readonly=True):
                    owner = await nonce_owner(
                        connection,
                        project_id=commit.project_id,
                        device_id_hash=envelope.device_id_hash,
                        nonce=envelope.payload_nonce,
                    )
                raise _conflict_for(envelope, owner) from None
        span.set_attribute("zkeb.outcome", "committed")
        span.set_attribute("zkeb.retention_trashed", len(trashed))
    if trashed:
        BACKUPS_TRASHED.labels(reason=RETENTION).inc(len(trashed))
    record_backup_created(commit.method, commit.size)
    if audited and audit_committed is not None:
        audit_committed(commit.organization_id)
    return Backup(
        id=commit.backup_id,
        organization_id=commit.organization_id,
        project_id=commit.project_id,
        device_id=device_id,
        payload_id=commit.payload_id,
        encrypted_payload_size=commit.size,
        payload_sha256=commit.sha256,
        **envelope_columns(envelope),
        created_at=created_at,
        updated_at=created_at,
    )


async def _lock(
    connection: asyncpg.Connection, commit: _Commit, admission: Admission, *, before_other_locks: bool
) -> None:
    """Take the commit's locks, in the order every commit takes them: retention's scope, then the project row.

    With a quota the project row is locked until the commit (the charge counts on it); without one it is only
    key-share-locked, which other commits share, and only when `before_other_locks` (a row lock the commit takes
    next must not be held while the inserts' foreign keys wait for the project row: see `share_project_row`).
    """
    if admission.retention_keep_last is not None or admission.retention_days is not None:
        await lock_retention_scope(
            connection,
            project_id=commit.project_id,
            container_id=commit.envelope.container_id,
            device_id_hash=commit.envelope.device_id_hash,
        )
    if admission.quota is not None:
        await lock_project_row(connection, commit.project_id)
    elif before_other_locks:
        await share_project_row(connection, commit.project_id)


async def _write_in_memory(  # noqa: PLR0917 - the commit's parts, each once
    connection: asyncpg.Connection,
    commit: _Commit,
    payload: InMemoryPayload,
    admission: Admission,
    device_id: UUID,
    store: PayloadStore,
    key: PayloadKey,
    cipher: ChunkCipher,
) -> datetime:
    """Write the payload, its chunks, the nonce and the backup (and, without a quota, the usage); the backup's time."""
    view = memoryview(payload.data).cast("B")

    def row_data(seq: int, piece: memoryview) -> bytes:
        # With staged chunks the rows carry no bytes: nothing to encrypt again here.
        return b"" if store.stages_bytes else cipher.encrypt(seq, piece)

    chunk_size = store.chunk_size
    chunk_count = max(1, -(-commit.size // chunk_size))
    with tracer.start_as_current_span("backups.store", attributes={"zkeb.chunk_count": chunk_count}):
        first = view[:chunk_size]
        created_at = await insert_backup(
            connection,
            commit.row(device_id, chunk_count),
            PayloadKeyColumns(key.key_id, key.wrapped_key, store.kind),
            first_chunk=(uuid7(), len(first), row_data(0, first)),
            nonce_id=uuid7(),
            shard_id=uuid7(),
            charge_shard=admission.quota is None,
        )
        for seq in range(1, chunk_count):  # one chunk in memory at a time, whatever the payload's size
            piece = view[seq * chunk_size : (seq + 1) * chunk_size]
            await insert_chunk(
                connection,
                chunk_id=uuid7(),
                organization_id=commit.organization_id,
                payload_id=commit.payload_id,
                seq=seq,
                offset=seq * chunk_size,
                plain_size=len(piece),
                data=row_data(seq, piece),
            )
    return created_at


async def _charge_and_retain(connection: asyncpg.Connection, commit: _Commit, admission: Admission) -> list[TrashedRow]:
    """Charge a quota'd project's row for the rows just written, then apply the container's retention policy.

    Raises:
        InsufficientStorageError: the project's quota cannot take the payload any more (507).
    """
    if admission.quota is not None and not await charge_project_row(
        connection, project_id=commit.project_id, size=commit.size
    ):
        usage = await project_usage(connection, commit.project_id)
        used, quota = usage if usage is not None else (0, 0)
        record_backup_failed("quota", commit.method)
        raise quota_exceeded(used=used, quota=quota or 0, requested=commit.size)
    if admission.retention_keep_last is None and admission.retention_days is None:
        return []
    return await trash_beyond_retention(
        connection,
        project_id=commit.project_id,
        container_id=commit.envelope.container_id,
        device_id_hash=commit.envelope.device_id_hash,
        keep_last=admission.retention_keep_last,
        days=admission.retention_days,
        deleted_by=RETENTION,
    )


async def _audit(
    connection: asyncpg.Connection,
    commit: _Commit,
    device_id: UUID,
    trashed: list[TrashedRow],
    request: ASGIConnection[Any, Any, Any, Any] | None,
) -> bool:
    """Record `backup.created` and each retention removal, unchained, in the commit's transaction."""
    audited = await append_unchained_event(
        connection,
        organization_id=commit.organization_id,
        action="backup.created",
        actor_type=commit.principal.actor_type,
        actor_id=commit.principal.actor_id,
        target_type="backup",
        target_id=str(commit.backup_id),
        details={
            "project_id": str(commit.project_id),
            "container_id": str(commit.envelope.container_id),
            "device_id": str(device_id),
            "size": commit.size,
            "method": commit.method,
        },
        request=request,
        settings=commit.context.settings,
    )
    await record_retention_events(
        connection,
        organization_id=commit.organization_id,
        project_id=commit.project_id,
        trashed=[TrashedBackup(item.id, item.container_id) for item in trashed],
        settings=commit.context.settings,
        chained=False,
    )
    return audited


def _admit(admission: Admission | None, envelope: BackupEnvelope, size: int, method: str) -> tuple[UUID, bytes]:
    """The device's id and public key, once the device, the nonce and the quota admit the upload.

    Raises:
        NotFoundError, UnprocessableError, ConflictError, InsufficientStorageError: see `commit_in_memory`.
    """
    if admission is None:
        raise NotFoundError("project not found")
    if not admission.key_unrevoked:  # revoked while the body arrived: it may no longer commit what it sent
        raise NotAuthorizedException(
            "the API key was revoked while this request ran",
            headers={"WWW-Authenticate": INVALID_TOKEN_CHALLENGE},
        )
    if admission.device_id is None or admission.public_key is None:
        raise invalid_field("device_id_hash", "is not an enrolled, unrevoked device of this project")
    if admission.nonce_used:
        raise _conflict_for(envelope, (admission.nonce_backup_id, admission.nonce_signature))
    if admission.quota is not None and admission.used + size > admission.quota:
        record_backup_failed("quota", method)
        raise quota_exceeded(used=admission.used, quota=admission.quota, requested=size)
    return admission.device_id, admission.public_key


def _lease_lost(*, exists: bool) -> UploadLeaseLostError:
    """Why a tus commit's lease no longer holds its upload: a later PATCH took it over (409), or it ended (404)."""
    return UploadLeaseLostError(UPLOAD_LEASE_LOST) if exists else UploadEndedError(UPLOAD_ENDED)


def _conflict_for(envelope: BackupEnvelope, owner: tuple[UUID | None, bytes | None] | None) -> ConflictError:
    """The 409 for a used nonce: naming the backup when it holds this very envelope (a retry after a lost answer)."""
    backup_id, signature = owner if owner is not None else (None, None)
    same = backup_id is not None and signature is not None and hmac.compare_digest(signature, envelope.signature)
    return nonce_conflict(backup_id if same else None)
