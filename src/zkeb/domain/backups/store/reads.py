"""The read paths' SQL: one backup or a page of them as a principal may see them, and what a restore needs.

A read is one raw read-only transaction (`raw_tenant_transaction`: its `BEGIN` carries the tenant), with no ORM
session: an envelope read, a page or a restore's plan is three round trips (`BEGIN` with the tenant, one `SELECT`,
`COMMIT`). The rows come back as transient `Backup` instances (attached to no session), so the schemas and
headers built from a backup read them as they read one from the ORM.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy import inspect

from zkeb.db.models import Backup
from zkeb.domain.backups.chunk_reads import ChunkSpan
from zkeb.domain.backups.crypto import PayloadKey
from zkeb.domain.backups.store.connection import raw_tenant_transaction

if TYPE_CHECKING:
    import asyncpg

__all__ = ("RestoreSource", "Visibility", "visible_backup", "visible_page", "visible_restore_source")

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
#: A restore's plan in one statement, so in one snapshot: the backup, its payload's key and store, and its chunk map
#: (in two statements a purge committed between them showed the backup with no chunks, a false "damaged" 500).
_RESTORE_SOURCE = (
    f"SELECT {_COLUMNS}, p.key_id AS p_key_id, p.wrapped_key AS p_wrapped_key, p.store AS p_store,"  # noqa: S608
    " s.seqs, s.offsets, s.sizes"
    " FROM backups b JOIN payloads p ON p.id = b.payload_id,"
    " LATERAL (SELECT array_agg(c.seq ORDER BY c.seq) AS seqs, array_agg(c.byte_offset ORDER BY c.seq) AS offsets,"
    " array_agg(c.plain_size ORDER BY c.seq) AS sizes FROM backup_chunks c WHERE c.payload_id = b.payload_id) s"
    f" WHERE {_VISIBLE}"
)
#: A page, newest first: the conditions a listing uses are joined in (each combination is its own prepared statement,
#: planned on the index it needs: project, container or device, each by (created_at, id) descending).
_PAGE = "SELECT {columns} FROM backups b WHERE b.project_id = $1 AND b.deleted_at IS NULL{conditions}"
_PAGE_ORDER = " ORDER BY b.created_at DESC, b.id DESC LIMIT {limit}"


@dataclass(frozen=True, slots=True)
class Visibility:
    """Which backups a read may return: one project's, not in the trash, and only one device's with `device_id_hash`."""

    organization_id: UUID
    project_id: UUID
    device_id_hash: bytes | None


@dataclass(frozen=True, slots=True)
class RestoreSource:
    """A visible backup with its payload's wrapped key, chunk map and store (`payloads.store`)."""

    backup: Backup
    key: PayloadKey
    spans: list[ChunkSpan]
    store: str


def _backup(row: Any) -> Backup:
    return Backup(**{attribute: row[column] for attribute, column in _ATTRIBUTES})


async def visible_backup(connection: asyncpg.Connection, visibility: Visibility, backup_id: UUID) -> Backup | None:
    """The backup, if it is visible; None otherwise."""
    async with raw_tenant_transaction(connection, visibility.organization_id, readonly=True):
        row = await connection.fetchrow(_BACKUP, backup_id, visibility.project_id, visibility.device_id_hash)
    return None if row is None else _backup(row)


async def visible_page(
    connection: asyncpg.Connection,
    visibility: Visibility,
    *,
    container_id: UUID | None,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[Backup]:
    """Up to `limit` visible backups, newest first: of `container_id` when given, older than `after` ((created_at,
    id), a keyset position) when given."""
    conditions: list[str] = []
    arguments: list[object] = [visibility.project_id]
    if visibility.device_id_hash is not None:
        arguments.append(visibility.device_id_hash)
        conditions.append(f" AND b.device_id_hash = ${len(arguments)}")
    if container_id is not None:
        arguments.append(container_id)
        conditions.append(f" AND b.container_id = ${len(arguments)}")
    if after is not None:
        arguments += after
        conditions.append(f" AND (b.created_at, b.id) < (${len(arguments) - 1}, ${len(arguments)})")
    statement = _PAGE.format(columns=_COLUMNS, conditions="".join(conditions)) + _PAGE_ORDER.format(limit=int(limit))
    async with raw_tenant_transaction(connection, visibility.organization_id, readonly=True):
        rows = await connection.fetch(statement, *arguments)
    return [_backup(row) for row in rows]


async def visible_restore_source(
    connection: asyncpg.Connection, visibility: Visibility, backup_id: UUID
) -> RestoreSource | None:
    """The visible backup and its payload's key, chunk map and store, read in one statement; None if not visible."""
    async with raw_tenant_transaction(connection, visibility.organization_id, readonly=True):
        row = await connection.fetchrow(_RESTORE_SOURCE, backup_id, visibility.project_id, visibility.device_id_hash)
    if row is None:
        return None
    spans = [ChunkSpan(*span) for span in zip(row["seqs"] or (), row["offsets"] or (), row["sizes"] or (), strict=True)]
    key = PayloadKey(row["p_key_id"], bytes(row["p_wrapped_key"]))
    return RestoreSource(_backup(row), key, spans, row["p_store"])
