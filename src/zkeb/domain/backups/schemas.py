"""Request and response bodies of the backups domain.

Single-shot uploads arrive as msgpack (bytes are `bin`; the payload is decoded as a `memoryview` into the
request body, so it is never copied) or JSON (bytes are standard base64, `device_id_hash` lowercase hex). The
envelope's fields come from `zkeb.domain.backups.envelope`, which declares them once; tus uploads carry the same
fields, but the payload, in `Upload-Metadata`.
"""

from __future__ import annotations

import re
from datetime import datetime
from uuid import UUID

import msgspec

from zkeb.domain.backups.envelope import JsonEnvelopeFields, MsgpackEnvelopeFields

__all__ = (
    "MSGPACK",
    "MSGPACK_MEDIA_TYPES",
    "AppendOnlyProblem",
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
)

#: The msgpack media type a backup is read and written as, and every name it is accepted under.
MSGPACK = "application/msgpack"
MSGPACK_MEDIA_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})

_FIELD_PATH = re.compile(r"at `\$\.(?P<field>[A-Za-z_]+)")


def field_of_validation_error(exc: msgspec.ValidationError) -> str | None:
    """The top-level field a msgspec validation error is about, if it names one."""
    match = _FIELD_PATH.search(str(exc))
    if match:
        return match["field"]
    named = re.search(r"(?:missing required|unknown) field `(?P<field>[^`]{1,64})`", str(exc))
    return named["field"] if named else None


class EnvelopeMsgpack(MsgpackEnvelopeFields, forbid_unknown_fields=True):
    """`POST /api/v1/backups` as `application/msgpack`: bytes fields are `bin`, the payload decoded without copying."""

    payload: memoryview


class EnvelopeJson(JsonEnvelopeFields, forbid_unknown_fields=True):
    """`POST /api/v1/backups` as `application/json`: bytes fields are standard base64, `device_id_hash` hex."""

    payload: bytes


class BackupRead(JsonEnvelopeFields):
    """A committed backup as JSON: the envelope without its payload, plus what the server adds."""

    id: UUID
    project_id: UUID
    encrypted_payload_size: int
    payload_sha256: str
    created_at: datetime


class BackupReadMsgpack(MsgpackEnvelopeFields):
    """A committed backup as msgpack (`Accept: application/msgpack`): bytes fields, `device_id_hash` too, are `bin`."""

    id: UUID
    project_id: UUID
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
