"""Backups aggregate: stored payloads with their encrypted chunks, backups, nonces and tus upload sessions."""

from __future__ import annotations

import datetime
from uuid import UUID

from advanced_alchemy.base import UUIDv7AuditBase
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from zkeb.db.models._base import TenantModel, TimestampUTC
from zkeb.db.models.accounts import Organization

__all__ = ("Backup", "BackupChunk", "Payload", "PayloadNonce", "PayloadObjectDeletion", "UploadSession")

_ENVELOPE_CHECKS = (
    ("octet_length(device_id_hash) = 32", "device_hash_len"),
    ("octet_length(payload_nonce) = 12", "payload_nonce_len"),
    ("octet_length(payload_auth_tag) = 16", "payload_tag_len"),
    ("octet_length(metadata_nonce) = 12", "metadata_nonce_len"),
    ("octet_length(metadata_auth_tag) = 16", "metadata_tag_len"),
    ("octet_length(metadata) <= 8192", "metadata_len"),
    ("octet_length(signature) = 64", "signature_len"),
)


class EnvelopeColumns:
    """The envelope's columns (`zkeb.domain.backups.envelope.BackupEnvelope`), shared by backups and tus uploads.

    `metadata` is the attribute `metadata_`: SQLAlchemy reserves the name.
    """

    container_id: Mapped[UUID]
    device_id_hash: Mapped[bytes] = mapped_column(LargeBinary)
    payload_nonce: Mapped[bytes] = mapped_column(LargeBinary)
    payload_auth_tag: Mapped[bytes] = mapped_column(LargeBinary)
    metadata_: Mapped[bytes] = mapped_column("metadata", LargeBinary)
    metadata_nonce: Mapped[bytes] = mapped_column(LargeBinary)
    metadata_auth_tag: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    backup_timestamp: Mapped[datetime.datetime] = mapped_column(TimestampUTC)


class Payload(TenantModel):
    """A stored ciphertext: its wrapped data key and, once complete, its size and digest.

    Chunks belong to the payload, so an upload session and the backup it becomes share them: completing
    an upload never copies bytes. `store` says where the chunks' bytes are; readers follow it, not the setting.
    """

    __tablename__ = "payloads"
    __table_args__ = (
        CheckConstraint("sha256 IS NULL OR octet_length(sha256) = 32", name="sha256_len"),
        CheckConstraint("size >= 0", name="size"),
        CheckConstraint("store IN ('postgres', 's3')", name="store"),
        Index("ix_payloads_key_id", "key_id"),
    )

    project_id: Mapped[UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    key_id: Mapped[str] = mapped_column(String(32))
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    chunk_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    sha256: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    #: Where the chunk bytes are: `postgres` (`backup_chunks.data`) or `s3` (one object a chunk; docs/storage.md).
    store: Mapped[str] = mapped_column(String(16), default="postgres", server_default=text("'postgres'"))


class PayloadObjectDeletion(UUIDv7AuditBase):
    """A deleted payload whose S3 objects are still to be deleted (a trigger on `payloads` records it).

    Tenant data with row-level security, but no foreign key: the record outlives its payload, project and
    organization until the maintenance pass has deleted the objects (docs/storage.md §6).
    """

    __tablename__ = "payload_object_deletions"
    __table_args__ = (UniqueConstraint("payload_id", name="uq_payload_object_deletions_payload"),)

    organization_id: Mapped[UUID]
    payload_id: Mapped[UUID]


class BackupChunk(TenantModel):
    """One encrypted piece (about 1 MiB of plaintext) of a payload, at byte `offset`, written once."""

    __tablename__ = "backup_chunks"
    __table_args__ = (
        UniqueConstraint("payload_id", "seq", name="uq_backup_chunks_payload_seq"),
        CheckConstraint("seq >= 0 AND byte_offset >= 0 AND plain_size > 0", name="position"),
    )

    payload_id: Mapped[UUID] = mapped_column(ForeignKey("payloads.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    byte_offset: Mapped[int] = mapped_column(BigInteger)
    plain_size: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Backup(EnvelopeColumns, TenantModel):
    """A verified, committed backup: the client's envelope without its payload, which lives in `payloads`."""

    __tablename__ = "backups"
    __table_args__ = (
        *(CheckConstraint(sql, name=name) for sql, name in _ENVELOPE_CHECKS),
        CheckConstraint("octet_length(payload_sha256) = 32", name="sha256_len"),
        CheckConstraint("encrypted_payload_size >= 1", name="size"),
        UniqueConstraint("payload_id", name="uq_backups_payload"),
        Index("ix_backups_project_newest", "project_id", text("created_at DESC"), text("id DESC")),
        Index("ix_backups_container_newest", "project_id", "container_id", text("created_at DESC"), text("id DESC")),
        Index("ix_backups_device_newest", "project_id", "device_id_hash", text("created_at DESC"), text("id DESC")),
        Index("ix_backups_deleted", "deleted_at", postgresql_where=text("deleted_at IS NOT NULL")),
    )

    project_id: Mapped[UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    device_id: Mapped[UUID] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    payload_id: Mapped[UUID] = mapped_column(ForeignKey("payloads.id", ondelete="RESTRICT"))
    encrypted_payload_size: Mapped[int] = mapped_column(BigInteger)
    payload_sha256: Mapped[bytes] = mapped_column(LargeBinary)
    deleted_at: Mapped[datetime.datetime | None] = mapped_column(TimestampUTC, default=None)
    deleted_by: Mapped[str | None] = mapped_column(String(80), default=None)
    #: Set when an org admin brings the backup back from the trash; retention leaves such a backup alone.
    restored_at: Mapped[datetime.datetime | None] = mapped_column(TimestampUTC, default=None)


class PayloadNonce(TenantModel):
    """Every `payload_nonce` a device has used in a project, kept even after its backup is purged."""

    __tablename__ = "payload_nonces"
    __table_args__ = (
        UniqueConstraint("organization_id", "project_id", "device_id_hash", "nonce", name="uq_payload_nonces"),
        CheckConstraint("octet_length(nonce) = 12", name="len"),
        CheckConstraint("octet_length(device_id_hash) = 32", name="device_len"),
    )

    project_id: Mapped[UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    device_id_hash: Mapped[bytes] = mapped_column(LargeBinary)
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    backup_id: Mapped[UUID | None] = mapped_column(default=None)


class UploadSession(EnvelopeColumns, TenantModel):
    """A tus upload in progress: the validated envelope and how many payload bytes have arrived."""

    __tablename__ = "upload_sessions"
    __table_args__ = (
        *(CheckConstraint(sql, name=name) for sql, name in _ENVELOPE_CHECKS),
        CheckConstraint("upload_offset >= 0 AND upload_offset <= upload_length", name="offset"),
        CheckConstraint("upload_length >= 1", name="length"),
        UniqueConstraint("payload_id", name="uq_upload_sessions_payload"),
        Index("ix_upload_sessions_expires", "expires_at"),
        Index("ix_upload_sessions_project", "organization_id", "project_id"),
    )

    project_id: Mapped[UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    device_id: Mapped[UUID] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    payload_id: Mapped[UUID] = mapped_column(ForeignKey("payloads.id", ondelete="CASCADE"))
    upload_length: Mapped[int] = mapped_column(BigInteger)
    upload_offset: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    expires_at: Mapped[datetime.datetime] = mapped_column(TimestampUTC)
    #: The PATCH that owns the upload now, if any: it checks this with every chunk batch it stores, and the next
    #: PATCH (a client's retry) takes the upload over by replacing it.
    lease_id: Mapped[UUID | None] = mapped_column(default=None)


_ = Organization  # the FK target must be mapped before these tables
