"""Per-project storage quotas: the 507 body, checks at upload start and at commit, races, usage and purge.

Each test runs once with each payload store (conftest.py): the S3 store counts the same bytes (the client's
ciphertext, not the objects' at-rest overhead), and an upload it refuses at commit leaves no object behind.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import asyncpg
import pytest
from lifecycle_support import (
    NOTHING_STORED,
    Client,
    Tenant,
    app_client,
    auth,
    device_token,
    lifecycle_settings,
    make_tenant,
    row_counts,
    set_policy,
    sign_envelope,
    tus_headers,
    upload,
)

from zkeb.settings import Settings

from support import assert_bucket_holds_exactly_the_chunks, maintenance_pass, problem

SIZE = 1000


@pytest.fixture
def quota_settings(base_settings_env: dict[str, str], database_url: str, payload_store_env: dict[str, str]) -> Settings:
    return lifecycle_settings(base_settings_env, database_url, **payload_store_env)


@pytest.fixture
async def qclient(quota_settings: Settings) -> AsyncIterator[Client]:
    async with app_client(quota_settings) as client:
        yield client


@pytest.fixture
async def tenant(qclient: Client, quota_settings: Settings) -> Tenant:
    return await make_tenant(qclient, quota_settings)


async def _usage(client: Client, tenant: Tenant, credential: str | None = None) -> dict[str, object]:
    response = await client.get(
        f"/api/v1/projects/{tenant.project_id}/usage", headers=auth(credential or tenant.admin_key)
    )
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def test_new_projects_take_default_project_quota(base_settings_env: dict[str, str], database_url: str) -> None:
    settings = lifecycle_settings(base_settings_env, database_url, DEFAULT_PROJECT_QUOTA="5KB")
    async with app_client(settings) as client:
        tenant = await make_tenant(client, settings)
        assert (await _usage(client, tenant))["quota_bytes"] == 5000
        unlimited = await client.post(
            "/api/v1/projects", json={"name": "big", "storage_quota_bytes": None}, headers=auth(tenant.admin_key)
        )
        assert unlimited.json()["storage_quota_bytes"] is None


async def test_single_shot_over_quota_is_507_with_used_quota_and_requested_and_stores_nothing(
    qclient: Client, tenant: Tenant, quota_settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    await set_policy(qclient, tenant, storage_quota_bytes=2500)
    for _ in range(2):
        assert (await upload(qclient, tenant.project_key, sign_envelope(tenant, os.urandom(SIZE)))).status_code == 201
    before = await row_counts(owner_connection)
    response = await upload(qclient, tenant.project_key, sign_envelope(tenant, os.urandom(SIZE)))
    assert response.status_code == 507
    body = problem(response)
    assert (body["used"], body["quota"], body["requested"]) == (2000, 2500, SIZE)
    assert "request_id" in body
    assert await row_counts(owner_connection) == before
    assert (await _usage(qclient, tenant))["used_bytes"] == 2000
    await assert_bucket_holds_exactly_the_chunks(quota_settings, owner_connection)


async def test_tus_creation_over_quota_is_507_before_any_byte(
    qclient: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    await set_policy(qclient, tenant, storage_quota_bytes=SIZE - 1)
    envelope = sign_envelope(tenant, os.urandom(SIZE))
    response = await qclient.post(
        "/api/v1/uploads",
        headers=tus_headers(
            tenant.project_key, **{"Upload-Length": str(SIZE), "Upload-Metadata": envelope.tus_metadata()}
        ),
    )
    assert response.status_code == 507
    assert response.headers["tus-resumable"] == "1.0.0"
    body = problem(response)
    assert (body["used"], body["quota"], body["requested"]) == (0, SIZE - 1, SIZE)
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_usage_counts_bytes_backups_trash_and_devices_and_devices_see_their_own_share(
    qclient: Client, tenant: Tenant, quota_settings: Settings
) -> None:
    first, second = tenant.devices
    ids = []
    for device, size in ((first, 100), (first, 200), (second, 400)):
        response = await upload(qclient, tenant.project_key, sign_envelope(tenant, os.urandom(size), device=device))
        ids.append(response.json()["id"])
    assert (await qclient.delete(f"/api/v1/backups/{ids[0]}", headers=auth(tenant.project_key))).status_code == 204
    usage = await _usage(qclient, tenant)
    assert usage == {
        "used_bytes": 700,
        "backups": 2,
        "trashed_backups": 1,
        "quota_bytes": None,
        "reserved_bytes": 0,
        "open_uploads": 0,
        "by_device": sorted(
            [
                {"device_id_hash": first.device_id_hash.hex(), "used_bytes": 300, "backups": 1, "trashed_backups": 1},
                {"device_id_hash": second.device_id_hash.hex(), "used_bytes": 400, "backups": 1, "trashed_backups": 0},
            ],
            key=lambda d: str(d["device_id_hash"]),
        ),
    }
    assert (await _usage(qclient, tenant, tenant.project_key)) == usage
    mine = await _usage(qclient, tenant, await device_token(qclient, tenant, second))
    assert mine["used_bytes"] == 700
    assert mine["by_device"] == [usage["by_device"][1 if first.device_id_hash < second.device_id_hash else 0]]  # type: ignore[index]
    stranger = await make_tenant(qclient, quota_settings, name="other")
    for credential in (stranger.admin_key, stranger.project_key):
        response = await qclient.get(f"/api/v1/projects/{tenant.project_id}/usage", headers=auth(credential))
        assert response.status_code == 404
        problem(response)


async def test_purging_frees_quota_so_the_next_upload_fits(
    qclient: Client, tenant: Tenant, quota_settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    await set_policy(qclient, tenant, storage_quota_bytes=SIZE)
    first = await upload(qclient, tenant.project_key, sign_envelope(tenant, os.urandom(SIZE)))
    assert first.status_code == 201
    backup_id = first.json()["id"]
    assert (await qclient.delete(f"/api/v1/backups/{backup_id}", headers=auth(tenant.project_key))).status_code == 204
    # The trash still counts against the quota.
    refused = await upload(qclient, tenant.project_key, sign_envelope(tenant, os.urandom(SIZE)))
    assert refused.status_code == 507
    purge = await qclient.delete(
        f"/api/v1/backups/{backup_id}", params={"purge": "true"}, headers=auth(tenant.admin_key)
    )
    assert purge.status_code == 204
    assert (await _usage(qclient, tenant))["used_bytes"] == 0
    again = await upload(qclient, tenant.project_key, sign_envelope(tenant, os.urandom(SIZE)))
    assert again.status_code == 201
    assert (await _usage(qclient, tenant))["used_bytes"] == SIZE
    assert (await maintenance_pass(quota_settings)).failed == []
    assert await owner_connection.fetchval("SELECT count(*) FROM backup_chunks") == 1
    await assert_bucket_holds_exactly_the_chunks(quota_settings, owner_connection)
