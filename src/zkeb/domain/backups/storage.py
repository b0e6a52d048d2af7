"""Payload chunk storage: streamed, pipelined writes and prefetched reads of at-rest encrypted chunks.

A payload is stored as ordered chunks of about `CHUNK_SIZE` bytes, each encrypted with the payload's data key
(`ChunkCipher`, the chunk's sequence number bound as associated data), in the payload's store
(`zkeb.domain.backups.store.payloads`: PostgreSQL's `backup_chunks`, or an S3 bucket with the rows in PostgreSQL).
Writes never hold one transaction across an upload: chunks are written in short batches on a raw asyncpg
connection of the app's pool, while the request keeps receiving, hashing and encrypting the next chunk (the store
is the bottleneck, so the two must overlap). The writer holds its pooled connection only while chunks are waiting
for it, so a client sending slowly holds none between chunks. Chunks are invisible to clients until the backup row
that references their payload commits; nothing else references them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from litestar.exceptions import HTTPException
from opentelemetry import trace
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.errors import ProblemError, ServiceUnavailableError
from zkeb.domain.backups.metrics import record_bytes_restored
from zkeb.domain.backups.store.connection import pooled_connection
from zkeb.domain.backups.store.payloads import READ_BATCH, ChunkWrite, PayloadStore, StoredChunksMissingError
from zkeb.lib.atrest import (
    ChunkCipher,
    ChunkIntegrityError,
    DataKeyUnwrapError,
    MasterKeyring,
    UnknownKeyIdError,
    new_data_key,
    unwrap_data_key,
    wrap_data_key,
)
from zkeb.lib.ranges import ByteRange

if TYPE_CHECKING:
    import asyncpg

__all__ = (
    "CHUNK_SIZE",
    "ChunkPipeline",
    "ChunkSpan",
    "PayloadCrypto",
    "PayloadKey",
    "PipelineError",
    "ReadStep",
    "StoredPayloadCorruptError",
    "TransactionHook",
    "hash_stored_chunks",
    "plan_read",
    "stream_plaintext",
)

T = TypeVar("T")

logger = logging.getLogger("zkeb.backups.storage")
tracer = trace.get_tracer("zkeb.backups")

#: Plaintext bytes per stored chunk.
CHUNK_SIZE = 1 << 20
#: Encrypted chunks waiting for the writer (bounds memory per upload to a few chunks).
WRITE_QUEUE_DEPTH = 2
#: Most chunks inserted in one transaction.
WRITE_BATCH = 2
#: Decrypted chunks buffered ahead of the client on restore (the store fetches `READ_BATCH` chunks at a time).
READ_QUEUE_DEPTH = 2
#: Fetched (still encrypted) batches waiting to be decrypted.
FETCH_QUEUE_DEPTH = 1


@dataclass(frozen=True, slots=True)
class PayloadKey:
    """A payload's data key as stored: wrapped by the master key `key_id`."""

    key_id: str
    wrapped_key: bytes


class PayloadCrypto:
    """Creates and opens per-payload data keys under the master keyring."""

    def __init__(self, keyring: MasterKeyring) -> None:
        """Use `keyring.active` for new payloads and any of its keys to open existing ones."""
        self._keyring = keyring

    def new_key(self, payload_id: UUID) -> tuple[PayloadKey, ChunkCipher]:
        """A fresh data key for `payload_id`, wrapped by the active master key, and its chunk cipher."""
        data_key = new_data_key()
        wrapped = wrap_data_key(self._keyring.active, data_key, payload_id=payload_id)
        return PayloadKey(self._keyring.active_id, wrapped), ChunkCipher(data_key, payload_id)

    def cipher(self, payload_id: UUID, key: PayloadKey) -> ChunkCipher:
        """The chunk cipher of a stored payload.

        Raises:
            ServiceUnavailableError: the master key that wrapped it is not configured, or does not open it.
        """
        try:
            data_key = unwrap_data_key(self._keyring.get(key.key_id), key.wrapped_key, payload_id=payload_id)
        except (UnknownKeyIdError, DataKeyUnwrapError) as exc:
            logger.error(  # noqa: TRY400 - the traceback adds nothing
                "cannot open the data key of payload %s (key id %s): %s", payload_id, key.key_id, exc
            )
            raise ServiceUnavailableError("the stored payload cannot be decrypted with the configured keys") from None
        return ChunkCipher(data_key, payload_id)


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


class StoredPayloadCorruptError(ProblemError):
    """A stored chunk failed authentication: changed or damaged at rest; neither transient nor the client's (500)."""

    status_code: int = 500


class PipelineError(RuntimeError):
    """The chunk writer failed; the upload cannot continue."""


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
        chunk_size: int = CHUNK_SIZE,
        in_transaction: TransactionHook | None = None,
    ) -> None:
        """Prepare to write chunks `first_seq, ...` starting at byte `first_offset` of the payload."""
        self._engine = engine
        self._payload_store = store
        self._in_transaction = in_transaction
        self._organization_id = organization_id
        self._payload_id = payload_id
        self._cipher = cipher
        self._digests = tuple(digests)
        self._chunk_size = chunk_size
        # One chunk's worth, allocated once and refilled: no reallocation, whatever the size of the pieces.
        self._buffer = bytearray(chunk_size)
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
                `_raise_writer_failure`); `receiving` was cancelled.
        """
        writer = self._writer
        if writer is None:
            raise PipelineError("the chunk writer is not running")
        task = asyncio.ensure_future(receiving)
        try:
            await asyncio.wait({task, writer}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and (writer.cancelled() or writer.exception() is not None):
                self._raise_writer_failure(writer)  # the receiver is cancelled below
            return await task
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _emit_buffer(self) -> None:
        # The chunk is hashed and encrypted (into a new object) before `_emit` first awaits, so the buffer is
        # free to be refilled as soon as it returns.
        with memoryview(self._buffer) as whole:
            await self._emit(whole[: self._filled])
        self._filled = 0

    async def close(self, *, flush_partial: bool = True) -> None:
        """Write what is buffered (if `flush_partial`) and wait until every queued chunk is stored.

        Raises:
            PipelineError: the writer failed.
        """
        if flush_partial and self._filled:
            await self._emit_buffer()
        await self._put(None)
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer

    async def abort(self) -> None:
        """Stop writing; chunks already stored stay until the caller deletes them."""
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
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
        if writer.done():
            self._raise_writer_failure(writer)
        if not self._queue.full():
            self._queue.put_nowait(item)
            return
        put = asyncio.ensure_future(self._queue.put(item))
        try:
            done, _ = await asyncio.wait({put, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not put.done():  # the writer failed, or this task was cancelled while waiting
                put.cancel()
        if put not in done:
            self._raise_writer_failure(writer)

    @staticmethod
    def _raise_writer_failure(writer: asyncio.Task[None]) -> None:
        """Raise why the writer stopped: its own error when the client has a status for it, else PipelineError."""
        exc = writer.exception() if not writer.cancelled() else None
        if isinstance(exc, HTTPException | PoolTimeoutError):  # e.g. a lost upload lease (409), a full pool (503)
            raise exc
        raise PipelineError("the chunk writer stopped") from exc

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
            )
            self.stored_chunks += len(batch)


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """Where one stored chunk sits in its payload."""

    seq: int
    byte_offset: int
    plain_size: int


@dataclass(frozen=True, slots=True)
class ReadStep:
    """Decrypt chunk `seq` and send its plaintext bytes `start .. stop-1`."""

    seq: int
    start: int
    stop: int


def plan_read(chunks: Sequence[ChunkSpan], byte_range: ByteRange | None) -> list[ReadStep]:
    """The chunks to decrypt (and the slice of each to send) for the whole payload or one byte range.

    Only chunks that overlap the range are listed, so a small range decrypts one or two chunks.

    Raises:
        ValueError: the chunks do not tile the payload contiguously from byte 0.
    """
    expected_offset = 0
    for position, chunk in enumerate(chunks):
        if chunk.seq != position or chunk.byte_offset != expected_offset or chunk.plain_size <= 0:
            raise ValueError(f"stored chunks are not contiguous at chunk {position}")
        expected_offset += chunk.plain_size
    if byte_range is None:
        return [ReadStep(c.seq, 0, c.plain_size) for c in chunks]
    first, last = byte_range.start, byte_range.end
    steps: list[ReadStep] = []
    for chunk in chunks:
        chunk_end = chunk.byte_offset + chunk.plain_size - 1
        if chunk_end < first or chunk.byte_offset > last:
            continue
        start = max(first, chunk.byte_offset) - chunk.byte_offset
        stop = min(last, chunk_end) - chunk.byte_offset + 1
        steps.append(ReadStep(chunk.seq, start, stop))
    return steps


class _PayloadReader:
    """Two stages ahead of the client: a fetcher reads `READ_BATCH` chunks at a time from the payload's store, and a
    decrypter turns the previous batch into plaintext pieces, so the store is already sending batch k+1 while batch
    k is decrypted and sent. At most `FETCH_QUEUE_DEPTH` fetched batches and `READ_QUEUE_DEPTH` pieces wait.

    How the fetcher holds database connections is the store's (`PayloadStore.read_batches`): the PostgreSQL store
    shares one read-only transaction per short read window, the S3 store holds none.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        store: PayloadStore,
        *,
        organization_id: UUID,
        payload_id: UUID,
        cipher: ChunkCipher,
        steps: Sequence[ReadStep],
    ) -> None:
        self._engine = engine
        self._store = store
        self._organization_id = organization_id
        self._payload_id = payload_id
        self._cipher = cipher
        self._steps = steps
        self._fetched: asyncio.Queue[list[bytes] | None] = asyncio.Queue(maxsize=FETCH_QUEUE_DEPTH)
        self.pieces: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=READ_QUEUE_DEPTH)

    async def _fetch(self) -> None:
        await self._store.read_batches(
            self._engine,
            organization_id=self._organization_id,
            payload_id=self._payload_id,
            seqs=[step.seq for step in self._steps],
            handover=self._fetched.put,
        )
        await self._fetched.put(None)

    async def _next_batch(self, fetcher: asyncio.Task[None]) -> list[bytes] | None:
        """The next fetched batch, or None at the end; re-raises the fetcher's failure."""
        get = asyncio.ensure_future(self._fetched.get())
        try:
            done, _ = await asyncio.wait({get, fetcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not get.done():  # the fetcher ended, or this task was cancelled (the client went away) while waiting
                get.cancel()
        if get in done:
            return get.result()
        fetcher.result()
        return await self._fetched.get()  # the fetcher ended cleanly right after queueing its last item

    async def run(self) -> None:
        """Decrypt fetched batches into `pieces`, ending with None, or with the exception that stopped it."""
        fetcher = asyncio.create_task(self._fetch(), name=f"zkeb-chunk-fetcher-{self._payload_id}")
        try:
            position = 0
            while (blobs := await self._next_batch(fetcher)) is not None:
                for index in range(len(blobs)):
                    step = self._steps[position]
                    with tracer.start_as_current_span("backups.decrypt", attributes={"zkeb.seq": step.seq}):
                        try:
                            plaintext = self._cipher.decrypt(step.seq, blobs[index])
                        except ChunkIntegrityError as exc:
                            logger.error(  # noqa: TRY400 - the traceback adds nothing
                                "payload %s: stored chunk %d failed its integrity check: %s",
                                self._payload_id,
                                step.seq,
                                exc,
                            )
                            raise StoredPayloadCorruptError(
                                "the stored payload failed its integrity check and cannot be restored"
                            ) from None
                    blobs[index] = b""  # release each ciphertext as soon as it is decrypted
                    whole = step.start == 0 and step.stop == len(plaintext)
                    await self.pieces.put(plaintext if whole else plaintext[step.start : step.stop])
                    del plaintext
                    position += 1
            await self.pieces.put(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await self.pieces.put(exc)
        finally:
            if not fetcher.done():
                fetcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fetcher


async def stream_plaintext(
    engine: AsyncEngine,
    *,
    store: PayloadStore,
    organization_id: UUID,
    payload_id: UUID,
    cipher: ChunkCipher,
    steps: Sequence[ReadStep],
    attributes: dict[str, Any] | None = None,
) -> AsyncIterator[bytes]:
    """Yield the payload bytes `steps` select, reading and decrypting ahead of the client on its own connection.

    Memory stays at a few chunks whatever the size (see `_PayloadReader`). Closing the generator (the client went
    away) stops the reader and releases its connection. The generator may be started in one task (the handler waits
    for the first piece, so a failure before any byte is its error, a 503 before headers) and finished in another
    (the response's): its span is therefore never the current one across a `yield`, only the reader's parent.
    """
    payload_reader = _PayloadReader(
        engine, store, organization_id=organization_id, payload_id=payload_id, cipher=cipher, steps=steps
    )
    span = tracer.start_span("backups.send", attributes=attributes or {})
    with trace.use_span(span, end_on_exit=False):
        reader = asyncio.create_task(payload_reader.run(), name=f"zkeb-chunk-reader-{payload_id}")
    sent = 0
    try:
        while True:
            item = await payload_reader.pieces.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                logger.error("restore of payload %s failed after %d bytes: %s", payload_id, sent, item)
                span.set_attribute("zkeb.outcome", "error")
                span.record_exception(item)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(item).__name__))
                raise item
            sent += len(item)
            yield item
        span.set_attribute("zkeb.outcome", "success")
    finally:
        span.set_attribute("zkeb.bytes", sent)
        span.end()
        record_bytes_restored(sent)
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
