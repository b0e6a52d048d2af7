"""PostgreSQL out of disk during uploads: 507 problem+json, nothing half-written, and service again once room is made.

The test's own PostgreSQL keeps the payload chunks (`backup_chunks` and its TOAST table) in a tablespace on a 4 MiB
tmpfs: uploads fill it until PostgreSQL cannot extend the table ("could not extend file": SQLSTATE 53100). The rest
of the database, its WAL included, stays on the ordinary disk, so PostgreSQL itself keeps running, as it does when
a data volume fills up.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
from faults_support import (
    FaultTenant,
    OwnPostgres,
    SmallFilesystem,
    make_fault_tenant,
    own_postgres,
    server_env,
    small_tmpfs,
    tus_create,
    zkeb_serve,
)

from support import make_settings

pytestmark = pytest.mark.slow

OCTETS = "application/offset+octet-stream"
MIB = 1024 * 1024


@pytest.fixture
def chunks_filesystem() -> Iterator[SmallFilesystem]:
    with small_tmpfs("4m", owner="pgserver" if os.geteuid() == 0 else None) as filesystem:
        yield filesystem


@pytest.fixture
def postgres(chunks_filesystem: SmallFilesystem) -> Iterator[OwnPostgres]:
    # Stopped before the filesystem under its tablespace is unmounted.
    with own_postgres() as server:
        yield server


async def _patch_in_pieces(
    client: httpx.AsyncClient, tenant: FaultTenant, location: str, payload: bytes, offset: int
) -> tuple[httpx.Response, int]:
    """PATCH `payload` from `offset` on, 1 MiB a request, until one is not 204 or the upload completes.

    The last response and the offset it was sent at.
    """
    tus = {"Tus-Resumable": "1.0.0", **tenant.auth, "Content-Type": OCTETS}
    while True:
        piece = payload[offset : offset + MIB]
        response = await client.patch(location, content=piece, headers={**tus, "Upload-Offset": str(offset)})
        if response.status_code != 204 or "zkeb-backup-id" in response.headers:
            return response, offset
        offset += len(piece)


async def _stored(connection: asyncpg.Connection, project_id: uuid.UUID) -> dict[str, int]:
    """What the database holds, as the superuser sees it (row-level security bypassed)."""
    row = await connection.fetchrow(
        "SELECT (SELECT count(*) FROM backups) AS backups,"
        " (SELECT p.used_bytes + coalesce((SELECT sum(s.used_bytes) FROM project_usage_shards s"
        "   WHERE s.project_id = p.id), 0) FROM projects p WHERE p.id = $1) AS used_bytes,"
        " (SELECT count(*) FROM payloads p WHERE NOT EXISTS (SELECT 1 FROM backups b WHERE b.payload_id = p.id)"
        "   AND NOT EXISTS (SELECT 1 FROM upload_sessions u WHERE u.payload_id = p.id)) AS orphan_payloads,"
        " (SELECT coalesce(sum(c.plain_size), 0) FROM backup_chunks c"
        "   JOIN upload_sessions u ON u.payload_id = c.payload_id) AS upload_chunk_bytes",
        project_id,
    )
    assert row is not None
    return dict(row)


def _assert_507_problem(response: httpx.Response) -> None:
    assert response.status_code == 507, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["retry-after"] == "60"
    assert "storage is full" in response.json()["detail"]


async def test_postgresql_out_of_disk_is_507_leaves_nothing_half_written_and_serves_again_once_room_is_made(
    base_settings_env: dict[str, str], postgres: OwnPostgres, chunks_filesystem: SmallFilesystem
) -> None:
    await postgres.execute("CREATE DATABASE zkeb")
    await postgres.execute(f"CREATE TABLESPACE chunks LOCATION '{chunks_filesystem.path}'")
    database_url = postgres.url.rsplit("/", 1)[0] + "/zkeb"
    env = server_env(base_settings_env, database_url, ENABLE_RATE_LIMITING="false")
    with zkeb_serve(env) as server:  # it migrates the database
        await postgres.execute("ALTER TABLE backup_chunks SET TABLESPACE chunks", database="zkeb")
        tenant = await make_fault_tenant(server.url, make_settings(base_settings_env, DATABASE_URL=database_url))
        owner = await asyncpg.connect(database_url)
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                seed = tenant.envelope(os.urandom(MIB // 2))
                seeded = await client.post("/api/v1/backups", json=seed.json(), headers=tenant.auth)
                assert seeded.status_code == 201, seeded.text
                before = await _stored(owner, tenant.project_id)

                # A tus upload larger than the room left: each 1 MiB PATCH commits, until one cannot.
                large = tenant.envelope(os.urandom(6 * MIB + 3))
                location = (await tus_create(client, tenant, large)).headers["location"]
                refused_patch, refused_at = await _patch_in_pieces(client, tenant, location, large.payload, 0)
                _assert_507_problem(refused_patch)
                head = await client.head(location, headers={"Tus-Resumable": "1.0.0", **tenant.auth})
                assert head.headers["upload-offset"] == str(refused_at)  # what was committed before stays
                assert 0 < refused_at < len(large.payload)

                small = tenant.envelope(os.urandom(2 * MIB))
                refused_single = await client.post("/api/v1/backups", json=small.json(), headers=tenant.auth)
                _assert_507_problem(refused_single)

                after_refusals = await _stored(owner, tenant.project_id)
                assert after_refusals == {**before, "upload_chunk_bytes": refused_at}
                listed = await client.get("/api/v1/backups", headers=tenant.auth)
                assert [item["id"] for item in listed.json()["items"]] == [seeded.json()["id"]]

                chunks_filesystem.resize("64m")  # the operator makes room; the same server process goes on

                stored_single = await client.post("/api/v1/backups", json=small.json(), headers=tenant.auth)
                assert stored_single.status_code == 201, stored_single.text
                completed, _ = await _patch_in_pieces(client, tenant, location, large.payload, refused_at)
                assert completed.status_code == 204, completed.text
                for backup_id, envelope in (
                    (stored_single.json()["id"], small),
                    (completed.headers["zkeb-backup-id"], large),
                ):
                    restored = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=tenant.auth)
                    assert hashlib.sha256(restored.content).digest() == hashlib.sha256(envelope.payload).digest()
                final = await _stored(owner, tenant.project_id)
                assert final == {
                    "backups": 3,
                    "used_bytes": before["used_bytes"] + len(small.payload) + len(large.payload),
                    "orphan_payloads": 0,
                    "upload_chunk_bytes": 0,
                }
        finally:
            await owner.close()
    print(f"\nout of disk: the tus upload kept {refused_at} bytes, then 507; the single-shot 507 kept nothing")
