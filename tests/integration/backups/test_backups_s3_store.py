"""Backups with `PAYLOAD_STORE=s3` on moto's S3 server: where the bytes go, resumes, restores and store failures."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from backups_support import MIB, NOTHING_STORED, Tenant, auth, make_tenant, row_counts, sign_envelope, tus_headers
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.app import create_app
from zkeb.domain.backups.chunk_writes import hash_stored_chunks
from zkeb.domain.backups.context import build_keyring
from zkeb.domain.backups.services import upload_patch
from zkeb.domain.backups.store.s3 import S3PayloadStore
from zkeb.lib.atrest import CHUNK_OVERHEAD, unwrap_data_key
from zkeb.settings import PayloadStoreSettings, Settings

from support import S3_ONLY, maintenance_pass, make_settings, problem, raw_s3_client

Client = AsyncTestClient[Litestar]

#: For the tests that use the `settings` (or `client`) fixture: the app stores payloads in a new bucket.
CHUNK = S3PayloadStore.chunk_size


@pytest.fixture
async def tenant(client: Client, settings: Settings) -> Tenant:
    return await make_tenant(client, settings)


async def _objects(settings: PayloadStoreSettings) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    async with raw_s3_client(settings) as client:
        listed = await client.list_objects_v2(Bucket=settings.bucket)
        for item in listed.get("Contents", []):
            response = await client.get_object(Bucket=settings.bucket, Key=item["Key"])
            async with response["Body"] as body:
                found[item["Key"]] = await body.read()
    return found


async def _tus_create(client: Client, tenant: Tenant, payload: bytes) -> tuple[str, bytes]:
    envelope = sign_envelope(tenant, payload)
    created = await client.post(
        "/api/v1/uploads",
        headers=tus_headers(
            tenant.project_key, **{"Upload-Length": str(len(payload)), "Upload-Metadata": envelope.tus_metadata()}
        ),
    )
    assert created.status_code == 201, created.text
    return created.headers["location"], payload


async def _patch(client: Client, tenant: Tenant, location: str, offset: int, body: bytes) -> Any:
    return await client.patch(
        location,
        content=body,
        headers=tus_headers(
            tenant.project_key, **{"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
        ),
    )


@S3_ONLY
async def test_a_backup_lives_in_the_bucket_as_ciphertext_only_and_restores_byte_for_byte(
    client: Client,
    tenant: Tenant,
    settings: Settings,
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
) -> None:
    payload = b"recognisable device ciphertext! " * (2 * CHUNK // 32)  # 2 chunks
    response = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, payload).json(), headers=auth(tenant.project_key)
    )
    assert response.status_code == 201, response.text
    backup = response.json()

    row = await owner_connection.fetchrow(
        "SELECT p.id, p.store, p.key_id, p.wrapped_key, p.chunk_count FROM payloads p"
        " JOIN backups b ON b.payload_id = p.id WHERE b.id = $1",
        uuid.UUID(backup["id"]),
    )
    assert (row["store"], row["chunk_count"]) == ("s3", 2)
    assert await owner_connection.fetchval("SELECT sum(octet_length(data)) FROM backup_chunks") == 0
    objects = await _objects(s3_store_settings)
    prefix = f"zkeb/payloads/{tenant.organization_id}/{row['id']}/"
    assert sorted(objects) == [f"{prefix}00000000", f"{prefix}00000001"]
    data_key = unwrap_data_key(build_keyring(settings).get(row["key_id"]), row["wrapped_key"], payload_id=row["id"])
    for blob in objects.values():
        assert b"recognisable device ciphertext!" not in blob
        assert data_key not in blob
        assert row["wrapped_key"] not in blob

    restored = await client.get(f"/api/v1/backups/{backup['id']}/payload", headers=auth(tenant.project_key))
    assert restored.status_code == 200
    assert restored.content == payload


@S3_ONLY
async def test_range_and_if_range_restores_read_only_what_they_need(client: Client, tenant: Tenant) -> None:
    payload = os.urandom(2 * CHUNK + 5)
    response = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, payload).json(), headers=auth(tenant.project_key)
    )
    backup_id = response.json()["id"]
    url = f"/api/v1/backups/{backup_id}/payload"
    whole = await client.get(url, headers=auth(tenant.project_key))
    etag = whole.headers["etag"]
    assert whole.content == payload

    first, last = CHUNK - 10, 2 * CHUNK + 2  # the end of chunk 0, all of chunk 1, the start of chunk 2
    ranged = await client.get(url, headers={**auth(tenant.project_key), "Range": f"bytes={first}-{last}"})
    assert ranged.status_code == 206
    assert ranged.content == payload[first : last + 1]
    assert ranged.headers["content-range"] == f"bytes {first}-{last}/{len(payload)}"

    suffix = await client.get(url, headers={**auth(tenant.project_key), "Range": "bytes=-5", "If-Range": etag})
    assert (suffix.status_code, suffix.content) == (206, payload[-5:])
    stale = await client.get(url, headers={**auth(tenant.project_key), "Range": "bytes=-5", "If-Range": '"other"'})
    assert (stale.status_code, stale.content) == (200, payload)


@S3_ONLY
async def test_a_tus_upload_resumes_over_objects_and_a_chunk_left_by_a_dead_patch_is_cleared(
    client: Client, tenant: Tenant, s3_store_settings: PayloadStoreSettings, owner_connection: asyncpg.Connection
) -> None:
    payload = os.urandom(3 * CHUNK + 100)
    location, _ = await _tus_create(client, tenant, payload)
    split = CHUNK + CHUNK // 2  # mid-chunk: the first PATCH flushes a short second chunk
    first = await _patch(client, tenant, location, 0, payload[:split])
    assert (first.status_code, first.headers["upload-offset"]) == (204, str(split))
    payload_id = await owner_connection.fetchval("SELECT payload_id FROM upload_sessions")
    # A PATCH that died after storing its next chunk but before recording it leaves an object without a row.
    stray_key = f"zkeb/payloads/{tenant.organization_id}/{payload_id}/00000002"
    async with raw_s3_client(s3_store_settings) as bucket:
        await bucket.put_object(Bucket=s3_store_settings.bucket, Key=stray_key, Body=b"left by a dead PATCH")

    second = await _patch(client, tenant, location, split, payload[split:])
    assert second.status_code == 204, second.text
    backup_id = second.headers["zkeb-backup-id"]

    objects = await _objects(s3_store_settings)
    assert objects[stray_key] != b"left by a dead PATCH"
    chunk_count = await owner_connection.fetchval("SELECT chunk_count FROM payloads WHERE id = $1", payload_id)
    assert len(objects) == chunk_count == 4  # a chunk and a half from each PATCH (the second's last + 100 bytes)
    restored = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
    assert hashlib.sha256(restored.content).digest() == hashlib.sha256(payload).digest()


@S3_ONLY
async def test_a_tampered_object_fails_the_restore_clearly_and_never_returns_its_bytes(
    client: Client, tenant: Tenant, s3_store_settings: PayloadStoreSettings
) -> None:
    payload = os.urandom(2 * MIB)
    response = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, payload).json(), headers=auth(tenant.project_key)
    )
    backup_id = response.json()["id"]
    objects = await _objects(s3_store_settings)
    first_key = min(objects)
    tampered = bytearray(objects[first_key])
    tampered[40] ^= 0xFF
    async with raw_s3_client(s3_store_settings) as bucket:
        await bucket.put_object(Bucket=s3_store_settings.bucket, Key=first_key, Body=bytes(tampered))

    restored = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))

    assert restored.status_code == 500
    body = problem(restored)
    assert body["detail"] == "the stored payload failed its integrity check and cannot be restored"
    assert payload[:64] not in restored.content


async def test_a_missing_bucket_makes_the_server_not_ready_and_says_why(
    base_settings_env: dict[str, str], database_url: str, s3_store_settings: PayloadStoreSettings
) -> None:
    assert s3_store_settings.endpoint_url is not None
    settings = make_settings(
        base_settings_env,
        DATABASE_URL=database_url,
        PAYLOAD_STORE="s3",
        S3_BUCKET="zkeb-no-such-bucket",
        S3_ENDPOINT_URL=s3_store_settings.endpoint_url,
    )
    async with AsyncTestClient(app=create_app(settings)) as client:
        ready = await client.get("/api/health/ready")
    assert ready.status_code == 503
    assert ready.json()["reasons"] == ["payload store: the S3 bucket 'zkeb-no-such-bucket' does not exist"]


@S3_ONLY
async def test_the_ready_server_reports_its_payload_store(client: Client) -> None:
    ready = await client.get("/api/health/ready")
    assert ready.status_code == 200
    assert ready.json()["payload_store"] == "s3"


#: What MinIO answers a write once its drives are past their free-space threshold.
_MINIO_STORAGE_FULL = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>XMinioStorageFull</Code><Message>Storage backend has '
    b"reached its minimum free drive threshold. Please delete a few objects to proceed.</Message></Error>"
)


class _StoreProxy:
    """A TCP proxy in front of the S3 server that can be broken: then it answers every request with a 503 (the
    store failing), closes connections at once (the store unreachable), or answers writes as a full MinIO does
    (507 `XMinioStorageFull`) while reads go through.

    It runs its own event loop in a thread: the test client runs the app in another thread and blocks the test's
    loop while a request is in flight.
    """

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self.mode = "forward"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s3-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> str:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop)
        self._server = started.result(timeout=10)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        server = self._server
        if server is not None:

            async def close() -> None:
                server.close()
                await server.wait_closed()

            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.mode == "unreachable":
                return
            if self.mode == "failing":
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            head = b""
            if self.mode == "full":
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"PUT "):
                    writer.write(
                        b"HTTP/1.1 507 Insufficient Storage\r\nContent-Type: application/xml\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                        % (len(_MINIO_STORAGE_FULL), _MINIO_STORAGE_FULL)
                    )
                    await writer.drain()
                    return
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            up_writer.write(head)

            async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await source.read(65536):
                        sink.write(data)
                        await sink.drain()
                with contextlib.suppress(Exception):
                    sink.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


@contextlib.asynccontextmanager
async def _app_behind_a_proxy(
    base_settings_env: dict[str, str], database_url: str, s3_store_settings: PayloadStoreSettings
) -> AsyncIterator[tuple[Client, Tenant, _StoreProxy]]:
    """The app storing payloads through a breakable `_StoreProxy` in front of the S3 server, and a tenant of it."""
    assert s3_store_settings.endpoint_url is not None
    proxy = _StoreProxy(s3_store_settings.endpoint_url)
    settings = make_settings(
        base_settings_env,
        DATABASE_URL=database_url,
        PAYLOAD_STORE="s3",
        S3_BUCKET=s3_store_settings.bucket,
        S3_PREFIX=s3_store_settings.prefix,
        S3_ENDPOINT_URL=proxy.start(),
    )
    try:
        async with AsyncTestClient(app=create_app(settings)) as client:
            yield client, await make_tenant(client, settings), proxy
    finally:
        proxy.stop()


@pytest.mark.parametrize(
    ("mode", "status", "detail"),
    [
        ("failing", 503, "the object store is unavailable"),
        ("unreachable", 503, "the object store is unavailable"),
        # A full MinIO refuses writes with 507 XMinioStorageFull and still serves reads: a 507 as from a full
        # PostgreSQL, retried in a minute.
        ("full", 507, "the object store is full"),
    ],
)
async def test_a_store_that_fails_mid_upload_is_refused_nothing_is_visible_and_a_retry_completes(
    base_settings_env: dict[str, str],
    database_url: str,
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
    mode: str,
    status: int,
    detail: str,
) -> None:
    async with _app_behind_a_proxy(base_settings_env, database_url, s3_store_settings) as (client, tenant, proxy):
        payload = os.urandom(2 * CHUNK + 100)
        location, _ = await _tus_create(client, tenant, payload)
        first = await _patch(client, tenant, location, 0, payload[:CHUNK])
        assert first.status_code == 204

        proxy.mode = mode
        failed = await _patch(client, tenant, location, CHUNK, payload[CHUNK:])
        assert failed.status_code == status, failed.text
        assert problem(failed)["detail"].startswith(detail)
        assert "retry-after" in failed.headers
        assert await owner_connection.fetchval("SELECT count(*) FROM backups") == 0
        head = await client.head(location, headers=tus_headers(tenant.project_key))
        assert head.headers["upload-offset"] == str(CHUNK)

        single = sign_envelope(tenant, os.urandom(CHUNK + 1))
        refused = await client.post("/api/v1/backups", json=single.json(), headers=auth(tenant.project_key))
        assert refused.status_code == status, refused.text
        assert await owner_connection.fetchval("SELECT count(*) FROM backups") == 0

        proxy.mode = "forward"
        retried = await _patch(client, tenant, location, CHUNK, payload[CHUNK:])
        assert retried.status_code == 204, retried.text
        again = await client.post("/api/v1/backups", json=single.json(), headers=auth(tenant.project_key))
        assert again.status_code == 201, again.text
        restored = await client.get(
            f"/api/v1/backups/{retried.headers['zkeb-backup-id']}/payload", headers=auth(tenant.project_key)
        )
        assert restored.content == payload


@pytest.mark.parametrize("mode", ["failing", "unreachable"])
async def test_a_store_that_fails_during_a_restore_answers_503_and_a_retry_restores(
    base_settings_env: dict[str, str], database_url: str, s3_store_settings: PayloadStoreSettings, mode: str
) -> None:
    async with _app_behind_a_proxy(base_settings_env, database_url, s3_store_settings) as (client, tenant, proxy):
        payload = os.urandom(2 * CHUNK + 100)
        created = await client.post(
            "/api/v1/backups", json=sign_envelope(tenant, payload).json(), headers=auth(tenant.project_key)
        )
        assert created.status_code == 201, created.text
        url = f"/api/v1/backups/{created.json()['id']}/payload"

        proxy.mode = mode
        for headers in (auth(tenant.project_key), {**auth(tenant.project_key), "Range": f"bytes={CHUNK}-"}):
            failed = await client.get(url, headers=headers)
            assert failed.status_code == 503, failed.text
            assert problem(failed)["detail"].startswith("the object store is unavailable")
            assert failed.headers["retry-after"] == "5"

        proxy.mode = "forward"
        restored = await client.get(url, headers=auth(tenant.project_key))
        assert restored.status_code == 200
        assert restored.content == payload


@S3_ONLY
async def test_a_refused_single_shot_upload_leaves_no_object_and_no_row(
    client: Client, tenant: Tenant, s3_store_settings: PayloadStoreSettings, owner_connection: asyncpg.Connection
) -> None:
    envelope = sign_envelope(tenant, os.urandom(2 * MIB + 3))
    forged = envelope.json() | {"signature": envelope.json()["signature"][:-4] + "AAA="}
    before = await row_counts(owner_connection)

    refused = await client.post("/api/v1/backups", json=forged, headers=auth(tenant.project_key))

    assert refused.status_code == 422
    assert await row_counts(owner_connection) == before
    assert before["payloads"] == NOTHING_STORED["payloads"]
    assert await _objects(s3_store_settings) == {}


@S3_ONLY
async def test_purged_and_terminated_payloads_lose_their_objects_at_the_nextmaintenance_pass(
    client: Client,
    tenant: Tenant,
    settings: Settings,
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
) -> None:
    kept_payload = os.urandom(2 * CHUNK)
    kept = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, kept_payload).json(), headers=auth(tenant.project_key)
    )
    purged = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, os.urandom(CHUNK + 1)).json(), headers=auth(tenant.project_key)
    )
    location, payload = await _tus_create(client, tenant, os.urandom(3 * CHUNK))
    assert (await _patch(client, tenant, location, 0, payload[:CHUNK])).status_code == 204
    assert len(await _objects(s3_store_settings)) == 5

    deleted = await client.delete(
        f"/api/v1/backups/{purged.json()['id']}", params={"purge": "true"}, headers=auth(tenant.admin_key)
    )
    assert deleted.status_code == 204, deleted.text
    terminated = await client.delete(location, headers=tus_headers(tenant.project_key))
    assert terminated.status_code == 204
    # Recorded in the deleting transactions; the bytes are still there until the pass.
    assert await owner_connection.fetchval("SELECT count(*) FROM payload_object_deletions") == 2
    assert len(await _objects(s3_store_settings)) == 5

    report = await maintenance_pass(settings)

    assert (report.objects_deleted, report.failed) == (3, [])
    assert await owner_connection.fetchval("SELECT count(*) FROM payload_object_deletions") == 0
    kept_payload_id = await owner_connection.fetchval(
        "SELECT payload_id FROM backups WHERE id = $1", uuid.UUID(kept.json()["id"])
    )
    assert {key.rsplit("/", 2)[1] for key in await _objects(s3_store_settings)} == {str(kept_payload_id)}
    restored = await client.get(f"/api/v1/backups/{kept.json()['id']}/payload", headers=auth(tenant.project_key))
    assert restored.content == kept_payload


@S3_ONLY
async def test_objects_of_a_deleted_payload_stay_recorded_while_the_store_fails(
    client: Client,
    tenant: Tenant,
    settings: Settings,
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
) -> None:
    created = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, os.urandom(100)).json(), headers=auth(tenant.project_key)
    )
    purge = await client.delete(
        f"/api/v1/backups/{created.json()['id']}", params={"purge": "true"}, headers=auth(tenant.admin_key)
    )
    assert purge.status_code == 204
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:  # bound, not listening: refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        unreachable = replace(settings, payload_store=replace(settings.payload_store, endpoint_url=endpoint))
        report = await maintenance_pass(unreachable)
    assert report.failed == ["objects"]
    assert await owner_connection.fetchval("SELECT count(*) FROM payload_object_deletions") == 1
    assert len(await _objects(s3_store_settings)) == 1

    assert (await maintenance_pass(settings)).objects_deleted == 1
    assert await _objects(s3_store_settings) == {}


def _zkeb(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zkeb", *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _cli_env(base_settings_env: dict[str, str], database_url: str, payload_store_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZKEB_", "DATABASE_", "REDIS_", "S3_", "PAYLOAD_"))}
    return {**env, **base_settings_env, "DATABASE_URL": database_url, **payload_store_env}


@S3_ONLY
async def test_storage_status_reports_where_payloads_live_and_theraw_s3_client(
    client: Client,
    tenant: Tenant,
    base_settings_env: dict[str, str],
    database_url: str,
    payload_store_env: dict[str, str],
) -> None:
    response = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, os.urandom(2 * CHUNK)).json(), headers=auth(tenant.project_key)
    )
    assert response.status_code == 201
    env = _cli_env(base_settings_env, database_url, payload_store_env)

    result = await asyncio.to_thread(_zkeb, env, "storage", "status", "--json")

    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["payload_store"] == "s3"
    assert status["stores"] == {"s3": {"payloads": 1, "bytes": 2 * CHUNK, "chunks": 2}}
    assert status["pending_object_deletions"] == 0
    assert status["bucket"]["objects"] == 2
    assert status["bucket"]["bytes"] == 2 * CHUNK + 2 * CHUNK_OVERHEAD


@S3_ONLY
async def test_serve_and_storage_status_refuse_a_missing_bucket_in_one_line(
    base_settings_env: dict[str, str], database_url: str, payload_store_env: dict[str, str]
) -> None:
    env = _cli_env(base_settings_env, database_url, {**payload_store_env, "S3_BUCKET": "zkeb-no-such-bucket"})

    served = await asyncio.to_thread(_zkeb, env, "serve", "--port", "1")
    status = await asyncio.to_thread(_zkeb, env, "storage", "status")

    for result in (served, status):
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == (
            "Error: payload store: the S3 bucket 'zkeb-no-such-bucket' does not exist"
        )
    assert "ZKEB listening" not in served.stderr


@S3_ONLY
async def test_a_resuming_patch_whose_stored_chunk_object_is_gone_answers_503_and_keeps_the_offset(
    client: Client,
    tenant: Tenant,
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The S3 twin of the tus test whose chunk row is lost: here the row stays and its object goes, just before the
    # resumed PATCH re-reads the stored prefix to hash it. The PATCH fails with a 503 and gives the upload back.
    payload = os.urandom(CHUNK + 5)
    location, _ = await _tus_create(client, tenant, payload)
    assert (await _patch(client, tenant, location, 0, payload[: CHUNK // 2])).status_code == 204

    async def hash_after_the_object_is_gone(connection: asyncpg.Connection, **kwargs: Any) -> None:
        key = f"zkeb/payloads/{kwargs['organization_id']}/{kwargs['payload_id']}/00000000"
        async with raw_s3_client(s3_store_settings) as bucket:
            await bucket.delete_object(Bucket=s3_store_settings.bucket, Key=key)
        await hash_stored_chunks(connection, **kwargs)

    monkeypatch.setattr(upload_patch, "hash_stored_chunks", hash_after_the_object_is_gone)
    response = await _patch(client, tenant, location, CHUNK // 2, payload[CHUNK // 2 :])

    assert response.status_code == 503, response.text
    assert "a stored chunk of this upload is missing" in problem(response)["detail"]
    head = await client.head(location, headers=tus_headers(tenant.project_key))
    assert head.headers["upload-offset"] == str(CHUNK // 2)
    assert await owner_connection.fetchval("SELECT count(*) FROM backups") == 0
    assert await owner_connection.fetchval("SELECT count(*) FROM upload_sessions WHERE lease_id IS NULL") == 1
