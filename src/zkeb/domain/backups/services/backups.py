"""Backup services: who may act for which device, payload rows, the signature check, queries and deletion.

The commit itself is `zkeb.domain.backups.services.finalize`.

Every call runs in the request's ORM session, whose transactions act for the principal's organization (row-level
security), and commits its own short unit of work: nothing here holds a transaction across an upload.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from opentelemetry import trace
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from uuid_utils.compat import uuid7

from zkeb.core.auth import Principal
from zkeb.core.cursors import decode_keyset_cursor, encode_keyset_cursor, listing_name
from zkeb.core.database import pooled_connection
from zkeb.core.errors import ConflictError, NotFoundError
from zkeb.db.models import Backup, Device, Payload, PayloadNonce
from zkeb.domain.backups.crypto import PayloadCrypto
from zkeb.domain.backups.envelope import BackupEnvelope, invalid_field, read_fields
from zkeb.domain.backups.metrics import record_backup_failed
from zkeb.domain.backups.repository import BackupRepositoryService
from zkeb.domain.backups.schemas import BackupRead, BackupReadMsgpack
from zkeb.domain.backups.store.payloads import StoredChunksMissingError, StoreKind
from zkeb.domain.backups.store.reads import (
    RestoreSource,
    Visibility,
    visible_backup,
    visible_page,
    visible_restore_source,
)
from zkeb.lib.atrest import ChunkCipher
from zkeb.lib.envelope import backup_signed_message, verify_ed25519

__all__ = (
    "BackupService",
    "NewPayload",
    "backup_read",
    "backup_read_msgpack",
    "first_piece",
    "get_latest_backup",
    "get_restore_source",
    "get_visible_backup",
    "list_visible_backups",
    "nonce_conflict",
    "verify_backup_signature",
)

logger = logging.getLogger("zkeb.backups")
tracer = trace.get_tracer("zkeb.backups")


@dataclass(frozen=True, slots=True)
class NewPayload:
    """A payload row just created for an upload, with the cipher for its chunks."""

    id: UUID
    cipher: ChunkCipher


def verify_backup_signature(
    envelope: BackupEnvelope,
    *,
    project_id: UUID,
    public_key: bytes,
    payload_sha256: bytes,
    payload_size: int,
    method: str,
) -> None:
    """Check the device's Ed25519 signature over the signed message (docs/protocol.md §4; it binds the project id).

    `method` (`single` or `tus`) labels the refusal's metric.

    Raises:
        UnprocessableError: the signature does not verify (422 naming `signature`).
    """
    with tracer.start_as_current_span(
        "backups.verify_signature", attributes={"zkeb.payload_size": payload_size}
    ) as span:
        message = backup_signed_message(
            project_id=project_id,
            container_id=envelope.container_id,
            device_id_hash=envelope.device_id_hash,
            backup_timestamp=envelope.backup_timestamp,
            payload_nonce=envelope.payload_nonce,
            payload_auth_tag=envelope.payload_auth_tag,
            payload_sha256=payload_sha256,
            payload_size=payload_size,
            metadata_nonce=envelope.metadata_nonce,
            metadata_auth_tag=envelope.metadata_auth_tag,
            metadata_sha256=_sha256(envelope.metadata),
            metadata_size=len(envelope.metadata),
        )
        valid = verify_ed25519(public_key, envelope.signature, message)
        span.set_attribute("zkeb.outcome", "valid" if valid else "invalid")
    if not valid:
        record_backup_failed("signature", method)
        raise invalid_field(
            "signature", "does not verify with the device's public key over this envelope, project and payload"
        )


def _sha256(data: bytes) -> bytes:
    import hashlib  # noqa: PLC0415 - keeps the module's imports about services

    return hashlib.sha256(data).digest()


def _server_fields(backup: Backup) -> dict[str, Any]:
    return {
        "id": backup.id,
        "project_id": backup.project_id,
        "encrypted_payload_size": backup.encrypted_payload_size,
        "payload_sha256": backup.payload_sha256.hex(),
        "created_at": backup.created_at,
    }


def backup_read(backup: Backup) -> BackupRead:
    """A backup as its JSON body."""
    return BackupRead(**read_fields(backup, digest_as_hex=True), **_server_fields(backup))


def backup_read_msgpack(backup: Backup) -> BackupReadMsgpack:
    """A backup as its msgpack body (`device_id_hash` as `bin`)."""
    return BackupReadMsgpack(**read_fields(backup, digest_as_hex=False), **_server_fields(backup))


class BackupService(BackupRepositoryService):
    """Committed backups and the rows an upload needs on its way to becoming one."""

    # --- uploads -------------------------------------------------------------------------------------------------

    async def device_for_upload(self, principal: Principal, device_id_hash: bytes) -> Device:
        """The enrolled, unrevoked device an upload acts for.

        A project key may act for any device of its project; a device token only for its own `device_id_hash`.

        Raises:
            UnprocessableError: unknown or revoked device, or another device than the token's (422 naming
                `device_id_hash`).
        """
        if not principal.can_act_for_device(device_id_hash):
            raise invalid_field("device_id_hash", "a device token may only upload for its own device")
        device = await self.session.scalar(
            select(Device).where(
                Device.project_id == principal.project_id,
                Device.device_id_hash == device_id_hash,
                Device.revoked_at.is_(None),
            )
        )
        if device is None:
            raise invalid_field("device_id_hash", "is not an enrolled, unrevoked device of this project")
        return device

    async def ensure_nonce_unused(
        self, project_id: UUID, device_id_hash: bytes, nonce: bytes, *, signature: bytes | None = None
    ) -> None:
        """Refuse a `payload_nonce` the device already used in the project (checked again at commit).

        When `signature` is that of the backup the nonce went to, the same envelope is being sent again (a retry
        whose first response was lost): the problem then names that backup as `backup_id`, so the client learns
        that its earlier attempt was committed.

        Raises:
            ConflictError: the nonce was used before (409).
        """
        used = (
            await self.session.execute(
                select(PayloadNonce.id, Backup.id, Backup.signature)
                .outerjoin(Backup, (Backup.id == PayloadNonce.backup_id) & Backup.deleted_at.is_(None))
                .where(
                    PayloadNonce.project_id == project_id,
                    PayloadNonce.device_id_hash == device_id_hash,
                    PayloadNonce.nonce == nonce,
                )
            )
        ).first()
        if used is None:
            return
        _, backup_id, committed_signature = used
        same_envelope = (
            signature is not None
            and committed_signature is not None
            and hmac.compare_digest(signature, committed_signature)
        )
        raise nonce_conflict(backup_id if same_envelope else None)

    def add_payload(
        self, *, organization_id: UUID, project_id: UUID, crypto: PayloadCrypto, store: StoreKind
    ) -> NewPayload:
        """Stage a payload row with a fresh wrapped data key, its chunks to go to `store` (the caller commits)."""
        payload_id = uuid7()
        key, cipher = crypto.new_key(payload_id)
        self.session.add(
            Payload(
                id=payload_id,
                organization_id=organization_id,
                project_id=project_id,
                key_id=key.key_id,
                wrapped_key=key.wrapped_key,
                store=store,
            )
        )
        return NewPayload(payload_id, cipher)


def _visibility(principal: Principal, device_id_hash: bytes | None = None) -> Visibility | None:
    """The backups the principal may read: its project's, and a device only its own; narrowed to `device_id_hash`
    (a listing's filter) when given. None: none at all (an org admin reads through its own routes, a device asking
    for another device's)."""
    own = principal.device_id_hash if principal.kind == "device" else None
    if principal.project_id is None or (own is not None and device_id_hash not in (None, own)):
        return None
    return Visibility(principal.organization_id, principal.project_id, own if own is not None else device_id_hash)


async def get_visible_backup(engine: AsyncEngine, principal: Principal, backup_id: UUID) -> Backup:
    """A backup the principal may see (its project's, not in the trash; a device's own), read without an ORM session.

    Raises:
        NotFoundError: unknown, deleted, another project's or (for a device) another device's.
    """
    visibility, backup = _visibility(principal), None
    if visibility is not None:
        async with pooled_connection(engine) as connection:
            backup = await visible_backup(connection, visibility, backup_id)
    if backup is None:
        raise NotFoundError("backup not found")
    return backup


async def list_visible_backups(
    engine: AsyncEngine,
    principal: Principal,
    *,
    container_id: UUID | None,
    device_id_hash: bytes | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[Backup], str | None]:
    """A page of visible backups, newest first, and the cursor of the next page (None on the last).

    Raises:
        InvalidCursorError: `cursor` is not one this listing gave out with these filters (400).
    """
    listing = listing_name("backups", container_id, device_id_hash)
    after = decode_keyset_cursor(listing, cursor) if cursor else None
    visibility = _visibility(principal, device_id_hash)
    if visibility is None:
        return [], None
    async with pooled_connection(engine) as connection:
        rows = await visible_page(connection, visibility, container_id=container_id, after=after, limit=limit + 1)
    if len(rows) > limit:
        last = rows[limit - 1]
        return rows[:limit], encode_keyset_cursor(listing, last.created_at, last.id)
    return rows, None


async def get_latest_backup(engine: AsyncEngine, principal: Principal, container_id: UUID) -> Backup:
    """The newest visible backup of a container.

    Raises:
        NotFoundError: the container has no visible backup.
    """
    backups, _ = await list_visible_backups(
        engine, principal, container_id=container_id, device_id_hash=None, cursor=None, limit=1
    )
    if not backups:
        raise NotFoundError("no backup in this container")
    return backups[0]


async def get_restore_source(engine: AsyncEngine, principal: Principal, backup_id: UUID) -> RestoreSource:
    """A visible backup with its payload's wrapped key, chunk map and store, read in one transaction.

    Raises:
        NotFoundError: as `get_visible_backup`.
    """
    visibility, source = _visibility(principal), None
    if visibility is not None:
        async with pooled_connection(engine) as connection:
            source = await visible_restore_source(connection, visibility, backup_id)
    if source is None:
        raise NotFoundError("backup not found")
    return source


async def first_piece(
    engine: AsyncEngine, principal: Principal, backup_id: UUID, content: AsyncIterator[bytes]
) -> bytes | None:
    """The first piece of a restore's stream (None: it is empty), read before the answer is sent.

    Raises:
        NotFoundError: the payload's chunks vanished because the backup was purged after its plan was read (what a
            request a moment later gets); chunks that vanished while it is still visible (moved to another store)
            stay a 503 to retry.
    """
    try:
        return await anext(content, None)
    except StoredChunksMissingError:
        await get_visible_backup(engine, principal, backup_id)
        raise


def nonce_conflict(backup_id: UUID | None = None) -> ConflictError:
    """The 409 for a `payload_nonce` used before; naming `backup_id` when it holds this very envelope."""
    if backup_id is not None:
        return ConflictError(
            "this envelope was already committed as backup_id (an earlier attempt succeeded); payload_nonce must "
            "never repeat",
            extra={"field": "payload_nonce", "backup_id": str(backup_id)},
        )
    return ConflictError(
        "payload_nonce was already used by this device in this project; AES-GCM nonces must never repeat",
        extra={"field": "payload_nonce"},
    )
