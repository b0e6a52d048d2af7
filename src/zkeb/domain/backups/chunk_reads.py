"""Restores: the chunks a whole payload or a byte range needs, fetched, decrypted and sent ahead of the client.

`plan_read` picks the chunks (and the slice of each) a request needs; `stream_plaintext` runs a reader two stages
ahead of the client (a fetcher reading batches from the payload's store, a decrypter turning them into plaintext),
so the store is already sending the next batch while this one is decrypted and sent. Memory stays at a few chunks
whatever the payload's size. A chunk that fails authentication ends the restore with a 500
(`StoredPayloadCorruptError`): changed or damaged at rest, neither transient nor the client's doing. A payload that
`zkeb storage migrate` moves to the other store while it is read is followed there: the chunks are the same
ciphertexts in both stores, so the read goes on from the first chunk not yet fetched. One deleted while it is read
(a purge) ends the restore with a warning, not an error: the organization asked for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.errors import ProblemError, database_connection_lost
from zkeb.domain.backups.metrics import record_bytes_restored
from zkeb.domain.backups.store.payloads import Blob, PayloadStores, StoredChunksMissingError
from zkeb.lib.atrest import ChunkCipher, ChunkIntegrityError
from zkeb.lib.ranges import ByteRange

__all__ = ("ChunkSpan", "PayloadDeletedError", "ReadStep", "StoredPayloadCorruptError", "plan_read", "stream_plaintext")

logger = logging.getLogger("zkeb.backups.storage")
tracer = trace.get_tracer("zkeb.backups")

#: Decrypted chunks buffered ahead of the client on restore (the store fetches `READ_BATCH` chunks at a time).
READ_QUEUE_DEPTH = 2
#: Fetched (still encrypted) batches waiting to be decrypted.
FETCH_QUEUE_DEPTH = 1
#: Times one restore follows its payload to another store (a migration there and back again) before it gives up.
MOVES_FOLLOWED = 2


class StoredPayloadCorruptError(ProblemError):
    """A stored chunk failed authentication: changed or damaged at rest; neither transient nor the client's (500)."""

    status_code: int = 500


class PayloadDeletedError(StoredChunksMissingError):
    """The payload was deleted (purged) while it was being restored: no store holds it any more."""


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """Where one stored chunk sits in its payload."""

    seq: int
    byte_offset: int
    plain_size: int


@dataclass(frozen=True, slots=True)
class ReadStep:
    """Decrypt chunk `seq` (`chunk_size` plaintext bytes) and send its plaintext bytes `start .. stop-1`."""

    seq: int
    start: int
    stop: int
    chunk_size: int


def plan_read(
    chunks: Sequence[ChunkSpan], byte_range: ByteRange | None, *, payload_id: UUID, payload_size: int
) -> list[ReadStep]:
    """The chunks to decrypt (and the slice of each to send) for the whole payload or one byte range.

    Only chunks that overlap the range are listed, so a small range decrypts one or two chunks.

    Raises:
        StoredPayloadCorruptError: the chunks do not tile the payload's `payload_size` bytes contiguously from byte
            0 (a chunk row lost or changed at rest): nothing may be sent, not even a range that misses the damage,
            since the response would promise bytes the server does not have.
    """
    expected_offset = 0
    for position, chunk in enumerate(chunks):
        if chunk.seq != position or chunk.byte_offset != expected_offset or chunk.plain_size <= 0:
            raise _incomplete(payload_id, f"the stored chunks are not contiguous at chunk {position}")
        expected_offset += chunk.plain_size
    if expected_offset != payload_size:
        raise _incomplete(payload_id, f"the stored chunks hold {expected_offset} of the payload's {payload_size} bytes")
    if byte_range is None:
        return [ReadStep(c.seq, 0, c.plain_size, c.plain_size) for c in chunks]
    first, last = byte_range.start, byte_range.end
    steps: list[ReadStep] = []
    for chunk in chunks:
        chunk_end = chunk.byte_offset + chunk.plain_size - 1
        if chunk_end < first or chunk.byte_offset > last:
            continue
        start = max(first, chunk.byte_offset) - chunk.byte_offset
        stop = min(last, chunk_end) - chunk.byte_offset + 1
        steps.append(ReadStep(chunk.seq, start, stop, chunk.plain_size))
    return steps


def _incomplete(payload_id: UUID, reason: str) -> StoredPayloadCorruptError:
    logger.error("payload %s cannot be restored: %s", payload_id, reason)
    return StoredPayloadCorruptError("the stored payload is incomplete or damaged and cannot be restored")


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
        stores: PayloadStores,
        *,
        store_kind: str,
        organization_id: UUID,
        payload_id: UUID,
        cipher: ChunkCipher,
        steps: Sequence[ReadStep],
    ) -> None:
        self._engine = engine
        self._stores = stores
        self._store_kind = store_kind
        self._organization_id = organization_id
        self._payload_id = payload_id
        self._cipher = cipher
        self._steps = steps
        self._fetched: asyncio.Queue[list[Blob] | None] = asyncio.Queue(maxsize=FETCH_QUEUE_DEPTH)
        self.pieces: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=READ_QUEUE_DEPTH)

    async def _fetch(self) -> None:
        """Queue every planned chunk's ciphertext, in batches, then None; follow the payload if it moves meanwhile."""
        seqs = [step.seq for step in self._steps]
        handed_over = 0

        async def handover(blobs: list[Blob]) -> None:
            nonlocal handed_over
            count = len(blobs)
            await self._fetched.put(blobs)
            handed_over += count

        store = self._stores.for_kind(self._store_kind)
        for moves in range(MOVES_FOLLOWED + 1):
            try:
                await store.read_batches(
                    self._engine,
                    organization_id=self._organization_id,
                    payload_id=self._payload_id,
                    seqs=seqs[handed_over:],
                    handover=handover,
                )
                break
            except StoredChunksMissingError:
                # Deleted (no store holds it), or switched by `zkeb storage migrate`, which frees the old copy.
                holder = await self._stores.holder_of(self._engine, self._organization_id, self._payload_id)
                if holder is None:
                    raise PayloadDeletedError("the backup was deleted while it was being restored") from None
                if holder is store or moves == MOVES_FOLLOWED:
                    raise
                logger.info(
                    "payload %s moved to %s while being restored; reading on from chunk %d there",
                    self._payload_id,
                    holder.kind,
                    seqs[handed_over] if handed_over < len(seqs) else len(seqs),
                )
                store = holder
        await self._fetched.put(None)

    async def _next_batch(self, fetcher: asyncio.Task[None]) -> list[Blob] | None:
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

    def _decrypt(self, step: ReadStep, blob: Blob) -> bytes:
        """The plaintext of one stored chunk, authenticated, of the size its row says.

        Raises:
            StoredPayloadCorruptError: the chunk was changed or damaged at rest, or its row's size is not its own.
        """
        with tracer.start_as_current_span("backups.decrypt", attributes={"zkeb.seq": step.seq}):
            try:
                plaintext = self._cipher.decrypt(step.seq, blob)
            except ChunkIntegrityError as exc:
                logger.error(  # noqa: TRY400 - the traceback adds nothing
                    "payload %s: stored chunk %d failed its integrity check: %s", self._payload_id, step.seq, exc
                )
                raise StoredPayloadCorruptError(
                    "the stored payload failed its integrity check and cannot be restored"
                ) from None
        if len(plaintext) != step.chunk_size:  # authentic, but its row was changed
            raise _incomplete(
                self._payload_id, f"chunk {step.seq} holds {len(plaintext)} bytes, its row {step.chunk_size}"
            )
        return plaintext

    async def run(self) -> None:
        """Decrypt fetched batches into `pieces`, ending with None, or with the exception that stopped it."""
        fetcher = asyncio.create_task(self._fetch(), name=f"zkeb-chunk-fetcher-{self._payload_id}")
        try:
            position = 0
            while (blobs := await self._next_batch(fetcher)) is not None:
                for index in range(len(blobs)):
                    step = self._steps[position]
                    plaintext = self._decrypt(step, blobs[index])
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
            # It holds what it raised, and the frames of that exception's traceback hold it: a cycle that only the
            # garbage collector frees, and with it the request (see chunk_writes' `_writer_failure`).
            del fetcher


async def stream_plaintext(
    engine: AsyncEngine,
    *,
    stores: PayloadStores,
    store_kind: str,
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
    `store_kind` is where the read was planned (`payloads.store`); `stores` find the payload if it moves meanwhile.
    """
    payload_reader = _PayloadReader(
        engine,
        stores,
        store_kind=store_kind,
        organization_id=organization_id,
        payload_id=payload_id,
        cipher=cipher,
        steps=steps,
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
                # The text, not the exception: a handler that keeps records (a test's capture, a buffer) would
                # keep the exception, its traceback and this request's frames with it.
                if isinstance(item, PayloadDeletedError):
                    logger.warning("restore of payload %s cut after %d bytes: %s", payload_id, sent, item.detail)
                elif database_connection_lost(item):  # a failover or restart, as for any other request
                    logger.warning(
                        "restore of payload %s cut after %d bytes: database connection lost (%s)",
                        payload_id,
                        sent,
                        type(item).__name__,
                    )
                else:
                    logger.error("restore of payload %s failed after %d bytes: %s", payload_id, sent, str(item))
                span.set_attribute("zkeb.outcome", "error")
                span.record_exception(item)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(item).__name__))
                try:
                    raise item
                finally:
                    del item  # this frame is in its traceback: the same cycle as the reader's `fetcher`
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
