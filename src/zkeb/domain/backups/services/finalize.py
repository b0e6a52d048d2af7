"""A backup whose payload is in memory, admitted, stored and committed in one durable transaction.

A single-shot upload (and a tus upload whose whole body comes with its creation) has every byte in memory before
anything is written, so nothing is gained by staging: one pooled connection runs one transaction that reads the
project's policy, the device and the nonce in one statement, verifies the signature, writes the payload with its
first chunk, the nonce, the backup and the usage in one statement (further chunks one statement each, encrypted
as they go, so memory stays at the body plus one chunk), applies retention, records `backup.created` for the
audit trail, and commits: one WAL flush per backup, where staging the payload first cost three transactions and
two flushes.

Nothing here takes a lock another project's commit, or another device's, waits for: usage goes to the
connection's usage shard (`zkeb.domain.backups.store.commits`) unless the project has a quota, retention ranks
under an advisory lock of one (container, device), and the audit event waits unchained for the linker
(`zkeb.core.audit_linker`). See docs/backups-commit.md for the measurements behind this.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
from litestar.connection import ASGIConnection
from opentelemetry import trace
from uuid_utils.compat import uuid7

from zkeb.core.audit_linker import append_unchained_event
from zkeb.core.auth import Principal
from zkeb.core.database import pooled_connection
from zkeb.core.errors import ConflictError, NotFoundError
from zkeb.db.models import Backup
from zkeb.domain.backups.context import BackupsContext
from zkeb.domain.backups.crypto import PayloadKey
from zkeb.domain.backups.envelope import BackupEnvelope, envelope_columns, invalid_field
from zkeb.domain.backups.metrics import BACKUPS_TRASHED, record_backup_created, record_backup_failed
from zkeb.domain.backups.services.backups import nonce_conflict, verify_backup_signature
from zkeb.domain.backups.services.lifecycle import RETENTION, TrashedBackup, quota_exceeded, record_retention_events
from zkeb.domain.backups.store.commits import (
    Admission,
    NewBackup,
    TrashedRow,
    charge_project_row,
    insert_backup,
    insert_chunk,
    lock_project_row,
    lock_retention_scope,
    nonce_owner,
    project_usage,
    read_admission,
    trash_beyond_retention,
)
from zkeb.domain.backups.store.connection import raw_tenant_transaction
from zkeb.domain.backups.store.payloads import PayloadStore
from zkeb.lib.atrest import ChunkCipher

__all__ = ("InMemoryPayload", "commit_in_memory")

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
class _NewBackupJob:
    """What one commit writes: who for, which envelope and bytes, and the ids it gives them."""

    context: BackupsContext
    principal: Principal
    organization_id: UUID
    project_id: UUID
    envelope: BackupEnvelope
    payload: InMemoryPayload
    method: str
    backup_id: UUID = field(default_factory=uuid7)
    payload_id: UUID = field(default_factory=uuid7)

    @property
    def size(self) -> int:
        """Payload bytes."""
        return len(self.payload.data)


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
    """
    if not principal.can_act_for_device(envelope.device_id_hash):
        raise invalid_field("device_id_hash", "a device token may only upload for its own device")
    assert principal.project_id is not None  # backup access: project keys and devices only
    job = _NewBackupJob(context, principal, principal.organization_id, principal.project_id, envelope, payload, method)
    attributes: dict[str, str | int] = {
        "zkeb.backup_id": str(job.backup_id),
        "zkeb.project_id": str(job.project_id),
        "zkeb.bytes": job.size,
    }
    with tracer.start_as_current_span("backups.commit", attributes=attributes) as span:
        store = context.stores.default
        key, cipher = context.crypto.new_key(job.payload_id)
        # Bytes kept outside PostgreSQL are stored before its transaction opens, never while it is open; a refused
        # or failed commit deletes them again.
        try:
            await _stage(store, job, cipher)
            return await _commit(job, store, key, cipher, request, audit_committed, span)
        except BaseException:
            if store.stages_bytes:
                await asyncio.shield(store.unstage(job.organization_id, job.payload_id))
            raise


async def _stage(store: PayloadStore, job: _NewBackupJob, cipher: ChunkCipher) -> None:
    """Encrypt and stage the chunks a few at a time (memory: the body plus `STAGE_BATCH` chunks)."""
    if not store.stages_bytes:
        return  # the rows carry the bytes
    view = memoryview(job.payload.data).cast("B")
    chunk_size = store.chunk_size
    chunk_count = max(1, -(-job.size // chunk_size))
    with tracer.start_as_current_span("backups.stage", attributes={"zkeb.chunk_count": chunk_count}):
        for first in range(0, chunk_count, STAGE_BATCH):
            chunks = [
                (seq, cipher.encrypt(seq, view[seq * chunk_size : (seq + 1) * chunk_size]))
                for seq in range(first, min(first + STAGE_BATCH, chunk_count))
            ]
            await store.stage(job.organization_id, job.payload_id, chunks)


async def _commit(  # noqa: PLR0917 - the commit's parts, each once
    job: _NewBackupJob,
    store: PayloadStore,
    key: PayloadKey,
    cipher: ChunkCipher,
    request: ASGIConnection[Any, Any, Any, Any] | None,
    audit_committed: Callable[[UUID], None] | None,
    span: trace.Span,
) -> Backup:
    """The one transaction: admit, verify, write the rows, charge, apply retention, audit."""
    context, envelope, payload, method = job.context, job.envelope, job.payload, job.method
    async with pooled_connection(context.engine) as connection:
        try:
            async with raw_tenant_transaction(connection, job.organization_id):
                admission = await read_admission(
                    connection,
                    project_id=job.project_id,
                    device_id_hash=envelope.device_id_hash,
                    nonce=envelope.payload_nonce,
                )
                device_id, public_key = _admit(admission, envelope, job.size, method)
                verify_backup_signature(
                    envelope,
                    project_id=job.project_id,
                    public_key=public_key,
                    payload_sha256=payload.sha256,
                    payload_size=job.size,
                )
                assert admission is not None
                created_at, trashed = await _store(connection, job, admission, device_id, store, key, cipher)
                audited = await _audit(connection, job, device_id, trashed, request)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != _NONCE_CONSTRAINT:
                raise
            span.set_attribute("zkeb.outcome", "conflict")
            record_backup_failed("nonce_reuse")
            # Committed meanwhile: by this very envelope (a concurrent retry), the conflict names its backup.
            async with raw_tenant_transaction(connection, job.organization_id, readonly=True):
                owner = await nonce_owner(
                    connection,
                    project_id=job.project_id,
                    device_id_hash=envelope.device_id_hash,
                    nonce=envelope.payload_nonce,
                )
            raise _conflict_for(envelope, owner) from None
    span.set_attribute("zkeb.outcome", "committed")
    span.set_attribute("zkeb.retention_trashed", len(trashed))
    if trashed:
        BACKUPS_TRASHED.labels(reason=RETENTION).inc(len(trashed))
    record_backup_created(method, job.size)
    if audited and audit_committed is not None:
        audit_committed(job.organization_id)
    return Backup(
        id=job.backup_id,
        organization_id=job.organization_id,
        project_id=job.project_id,
        device_id=device_id,
        payload_id=job.payload_id,
        encrypted_payload_size=job.size,
        payload_sha256=payload.sha256,
        **envelope_columns(envelope),
        created_at=created_at,
        updated_at=created_at,
    )


async def _store(  # noqa: PLR0917 - the commit's parts, each once
    connection: asyncpg.Connection,
    job: _NewBackupJob,
    admission: Admission,
    device_id: UUID,
    store: PayloadStore,
    key: PayloadKey,
    cipher: ChunkCipher,
) -> tuple[datetime, list[TrashedRow]]:
    """Write the payload, its chunks, the nonce and the backup, charge the usage and apply retention.

    Raises:
        InsufficientStorageError: the project's quota cannot take the payload any more (507).
    """
    envelope, size = job.envelope, job.size
    retention = admission.retention_keep_last is not None or admission.retention_days is not None
    if retention:
        await lock_retention_scope(
            connection,
            project_id=job.project_id,
            container_id=envelope.container_id,
            device_id_hash=envelope.device_id_hash,
        )
    if admission.quota is not None:
        await lock_project_row(connection, job.project_id)
    view = memoryview(job.payload.data).cast("B")

    def row_data(seq: int, piece: memoryview) -> bytes:
        # With staged chunks the rows carry no bytes: nothing to encrypt again here.
        return b"" if store.stages_bytes else cipher.encrypt(seq, piece)

    chunk_size = store.chunk_size
    chunk_count = max(1, -(-size // chunk_size))
    with tracer.start_as_current_span("backups.store", attributes={"zkeb.chunk_count": chunk_count}):
        first = view[:chunk_size]
        created_at = await insert_backup(
            connection,
            NewBackup(
                id=job.backup_id,
                organization_id=job.organization_id,
                project_id=job.project_id,
                device_id=device_id,
                payload_id=job.payload_id,
                key_id=key.key_id,
                wrapped_key=key.wrapped_key,
                size=size,
                chunk_count=chunk_count,
                sha256=job.payload.sha256,
                envelope=envelope,
                store=store.kind,
            ),
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
                organization_id=job.organization_id,
                payload_id=job.payload_id,
                seq=seq,
                offset=seq * chunk_size,
                plain_size=len(piece),
                data=row_data(seq, piece),
            )
    # With a quota, the project row (locked above) is charged once the rows are written.
    if admission.quota is not None and not await charge_project_row(connection, project_id=job.project_id, size=size):
        usage = await project_usage(connection, job.project_id)
        used, quota = usage if usage is not None else (0, 0)
        record_backup_failed("quota", job.method)
        raise quota_exceeded(used=used, quota=quota or 0, requested=size)
    if not retention:
        return created_at, []
    trashed = await trash_beyond_retention(
        connection,
        project_id=job.project_id,
        container_id=envelope.container_id,
        device_id_hash=envelope.device_id_hash,
        keep_last=admission.retention_keep_last,
        days=admission.retention_days,
        deleted_by=RETENTION,
    )
    return created_at, trashed


async def _audit(
    connection: asyncpg.Connection,
    job: _NewBackupJob,
    device_id: UUID,
    trashed: list[TrashedRow],
    request: ASGIConnection[Any, Any, Any, Any] | None,
) -> bool:
    """Record `backup.created` and each retention removal, unchained, in the commit's transaction."""
    audited = await append_unchained_event(
        connection,
        organization_id=job.organization_id,
        action="backup.created",
        actor_type=job.principal.actor_type,
        actor_id=job.principal.credential_id,
        target_type="backup",
        target_id=str(job.backup_id),
        details={
            "project_id": str(job.project_id),
            "container_id": str(job.envelope.container_id),
            "device_id": str(device_id),
            "size": job.size,
            "method": job.method,
        },
        request=request,
        settings=job.context.settings,
    )
    await record_retention_events(
        connection,
        organization_id=job.organization_id,
        project_id=job.project_id,
        trashed=[TrashedBackup(item.id, item.container_id) for item in trashed],
        settings=job.context.settings,
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
    if admission.device_id is None or admission.public_key is None:
        raise invalid_field("device_id_hash", "is not an enrolled, unrevoked device of this project")
    if admission.nonce_used:
        raise _conflict_for(envelope, (admission.nonce_backup_id, admission.nonce_signature))
    if admission.quota is not None and admission.used + size > admission.quota:
        record_backup_failed("quota", method)
        raise quota_exceeded(used=admission.used, quota=admission.quota, requested=size)
    return admission.device_id, admission.public_key


def _conflict_for(envelope: BackupEnvelope, owner: tuple[UUID | None, bytes | None] | None) -> ConflictError:
    """The 409 for a used nonce: naming the backup when it holds this very envelope (a retry after a lost answer)."""
    backup_id, signature = owner if owner is not None else (None, None)
    same = backup_id is not None and signature is not None and hmac.compare_digest(signature, envelope.signature)
    return nonce_conflict(backup_id if same else None)
