"""Where payload chunk bytes live: the interface the write and read pipelines use, and the PostgreSQL store.

Both stores keep each chunk's row in `backup_chunks` (`seq`, `byte_offset`, `plain_size`): the index restores plan
from and the resumable state of a tus upload. The PostgreSQL store keeps the at-rest ciphertext in the row's `data`;
the S3 store (`zkeb.domain.backups.store.s3`) keeps it in an object and leaves `data` empty. A payload's `store`
column says which, so readers follow the payload, not the setting (docs/storage.md).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple
from uuid import UUID

from opentelemetry import trace
from uuid_utils.compat import uuid7

from zkeb.core.database import pooled_connection
from zkeb.core.errors import ServiceUnavailableError
from zkeb.domain.backups.store.connection import raw_tenant_transaction

if TYPE_CHECKING:
    import asyncpg
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = (
    "READ_BATCH",
    "Blob",
    "ChunkWrite",
    "Handover",
    "PayloadStore",
    "PayloadStores",
    "PostgresPayloadStore",
    "RowsHook",
    "StoreKind",
    "StoredChunksMissingError",
    "insert_chunk_rows",
)

tracer = trace.get_tracer("zkeb.backups")

StoreKind = Literal["postgres", "s3"]

#: Chunks fetched per read (a query, or concurrent GETs) on restore. With queries following each other in one
#: transaction (READ_TRANSACTION_SECONDS), 2 per query already matches asyncpg's own read ceiling in
#: bench/upload.py; more per query would only add memory (1 per query was ~20 % slower).
READ_BATCH = 2
#: Longest a PostgreSQL restore keeps one read-only transaction open. Queries follow each other in it while the
#: client keeps up (no BEGIN/SET/COMMIT round trips per batch); a client that falls behind makes it commit instead
#: of waiting, so a slow download never holds its transaction (and its lock on the chunk table), nor its pooled
#: connection, for longer than this.
READ_TRANSACTION_SECONDS = 0.5

_INSERT_CHUNK = (
    "INSERT INTO backup_chunks (id, organization_id, payload_id, seq, byte_offset, plain_size, data, "
    "created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, now(), now())"
)
_SELECT_CHUNKS = "SELECT seq, data FROM backup_chunks WHERE payload_id = $1 AND seq = ANY($2::integer[]) ORDER BY seq"
_SELECT_CHUNKS_BELOW = (
    "SELECT seq, data FROM backup_chunks WHERE payload_id = $1 AND seq >= $2 AND seq < $3 ORDER BY seq"
)
#: One statement: the rows deleted are disjoint from the rows counted, so the count needs no later snapshot.
_DELETE_CHUNKS_FROM = (
    "WITH gone AS (DELETE FROM backup_chunks WHERE payload_id = $1 AND byte_offset >= $2)"
    " SELECT count(*) FROM backup_chunks WHERE payload_id = $1 AND byte_offset < $2"
)
_PAYLOAD_STORE = "SELECT store FROM payloads WHERE id = $1"


class ChunkWrite(NamedTuple):
    """A chunk on its way to a store: sequence number, byte offset, plaintext size, at-rest ciphertext."""

    seq: int
    offset: int
    plain_size: int
    blob: bytes


#: Runs first in the transaction that records a batch's rows (a tus PATCH checks its lease and progress there).
RowsHook = Callable[["asyncpg.Connection"], Awaitable[None]]
#: A stored chunk's ciphertext as read: `bytes` from PostgreSQL, a view of the client's buffer from an object store.
Blob = bytes | memoryview
#: Takes a fetched batch of ciphertexts (in the order asked for); cancelling it must leave nothing handed over.
Handover = Callable[[list[Blob]], Awaitable[None]]


class StoredChunksMissingError(ServiceUnavailableError):
    """Chunks the rows list are not in the store (deleted while reading, or lost)."""


class PayloadStore(ABC):
    """Stores and reads the at-rest chunks of payloads; the chunk rows are written in the same step."""

    kind: ClassVar[StoreKind]
    #: Whether chunk bytes live outside the rows (staged before them; the rows' `data` is empty).
    stages_bytes: ClassVar[bool]
    #: Plaintext bytes per chunk that new payloads are cut into. Each chunk records its own size, so readers never
    #: assume this (a payload moved between stores keeps the chunks it was written with).
    chunk_size: ClassVar[int]

    @abstractmethod
    async def write_batch(
        self,
        connection: asyncpg.Connection,
        *,
        organization_id: UUID,
        payload_id: UUID,
        chunks: Sequence[ChunkWrite],
        before_rows: RowsHook | None = None,
        fence: RowsHook | None = None,
    ) -> None:
        """Store `chunks` and commit their rows in one short transaction that runs `before_rows` first.

        Once this returns, every chunk is durable enough for its row to be acknowledged; a row is never committed
        for a chunk that was not stored. `fence`, run in a transaction of its own, raises unless the writer still
        owns the payload (a tus PATCH: its lease) and keeps anyone from taking it over until that transaction ends:
        a store whose chunk bytes live outside the rows uses it before it replaces bytes a writer that lost the
        payload left behind.
        """

    @abstractmethod
    async def read_batches(
        self,
        engine: AsyncEngine,
        *,
        organization_id: UUID,
        payload_id: UUID,
        seqs: Sequence[int],
        handover: Handover,
    ) -> None:
        """Fetch the chunks `seqs`, `READ_BATCH` at a time, handing each batch over as soon as it is fetched.

        Raises:
            StoredChunksMissingError: a chunk is gone (the backup was deleted while being read?).
            ServiceUnavailableError: the store failed.
        """

    @abstractmethod
    async def read_stored(
        self, connection: asyncpg.Connection, *, organization_id: UUID, payload_id: UUID, first: int, stop: int
    ) -> list[Blob]:
        """The ciphertexts of chunks `first .. stop-1` (a resumed upload rehashes them).

        Raises:
            StoredChunksMissingError: one of them is missing.
        """

    @abstractmethod
    async def delete_chunks_from(
        self, connection: asyncpg.Connection, *, organization_id: UUID, payload_id: UUID, offset: int
    ) -> None:
        """Delete the chunks (rows and bytes) that start at or after `offset`: bytes never acknowledged.

        The rows go in the caller's transaction (a claim's, a release's); chunks stored without a row (a PATCH that
        died between storing and recording them) go too.
        """

    @abstractmethod
    async def stage(self, organization_id: UUID, payload_id: UUID, chunks: Sequence[tuple[int, bytes]]) -> None:
        """Store chunk bytes that live outside PostgreSQL before their rows are written in a caller's transaction.

        With `stages_bytes`, the in-memory commit stages every chunk, then writes rows with an empty `data`;
        without, the rows carry the bytes and there is nothing to stage.
        """

    @abstractmethod
    async def unstage(self, organization_id: UUID, payload_id: UUID) -> None:
        """Delete what `stage` stored for a payload whose rows were not committed."""

    async def check(self) -> str | None:
        """Why the store cannot serve now (readiness), or None."""
        return None


async def insert_chunk_rows(
    connection: asyncpg.Connection,
    *,
    organization_id: UUID,
    payload_id: UUID,
    chunks: Sequence[ChunkWrite],
    keep_bytes: bool,
) -> None:
    """Insert the rows of `chunks`, with their ciphertext when `keep_bytes` (the PostgreSQL store), else empty."""
    rows = [
        (uuid7(), organization_id, payload_id, c.seq, c.offset, c.plain_size, c.blob if keep_bytes else b"")
        for c in chunks
    ]
    if len(rows) == 1:
        await connection.execute(_INSERT_CHUNK, *rows[0])
    else:
        await connection.executemany(_INSERT_CHUNK, rows)


async def delete_chunk_rows_from(connection: asyncpg.Connection, *, payload_id: UUID, offset: int) -> int:
    """Delete the chunk rows that start at or after `offset`, in the caller's tenant transaction; how many chunks are
    left (the next `seq`)."""
    kept: int = await connection.fetchval(_DELETE_CHUNKS_FROM, payload_id, offset)
    return kept


def _require_rows(rows: Sequence[Any], seqs: Sequence[int]) -> None:
    # An empty `data`: the payload moved to S3 (`zkeb storage migrate`) after this read was planned.
    if [row["seq"] for row in rows] != list(seqs) or any(not row["data"] for row in rows):
        raise StoredChunksMissingError("stored chunks vanished while reading (the backup was deleted or moved?)")


class PostgresPayloadStore(PayloadStore):
    """Chunk bytes in `backup_chunks.data`, next to their rows (the embedded default).

    Chunk transactions commit with `synchronous_commit = off`: the commit that makes a backup visible is
    synchronous, and flushing its WAL record flushes every earlier record, chunks included, so durability of a
    visible backup is unchanged while the chunk writes skip one fsync each.
    """

    kind: ClassVar[StoreKind] = "postgres"
    stages_bytes: ClassVar[bool] = False
    #: 1 MiB: a row's `data` stays well inside one TOAST value, and a restore's batch of `READ_BATCH` rows is 2 MiB.
    chunk_size: ClassVar[int] = 1 << 20

    async def write_batch(
        self,
        connection: asyncpg.Connection,
        *,
        organization_id: UUID,
        payload_id: UUID,
        chunks: Sequence[ChunkWrite],
        before_rows: RowsHook | None = None,
        fence: RowsHook | None = None,  # noqa: ARG002 - the interface's: rows carry the bytes, nothing is left behind
    ) -> None:
        """Insert the rows with their bytes (see `PayloadStore.write_batch`)."""
        async with raw_tenant_transaction(connection, organization_id, synchronous_commit=False):
            if before_rows is not None:
                await before_rows(connection)
            await insert_chunk_rows(
                connection, organization_id=organization_id, payload_id=payload_id, chunks=chunks, keep_bytes=True
            )

    async def read_batches(
        self,
        engine: AsyncEngine,
        *,
        organization_id: UUID,
        payload_id: UUID,
        seqs: Sequence[int],
        handover: Handover,
    ) -> None:
        """Queries of `READ_BATCH` chunks in one read-only transaction per read window (see the constants)."""
        # One pooled connection per read window, given back before waiting for a slow client: a stalled download
        # holds neither a transaction nor a connection of the pool the API's requests need.
        loop = asyncio.get_running_loop()
        index = 0
        while index < len(seqs):
            left_over: list[Blob] | None = None
            with tracer.start_as_current_span("backups.read_chunks") as span:
                first = index
                async with (
                    pooled_connection(engine) as connection,
                    raw_tenant_transaction(connection, organization_id, readonly=True),
                ):
                    deadline = loop.time() + READ_TRANSACTION_SECONDS
                    while index < len(seqs):
                        batch = seqs[index : index + READ_BATCH]
                        rows = await connection.fetch(_SELECT_CHUNKS, payload_id, list(batch))
                        _require_rows(rows, batch)
                        blobs: list[Blob] = [row["data"] for row in rows]
                        del rows
                        index += len(batch)
                        try:  # hand the batch over, but commit rather than wait past the deadline
                            async with asyncio.timeout_at(deadline):
                                await handover(blobs)
                        except TimeoutError:
                            left_over = blobs
                            break
                        finally:
                            del blobs  # the decrypter frees each chunk as it goes; hold none here
                        if loop.time() >= deadline:
                            break
                span.set_attribute("zkeb.chunk_count", index - first)
            if left_over is not None:
                await handover(left_over)
                del left_over

    async def read_stored(
        self, connection: asyncpg.Connection, *, organization_id: UUID, payload_id: UUID, first: int, stop: int
    ) -> list[Blob]:
        """One read-only query (see `PayloadStore.read_stored`)."""
        async with raw_tenant_transaction(connection, organization_id, readonly=True):
            rows = await connection.fetch(_SELECT_CHUNKS_BELOW, payload_id, first, stop)
        _require_rows(rows, range(first, stop))
        return [row["data"] for row in rows]

    async def delete_chunks_from(
        self,
        connection: asyncpg.Connection,
        *,
        organization_id: UUID,  # noqa: ARG002 - the interface's: the caller's transaction acts for it
        payload_id: UUID,
        offset: int,
    ) -> None:
        """Delete the rows, and with them the bytes (see `PayloadStore.delete_chunks_from`)."""
        await delete_chunk_rows_from(connection, payload_id=payload_id, offset=offset)

    async def stage(self, organization_id: UUID, payload_id: UUID, chunks: Sequence[tuple[int, bytes]]) -> None:
        """Nothing: the rows carry the bytes."""

    async def unstage(self, organization_id: UUID, payload_id: UUID) -> None:
        """Nothing: uncommitted rows took their bytes with them."""


class PayloadStores:
    """The stores of one process: PostgreSQL always, S3 when configured; `default` takes new payloads."""

    def __init__(self, default: StoreKind, *, s3: PayloadStore | None = None) -> None:
        """`default` names where new payloads go; it must be configured."""
        self.postgres = PostgresPayloadStore()
        self.s3 = s3
        if default == "s3" and s3 is None:
            raise ValueError("PAYLOAD_STORE=s3 needs an S3 store")
        self.default: PayloadStore = s3 if default == "s3" and s3 is not None else self.postgres

    def for_kind(self, kind: str) -> PayloadStore:
        """The store that holds a payload whose `store` column is `kind`.

        Raises:
            ServiceUnavailableError: the payload is in S3 and this process has no S3 store configured.
        """
        if kind == "postgres":
            return self.postgres
        if kind == "s3" and self.s3 is not None:
            return self.s3
        raise ServiceUnavailableError(f"this payload is stored in {kind}, which this server is not configured for")

    async def holder_of(self, engine: AsyncEngine, organization_id: UUID, payload_id: UUID) -> PayloadStore | None:
        """The store that holds a payload now (a migration may have moved it since a read began); None once it is gone.

        Raises:
            ServiceUnavailableError: the payload is in S3 and this process has no S3 store configured.
        """
        async with (
            pooled_connection(engine) as connection,
            raw_tenant_transaction(connection, organization_id, readonly=True),
        ):
            kind = await connection.fetchval(_PAYLOAD_STORE, payload_id)
        return None if kind is None else self.for_kind(kind)

    async def check(self) -> str | None:
        """Why the stores cannot serve (readiness), or None."""
        return None if self.s3 is None else await self.s3.check()
