"""`zkeb storage reconcile` on moto's S3 server: objects with no row and rows with no object are reported (keys,
ids, sizes), objects awaiting the deletion outbox are counted apart, and orphans go only when asked and old enough."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from typing import Any

import asyncpg
from backups_support import Tenant, auth, make_tenant, sign_envelope
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.domain.backups.store.s3 import S3PayloadStore
from zkeb.settings import PayloadStoreSettings, Settings

from support import S3_ONLY, raw_s3_client

Client = AsyncTestClient[Litestar]

CHUNK = S3PayloadStore.chunk_size


def _reconcile(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "zkeb", "storage", "reconcile", "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


async def _backup(client: Client, tenant: Tenant, payload: bytes) -> str:
    response = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, payload).json(), headers=auth(tenant.project_key)
    )
    assert response.status_code == 201, response.text
    backup_id: str = response.json()["id"]
    return backup_id


@S3_ONLY
async def test_reconcile_reports_an_orphan_object_and_a_missing_one_and_deletes_only_old_orphans_when_asked(
    client: Client,
    settings: Settings,
    base_settings_env: dict[str, str],
    database_url: str,
    payload_store_env: dict[str, str],
    s3_store_settings: PayloadStoreSettings,
    owner_connection: asyncpg.Connection,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZKEB_", "DATABASE_", "REDIS_", "S3_", "PAYLOAD_"))}
    env = {**env, **base_settings_env, "DATABASE_URL": database_url, **payload_store_env}
    tenant = await make_tenant(client, settings)
    kept = await _backup(client, tenant, os.urandom(2 * CHUNK))
    damaged = await _backup(client, tenant, os.urandom(2 * CHUNK))
    purged = await _backup(client, tenant, os.urandom(100))
    purge = await client.delete(f"/api/v1/backups/{purged}", params={"purge": "true"}, headers=auth(tenant.admin_key))
    assert purge.status_code == 204

    status, clean = await asyncio.to_thread(_reconcile, env, "--min-age", "0")
    assert (status, clean["clean"], clean["objects"], clean["rows"]) == (0, True, 5, 4)
    assert clean["awaiting_deletion"]["count"] == 1  # the purged backup's object, until the maintenance pass

    damaged_payload = await owner_connection.fetchval(
        "SELECT payload_id FROM backups WHERE id = $1", uuid.UUID(damaged)
    )
    lost_key = f"zkeb/payloads/{tenant.organization_id}/{damaged_payload}/00000001"
    orphan_key = f"zkeb/payloads/{tenant.organization_id}/{uuid.uuid4()}/00000000"  # a PUT whose row never came
    async with raw_s3_client(s3_store_settings) as bucket:
        await bucket.delete_object(Bucket=s3_store_settings.bucket, Key=lost_key)
        await bucket.put_object(Bucket=s3_store_settings.bucket, Key=orphan_key, Body=b"x" * 1000)

    status, found = await asyncio.to_thread(_reconcile, env, "--min-age", "0")

    assert (status, found["clean"]) == (1, False)
    assert found["missing"] == {
        "count": 1,
        "bytes": CHUNK,
        "items": [{"organization_id": str(tenant.organization_id), "payload_id": str(damaged_payload), "seq": 1}],
    }
    assert (found["orphans"]["count"], found["orphans"]["bytes"]) == (1, 1000)
    assert [item["key"] for item in found["orphans"]["items"]] == [orphan_key]
    assert found["orphans_deleted"] == 0

    # The orphan is fresh: with the default age it may be an upload in flight, counted apart and never deleted.
    status, young = await asyncio.to_thread(_reconcile, env, "--delete-orphans")
    assert (status, young["orphans"]["count"], young["recent_orphans"]["count"]) == (1, 0, 1)
    assert young["orphans_deleted"] == 0
    status, deleted = await asyncio.to_thread(_reconcile, env, "--delete-orphans", "--min-age", "0")
    assert (status, deleted["orphans"]["count"], deleted["orphans_deleted"]) == (1, 1, 1)  # the missing row remains

    status, after = await asyncio.to_thread(_reconcile, env, "--min-age", "0")
    assert (status, after["orphans"]["count"], after["missing"]["count"]) == (1, 0, 1)
    async with raw_s3_client(s3_store_settings) as bucket:
        listed = await bucket.list_objects_v2(Bucket=s3_store_settings.bucket)
    keys = {item["Key"] for item in listed["Contents"]}
    kept_payload = await owner_connection.fetchval("SELECT payload_id FROM backups WHERE id = $1", uuid.UUID(kept))
    kept_prefix = f"zkeb/payloads/{tenant.organization_id}/{kept_payload}/"
    assert {f"{kept_prefix}00000000", f"{kept_prefix}00000001", lost_key.replace("00000001", "00000000")} <= keys
    assert orphan_key not in keys
    restored = await client.get(f"/api/v1/backups/{kept}/payload", headers=auth(tenant.project_key))
    assert restored.status_code == 200


@S3_ONLY
async def test_reconcile_pages_through_a_listing_longer_than_one_page(
    client: Client,
    settings: Settings,
    base_settings_env: dict[str, str],
    database_url: str,
    payload_store_env: dict[str, str],
    s3_store_settings: PayloadStoreSettings,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZKEB_", "DATABASE_", "REDIS_", "S3_", "PAYLOAD_"))}
    env = {**env, **base_settings_env, "DATABASE_URL": database_url, **payload_store_env}
    tenant = await make_tenant(client, settings)
    await _backup(client, tenant, os.urandom(2 * CHUNK + 1))  # 3 chunks
    stray = uuid.uuid4()
    async with raw_s3_client(s3_store_settings) as bucket:
        await asyncio.gather(
            *(
                bucket.put_object(
                    Bucket=s3_store_settings.bucket,
                    Key=f"zkeb/payloads/{tenant.organization_id}/{stray}/{seq:08d}",
                    Body=b"o",
                )
                for seq in range(1100)  # ListObjectsV2 answers 1000 keys a page
            )
        )

    status, found = await asyncio.to_thread(_reconcile, env, "--min-age", "0")

    assert (status, found["objects"], found["rows"]) == (1, 1103, 3)
    assert (found["orphans"]["count"], found["orphans"]["bytes"], found["missing"]["count"]) == (1100, 1100, 0)
    assert len(found["orphans"]["items"]) == 1000  # listed up to LISTED_FINDINGS, all counted
