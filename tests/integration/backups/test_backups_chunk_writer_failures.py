"""A chunk writer that fails leaves no reference cycle behind: what the request's frames hold is freed at once.

granian closes a connection whose request body went unread (a tus PATCH refused mid-body: 409 taken over, 404
terminated) only once the request's objects are freed. An exception kept by a frame of its own traceback (through a
task that raised it) is freed only by the cyclic garbage collector, which on an idle server may not run for
minutes: the client got its 409 and then waited for the end of the connection (a live-server test hung on it). These
run with the collector off, so whatever a cycle keeps stays kept and the test fails.
"""

from __future__ import annotations

import asyncio
import gc
import os
import uuid
import weakref
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.errors import ConflictError
from zkeb.domain.backups.chunk_writes import ChunkPipeline
from zkeb.domain.backups.store.payloads import PostgresPayloadStore
from zkeb.lib.atrest import ChunkCipher

from support import StandInRequest, collector_off

CHUNK = PostgresPayloadStore.chunk_size


async def _taken_over(connection: asyncpg.Connection, next_seq: int, next_offset: int) -> None:
    raise ConflictError("a later PATCH took the upload over")


async def _one_chunk_then_silence(pipeline: ChunkPipeline) -> None:
    """A client that sends a chunk's worth and then goes silent."""
    await pipeline.write(bytes(CHUNK))
    await asyncio.Event().wait()


async def _chunks_faster_than_stored(pipeline: ChunkPipeline) -> None:
    """A client faster than the store: the writer fails while this waits for room in the queue."""
    for _ in range(8):
        await pipeline.write(bytes(CHUNK))


async def _one_chunk(pipeline: ChunkPipeline) -> None:
    """A whole body of one chunk."""
    await pipeline.write(bytes(CHUNK))


async def _fed_then_closed(pipeline: ChunkPipeline, receive: Callable[[ChunkPipeline], Awaitable[None]]) -> None:
    await pipeline.feed(receive(pipeline))
    await pipeline.close()


@pytest.mark.parametrize(
    "handle_body",
    [
        # The writer fails while the receiver (a task of its own) waits for the client: `feed` raises it.
        pytest.param(lambda p: _fed_then_closed(p, _one_chunk_then_silence), id="feed-receiver-waiting"),
        # ... or while the receiver waits for room in the queue: `feed` raises it too, before the receiver can.
        pytest.param(lambda p: _fed_then_closed(p, _chunks_faster_than_stored), id="feed-receiver-queueing"),
        # Written from the handler's own task, which waits for room in the queue: `_put` raises it.
        pytest.param(_chunks_faster_than_stored, id="put"),
        # The body ended; the writer fails on its last chunk: `close` raises it.
        pytest.param(lambda p: _fed_then_closed(p, _one_chunk), id="close"),
    ],
)
async def test_a_refused_write_frees_the_request_without_the_garbage_collector(
    engine: AsyncEngine, handle_body: Callable[[ChunkPipeline], Awaitable[None]]
) -> None:
    payload_id = uuid.uuid4()

    async def handle(request: StandInRequest) -> None:  # its frame, like a handler's, holds the request
        pipeline = ChunkPipeline(
            engine,
            store=PostgresPayloadStore(),
            organization_id=uuid.uuid4(),
            payload_id=payload_id,
            cipher=ChunkCipher(os.urandom(32), payload_id),
            in_transaction=_taken_over,
        )
        async with pipeline:
            await handle_body(pipeline)

    request = StandInRequest()
    freed = weakref.ref(request)
    refused = False
    with collector_off():
        try:
            await handle(request)
        except ConflictError:
            refused = True
        del request
        for _ in range(3):  # what the loop still has to run for the request's tasks (their last wake-ups)
            await asyncio.sleep(0)
        assert refused
        assert freed() is None, f"kept by {[type(r).__name__ for r in gc.get_referrers(freed())]}"
