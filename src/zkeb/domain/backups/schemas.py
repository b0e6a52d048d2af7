"""Request and response bodies of the backups domain, and the validated envelope they become.

Single-shot uploads arrive as msgpack (bytes are `bin`; the payload is decoded as a `memoryview` into the
request body, so it is never copied) or JSON (bytes are standard base64, `device_id_hash` lowercase hex).
tus uploads carry the same fields, but the payload, in `Upload-Metadata` (see `zkeb.domain.backups.tus`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import msgspec

from zkeb.core.errors import UnprocessableError
from zkeb.lib.envelope import (
    AUTH_TAG_LENGTH,
    DEVICE_ID_HASH_LENGTH,
    ED25519_SIGNATURE_LENGTH,
    NONCE_LENGTH,
    parse_rfc3339_utc,
)

__all__ = (
    "MAX_METADATA_SIZE",
    "AppendOnlyProblem",
    "BackupEnvelope",
    "BackupList",
    "BackupRead",
    "BackupReadMsgpack",
    "DeviceUsage",
    "EnvelopeJson",
    "EnvelopeMsgpack",
    "ProjectUsage",
    "QuotaProblem",
    "TrashPage",
    "TrashedBackupRead",
    "field_of_validation_error",
    "invalid_field",
    "parse_device_id_hash_hex",
    "validate_envelope",
)

MAX_METADATA_SIZE = 8192
_HEX_HASH = re.compile(r"[0-9a-fA-F]{64}")
_FIELD_PATH = re.compile(r"at `\$\.(?P<field>[A-Za-z_]+)")


def invalid_field(field: str, detail: str) -> UnprocessableError:
    """A 422 naming the envelope field at fault (`field` member of the problem body)."""
    return UnprocessableError(f"{field}: {detail}", extra={"field": field})


def field_of_validation_error(exc: msgspec.ValidationError) -> str | None:
    """The top-level field a msgspec validation error is about, if it names one."""
    match = _FIELD_PATH.search(str(exc))
    if match:
        return match["field"]
    missing = re.search(r"missing required field `(?P<field>[A-Za-z_]+)`", str(exc))
    return missing["field"] if missing else None


class EnvelopeMsgpack(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /api/v1/backups` as `application/msgpack`: bytes fields are `bin`, decoded without copying."""

    container_id: UUID
    device_id_hash: memoryview
    payload: memoryview
    payload_nonce: memoryview
    payload_auth_tag: memoryview
    metadata: memoryview
    metadata_nonce: memoryview
    metadata_auth_tag: memoryview
    signature: memoryview
    backup_timestamp: str


class EnvelopeJson(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /api/v1/backups` as `application/json`: bytes fields are standard base64, `device_id_hash` hex."""

    container_id: UUID
    device_id_hash: str
    payload: bytes
    payload_nonce: bytes
    payload_auth_tag: bytes
    metadata: bytes
    metadata_nonce: bytes
    metadata_auth_tag: bytes
    signature: bytes
    backup_timestamp: str


@dataclass(frozen=True, slots=True)
class BackupEnvelope:
    """A validated envelope without its payload: what the signature covers, besides the payload's digest."""

    container_id: UUID
    device_id_hash: bytes
    payload_nonce: bytes
    payload_auth_tag: bytes
    metadata: bytes
    metadata_nonce: bytes
    metadata_auth_tag: bytes
    signature: bytes
    backup_timestamp: datetime


def _exact(field: str, value: bytes | memoryview, length: int) -> bytes:
    if len(value) != length:
        raise invalid_field(field, f"must be {length} bytes, got {len(value)}")
    return bytes(value)


def parse_device_id_hash_hex(value: str) -> bytes:
    """Decode a hex `device_id_hash`: ZKEB writes it lowercase and, as at device enrolment, reads either case.

    Raises:
        UnprocessableError: not 64 hex characters.
    """
    if not _HEX_HASH.fullmatch(value):
        raise invalid_field("device_id_hash", "must be 64 hex characters (a SHA-256)")
    return bytes.fromhex(value)


def validate_envelope(
    *,
    container_id: UUID,
    device_id_hash: bytes | memoryview,
    payload_nonce: bytes | memoryview,
    payload_auth_tag: bytes | memoryview,
    metadata: bytes | memoryview,
    metadata_nonce: bytes | memoryview,
    metadata_auth_tag: bytes | memoryview,
    signature: bytes | memoryview,
    backup_timestamp: str,
) -> BackupEnvelope:
    """Check every field but the payload against the envelope table.

    Raises:
        UnprocessableError: a field is invalid; the problem names it.
    """
    if len(metadata) > MAX_METADATA_SIZE:
        raise invalid_field("metadata", f"must be at most {MAX_METADATA_SIZE} bytes, got {len(metadata)}")
    if bytes(metadata_nonce) == bytes(payload_nonce):
        raise invalid_field("metadata_nonce", "must differ from payload_nonce (one key encrypts both)")
    try:
        timestamp = parse_rfc3339_utc(backup_timestamp)
    except ValueError as exc:
        raise invalid_field("backup_timestamp", str(exc)) from None
    return BackupEnvelope(
        container_id=container_id,
        device_id_hash=_exact("device_id_hash", device_id_hash, DEVICE_ID_HASH_LENGTH),
        payload_nonce=_exact("payload_nonce", payload_nonce, NONCE_LENGTH),
        payload_auth_tag=_exact("payload_auth_tag", payload_auth_tag, AUTH_TAG_LENGTH),
        metadata=bytes(metadata),
        metadata_nonce=_exact("metadata_nonce", metadata_nonce, NONCE_LENGTH),
        metadata_auth_tag=_exact("metadata_auth_tag", metadata_auth_tag, AUTH_TAG_LENGTH),
        signature=_exact("signature", signature, ED25519_SIGNATURE_LENGTH),
        backup_timestamp=timestamp,
    )


class BackupRead(msgspec.Struct):
    """A committed backup as JSON: the envelope without its payload, plus what the server adds."""

    id: UUID
    project_id: UUID
    container_id: UUID
    device_id_hash: str
    payload_nonce: bytes
    payload_auth_tag: bytes
    metadata: bytes
    metadata_nonce: bytes
    metadata_auth_tag: bytes
    signature: bytes
    backup_timestamp: str
    encrypted_payload_size: int
    payload_sha256: str
    created_at: datetime


class BackupReadMsgpack(msgspec.Struct):
    """A committed backup as msgpack (`Accept: application/msgpack`): bytes fields, `device_id_hash` too, are `bin`."""

    id: UUID
    project_id: UUID
    container_id: UUID
    device_id_hash: bytes
    payload_nonce: bytes
    payload_auth_tag: bytes
    metadata: bytes
    metadata_nonce: bytes
    metadata_auth_tag: bytes
    signature: bytes
    backup_timestamp: str
    encrypted_payload_size: int
    payload_sha256: str
    created_at: datetime


class BackupList(msgspec.Struct):
    """A page of backups, newest first; pass `next_cursor` back as `cursor` for the next page."""

    items: list[BackupRead]
    next_cursor: str | None


class TrashedBackupRead(BackupRead, kw_only=True):
    """A backup in the trash: its envelope (without payload), who deleted it and when it will be purged."""

    deleted_at: datetime
    deleted_by: str | None
    purge_after: datetime


class TrashPage(msgspec.Struct):
    """A page of a project's trash, most recently deleted first; pass `next_cursor` back as `cursor`."""

    items: list[TrashedBackupRead]
    next_cursor: str | None


class DeviceUsage(msgspec.Struct):
    """One device's share: payload bytes charged (trash included), visible and trashed backups."""

    device_id_hash: str
    used_bytes: int
    backups: int
    trashed_backups: int


class ProjectUsage(msgspec.Struct):
    """A project's storage. `used_bytes` counts every backup until it is purged, trashed ones included.

    `reserved_bytes` is what the project's `open_uploads` (tus, unexpired) reserve of the quota: their
    `Upload-Length`, until each is committed (then counted in `used_bytes`), terminated or expired.
    """

    used_bytes: int
    backups: int
    trashed_backups: int
    quota_bytes: int | None
    by_device: list[DeviceUsage]
    reserved_bytes: int
    open_uploads: int


class QuotaProblem(msgspec.Struct, kw_only=True):
    """507 problem details: the project's quota cannot take the upload."""

    type: str = "about:blank"
    title: str = "Insufficient Storage"
    status: int = 507
    detail: str
    instance: str
    used: int
    quota: int
    requested: int
    request_id: str | None = None


class AppendOnlyProblem(msgspec.Struct, kw_only=True):
    """403 problem details: an append-only project refuses the deletion (`reason` says why)."""

    type: str = "about:blank"
    title: str = "Forbidden"
    status: int = 403
    detail: str
    instance: str
    reason: str
    deletable_after: str | None = None
    request_id: str | None = None
