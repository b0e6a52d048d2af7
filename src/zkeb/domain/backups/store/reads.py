"""The read paths' SQL: one backup as a principal may see it, and what restoring its payload needs.

A read is one raw read-only transaction (`raw_tenant_transaction`: its `BEGIN` carries the tenant), with no ORM
session: an envelope read is three round trips (`BEGIN` with the tenant, the `SELECT`, `COMMIT`), a restore's plan
four. The rows come back as transient `Backup` instances (attached to no session), so the schemas and headers built
from a backup read them as they read one from the ORM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy import inspect

from zkeb.db.models import Backup
from zkeb.domain.backups.chunk_reads import ChunkSpan
from zkeb.domain.backups.crypto import PayloadKey
from zkeb.domain.backups.store.connection import raw_tenant_transaction

if TYPE_CHECKING:
    import asyncpg

__all__ = ("RestoreSource", "visible_backup", "visible_restore_source")

#: (ORM attribute, column) of every `backups` column the model maps (`metadata_` is the `metadata` column).
_ATTRIBUTES = tuple(
    (attribute.key, attribute.columns[0].name)
    for attribute in inspect(Backup).column_attrs
    if attribute.columns[0].table is Backup.__table__ and not attribute.key.startswith("_")
)
_COLUMNS = ", ".join(f"b.{column}" for _, column in _ATTRIBUTES)
#: Visible: the project's, not in the trash, and, when a device hash is given ($3), that device's own.
_VISIBLE = "b.id = $1 AND b.project_id = $2 AND b.deleted_at IS NULL AND ($3::bytea IS NULL OR b.device_id_hash = $3)"
_BACKUP = f"SELECT {_COLUMNS} FROM backups b WHERE {_VISIBLE}"  # noqa: S608 - column names from the model
_BACKUP_AND_PAYLOAD = (
    f"SELECT {_COLUMNS}, p.key_id AS p_key_id, p.wrapped_key AS p_wrapped_key, p.store AS p_store"  # noqa: S608
    f" FROM backups b JOIN payloads p ON p.id = b.payload_id WHERE {_VISIBLE}"
)
_SPANS = "SELECT seq, byte_offset, plain_size FROM backup_chunks WHERE payload_id = $1 ORDER BY seq"


@dataclass(frozen=True, slots=True)
class RestoreSource:
    """A visible backup with its payload's wrapped key, chunk map and store (`payloads.store`)."""

    backup: Backup
    key: PayloadKey
    spans: list[ChunkSpan]
    store: str


def _backup(row: Any) -> Backup:
    return Backup(**{attribute: row[column] for attribute, column in _ATTRIBUTES})


async def visible_backup(
    connection: asyncpg.Connection,
    organization_id: UUID,
    *,
    backup_id: UUID,
    project_id: UUID,
    device_id_hash: bytes | None,
) -> Backup | None:
    """The backup, if it is visible (`device_id_hash`: only that device's own); None otherwise."""
    async with raw_tenant_transaction(connection, organization_id, readonly=True):
        row = await connection.fetchrow(_BACKUP, backup_id, project_id, device_id_hash)
    return None if row is None else _backup(row)


async def visible_restore_source(
    connection: asyncpg.Connection,
    organization_id: UUID,
    *,
    backup_id: UUID,
    project_id: UUID,
    device_id_hash: bytes | None,
) -> RestoreSource | None:
    """The visible backup and its payload's key, chunk map and store, read in one transaction; None if not visible."""
    async with raw_tenant_transaction(connection, organization_id, readonly=True):
        row = await connection.fetchrow(_BACKUP_AND_PAYLOAD, backup_id, project_id, device_id_hash)
        if row is None:
            return None
        spans = [
            ChunkSpan(r["seq"], r["byte_offset"], r["plain_size"])
            for r in await connection.fetch(_SPANS, row["payload_id"])
        ]
    key = PayloadKey(row["p_key_id"], bytes(row["p_wrapped_key"]))
    return RestoreSource(_backup(row), key, spans, row["p_store"])
