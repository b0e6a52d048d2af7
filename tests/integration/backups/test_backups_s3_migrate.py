"""`zkeb storage migrate` on moto's S3 server: payloads move to the bucket and back with every restore byte-identical,
a killed or half-done run resumes and ends consistent, and restores keep working across the switch."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
from backups_support import MIB, Tenant, auth, make_tenant, sign_envelope, tus_headers
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.app import create_app
from zkeb.core.database import create_app_engine
from zkeb.domain.backups.chunk_reads import ChunkSpan, plan_read, stream_plaintext
from zkeb.domain.backups.context import build_keyring
from zkeb.domain.backups.crypto import PayloadCrypto, PayloadKey
from zkeb.domain.backups.jobs.storage_migration import PayloadMover
from zkeb.domain.backups.store.moves import MigrationRunningError, migration_lock
from zkeb.domain.backups.store.payloads import PayloadStores, StoreKind
from zkeb.domain.backups.store.s3 import S3ChunkStore, S3PayloadStore
from zkeb.settings import PayloadStoreSettings, Settings

from support import S3_ONLY, granian_server, make_settings, raw_s3_client

Client = AsyncTestClient[Litestar]

#: The `client` fixture's app stores new payloads in a new bucket and reads payloads of both stores.


@dataclass
class Populated:
    """Backups (id -> bytes) written to PostgreSQL, and one tus upload still open."""

    tenants: list[Tenant]
    backups: dict[str, tuple[Tenant, bytes]]
    open_upload: str


@pytest.fixture
def postgres_settings(base_settings_env: dict[str, str], database_url: str) -> Settings:
    return make_settings(base_settings_env, DATABASE_URL=database_url)


@pytest.fixture
async def postgres_client(postgres_settings: Settings) -> AsyncIterator[Client]:
    """An app on the same database that writes new payloads to PostgreSQL."""
    async with AsyncTestClient(app=create_app(postgres_settings)) as opened:
        yield opened


@pytest.fixture
async def mover(settings: Settings, s3_store_settings: PayloadStoreSettings) -> AsyncIterator[PayloadMover]:
    engine = create_app_engine(settings, settings.database_url or "")
    async with S3ChunkStore(s3_store_settings) as objects:
        yield PayloadMover(engine, objects, PayloadCrypto(build_keyring(settings)))
    await engine.dispose()


async def _single_shot(client: Client, tenant: Tenant, payload: bytes) -> str:
    response = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, payload).json(), headers=auth(tenant.project_key)
    )
    assert response.status_code == 201, response.text
    backup_id: str = response.json()["id"]
    return backup_id


async def _tus(client: Client, tenant: Tenant, payload: bytes, *, cuts: list[int]) -> str:
    """A tus upload sent in PATCHes ending at `cuts` (mid-chunk ones leave short chunks); the backup id, or the
    upload's location when the cuts stop before the end."""
    created = await client.post(
        "/api/v1/uploads",
        headers=tus_headers(
            tenant.project_key,
            **{"Upload-Length": str(len(payload)), "Upload-Metadata": sign_envelope(tenant, payload).tus_metadata()},
        ),
    )
    assert created.status_code == 201, created.text
    location: str = created.headers["location"]
    offset = 0
    for cut in cuts:
        patched = await client.patch(
            location,
            content=payload[offset:cut],
            headers=tus_headers(
                tenant.project_key,
                **{"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"},
            ),
        )
        assert patched.status_code == 204, patched.text
        offset = cut
    return str(patched.headers.get("zkeb-backup-id") or location)


async def _populate(client: Client, postgres_client: Client, settings: Settings) -> Populated:
    tenants = [await make_tenant(client, settings, "first"), await make_tenant(client, settings, "second")]
    backups: dict[str, tuple[Tenant, bytes]] = {}
    for tenant, payload in (
        (tenants[0], os.urandom(100)),
        (tenants[0], os.urandom(MIB)),
        (tenants[1], os.urandom(2 * MIB + MIB // 2)),
    ):
        backups[await _single_shot(postgres_client, tenant, payload)] = (tenant, payload)
    payload = os.urandom(3 * MIB + 100)  # 1 MiB, 0.5 MiB (the first PATCH's short chunk), 1 MiB, 0.5 MiB + 100
    backups[await _tus(postgres_client, tenants[1], payload, cuts=[MIB + MIB // 2, len(payload)])] = (
        tenants[1],
        payload,
    )
    open_upload = await _tus(postgres_client, tenants[0], os.urandom(2 * MIB), cuts=[MIB])
    return Populated(tenants, backups, open_upload)


async def _assert_restores(client: Client, populated: Populated) -> None:
    for backup_id, (tenant, payload) in populated.backups.items():
        restored = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
        assert restored.status_code == 200, restored.text
        assert restored.content == payload


async def _stores(owner: asyncpg.Connection) -> dict[str, int]:
    rows = await owner.fetch("SELECT store, count(*) FROM payloads WHERE sha256 IS NOT NULL GROUP BY store")
    return {row["store"]: row["count"] for row in rows}


async def _object_keys(settings: PayloadStoreSettings) -> list[str]:
    async with raw_s3_client(settings) as bucket:
        paginator = bucket.get_paginator("list_objects_v2")
        return [
            item["Key"]
            async for page in paginator.paginate(Bucket=settings.bucket)
            for item in page.get("Contents", [])
        ]


async def _assert_consistent(owner: asyncpg.Connection, s3_store_settings: PayloadStoreSettings) -> None:
    """Every `s3` payload's chunks are objects and nothing else is in the bucket; every `postgres` row has bytes."""
    expected = {
        f"zkeb/payloads/{row['organization_id']}/{row['payload_id']}/{row['seq']:08d}"
        for row in await owner.fetch(
            "SELECT c.organization_id, c.payload_id, c.seq FROM backup_chunks c"
            " JOIN payloads p ON p.id = c.payload_id WHERE p.store = 's3'"
        )
    }
    assert sorted(await _object_keys(s3_store_settings)) == sorted(expected)
    assert (
        await owner.fetchval(
            "SELECT count(*) FROM backup_chunks c JOIN payloads p ON p.id = c.payload_id"
            " WHERE (p.store = 's3') = (octet_length(c.data) > 0)"
        )
        == 0
    )
    assert await owner.fetchval("SELECT count(*) FROM payload_object_deletions") == 0


@S3_ONLY
async def test_a_populated_database_moves_to_the_bucket_and_back_with_every_restore_byte_identical(
    client: Client,
    postgres_client: Client,
    settings: Settings,
    mover: PayloadMover,
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
) -> None:
    populated = await _populate(client, postgres_client, settings)
    assert await _stores(owner_connection) == {"postgres": 4}

    to_s3 = await mover.migrate("s3", batch=2)

    assert (to_s3.moved, to_s3.incomplete_skipped, to_s3.failed) == (4, 1, {})
    assert to_s3.moved_bytes == sum(len(payload) for _, payload in populated.backups.values())
    assert to_s3.remaining == 1  # the open upload stays where it is being written
    assert await _stores(owner_connection) == {"s3": 4}
    assert len(await _object_keys(s3_store_settings)) == 1 + 1 + 3 + 4
    await _assert_consistent(owner_connection, s3_store_settings)
    await _assert_restores(client, populated)

    to_postgres = await mover.migrate("postgres")

    assert (to_postgres.moved, to_postgres.failed, to_postgres.remaining) == (4, {}, 0)
    assert await _stores(owner_connection) == {"postgres": 4}
    assert await _object_keys(s3_store_settings) == []  # freed through the outbox, drained by the run
    await _assert_consistent(owner_connection, s3_store_settings)
    await _assert_restores(client, populated)


@S3_ONLY
async def test_a_half_copied_payload_is_copied_again_not_duplicated_and_ends_consistent(
    client: Client,
    postgres_client: Client,
    settings: Settings,
    mover: PayloadMover,
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
) -> None:
    populated = await _populate(client, postgres_client, settings)
    first = await mover.migrate("s3", batch=1, limit=1)
    assert (first.moved, first.remaining) == (1, 4)
    # A run killed while copying the next payload: one of its objects stored, with bytes that are not its chunk.
    organization_id, payload_id = await owner_connection.fetchrow(
        "SELECT organization_id, id FROM payloads WHERE store = 'postgres' AND chunk_count = 4"
    )
    async with raw_s3_client(s3_store_settings) as bucket:
        await bucket.put_object(
            Bucket=s3_store_settings.bucket,
            Key=f"zkeb/payloads/{organization_id}/{payload_id}/00000000",
            Body=b"a chunk cut short by a killed run",
        )

    rest = await mover.migrate("s3")

    assert (rest.moved, rest.failed, rest.remaining) == (3, {}, 1)
    await _assert_consistent(owner_connection, s3_store_settings)
    await _assert_restores(client, populated)
    # And back, after a run killed while filling the rows of a payload: its first row holds someone else's bytes.
    await owner_connection.execute(
        "UPDATE backup_chunks SET data = 'half-copied' WHERE payload_id = $1 AND seq = 0", payload_id
    )
    assert (await mover.migrate("postgres")).moved == 4
    await _assert_consistent(owner_connection, s3_store_settings)
    await _assert_restores(client, populated)


def _cli_env(base_settings_env: dict[str, str], database_url: str, store: PayloadStoreSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZKEB_", "DATABASE_", "REDIS_", "S3_", "PAYLOAD_"))}
    assert store.endpoint_url is not None
    return {
        **env,
        **base_settings_env,
        "DATABASE_URL": database_url,
        "S3_BUCKET": store.bucket,
        "S3_PREFIX": store.prefix,
        "S3_ENDPOINT_URL": store.endpoint_url,
    }


@S3_ONLY
async def test_a_migration_killed_midway_resumes_and_ends_consistent(
    client: Client,
    postgres_client: Client,
    settings: Settings,
    base_settings_env: dict[str, str],
    database_url: str,
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
) -> None:
    populated = await _populate(client, postgres_client, settings)
    for _ in range(4):  # more payloads, so that the kill lands while some are left
        tenant = populated.tenants[0]
        payload = os.urandom(3 * MIB)
        populated.backups[await _single_shot(postgres_client, tenant, payload)] = (tenant, payload)
    env = _cli_env(base_settings_env, database_url, s3_store_settings)  # PAYLOAD_STORE unset: postgres
    command = [sys.executable, "-m", "zkeb", "storage", "migrate", "--to", "s3", "--batch", "1", "--no-progress"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # noqa: ASYNC220
    try:
        for _ in range(1500):
            if (await _stores(owner_connection)).get("s3", 0) >= 1 or process.poll() is not None:
                break
            await asyncio.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        await asyncio.to_thread(process.wait, 30)
    moved_before = (await _stores(owner_connection)).get("s3", 0)
    assert 1 <= moved_before < 8, "the kill did not land midway"

    resumed = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=300, check=False
    )

    assert resumed.returncode == 0, resumed.stderr
    assert f"Moved {8 - moved_before} payloads" in resumed.stdout
    assert await _stores(owner_connection) == {"s3": 8}
    await _assert_consistent(owner_connection, s3_store_settings)
    await _assert_restores(client, populated)
    reconciled = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "zkeb", "storage", "reconcile", "--min-age", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr


@S3_ONLY
async def test_restores_from_a_live_server_keep_working_while_payloads_move(
    client: Client,
    postgres_client: Client,
    settings: Settings,
    base_settings_env: dict[str, str],
    database_url: str,
    payload_store_env: dict[str, str],
    mover: PayloadMover,
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
) -> None:
    populated = await _populate(client, postgres_client, settings)
    outcomes: list[str] = []
    moving = True

    async def restore_until_moved(server: httpx.AsyncClient) -> None:
        while moving:
            for backup_id, (tenant, payload) in populated.backups.items():
                received = b""
                try:
                    async with server.stream(
                        "GET", f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key)
                    ) as response:
                        assert response.status_code in {200, 503}, await response.aread()
                        async for piece in response.aiter_bytes():
                            received += piece
                        outcomes.append(str(response.status_code))
                        if response.status_code == 200:
                            assert received == payload  # never wrong bytes
                except (httpx.RemoteProtocolError, httpx.ReadError):  # the old bytes went mid-stream: a cut response
                    outcomes.append("cut")
                    assert payload.startswith(received)

    env = {**base_settings_env, "DATABASE_URL": database_url, "MAINTENANCE_INTERVAL": "0", **payload_store_env}
    with granian_server(env) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as server:
            restorers = [asyncio.create_task(restore_until_moved(server)) for _ in range(3)]
            try:
                for target in ("s3", "postgres", "s3"):
                    report = await mover.migrate(target, batch=1)
                    assert (report.moved, report.failed) == (4, {})
            finally:
                moving = False
                await asyncio.gather(*restorers)

    # A restore under way when its payload switched follows it to the new store: none fails, none is cut.
    assert outcomes
    assert set(outcomes) == {"200"}, outcomes
    await _assert_consistent(owner_connection, s3_store_settings)
    await _assert_restores(client, populated)


@S3_ONLY
@pytest.mark.parametrize("target", ["s3", "postgres"])
async def test_a_restore_under_way_when_its_payload_moves_follows_it_to_the_new_store(
    client: Client,
    postgres_client: Client,
    settings: Settings,
    mover: PayloadMover,
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
    target: StoreKind,
) -> None:
    tenant = await make_tenant(client, settings)
    payload = os.urandom(12 * MIB)  # more chunks than a restore reads ahead of its client
    backup_id = await _tus(postgres_client, tenant, payload, cuts=[len(payload)])
    if target == "postgres":
        assert (await mover.migrate("s3")).moved == 1
    row = await owner_connection.fetchrow(
        "SELECT p.id, p.store, p.key_id, p.wrapped_key FROM payloads p JOIN backups b ON b.payload_id = p.id"
        " WHERE b.id = $1",
        uuid.UUID(backup_id),
    )
    spans = [
        ChunkSpan(r["seq"], r["byte_offset"], r["plain_size"])
        for r in await owner_connection.fetch(
            "SELECT seq, byte_offset, plain_size FROM backup_chunks WHERE payload_id = $1 ORDER BY seq", row["id"]
        )
    ]
    cipher = PayloadCrypto(build_keyring(settings)).cipher(row["id"], PayloadKey(row["key_id"], row["wrapped_key"]))
    engine = create_app_engine(settings, settings.database_url or "")
    async with S3ChunkStore(s3_store_settings) as objects:
        stores = PayloadStores("postgres", s3=S3PayloadStore(objects))
        pieces = stream_plaintext(
            engine,
            stores=stores,
            store_kind=row["store"],
            organization_id=tenant.organization_id,
            payload_id=row["id"],
            cipher=cipher,
            steps=plan_read(spans, None, payload_id=row["id"], payload_size=len(payload)),
        )
        received = [await anext(pieces)]  # the restore is under way on the old location

        # The switch frees the old copy (rows emptied, or objects deleted by the outbox drain) before the read
        # reaches the chunks it has not fetched yet: those come from the new store.
        assert (await mover.migrate(target)).moved == 1
        assert await owner_connection.fetchval("SELECT store FROM payloads WHERE id = $1", row["id"]) == target

        received.extend([piece async for piece in pieces])
    await engine.dispose()
    assert b"".join(received) == payload
    restored = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
    assert (restored.status_code, restored.content == payload) == (200, True)


@S3_ONLY
async def test_a_copy_that_does_not_verify_is_discarded_and_its_payload_stays_where_it_was(
    client: Client,
    postgres_client: Client,
    settings: Settings,
    mover: PayloadMover,
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
) -> None:
    tenant = await make_tenant(client, settings)
    good, bad = os.urandom(2 * MIB), os.urandom(2 * MIB)
    await _single_shot(postgres_client, tenant, good)
    bad_backup = await _single_shot(postgres_client, tenant, bad)
    bad_payload = await owner_connection.fetchval("SELECT payload_id FROM backups WHERE id = $1", uuid.UUID(bad_backup))
    await owner_connection.execute(  # one bit of the stored ciphertext flipped: it no longer authenticates
        "UPDATE backup_chunks SET data = set_byte(data, 40, get_byte(data, 40) # 1) WHERE payload_id = $1 AND seq = 1",
        bad_payload,
    )

    report = await mover.migrate("s3")

    assert (report.moved, list(report.failed), report.remaining) == (1, [bad_payload], 1)
    assert report.failed[bad_payload] == "chunk 1 read back from s3 failed its integrity check"
    assert await owner_connection.fetchval("SELECT store FROM payloads WHERE id = $1", bad_payload) == "postgres"
    assert not [key for key in await _object_keys(s3_store_settings) if str(bad_payload) in key]
    await _assert_consistent(owner_connection, s3_store_settings)


@S3_ONLY
async def test_a_committed_payload_missing_chunk_rows_is_reported_failed_not_skipped_as_an_open_upload(
    client: Client,
    postgres_client: Client,
    settings: Settings,
    mover: PayloadMover,
    owner_connection: asyncpg.Connection,
) -> None:
    # A committed payload (it has its SHA-256) with a chunk row lost at rest is damage to report, and the run must
    # say it failed: counted as an open upload, it stayed behind for good while the run looked clean.
    tenant = await make_tenant(client, settings)
    damaged = await _single_shot(postgres_client, tenant, os.urandom(3 * MIB))
    payload_id = await owner_connection.fetchval("SELECT payload_id FROM backups WHERE id = $1", uuid.UUID(damaged))
    await owner_connection.execute("DELETE FROM backup_chunks WHERE payload_id = $1 AND seq = 2", payload_id)

    report = await mover.migrate("s3")

    assert (report.moved, report.incomplete_skipped, report.remaining) == (0, 0, 1)
    assert report.failed == {payload_id: "2 of its 3 chunk rows are in the database"}
    assert await owner_connection.fetchval("SELECT store FROM payloads WHERE id = $1", payload_id) == "postgres"


@S3_ONLY
async def test_a_second_migration_refuses_to_start_while_one_runs(settings: Settings, mover: PayloadMover) -> None:
    engine = create_app_engine(settings, settings.database_url or "")
    try:
        async with migration_lock(engine):
            with pytest.raises(MigrationRunningError):
                await mover.migrate("s3")
    finally:
        await engine.dispose()
    assert (await mover.migrate("s3")).moved == 0
