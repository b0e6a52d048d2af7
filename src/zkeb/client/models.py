"""The SDK's typed results (msgspec structs) and the server shapes it decodes."""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import Literal

import msgspec

__all__ = (
    "BackupRecord",
    "BackupResult",
    "Enrollment",
    "LeftOut",
    "RestoreResult",
    "ServerEnvelope",
    "VerifyResult",
)


class ServerEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A stored backup as `GET /api/v1/backups/{id}` answers it (bytes fields decoded from base64)."""

    id: uuid.UUID
    project_id: uuid.UUID
    container_id: uuid.UUID
    device_id_hash: str
    payload_nonce: bytes
    payload_auth_tag: bytes
    metadata: bytes
    metadata_nonce: bytes
    metadata_auth_tag: bytes
    signature: bytes
    backup_timestamp: datetime
    encrypted_payload_size: int
    payload_sha256: str
    created_at: datetime


class BackupRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One backup as `ls` shows it; ``name``/``size``/``kind`` come from its metadata when this key opens it."""

    id: uuid.UUID
    container_id: uuid.UUID
    device_id_hash: str
    created_at: datetime
    encrypted_size: int
    name: str | None = None
    size: int | None = None
    kind: Literal["file", "directory"] | None = None


class LeftOut(msgspec.Struct, frozen=True):
    """An entry of a directory not backed up or not restored, and why (never a failure: it holds no data)."""

    path: str
    reason: str


class BackupResult(msgspec.Struct, frozen=True, kw_only=True):
    """A finished backup.

    Attributes:
        id: The backup's id on the server.
        transfer: ``"single-shot"`` (one request) or ``"tus"`` (resumable upload).
        resumed_from: The ciphertext offset this run continued an earlier run's upload from (0 when it did not).
        left_out: For a directory, the special files (FIFOs, sockets, devices) not packed: they hold no data.
    """

    id: uuid.UUID
    container_id: uuid.UUID
    name: str
    kind: Literal["file", "directory"]
    size: int
    encrypted_size: int
    sha256: str
    transfer: Literal["single-shot", "tus"]
    resumed_from: int = 0
    left_out: list[LeftOut] = msgspec.field(default_factory=list)


class RestoreResult(msgspec.Struct, frozen=True, kw_only=True):
    """A restored backup: where it was written, and what was verified.

    Attributes:
        left_out: For a directory, the archive members skipped: links pointing outside it, and special files.
    """

    id: uuid.UUID
    path: Path | None
    name: str
    kind: Literal["file", "directory"]
    size: int
    sha256: str
    left_out: list[LeftOut] = msgspec.field(default_factory=list)


class VerifyResult(msgspec.Struct, frozen=True, kw_only=True):
    """A backup downloaded and checked end to end (signature, digest, tag, plaintext SHA-256), nothing written."""

    id: uuid.UUID
    name: str
    kind: Literal["file", "directory"]
    size: int
    sha256: str
    verified: bool = True


class Enrollment(msgspec.Struct, frozen=True, kw_only=True):
    """The server's record of an enrolled device."""

    id: uuid.UUID
    project_id: uuid.UUID
    device_id_hash: str
    label: str | None = None
