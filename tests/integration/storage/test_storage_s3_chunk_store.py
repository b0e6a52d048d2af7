"""The S3 chunk store against moto's standalone S3 server: layout, conditional writes, reads, deletion, listing."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest

from zkeb.domain.backups.store.s3 import (
    ChunkConflictError,
    ChunkMissingError,
    PayloadStoreUnavailableError,
    S3ChunkStore,
    StoredObject,
)
from zkeb.lib.atrest import ChunkCipher, ChunkIntegrityError, new_data_key
from zkeb.settings import PayloadStoreSettings

from support import raw_s3_client


@pytest.fixture
async def store(s3_store_settings: PayloadStoreSettings) -> AsyncIterator[S3ChunkStore]:
    async with S3ChunkStore(s3_store_settings) as opened:
        yield opened


async def _get_raw(settings: PayloadStoreSettings, key: str) -> tuple[bytes, dict[str, str]]:
    async with raw_s3_client(settings) as client:
        response = await client.get_object(Bucket=settings.bucket, Key=key)
        async with response["Body"] as body:
            return await body.read(), dict(response["Metadata"])


async def _put_raw(settings: PayloadStoreSettings, key: str, body: bytes) -> None:
    async with raw_s3_client(settings) as client:
        await client.put_object(Bucket=settings.bucket, Key=key, Body=body)


async def test_chunks_round_trip_under_the_documented_keys(
    store: S3ChunkStore, s3_store_settings: PayloadStoreSettings
) -> None:
    organization_id, payload_id = uuid4(), uuid4()
    chunks = [(seq, os.urandom(100 + seq)) for seq in range(3)]
    await store.put_chunks(organization_id, payload_id, chunks)

    assert await store.get_chunks(organization_id, payload_id, [2, 0]) == [chunks[2][1], chunks[0][1]]
    assert await store.list_payload(organization_id, payload_id) == [
        StoredObject(organization_id, payload_id, seq, len(blob)) for seq, blob in chunks
    ]
    key = f"zkeb/payloads/{organization_id}/{payload_id}/00000001"
    assert store.key(organization_id, payload_id, 1) == key
    assert (await _get_raw(s3_store_settings, key))[0] == chunks[1][1]


async def test_a_chunk_is_never_overwritten(store: S3ChunkStore) -> None:
    organization_id, payload_id = uuid4(), uuid4()
    await store.put_chunk(organization_id, payload_id, 0, b"first")

    with pytest.raises(ChunkConflictError) as refused:
        await store.put_chunk(organization_id, payload_id, 0, b"second")

    assert refused.value.status_code == 503
    assert bytes(await store.get_chunk(organization_id, payload_id, 0)) == b"first"


async def test_a_missing_chunk_is_reported_as_missing(store: S3ChunkStore) -> None:
    with pytest.raises(ChunkMissingError, match="chunk 4 of the payload is missing"):
        await store.get_chunks(uuid4(), uuid4(), [4])


async def test_deleting_from_a_chunk_keeps_the_ones_before_and_other_payloads(store: S3ChunkStore) -> None:
    organization_id, payload_id, other = uuid4(), uuid4(), uuid4()
    await store.put_chunks(organization_id, payload_id, [(seq, b"x" * (seq + 1)) for seq in range(5)])
    await store.put_chunks(organization_id, other, [(0, b"other")])

    assert await store.delete_chunks_from(organization_id, payload_id, 3) == 2
    assert [obj.seq for obj in await store.list_payload(organization_id, payload_id)] == [0, 1, 2]
    assert await store.delete_payload(organization_id, payload_id) == 3
    assert await store.list_payload(organization_id, payload_id) == []
    assert [obj.payload_id async for obj in store.list_all()] == [other]


async def test_listing_skips_keys_that_are_not_chunks(
    store: S3ChunkStore, s3_store_settings: PayloadStoreSettings
) -> None:
    organization_id, payload_id = uuid4(), uuid4()
    await store.put_chunk(organization_id, payload_id, 0, b"chunk")
    for stray in ("zkeb/payloads/readme.txt", f"zkeb/payloads/{organization_id}/{payload_id}/notaseq1"):
        await _put_raw(s3_store_settings, stray, b"?")

    assert [obj.seq async for obj in store.list_all()] == [0]


async def test_a_bucket_that_does_not_exist_fails_the_check_in_one_line(
    s3_store_settings: PayloadStoreSettings,
) -> None:
    settings = PayloadStoreSettings(
        kind="s3", bucket="zkeb-no-such-bucket", endpoint_url=s3_store_settings.endpoint_url
    )
    async with S3ChunkStore(settings) as store:
        with pytest.raises(PayloadStoreUnavailableError) as failed:
            await store.check()
    assert failed.value.detail == "the S3 bucket 'zkeb-no-such-bucket' does not exist"


async def test_an_unreachable_store_is_unavailable_not_an_error(s3_store_settings: PayloadStoreSettings) -> None:
    with socket_closed_port() as port:
        settings = PayloadStoreSettings(kind="s3", bucket="zkeb-any", endpoint_url=f"http://127.0.0.1:{port}")
        async with S3ChunkStore(settings, connect_timeout=1.0, read_timeout=1.0) as store:
            with pytest.raises(PayloadStoreUnavailableError, match="cannot reach the S3 store"):
                await store.check()
            with pytest.raises(PayloadStoreUnavailableError, match="could not store a chunk") as failed:
                await store.put_chunk(uuid4(), uuid4(), 0, b"bytes")
            with pytest.raises(PayloadStoreUnavailableError, match="could not read a chunk") as failed_read:
                await store.get_chunk(uuid4(), uuid4(), 0)
    assert failed.value.status_code == failed_read.value.status_code == 503


async def test_a_store_that_stops_answering_mid_body_times_out_as_unavailable(
    s3_store_settings: PayloadStoreSettings,
) -> None:
    """A GET whose response stalls after its first bytes ends at the read timeout, as a 503."""
    stalled: list[asyncio.StreamWriter] = []

    async def answer_then_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nfirst bytes")
        await writer.drain()
        stalled.append(writer)  # held open, silent

    server = await asyncio.start_server(answer_then_stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = PayloadStoreSettings(kind="s3", bucket="zkeb-any", endpoint_url=f"http://127.0.0.1:{port}")
    try:
        async with S3ChunkStore(settings, connect_timeout=1.0, read_timeout=0.5) as store:
            started = time.monotonic()
            with pytest.raises(PayloadStoreUnavailableError, match="could not read a chunk") as failed:
                await store.get_chunk(uuid4(), uuid4(), 0)
            elapsed = time.monotonic() - started
    finally:
        for writer in stalled:
            writer.close()
        server.close()
    assert failed.value.status_code == 503
    # At the read timeout (obstore does not retry a response whose body had begun), not at the bound of a whole GET.
    assert stalled
    assert 0.5 <= elapsed < 5


@pytest.mark.usefixtures("s3_store_settings")  # for its credentials in the AWS variables
async def test_a_refused_read_is_logged_without_the_stores_answer(caplog: pytest.LogCaptureFixture) -> None:
    """A store's error XML can echo the request (here an access key id and the string signed): it is not logged."""
    answer = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SignatureDoesNotMatch</Code>'
        b"<AWSAccessKeyId>AKIAEXAMPLEKEYID0001</AWSAccessKeyId><StringToSign>AWS4-HMAC-SHA256 x</StringToSign></Error>"
    )

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = PayloadStoreSettings(kind="s3", bucket="zkeb-any", endpoint_url=f"http://127.0.0.1:{port}")
    try:
        async with S3ChunkStore(settings, connect_timeout=1.0, read_timeout=1.0) as store:
            with (
                caplog.at_level("WARNING", logger="zkeb.backups.s3"),
                pytest.raises(PayloadStoreUnavailableError) as failed,
            ):
                await store.get_chunk(uuid4(), uuid4(), 0)
    finally:
        server.close()
    assert failed.value.status_code == 503
    logged = caplog.text
    assert "cannot read a chunk" in logged
    assert "403" in logged
    assert "AKIAEXAMPLEKEYID0001" not in logged
    assert "StringToSign" not in logged
    assert "AKIAEXAMPLEKEYID0001" not in str(failed.value.detail)


async def test_objects_hold_only_ciphertext_and_a_tampered_one_fails_authentication(
    store: S3ChunkStore, s3_store_settings: PayloadStoreSettings
) -> None:
    organization_id, payload_id = uuid4(), uuid4()
    data_key = new_data_key()
    cipher = ChunkCipher(data_key, payload_id)
    plaintext = b"device ciphertext, recognisable " * 64
    await store.put_chunk(organization_id, payload_id, 0, cipher.encrypt(0, plaintext))

    key = store.key(organization_id, payload_id, 0)
    stored, metadata = await _get_raw(s3_store_settings, key)
    assert plaintext[:32] not in stored
    assert data_key not in stored
    assert metadata == {}
    assert cipher.decrypt(0, await store.get_chunk(organization_id, payload_id, 0)) == plaintext

    tampered = bytearray(stored)
    tampered[20] ^= 1
    await store.delete_payload(organization_id, payload_id)
    await store.put_chunk(organization_id, payload_id, 0, bytes(tampered))
    with pytest.raises(ChunkIntegrityError, match="chunk 0 failed authentication"):
        cipher.decrypt(0, await store.get_chunk(organization_id, payload_id, 0))


class socket_closed_port:  # noqa: N801 - used as a context manager
    """A loopback port nothing listens on, for as long as the block runs."""

    def __enter__(self) -> int:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        port: int = self._socket.getsockname()[1]
        return port

    def __exit__(self, *exc_info: object) -> None:
        self._socket.close()
