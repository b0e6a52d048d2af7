"""A restore that fails leaves no reference cycle behind: what the request's frames hold is freed at once.

The same rule as for the chunk writer (`test_backups_chunk_writer_failures`): an exception kept by a frame of its own
traceback, through the task that raised it or a local, is freed only by the cyclic garbage collector, and with it
every frame of the request. A restore is a GET with no body left unread, so nothing waits on it, but a failed
restore's frames (its request, buffers, connection handles) would stay in memory until the collector runs. These run
with the collector off, so whatever a cycle keeps stays kept and the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import uuid
import weakref

import asyncpg
import pytest
from backups_support import make_tenant, sign_envelope, tus_headers
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.domain.backups.chunk_reads import ChunkSpan, StoredPayloadCorruptError, plan_read, stream_plaintext
from zkeb.domain.backups.store.payloads import PayloadStores, StoredChunksMissingError
from zkeb.domain.backups.store.s3 import S3ChunkStore, S3PayloadStore
from zkeb.lib.atrest import ChunkCipher
from zkeb.settings import Settings

from support import StandInRequest, collector_off


async def _stored_payload(
    client: AsyncTestClient[Litestar], settings: Settings, owner: asyncpg.Connection
) -> tuple[uuid.UUID, uuid.UUID, list[ChunkSpan]]:
    """(organization id, payload id, chunk spans) of a committed 9 MiB backup (chunks in either store), by tus."""
    tenant = await make_tenant(client, settings)
    payload = os.urandom(9 * 1024 * 1024)
    created = await client.post(
        "/api/v1/uploads",
        headers=tus_headers(
            tenant.project_key,
            **{"Upload-Length": str(len(payload)), "Upload-Metadata": sign_envelope(tenant, payload).tus_metadata()},
        ),
    )
    assert created.status_code == 201, created.text
    patched = await client.patch(
        created.headers["location"],
        content=payload,
        headers=tus_headers(
            tenant.project_key, **{"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        ),
    )
    assert patched.status_code == 204, patched.text
    payload_id = await owner.fetchval(
        "SELECT payload_id FROM backups WHERE id = $1", uuid.UUID(patched.headers["zkeb-backup-id"])
    )
    spans = [
        ChunkSpan(r["seq"], r["byte_offset"], r["plain_size"])
        for r in await owner.fetch(
            "SELECT seq, byte_offset, plain_size FROM backup_chunks WHERE payload_id = $1 ORDER BY seq", payload_id
        )
    ]
    assert len(spans) > 1
    return tenant.organization_id, payload_id, spans


@pytest.mark.parametrize("failure", ["fetcher", "decrypter"])
async def test_a_failed_restore_frees_the_request_without_the_garbage_collector(
    client: AsyncTestClient[Litestar],
    settings: Settings,
    owner_connection: asyncpg.Connection,
    engine: AsyncEngine,
    failure: str,
) -> None:
    if failure == "fetcher":
        # The payload is gone (purged): the fetcher finds no chunk and raises, the decrypter hands it on.
        organization_id, payload_id = uuid.uuid4(), uuid.uuid4()
        spans = [ChunkSpan(0, 0, 1024), ChunkSpan(1, 1024, 1024)]
        expected: type[Exception] = StoredChunksMissingError
    else:
        # The chunks are there but do not open with this key: the decrypter raises.
        organization_id, payload_id, spans = await _stored_payload(client, settings, owner_connection)
        expected = StoredPayloadCorruptError
    cipher = ChunkCipher(os.urandom(32), payload_id)
    kind = settings.payload_store.kind
    objects = S3ChunkStore(settings.payload_store) if kind == "s3" else None
    stores = PayloadStores(kind, s3=S3PayloadStore(objects) if objects is not None else None)

    async def handle(request: StandInRequest) -> None:  # its frame, like a handler's, holds the request
        pieces = stream_plaintext(
            engine,
            stores=stores,
            store_kind=kind,
            organization_id=organization_id,
            payload_id=payload_id,
            cipher=cipher,
            steps=plan_read(spans, None, payload_id=payload_id, payload_size=sum(span.plain_size for span in spans)),
        )
        async for _ in pieces:
            pass

    request = StandInRequest()
    freed = weakref.ref(request)
    failed = False
    async with objects if objects is not None else contextlib.nullcontext():
        with collector_off():
            try:
                await handle(request)
            except expected:
                failed = True
            del request
            for _ in range(3):  # what the loop still has to run for the reader's tasks (their last wake-ups)
                await asyncio.sleep(0)
            assert failed
            assert freed() is None, f"kept by {[type(r).__name__ for r in gc.get_referrers(freed())]}"
