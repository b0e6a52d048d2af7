"""The SQL of moving payloads between stores (`zkeb storage migrate`) and of comparing the bucket with the rows.

Cross-tenant listings go through the owner's functions of migration e9b2, which name only ids; everything read or
changed about a payload happens in that payload's tenant transaction (row-level security), as the maintenance jobs
do. Only complete payloads (with their `sha256`) move: an open tus upload keeps writing to the store it started in.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from uuid import UUID

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.errors import ServiceUnavailableError
from zkeb.domain.backups.store.connection import raw_tenant_transaction
from zkeb.domain.backups.store.payloads import Blob, StoreKind

__all__ = (
    "ChunkRow",
    "MigrationRunningError",
    "MovingPayload",
    "chunk_rows",
    "clear_chunk_data",
    "fill_chunk_data",
    "load_payload",
    "migration_lock",
    "organizations_in_store",
    "payloads_awaiting_deletion",
    "payloads_in_store",
    "switch_store",
)

#: Any fixed number: the advisory lock that keeps two migrations from moving the same payload at once.
_MIGRATION_LOCK = 0x7A6B6562_0000_0019
_TRY_LOCK = text("SELECT pg_try_advisory_lock(:key)")
_UNLOCK = text("SELECT pg_advisory_unlock(:key)")
_IN_STORE = text("SELECT organization_id, payload_id FROM zkeb_payloads_in_store(:store, :after, :limit)")
_ORGANIZATIONS = text("SELECT zkeb_payload_store_organizations(:store)")

_LOAD = (
    "SELECT store, key_id, wrapped_key, sha256, size, chunk_count,"
    " (SELECT count(*) FROM backup_chunks c WHERE c.payload_id = p.id) AS rows"
    " FROM payloads p WHERE p.id = $1"
)
_FILL = "UPDATE backup_chunks SET data = $3, updated_at = now() WHERE payload_id = $1 AND seq = $2"
_CLEAR = "UPDATE backup_chunks SET data = ''::bytea, updated_at = now() WHERE payload_id = $1"
_LOCK_PAYLOAD = "SELECT store, chunk_count FROM payloads WHERE id = $1 FOR UPDATE"
_FILLED = "SELECT count(*) FROM backup_chunks WHERE payload_id = $1 AND octet_length(data) > 0"
_SWITCH = "UPDATE payloads SET store = $2, updated_at = now() WHERE id = $1"
_S3_PAYLOADS_AFTER = (
    "SELECT id FROM payloads WHERE store = 's3' AND organization_id = $1 AND ($2::uuid IS NULL OR id > $2)"
    " ORDER BY id LIMIT $3"
)
_CHUNK_ROWS = (
    "SELECT payload_id, seq, plain_size FROM backup_chunks WHERE payload_id = ANY($1::uuid[]) ORDER BY payload_id, seq"
)
_AWAITING_DELETION = "SELECT payload_id FROM payload_object_deletions WHERE organization_id = $1"


class MigrationRunningError(ServiceUnavailableError):
    """Another `zkeb storage migrate` holds the migration lock."""


@dataclass(frozen=True, slots=True)
class MovingPayload:
    """What a migration needs of one payload: where it is, its data key, its digest and its chunk count."""

    store: str
    key_id: str
    wrapped_key: bytes
    sha256: bytes | None
    size: int
    chunk_count: int
    rows: int


@dataclass(frozen=True, slots=True)
class ChunkRow:
    """One chunk row of an S3 payload, as the reconciler compares it with the objects."""

    payload_id: UUID
    seq: int
    plain_size: int


@contextlib.asynccontextmanager
async def migration_lock(engine: AsyncEngine) -> AsyncIterator[None]:
    """Hold the session-level migration lock for the block (on a connection of its own).

    Raises:
        MigrationRunningError: another migration holds it.
    """
    async with engine.connect() as connection:
        if not (await connection.execute(_TRY_LOCK, {"key": _MIGRATION_LOCK})).scalar_one():
            raise MigrationRunningError("another `zkeb storage migrate` is running")
        await connection.commit()
        try:
            yield
        finally:
            await connection.execute(_UNLOCK, {"key": _MIGRATION_LOCK})
            await connection.commit()


async def payloads_in_store(
    engine: AsyncEngine, store: StoreKind, *, after: UUID | None, limit: int
) -> list[tuple[UUID, UUID]]:
    """(organization id, payload id) of the next `limit` payloads in `store` with an id after `after`, by id."""
    async with engine.connect() as connection:
        rows = (await connection.execute(_IN_STORE, {"store": store, "after": after, "limit": limit})).all()
        await connection.rollback()
    return [(row[0], row[1]) for row in rows]


async def organizations_in_store(engine: AsyncEngine, store: StoreKind) -> list[UUID]:
    """The organizations with payloads in `store`."""
    async with engine.connect() as connection:
        found = list((await connection.execute(_ORGANIZATIONS, {"store": store})).scalars().all())
        await connection.rollback()
    return found


async def load_payload(connection: asyncpg.Connection, organization_id: UUID, payload_id: UUID) -> MovingPayload | None:
    """The payload as it is now; None when it was deleted."""
    async with raw_tenant_transaction(connection, organization_id, readonly=True):
        row = await connection.fetchrow(_LOAD, payload_id)
    if row is None:
        return None
    return MovingPayload(
        store=row["store"],
        key_id=row["key_id"],
        wrapped_key=bytes(row["wrapped_key"]),
        sha256=None if row["sha256"] is None else bytes(row["sha256"]),
        size=int(row["size"]),
        chunk_count=int(row["chunk_count"]),
        rows=int(row["rows"]),
    )


async def fill_chunk_data(
    connection: asyncpg.Connection, organization_id: UUID, payload_id: UUID, chunks: Sequence[tuple[int, Blob]]
) -> None:
    """Write the ciphertexts of an S3 payload's chunks into their rows (read only once the payload switches)."""
    async with raw_tenant_transaction(connection, organization_id):
        await connection.executemany(_FILL, [(payload_id, seq, blob) for seq, blob in chunks])


async def clear_chunk_data(connection: asyncpg.Connection, organization_id: UUID, payload_id: UUID) -> None:
    """Empty the rows' `data` of a payload whose copy into PostgreSQL failed verification."""
    async with raw_tenant_transaction(connection, organization_id):
        await connection.execute(_CLEAR, payload_id)


async def switch_store(
    connection: asyncpg.Connection,
    organization_id: UUID,
    payload_id: UUID,
    *,
    source: StoreKind,
    target: StoreKind,
    chunk_count: int,
) -> str | None:
    """Move the payload to `target` in one transaction: its `store`, and its rows' `data` (filled or emptied).

    Refuses (changes nothing) unless the payload is still in `source` with `chunk_count` chunks and, for
    PostgreSQL, every row holds its bytes. Leaving S3 records the payload's objects for deletion (the trigger of
    migration e9b2), in this transaction.

    Returns:
        `target` when switched, else the payload's store now (None when it is gone).
    """
    async with raw_tenant_transaction(connection, organization_id):
        row = await connection.fetchrow(_LOCK_PAYLOAD, payload_id)
        if row is None or row["store"] != source or row["chunk_count"] != chunk_count:
            return None if row is None else str(row["store"])
        if target == "postgres" and await connection.fetchval(_FILLED, payload_id) != chunk_count:
            return source
        if target == "s3":
            await connection.execute(_CLEAR, payload_id)
        await connection.execute(_SWITCH, payload_id, target)
    return target


async def chunk_rows(
    connection: asyncpg.Connection, organization_id: UUID, *, page: int
) -> AsyncIterator[list[ChunkRow]]:
    """The chunk rows of the organization's S3 payloads, by payload id then `seq`, `page` payloads at a time."""
    after: UUID | None = None
    while True:
        async with raw_tenant_transaction(connection, organization_id, readonly=True):
            payload_ids = [
                row["id"] for row in await connection.fetch(_S3_PAYLOADS_AFTER, organization_id, after, page)
            ]
            rows = await connection.fetch(_CHUNK_ROWS, payload_ids) if payload_ids else []
        if not payload_ids:
            return
        yield [ChunkRow(row["payload_id"], row["seq"], row["plain_size"]) for row in rows]
        after = payload_ids[-1]


async def payloads_awaiting_deletion(connection: asyncpg.Connection, organization_id: UUID) -> set[UUID]:
    """The organization's payloads whose objects the outbox still has to delete."""
    async with raw_tenant_transaction(connection, organization_id, readonly=True):
        return {row["payload_id"] for row in await connection.fetch(_AWAITING_DELETION, organization_id)}
