"""Payload writes: a byte stream cut into chunks, hashed, encrypted and stored while the request keeps receiving.

A payload is stored as ordered chunks of about its store's `chunk_size` bytes, each encrypted with the payload's
data key (`ChunkCipher`, the chunk's sequence number bound as associated data), in the payload's store
(`zkeb.domain.backups.store.payloads`: PostgreSQL's `backup_chunks`, or an S3 bucket with the rows in PostgreSQL).
Writes never hold one transaction across an upload: chunks are written in short batches on a raw asyncpg
connection of the app's pool, while the request keeps receiving, hashing and encrypting the next chunk (the store
is the bottleneck, so the two must overlap). The writer holds its pooled connection only while chunks are waiting
for it, so a client sending slowly holds none between chunks. Chunks are invisible to clients until the backup row
that references their payload commits; nothing else references them. Restores read them back through
`zkeb.domain.backups.chunk_reads`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from litestar.exceptions import HTTPException
from opentelemetry import trace
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.database import pooled_connection
from zkeb.core.errors import ServiceUnavailableError
from zkeb.domain.backups.store.payloads import (
    READ_BATCH,
    ChunkWrite,
    PayloadStore,
    RowsHook,
    StoredChunksMissingError,
)
from zkeb.lib.atrest import ChunkCipher

if TYPE_CHECKING:
    import asyncpg

__all__ = ("ChunkPipeline", "PipelineError", "TransactionHook", "hash_stored_chunks")

T = TypeVar("T")

tracer = trace.get_tracer("zkeb.backups")

#: Encrypted chunks waiting for the writer (bounds memory per upload to a few chunks).
WRITE_QUEUE_DEPTH = 2
#: Most chunks inserted in one transaction.
WRITE_BATCH = 2


async def hash_stored_chunks(
    connection: asyncpg.Connection,
    *,
    store: PayloadStore,
    organization_id: UUID,
    payload_id: UUID,
    cipher: ChunkCipher,
    chunk_count: int,
    digest: Any,
) -> None:
    """Feed the plaintext of chunks `0 .. chunk_count-1` to `digest` (a resumed upload's hash prefix)."""
    with tracer.start_as_current_span("backups.hash_stored", attributes={"zkeb.chunk_count": chunk_count}):
        for first in range(0, chunk_count, READ_BATCH):
            stop = min(first + READ_BATCH, chunk_count)
            try:
                blobs = await store.read_stored(
                    connection, organization_id=organization_id, payload_id=payload_id, first=first, stop=stop
                )
            except StoredChunksMissingError:
                raise ServiceUnavailableError("a stored chunk of this upload is missing") from None
            for seq, blob in enumerate(blobs, start=first):
                digest.update(cipher.decrypt(seq, blob))


class PipelineError(RuntimeError):
    """The chunk writer failed; the upload cannot continue."""


def _writer_failure(writer: asyncio.Task[None]) -> BaseException:
    """What to raise for the writer's stop: its own error when the client has a status for it, else PipelineError.

    Where it is raised, no local may keep the writer (or another task that raised it) once the frame is left: the
    exception keeps that frame in its traceback, the task keeps the exception, and the cycle keeps every frame of
    the request, the request itself with them, until the garbage collector runs. granian closes a connection whose
    request body went unread only once the request is freed, so a PATCH refused mid-body (409, 404) left its client
    waiting for the end of the connection, once for over 60 s on an idle server (`zkeb.core.connection`).
    """
    exc = writer.exception() if not writer.cancelled() else None
    if isinstance(exc, HTTPException | PoolTimeoutError):  # e.g. a lost upload lease (409), a full pool (503)
        return exc
    failure = PipelineError("the chunk writer stopped")
    failure.__cause__ = exc
    return failure


_Chunk = ChunkWrite
#: Runs first in each chunk transaction with the sequence number and byte offset that follow the batch; raising
#: aborts the write (a tus PATCH checks its lease and records its progress here).
TransactionHook = Callable[["asyncpg.Connection", int, int], Awaitable[None]]


class ChunkPipeline:
    """Cuts a byte stream into chunks, hashes and encrypts them, and writes them from a separate task.

    `write()` returns as soon as the chunk is queued, so the request keeps receiving while the previous chunk is
    being inserted; at most `WRITE_QUEUE_DEPTH` encrypted chunks wait, plus one being received and one being
    written, whatever the payload size. The writer takes a pooled connection when a chunk is queued and gives it
    back when none is left waiting.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        store: PayloadStore,
        organization_id: UUID,
        payload_id: UUID,
        cipher: ChunkCipher,
        first_seq: int = 0,
        first_offset: int = 0,
        digests: Sequence[Any] = (),
        in_transaction: TransactionHook | None = None,
        fence: RowsHook | None = None,
    ) -> None:
        """Prepare to write chunks `first_seq, ...` starting at byte `first_offset` of the payload.

        `in_transaction` runs in each batch's transaction (with the next seq and offset), `fence` where the store
        needs to know the payload is still the writer's (see `PayloadStore.write_batch`).
        """
        self._engine = engine
        self._payload_store = store
        self._in_transaction = in_transaction
        self._fence = fence
        self._organization_id = organization_id
        self._payload_id = payload_id
        self._cipher = cipher
        self._digests = tuple(digests)
        self._chunk_size = store.chunk_size
        # One chunk's worth, allocated once and refilled: no reallocation, whatever the size of the pieces.
        self._buffer = bytearray(store.chunk_size)
        self._filled = 0
        self._queue: asyncio.Queue[_Chunk | None] = asyncio.Queue(maxsize=WRITE_QUEUE_DEPTH)
        self._writer: asyncio.Task[None] | None = None
        self.next_seq = first_seq
        self.next_offset = first_offset
        self.received = 0
        self.stored_chunks = 0

    async def __aenter__(self) -> ChunkPipeline:
        """Start the writer task."""
        self._writer = asyncio.create_task(self._write_loop(), name=f"zkeb-chunk-writer-{self._payload_id}")
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        """Stop the writer if the upload did not close cleanly."""
        await self.abort()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet cut into a chunk."""
        return self._filled

    async def write(self, data: bytes | memoryview) -> None:
        """Take the next bytes of the payload."""
        if not data:
            return
        self.received += len(data)
        view = memoryview(data).cast("B")
        chunk_size = self._chunk_size
        while view:
            if not self._filled and len(view) >= chunk_size:
                # Whole chunks straight from the caller's buffer: no copy for large in-memory payloads.
                await self._emit(view[:chunk_size])
                view = view[chunk_size:]
                continue
            taken = min(len(view), chunk_size - self._filled)
            self._buffer[self._filled : self._filled + taken] = view[:taken]
            self._filled += taken
            view = view[taken:]
            if self._filled == chunk_size:
                await self._emit_buffer()

    async def feed(self, receiving: Awaitable[T]) -> T:
        """Run `receiving`, which writes into this pipeline, and stop it as soon as the writer fails.

        A receiver waiting for bytes that are slow to come (a client gone silent) learns of the failure at once,
        not when its next chunk is queued.

        Raises:
            PipelineError: the writer failed (or its own error when the client has a status for it, see
                `_writer_failure`); `receiving` was cancelled.
        """
        writer = self._writer
        if writer is None:
            raise PipelineError("the chunk writer is not running")
        task = asyncio.ensure_future(receiving)
        try:
            await asyncio.wait({task, writer}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and (writer.cancelled() or writer.exception() is not None):
                raise _writer_failure(writer)  # the receiver is cancelled below
            return await task
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            del task, writer  # each holds what it raised, which holds this frame: see `_writer_failure`

    async def _emit_buffer(self) -> None:
        # The chunk is hashed and encrypted (into a new object) before `_emit` first awaits, so the buffer is
        # free to be refilled as soon as it returns.
        with memoryview(self._buffer) as whole:
            await self._emit(whole[: self._filled])
        self._filled = 0

    async def close(self, *, flush_partial: bool = True) -> None:
        """Write what is buffered (if `flush_partial`) and wait until every queued chunk is stored.

        Raises:
            Exception: what stopped the writer, as it raised it (a lost lease's 409, the store's or the database's
                error); `PipelineError` when it had already stopped before the last chunk was queued.
        """
        if flush_partial and self._filled:
            await self._emit_buffer()
        await self._put(None)
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                await writer
            finally:
                del writer  # it holds what it raised: see `_writer_failure`

    async def abort(self) -> None:
        """Stop writing; chunks already stored stay until the caller deletes them."""
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.cancel()
            try:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer
            finally:
                del writer  # it holds what it raised: see `_writer_failure`
        self._filled = 0

    async def _emit(self, plaintext: memoryview) -> None:
        for digest in self._digests:
            digest.update(plaintext)
        size = len(plaintext)
        blob = self._cipher.encrypt(self.next_seq, plaintext)
        await self._put(ChunkWrite(self.next_seq, self.next_offset, size, blob))
        self.next_seq += 1
        self.next_offset += size

    async def _put(self, item: _Chunk | None) -> None:
        writer = self._writer
        if writer is None:
            raise PipelineError("the chunk writer is not running")
        try:
            if writer.done():
                raise _writer_failure(writer)
            if not self._queue.full():
                self._queue.put_nowait(item)
                return
            put = asyncio.ensure_future(self._queue.put(item))
            try:
                await asyncio.wait({put, writer}, return_when=asyncio.FIRST_COMPLETED)
                queued = put.done()
            finally:
                if not put.done():  # the writer failed, or this task was cancelled while waiting
                    put.cancel()
            if not queued:
                raise _writer_failure(writer)
        finally:
            del writer  # it holds what it raised: see `_writer_failure`

    def _take_batch(self, first: _Chunk) -> tuple[list[_Chunk], bool]:
        """`first` and the chunks queued behind it, up to `WRITE_BATCH`; True when the end marker was taken too."""
        batch = [first]
        while len(batch) < WRITE_BATCH and not self._queue.empty():
            following = self._queue.get_nowait()
            if following is None:
                return batch, True
            batch.append(following)
        return batch, False

    async def _write_loop(self) -> None:
        queue = self._queue
        while (item := await queue.get()) is not None:
            # A pooled connection only while chunks are waiting: a slow client's upload holds none between chunks.
            async with pooled_connection(self._engine) as connection:
                while True:
                    batch, finished = self._take_batch(item)
                    await self._store(connection, batch)
                    if finished:
                        return
                    if queue.empty():
                        break
                    if (item := queue.get_nowait()) is None:
                        return

    async def _store(self, connection: asyncpg.Connection, batch: list[_Chunk]) -> None:
        size = sum(chunk.plain_size for chunk in batch)
        with tracer.start_as_current_span(
            "backups.store_chunks",
            attributes={"zkeb.chunk_count": len(batch), "zkeb.bytes": size, "zkeb.first_seq": batch[0].seq},
        ):
            hook = self._in_transaction
            last = batch[-1]

            async def before_rows(connection: asyncpg.Connection) -> None:
                if hook is not None:
                    await hook(connection, last.seq + 1, last.offset + last.plain_size)

            await self._payload_store.write_batch(
                connection,
                organization_id=self._organization_id,
                payload_id=self._payload_id,
                chunks=batch,
                before_rows=before_rows if hook is not None else None,
                fence=self._fence,
            )
            self.stored_chunks += len(batch)
