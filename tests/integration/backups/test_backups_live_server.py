"""Streaming behaviour against a real granian server: tus clients (tuspy, aiotus), broken connections, resumption."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiotus
import asyncpg
import httpx
import pytest
from backups_support import (
    MIB,
    NOTHING_STORED,
    Tenant,
    auth,
    make_tenant,
    row_counts,
    sign_envelope,
    tus_headers,
)
from tusclient import client as tus_client

from zkeb.domain.backups.store.s3 import S3PayloadStore
from zkeb.settings import PayloadStoreSettings

from support import S3_ONLY, Envelope, granian_server, make_settings, raw_s3_client

OCTETS = "application/offset+octet-stream"


@pytest.fixture
def live_url(base_settings_env: dict[str, str], database_url: str) -> Iterator[str]:
    with granian_server({**base_settings_env, "DATABASE_URL": database_url}) as url:
        yield url


@pytest.fixture
async def http(live_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live_url, timeout=60) as client:
        yield client


@pytest.fixture
async def tenant(http: httpx.AsyncClient, base_settings_env: dict[str, str], database_url: str) -> Tenant:
    return await make_tenant(http, make_settings(base_settings_env, DATABASE_URL=database_url))


async def _create_upload(http: httpx.AsyncClient, tenant: Tenant, envelope: Envelope) -> httpx.Response:
    """A tus upload created for `envelope` (nothing sent yet)."""
    created = await http.post(
        "/api/v1/uploads",
        headers=tus_headers(
            tenant.project_key,
            **{"Upload-Length": str(len(envelope.payload)), "Upload-Metadata": envelope.tus_metadata()},
        ),
    )
    assert created.status_code == 201, created.text
    return created


async def _restore(http: httpx.AsyncClient, tenant: Tenant, container: str) -> bytes:
    latest = await http.get(f"/api/v1/containers/{container}/backups/latest", headers=auth(tenant.project_key))
    assert latest.status_code == 200, latest.text
    response = await http.get(f"/api/v1/backups/{latest.json()['id']}/payload", headers=auth(tenant.project_key))
    assert response.status_code == 200
    return response.content


async def test_tuspy_uploads_in_several_patches_with_checksums(
    http: httpx.AsyncClient, live_url: str, tenant: Tenant
) -> None:
    payload = os.urandom(3 * MIB + 5)
    envelope = sign_envelope(tenant, payload)
    client = tus_client.TusClient(f"{live_url}/api/v1/uploads", headers=auth(tenant.project_key))
    uploader = client.uploader(
        file_stream=io.BytesIO(payload),
        chunk_size=MIB + 123,
        metadata={k: v.decode("latin-1") for k, v in envelope.tus_metadata_values().items()},
        metadata_encoding="latin-1",
        upload_checksum=True,
    )
    await asyncio.to_thread(uploader.upload)
    assert uploader.offset == len(payload)
    assert await _restore(http, tenant, str(envelope.container_id)) == payload


async def test_aiotus_uploads(http: httpx.AsyncClient, live_url: str, tenant: Tenant) -> None:
    payload = os.urandom(2 * MIB + 77)
    envelope = sign_envelope(tenant, payload)
    location = await aiotus.upload(
        f"{live_url}/api/v1/uploads",
        io.BytesIO(payload),
        metadata=dict(envelope.tus_metadata_values()),
        headers=auth(tenant.project_key),
        chunksize=MIB,
    )
    assert location is not None
    assert await _restore(http, tenant, str(envelope.container_id)) == payload


def _send_partial(live_url: str, request_head: str, body: bytes) -> None:
    """Send a request head and part of its body on a raw socket, then drop the connection."""
    host, port = live_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(request_head.encode() + body)
        time.sleep(0.5)  # let the server read what was sent before the connection drops (not an assertion)


async def _wait_for_offset(http: httpx.AsyncClient, location: str, key: str, at_least: int = 1) -> int:
    for _ in range(300):
        head = await http.head(location, headers=tus_headers(key))
        offset = int(head.headers["upload-offset"])
        if offset >= at_least:
            return offset
        await asyncio.sleep(0.1)
    raise AssertionError("the server never recorded the bytes of the dropped PATCH")


async def test_patch_cut_by_the_network_keeps_received_bytes_and_resumes(
    http: httpx.AsyncClient, live_url: str, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    payload = os.urandom(5 * MIB + 11)
    envelope = sign_envelope(tenant, payload)
    created = await _create_upload(http, tenant, envelope)
    location = created.headers["location"]
    sent = 2 * MIB + 500_000
    await asyncio.to_thread(
        _send_partial,
        live_url,
        f"PATCH {location} HTTP/1.1\r\nHost: test\r\nTus-Resumable: 1.0.0\r\n"
        f"Authorization: Bearer {tenant.project_key}\r\nContent-Type: {OCTETS}\r\nUpload-Offset: 0\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n",
        payload[:sent],
    )
    offset = await _wait_for_offset(http, location, tenant.project_key)
    assert 0 < offset <= sent
    assert (await row_counts(owner_connection))["backups"] == 0
    for _ in range(100):
        offset = int((await http.head(location, headers=tus_headers(tenant.project_key))).headers["upload-offset"])
        resumed = await http.patch(
            location,
            content=payload[offset:],
            headers=tus_headers(tenant.project_key, **{"Upload-Offset": str(offset), "Content-Type": OCTETS}),
        )
        if resumed.status_code != 409:  # the dropped PATCH recorded its last bytes meanwhile: resume from there
            break
    assert resumed.status_code == 204, resumed.text
    backup_id = resumed.headers["zkeb-backup-id"]
    restored = await http.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
    assert hashlib.sha256(restored.content).digest() == hashlib.sha256(payload).digest()


async def test_a_patch_refused_before_its_body_is_read_does_not_break_the_clients_next_request(
    live_url: str, tenant: Tenant
) -> None:
    # One pooled connection, as a device's HTTP client keeps. Granian resets a connection whose request body the
    # app answered without reading, so a client that sends its next request over it before noticing sees
    # "connection reset" (a race: httpx checks the socket before reusing it, so here only the header shows the fix,
    # and the next requests show it costs nothing). `Connection: close` tells every client not to reuse it.
    payload = os.urandom(2 * MIB)
    async with httpx.AsyncClient(base_url=live_url, timeout=60, limits=httpx.Limits(max_connections=1)) as http:
        location = (await _create_upload(http, tenant, sign_envelope(tenant, payload))).headers["location"]
        headers = tus_headers(tenant.project_key, **{"Content-Type": OCTETS})
        wrong_offset = await http.patch(location, content=payload, headers={**headers, "Upload-Offset": "5"})
        assert wrong_offset.status_code == 409, wrong_offset.text
        assert wrong_offset.headers["connection"] == "close"
        head = await http.head(location, headers=tus_headers(tenant.project_key))
        assert head.status_code == 200
        assert head.headers["upload-offset"] == "0"
        done = await http.patch(location, content=payload, headers={**headers, "Upload-Offset": "0"})
        assert done.status_code == 204, done.text
        assert "connection" not in done.headers  # a body read to its end keeps the connection


async def test_a_client_still_sending_a_body_refused_from_its_headers_reads_the_answer(
    live_url: str, tenant: Tenant
) -> None:
    # A PATCH of a few MiB refused before its body is read (a wrong offset, a bad credential; a 429 the same way):
    # granian reset the connection while the client was still sending, and httpx's async client reported ReadError,
    # never the answer, so a device could not learn its offset, that its token had expired, or a 429's Retry-After
    # (a review over a lossy network: a tight rate limit livelocked an upload). The rest of the body is read and
    # dropped first now.
    payload = os.urandom(16 * MIB)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), MIB):
            yield payload[start : start + MIB]

    async with httpx.AsyncClient(base_url=live_url, timeout=60) as http:
        location = (await _create_upload(http, tenant, sign_envelope(tenant, payload))).headers["location"]
        headers = tus_headers(tenant.project_key, **{"Content-Type": OCTETS, "Upload-Offset": "5"})
        wrong_offset = await http.patch(location, content=pieces(), headers=headers)
        assert wrong_offset.status_code == 409, wrong_offset.text
        assert wrong_offset.headers["upload-offset"] == "0"
        assert wrong_offset.headers["connection"] == "close"
        bad_key = await http.patch(location, content=payload, headers={**headers, "Authorization": "Bearer zkeb_nope"})
        assert bad_key.status_code == 401, bad_key.text
        done = await http.patch(location, content=pieces(), headers={**headers, "Upload-Offset": "0"})
        assert done.status_code == 204, done.text


async def test_head_of_a_payload_reports_its_size_through_granian(http: httpx.AsyncClient, tenant: Tenant) -> None:
    payload = os.urandom(MIB + 3)
    created = await http.post(
        "/api/v1/backups", json=sign_envelope(tenant, payload).json(), headers=auth(tenant.project_key)
    )
    assert created.status_code == 201, created.text
    response = await http.head(f"/api/v1/backups/{created.json()['id']}/payload", headers=auth(tenant.project_key))
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(payload))
    assert response.content == b""


async def test_single_shot_cut_by_the_network_leaves_nothing(
    http: httpx.AsyncClient, live_url: str, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    envelope = sign_envelope(tenant, os.urandom(4 * MIB))
    body = envelope.msgpack()
    await asyncio.to_thread(
        _send_partial,
        live_url,
        f"POST /api/v1/backups HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {tenant.project_key}\r\n"
        f"Content-Type: application/msgpack\r\nContent-Length: {len(body)}\r\n\r\n",
        body[: len(body) // 2],
    )
    listed = await http.get("/api/v1/backups", headers=auth(tenant.project_key))
    assert listed.json()["items"] == []
    assert await row_counts(owner_connection) == NOTHING_STORED
    complete = await http.post(
        "/api/v1/backups",
        content=body,
        headers={**auth(tenant.project_key), "Content-Type": "application/msgpack"},
    )
    assert complete.status_code == 201
    assert (await row_counts(owner_connection))["backups"] == 1


async def test_chunked_single_shot_over_16_mib_is_413_and_nothing_is_stored(
    http: httpx.AsyncClient, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(17):
            yield b"\0" * MIB

    response = await http.post(
        "/api/v1/backups",
        content=body(),
        headers={**auth(tenant.project_key), "Content-Type": "application/msgpack"},
    )
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_streamed_tus_patch_from_a_generator(
    http: httpx.AsyncClient, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    payload = os.urandom(7 * MIB + 3)
    envelope: Envelope = sign_envelope(tenant, payload)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 300_000):
            yield payload[start : start + 300_000]

    created = await _create_upload(http, tenant, envelope)
    digest = base64.b64encode(hashlib.sha256(payload).digest()).decode()
    patched = await http.patch(
        created.headers["location"],
        content=pieces(),
        headers=tus_headers(
            tenant.project_key,
            **{"Upload-Offset": "0", "Content-Type": OCTETS, "Upload-Checksum": f"sha256 {digest}"},
        ),
    )
    assert patched.status_code == 204, patched.text
    chunks: list[Any] = await owner_connection.fetch("SELECT plain_size FROM backup_chunks ORDER BY seq")
    assert [c["plain_size"] for c in chunks] == [MIB] * 7 + [3]
    restored = await http.get(
        f"/api/v1/backups/{patched.headers['zkeb-backup-id']}/payload", headers=auth(tenant.project_key)
    )
    assert restored.content == payload


@contextlib.asynccontextmanager
async def _pool_of_two(
    base_settings_env: dict[str, str], database_url: str
) -> AsyncIterator[tuple[str, httpx.AsyncClient, Tenant]]:
    """A server whose pool has two connections, a client for it and a tenant: stalled transfers must hold none."""
    with granian_server({**base_settings_env, "DATABASE_URL": database_url, "DB_POOL_SIZE": "2"}) as live_url:
        async with httpx.AsyncClient(base_url=live_url, timeout=60) as http:
            yield live_url, http, await make_tenant(http, make_settings(base_settings_env, DATABASE_URL=database_url))


async def _wait_until_no_transaction_is_open(owner: asyncpg.Connection, while_what: str) -> None:
    """Five quiet `pg_stat_activity` samples in a row, within 30 s."""
    quiet = 0
    deadline = time.monotonic() + 30
    while quiet < 5:
        assert time.monotonic() < deadline, f"a transaction stayed open while {while_what}"
        open_transactions = await owner.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND usename = 'zkeb_app'"
            " AND state LIKE 'idle in transaction%'"
        )
        quiet = quiet + 1 if open_transactions == 0 else 0
        await asyncio.sleep(0.1)


async def _start_download(
    live_url: str, backup_id: str, credential: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw-socket restore of `backup_id` that has read the response head and its first MiB, then stops reading."""
    host, port = live_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /api/v1/backups/{backup_id}/payload HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {credential}\r\nConnection: close\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def test_stalled_downloads_hold_no_transaction_nor_pooled_connection_and_then_complete(
    base_settings_env: dict[str, str], database_url: str, owner_connection: asyncpg.Connection
) -> None:
    # A pool of two, and two clients that stop reading their restores: while they stall, the API must still get a
    # connection (with both held it would wait 5 s and answer 503), and no transaction may stay open.
    async with _pool_of_two(base_settings_env, database_url) as (live_url, http, tenant):
        # Far more than the socket buffers and the server's read-ahead, so the server must wait for the clients.
        payload = os.urandom(48 * MIB + 7)
        envelope = sign_envelope(tenant, payload)
        created = await _create_upload(http, tenant, envelope)
        patched = await http.patch(
            created.headers["location"],
            content=payload,
            headers=tus_headers(tenant.project_key, **{"Upload-Offset": "0", "Content-Type": OCTETS}),
        )
        assert patched.status_code == 204, patched.text
        backup_id = patched.headers["zkeb-backup-id"]
        downloads = [await _start_download(live_url, backup_id, tenant.project_key) for _ in range(2)]
        try:
            received = [bytearray(await reader.readexactly(MIB)) for reader, _ in downloads]
            await _wait_until_no_transaction_is_open(owner_connection, "the downloads were stalled")
            metadata = await http.get(f"/api/v1/backups/{backup_id}", headers=auth(tenant.project_key))
            assert metadata.status_code == 200, metadata.text
            for (reader, _), buffer in zip(downloads, received, strict=True):
                while piece := await reader.read(4 * MIB):
                    buffer.extend(piece)
        finally:
            for _, writer in downloads:
                writer.close()
    for buffer in received:
        assert len(buffer) == len(payload)
        assert hashlib.sha256(buffer).digest() == hashlib.sha256(payload).digest()


async def _open_patch(
    live_url: str, location: str, credential: str, *, offset: int, length: int, first: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw-socket PATCH that announces `length` body bytes, sends `first` of them and then goes silent."""
    host, port = live_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"PATCH {httpx.URL(location).path} HTTP/1.1\r\nHost: {host}\r\nTus-Resumable: 1.0.0\r\n"
        f"Authorization: Bearer {credential}\r\nContent-Type: {OCTETS}\r\nUpload-Offset: {offset}\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n".encode()
        + first
    )
    await writer.drain()
    return reader, writer


#: Longest a raw-socket test waits for the server's answer and its end of the connection: a server that never
#: answers fails the test with this said, instead of holding its worker until pytest-timeout's 300 s.
RESPONSE_WAIT_SECONDS = 60


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
    """Status, head and body of the response on a raw-socket request made with `Connection: close`."""
    head = ""
    try:
        async with asyncio.timeout(RESPONSE_WAIT_SECONDS):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            body = await reader.read()
    except TimeoutError:
        missing = f"the end of the connection after {head.splitlines()[0]!r}" if head else "response"
        raise AssertionError(f"no {missing} within {RESPONSE_WAIT_SECONDS} s") from None
    return int(head.split(" ", 2)[1]), head.lower(), body


async def test_slow_patches_hold_no_pooled_connection_between_chunks_and_then_complete(
    base_settings_env: dict[str, str], database_url: str, owner_connection: asyncpg.Connection
) -> None:
    # Three devices uploading slowly on a pool of two. Between chunks they must hold no connection: the API still
    # gets one (a PATCH that kept its connection for its whole body left none, and requests waited 5 s for a 503),
    # and no transaction stays open.
    async with _pool_of_two(base_settings_env, database_url) as (live_url, http, tenant):
        payloads = [os.urandom(3 * MIB + extra) for extra in (1, 2, 3)]
        envelopes = [sign_envelope(tenant, payload) for payload in payloads]
        locations = [(await _create_upload(http, tenant, e)).headers["location"] for e in envelopes]
        sent = MIB + MIB // 2
        patches = [
            await _open_patch(
                live_url, location, tenant.project_key, offset=0, length=len(payload), first=payload[:sent]
            )
            for location, payload in zip(locations, payloads, strict=True)
        ]
        try:
            for location in locations:  # each stored its first chunk and recorded it, short of its end
                assert await _wait_for_offset(http, location, tenant.project_key) == MIB
            await _wait_until_no_transaction_is_open(owner_connection, "the uploads were stalled")
            listed = await http.get("/api/v1/backups", headers=auth(tenant.project_key))
            assert listed.status_code == 200, listed.text
            for (_, writer), payload in zip(patches, payloads, strict=True):
                writer.write(payload[sent:])
                await writer.drain()
            responses = [await _read_response(reader) for reader, _ in patches]
        finally:
            for _, writer in patches:
                writer.close()
        for (status, head, body), envelope, payload in zip(responses, envelopes, payloads, strict=True):
            assert status == 204, body
            assert "zkeb-backup-id:" in head
            assert await _restore(http, tenant, str(envelope.container_id)) == payload


async def test_a_retry_takes_over_from_a_patch_gone_silent_which_then_stores_nothing(
    http: httpx.AsyncClient, live_url: str, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    # A device's connection dies unseen (half-open) mid-PATCH; its retry must not wait for the server to notice.
    payload = os.urandom(5 * MIB + 9)
    envelope = sign_envelope(tenant, payload)
    location = (await _create_upload(http, tenant, envelope)).headers["location"]
    sent = 2 * MIB + 300_000
    reader, writer = await _open_patch(
        live_url, location, tenant.project_key, offset=0, length=len(payload), first=payload[:sent]
    )
    try:
        offset = await _wait_for_offset(http, location, tenant.project_key, at_least=2 * MIB)
        assert offset == 2 * MIB  # the stored chunks count; the 300 000 bytes past them are the retry's to resend
        resumed = await http.patch(
            location,
            content=payload[offset : 4 * MIB],
            headers=tus_headers(tenant.project_key, **{"Upload-Offset": str(offset), "Content-Type": OCTETS}),
        )
        assert resumed.status_code == 204, resumed.text
        # The silent PATCH wakes up: its next chunk finds the upload taken over by the retry, so it stops.
        writer.write(payload[sent : 3 * MIB + 1000])
        async with asyncio.timeout(RESPONSE_WAIT_SECONDS):
            await writer.drain()
        status, _, body = await _read_response(reader)
    finally:
        writer.close()
    assert status == 409, body
    assert b"a later PATCH took it over" in body
    resumed = await http.patch(
        location,
        content=payload[4 * MIB :],
        headers=tus_headers(tenant.project_key, **{"Upload-Offset": str(4 * MIB), "Content-Type": OCTETS}),
    )
    assert resumed.status_code == 204, resumed.text
    chunks = await owner_connection.fetch("SELECT seq, byte_offset, plain_size FROM backup_chunks ORDER BY seq")
    assert [(c["seq"], c["byte_offset"]) for c in chunks] == [(seq, seq * MIB) for seq in range(6)]
    backup_id = resumed.headers["zkeb-backup-id"]
    restored = await http.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
    assert restored.content == payload


@pytest.fixture
async def s3_live(
    base_settings_env: dict[str, str], database_url: str, payload_store_env: dict[str, str]
) -> AsyncIterator[tuple[str, httpx.AsyncClient, Tenant]]:
    """A granian server storing payloads in the bucket `payload_store_env` names, a client of it and a tenant."""
    env = {**base_settings_env, "DATABASE_URL": database_url, **payload_store_env}
    with granian_server(env) as live_url:
        async with httpx.AsyncClient(base_url=live_url, timeout=60) as http:
            yield live_url, http, await make_tenant(http, make_settings(env))


async def _wait_for_a_claim(owner: asyncpg.Connection) -> None:
    for _ in range(500):
        if await owner.fetchval("SELECT lease_id FROM upload_sessions") is not None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the PATCH never claimed the upload")


async def _objects_in(settings: PayloadStoreSettings) -> int:
    async with raw_s3_client(settings) as bucket:
        listed = await bucket.list_objects_v2(Bucket=settings.bucket)
    return len(listed.get("Contents", []))


@S3_ONLY
async def test_a_retry_stores_its_chunk_over_an_object_its_predecessor_put_after_the_takeover(
    s3_live: tuple[str, httpx.AsyncClient, Tenant],
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
) -> None:
    # A device retries while its first PATCH is still storing a chunk object: the retry claims the upload and clears
    # the objects past the offset, then the first PATCH's PUT lands (it loses its lease only at its rows). The
    # retry's own conditional PUT of that chunk then found the key taken and answered 503, every time the race was
    # lost (5 of 6 rounds of three concurrent PATCHes). Here the late object is put between the retry's claim and
    # its first chunk; the retry must replace it, since it still holds the upload.
    live_url, http, tenant = s3_live
    payload = os.urandom(S3PayloadStore.chunk_size + 1000)
    location = (await _create_upload(http, tenant, sign_envelope(tenant, payload))).headers["location"]
    payload_id = await owner_connection.fetchval("SELECT payload_id FROM upload_sessions")
    sent = MIB  # less than a chunk: nothing is stored until the rest comes
    reader, writer = await _open_patch(
        live_url, location, tenant.project_key, offset=0, length=len(payload), first=payload[:sent]
    )
    try:
        await _wait_for_a_claim(owner_connection)
        late_key = f"{s3_store_settings.prefix}payloads/{tenant.organization_id}/{payload_id}/00000000"
        async with raw_s3_client(s3_store_settings) as bucket:
            await bucket.put_object(Bucket=s3_store_settings.bucket, Key=late_key, Body=b"a late PUT")
        writer.write(payload[sent:])
        async with asyncio.timeout(RESPONSE_WAIT_SECONDS):
            await writer.drain()
        status, head, body = await _read_response(reader)
    finally:
        writer.close()
    assert status == 204, body
    backup_id = head.split("zkeb-backup-id:", 1)[1].split("\r\n", 1)[0].strip()
    restored = await http.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
    assert restored.status_code == 200, restored.text
    assert restored.content == payload
    assert await _objects_in(s3_store_settings) == 2  # the chunk that replaced the late object, and the last one


@S3_ONLY
async def test_a_patch_whose_chunk_key_its_retry_took_learns_it_lost_the_upload_and_deletes_nothing(
    s3_live: tuple[str, httpx.AsyncClient, Tenant],
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
) -> None:
    # The other side of the race: the first PATCH's PUT finds the key taken by its retry's. It must neither delete
    # the retry's object (the backup is committed on it) nor answer 503, which asks for a retry that cannot help.
    live_url, http, tenant = s3_live
    payload = os.urandom(S3PayloadStore.chunk_size + 1000)
    location = (await _create_upload(http, tenant, sign_envelope(tenant, payload))).headers["location"]
    sent = MIB
    reader, writer = await _open_patch(
        live_url, location, tenant.project_key, offset=0, length=len(payload), first=payload[:sent]
    )
    try:
        await _wait_for_a_claim(owner_connection)
        retried = await http.patch(
            location,
            content=payload,
            headers=tus_headers(tenant.project_key, **{"Upload-Offset": "0", "Content-Type": OCTETS}),
        )
        assert retried.status_code == 204, retried.text
        writer.write(payload[sent:])
        async with asyncio.timeout(RESPONSE_WAIT_SECONDS):
            await writer.drain()
        status, _, body = await _read_response(reader)
    finally:
        writer.close()
    assert status == 404, body  # the upload ended: its retry completed it
    assert b"already stored" not in body
    backup_id = retried.headers["zkeb-backup-id"]
    restored = await http.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
    assert restored.status_code == 200, restored.text
    assert restored.content == payload
    assert await _objects_in(s3_store_settings) == 2


async def test_termination_stops_a_patch_gone_silent_and_deletes_everything(
    http: httpx.AsyncClient, live_url: str, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    payload = os.urandom(3 * MIB)
    location = (await _create_upload(http, tenant, sign_envelope(tenant, payload))).headers["location"]
    reader, writer = await _open_patch(
        live_url, location, tenant.project_key, offset=0, length=len(payload), first=payload[: MIB + 10]
    )
    try:
        await _wait_for_offset(http, location, tenant.project_key)
        terminated = await http.delete(location, headers=tus_headers(tenant.project_key))
        assert terminated.status_code == 204, terminated.text
        writer.write(payload[MIB + 10 : 2 * MIB + 10])
        await writer.drain()
        status, _, body = await _read_response(reader)
    finally:
        writer.close()
    assert status == 404, body
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_a_chunked_body_past_upload_length_is_413_and_undoes_what_it_recorded(
    http: httpx.AsyncClient, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    payload = os.urandom(3 * MIB)
    location = (await _create_upload(http, tenant, sign_envelope(tenant, payload))).headers["location"]
    before = await row_counts(owner_connection)

    async def too_long() -> AsyncIterator[bytes]:  # no Content-Length: the excess shows only at the end
        body = payload + b"x"
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    response = await http.patch(
        location,
        content=too_long(),
        headers=tus_headers(tenant.project_key, **{"Upload-Offset": "0", "Content-Type": OCTETS}),
    )
    assert response.status_code == 413, response.text
    head = await http.head(location, headers=tus_headers(tenant.project_key))
    assert head.headers["upload-offset"] == "0"
    assert await row_counts(owner_connection) == before
    assert await owner_connection.fetchval("SELECT chunk_count FROM payloads") == 0


@pytest.mark.parametrize(
    ("path", "credential"),
    [
        pytest.param("/api/v1/auth/token", None, id="token"),
        pytest.param("/api/v1/projects", "admin", id="projects"),
        pytest.param("/api/v1/backups", "project", id="single-shot"),
    ],
)
async def test_a_malformed_chunked_body_is_a_400_and_changes_nothing(
    live_url: str, tenant: Tenant, owner_connection: asyncpg.Connection, path: str, credential: str | None
) -> None:
    # granian reports a body whose chunked encoding breaks as a disconnect; Litestar made that a 500.
    key = {"admin": tenant.admin_key, "project": tenant.project_key, None: None}[credential]
    authorization = f"Authorization: Bearer {key}\r\n" if key else ""
    before = await row_counts(owner_connection)
    host, port = live_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{authorization}"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".encode()
        )
        await writer.drain()
        status, head, body = await asyncio.wait_for(_read_response(reader), 30)
    finally:
        writer.close()
    assert status == 400, body
    assert "content-type: application/problem+json" in head
    assert b"the request body ended before its end" in body
    assert await row_counts(owner_connection) == before
    assert await owner_connection.fetchval("SELECT count(*) FROM projects") == 1


async def test_a_restore_whose_backup_is_purged_while_it_plans_answers_404(
    http: httpx.AsyncClient, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    # A race review found 500s claiming the payload was damaged: the plan read the backup, then its chunk map, in two
    # statements, and a purge committed between them left a backup with no chunks. The plan is one statement now.
    # Here the chunk table is locked while the restore plans, and the backup purged before the lock is let go.
    envelope = sign_envelope(tenant, os.urandom(2 * MIB + 1))
    created = await http.post("/api/v1/backups", json=envelope.json(), headers=auth(tenant.project_key))
    assert created.status_code == 201, created.text
    backup_id = created.json()["id"]
    payload_id = await owner_connection.fetchval("SELECT payload_id FROM backups WHERE id = $1::uuid", backup_id)
    waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'backup_chunks'::regclass"
    async with owner_connection.transaction():
        await owner_connection.execute("LOCK TABLE backup_chunks IN ACCESS EXCLUSIVE MODE")
        restore = asyncio.ensure_future(
            http.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
        )
        for _ in range(500):
            if await owner_connection.fetchval(waiting):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the restore never waited for the chunk table")
        await owner_connection.execute("DELETE FROM backups WHERE id = $1::uuid", backup_id)
        await owner_connection.execute("DELETE FROM backup_chunks WHERE payload_id = $1", payload_id)
    response = await restore
    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/problem+json"


@contextlib.asynccontextmanager
async def _logged_server(
    base_settings_env: dict[str, str], database_url: str, log_path: Path
) -> AsyncIterator[tuple[str, httpx.AsyncClient, Tenant]]:
    """A granian server writing its INFO log (access lines included) to `log_path`, a client and a tenant of it.

    Read the log once the block has ended: the server has stopped, so everything it wrote is in the file.
    """
    env = {**base_settings_env, "DATABASE_URL": database_url, "LOG_LEVEL": "INFO"}
    with granian_server(env, log_path=log_path) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            yield url, http, await make_tenant(http, make_settings(base_settings_env, DATABASE_URL=database_url))


async def _restore_purging_after_the_first_piece(
    http: httpx.AsyncClient, tenant: Tenant, backup_id: str, received: list[bytes]
) -> None:
    """Stream a backup's payload into `received`, purging the backup once the first MiB has arrived."""
    async with http.stream("GET", f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key)) as response:
        assert response.status_code == 200
        async for piece in response.aiter_raw(MIB):
            if not received:
                purged = await http.delete(
                    f"/api/v1/backups/{backup_id}", params={"purge": "true"}, headers=auth(tenant.admin_key)
                )
                assert purged.status_code == 204, purged.text
            received.append(piece)


async def test_a_restore_whose_backup_is_purged_mid_stream_is_cut_short_with_one_warning_and_no_traceback(
    base_settings_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    # granian logged a traceback at ERROR for every restore cut by a purge (the stream raised after its headers were
    # sent), and so did ours: a deletion the organization asked for is not a server error.
    log_path = tmp_path / "server.log"
    async with _logged_server(base_settings_env, database_url, log_path) as (_, http, tenant):
        envelope = sign_envelope(tenant, os.urandom(40 * MIB))
        created = await _create_upload(http, tenant, envelope)
        completed = await http.patch(
            created.headers["location"],
            content=envelope.payload,
            headers=tus_headers(tenant.project_key, **{"Upload-Offset": "0", "Content-Type": OCTETS}),
        )
        assert completed.status_code == 204, completed.text
        backup_id = completed.headers["zkeb-backup-id"]
        received: list[bytes] = []
        with pytest.raises(httpx.RemoteProtocolError, match=r"incomplete|without sending complete"):
            await _restore_purging_after_the_first_piece(http, tenant, backup_id, received)
        health = await http.get("/api/health/live")
        assert health.status_code == 200
    log = log_path.read_text()

    assert 0 < len(b"".join(received)) < len(envelope.payload), "the restore was not cut mid-stream"
    assert b"".join(received) == envelope.payload[: len(b"".join(received))]
    assert "Traceback" not in log, log[-3000:]
    assert "[ERROR]" not in log, log[-3000:]
    assert '"level":"error"' not in log, log[-3000:]
    assert "deleted while it was being restored" in log, log[-3000:]
    access = [line for line in log.splitlines() if '"logger":"zkeb.access"' in line and "/payload" in line]
    assert len(access) == 1, access
    assert '"failed":"PayloadDeletedError"' in access[0]
    assert '"incomplete":true' in access[0]


async def test_the_access_log_tells_requests_a_client_abandoned_from_complete_ones(
    base_settings_env: dict[str, str], database_url: str, tmp_path: Path
) -> None:
    # An operator's review: a PATCH whose client was cut off at 15 MB logged `204`, and a download the client gave
    # up logged `200` with the bytes handed to granian, both as if complete.
    log_path = tmp_path / "server.log"
    async with _logged_server(base_settings_env, database_url, log_path) as (url, http, tenant):
        envelope = sign_envelope(tenant, os.urandom(24 * MIB))
        location = (await _create_upload(http, tenant, envelope)).headers["location"]
        await asyncio.to_thread(
            _send_partial,
            url,
            f"PATCH {location} HTTP/1.1\r\nHost: test\r\nTus-Resumable: 1.0.0\r\n"
            f"Authorization: Bearer {tenant.project_key}\r\nContent-Type: {OCTETS}\r\nUpload-Offset: 0\r\n"
            f"Content-Length: {len(envelope.payload)}\r\n\r\n",
            envelope.payload[: 2 * MIB],
        )
        offset = await _wait_for_offset(http, location, tenant.project_key)
        completed = await http.patch(
            location,
            content=envelope.payload[offset:],
            headers=tus_headers(tenant.project_key, **{"Upload-Offset": str(offset), "Content-Type": OCTETS}),
        )
        assert completed.status_code == 204, completed.text
        payload_url = f"/api/v1/backups/{completed.headers['zkeb-backup-id']}/payload"
        whole = await http.get(payload_url, headers=auth(tenant.project_key))
        assert whole.content == envelope.payload
        async with http.stream("GET", payload_url, headers=auth(tenant.project_key)) as response:
            async for _ in response.aiter_raw(MIB):
                break  # the client gives up after its first MiB
        await asyncio.sleep(1.0)  # the server notices when it next sends
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if '"logger":"zkeb.access"' in line]
    patches = [line for line in lines if line["method"] == "PATCH"]
    downloads = [line for line in lines if line["route"] == "/api/v1/backups/{backup_id}/payload"]

    assert [(line.get("disconnected"), line.get("incomplete")) for line in patches] == [(True, None), (None, None)]
    assert [(line.get("incomplete"), line.get("failed")) for line in downloads] == [(None, None), (True, None)]


async def test_identical_creations_at_the_same_time_make_one_upload(
    http: httpx.AsyncClient, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    # A creation retried while the first is still running (its answer slow, not lost) made a second upload that
    # reserved its length of the quota again (a race review: 8 at once made 3). The project row is held here until
    # all of them wait on it, which made each one its own upload before the fix.
    envelope = sign_envelope(tenant, os.urandom(1000))
    headers = tus_headers(
        tenant.project_key,
        **{"Upload-Length": str(len(envelope.payload)), "Upload-Metadata": envelope.tus_metadata()},
    )
    waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'projects'::regclass"
    async with owner_connection.transaction():
        await owner_connection.execute("SELECT 1 FROM projects WHERE id = $1 FOR UPDATE", tenant.project_id)
        creations = [asyncio.ensure_future(http.post("/api/v1/uploads", headers=headers)) for _ in range(4)]
        for _ in range(500):
            if await owner_connection.fetchval(waiting) >= 2:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the creations never waited for the project row")
    created = await asyncio.gather(*creations)
    assert [r.status_code for r in created] == [201] * 4, [r.text for r in created]
    assert len({r.headers["location"] for r in created}) == 1
    sessions = await owner_connection.fetch(
        "SELECT upload_length FROM upload_sessions WHERE project_id = $1", tenant.project_id
    )
    assert [r["upload_length"] for r in sessions] == [len(envelope.payload)]


async def test_a_key_revoked_while_its_patch_streams_commits_nothing(
    http: httpx.AsyncClient, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    # A race review: an API key revoked while its PATCH was still sending committed the backup 0.2-0.4 s after the
    # revocation answered 204 (a device revoked meanwhile was refused). Now the commit checks the key too: 401, no
    # backup, and the upload waits for a credential that may finish it.
    payload = os.urandom(3 * MIB + 5)
    envelope = sign_envelope(tenant, payload)
    created = await _create_upload(http, tenant, envelope)
    admin = auth(tenant.admin_key)
    keys = (await http.get(f"/api/v1/projects/{tenant.project_id}/api-keys", headers=admin)).json()["items"]
    half_sent = asyncio.Event()
    revoked = asyncio.Event()

    async def pieces() -> AsyncIterator[bytes]:
        yield payload[: 2 * MIB]
        half_sent.set()
        await revoked.wait()
        yield payload[2 * MIB :]

    async def revoke() -> None:
        await half_sent.wait()
        await asyncio.sleep(0.2)  # the first half is at the server
        for key in keys:
            assert (await http.delete(f"/api/v1/api-keys/{key['id']}", headers=admin)).status_code == 204
        revoked.set()

    headers = tus_headers(tenant.project_key, **{"Upload-Offset": "0", "Content-Type": OCTETS})
    patched, _ = await asyncio.gather(
        http.patch(created.headers["location"], content=pieces(), headers=headers), revoke()
    )
    assert patched.status_code == 401, patched.text
    assert patched.headers["www-authenticate"] == 'Bearer realm="zkeb", error="invalid_token"'
    assert await owner_connection.fetchval("SELECT count(*) FROM backups") == 0
    assert await owner_connection.fetchval("SELECT count(*) FROM upload_sessions") == 1


async def test_a_problems_title_is_the_phrase_of_its_status_line(http: httpx.AsyncClient, tenant: Tenant) -> None:
    # docs/protocol.md §7: `title` is the status's phrase. An API-integrator review found "Request Entity Too Large"
    # under a `413 Payload Too Large` line and "Requested Range Not Satisfiable" under `416 Range Not Satisfiable`.
    envelope = sign_envelope(tenant, b"x" * 10)
    created = await http.post("/api/v1/backups", json=envelope.json(), headers=auth(tenant.project_key))
    url = f"/api/v1/backups/{created.json()['id']}/payload"
    answers = [
        await http.get(url, headers={**auth(tenant.project_key), "Range": "bytes=10-"}),
        await http.post(
            "/api/v1/uploads",
            headers=tus_headers(
                tenant.project_key, **{"Upload-Length": str(10**15), "Upload-Metadata": envelope.tus_metadata()}
            ),
        ),
        await http.get(f"/api/v1/backups/{uuid.uuid4()}", headers=auth(tenant.project_key)),
        await http.get("/api/v1/backups", headers=auth("zkeb_not-a-key")),
    ]
    assert [r.status_code for r in answers] == [416, 413, 404, 401]
    for response in answers:
        assert response.json()["title"] == response.reason_phrase, response.status_code


async def test_head_on_a_get_route_through_granian_is_its_headers_without_a_body(
    http: httpx.AsyncClient, tenant: Tenant
) -> None:
    for path, headers in (("/api/health/live", {}), ("/api/v1/backups", auth(tenant.project_key))):
        get, head = await http.get(path, headers=headers), await http.head(path, headers=headers)
        assert (get.status_code, head.status_code) == (200, 200), path
        assert head.content == b""
        assert head.headers["content-length"] == str(len(get.content))
    # The connection is still good after a HEAD whose Content-Length announced a body it did not carry.
    assert (await http.get("/api/health/live")).status_code == 200
