"""Retention at commit and by the maintenance runner; the trash (hide, list, restore, purge); append-only projects.

Each test runs once with each payload store (conftest.py): with S3, retention must leave a trashed backup's
objects in the bucket (it can be restored), and a purge must take them away at the maintenance pass.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from lifecycle_support import (
    Client,
    Tenant,
    age_backups,
    app_client,
    auth,
    device_token,
    lifecycle_settings,
    make_tenant,
    row_counts,
    set_policy,
    sign_envelope,
    trash_backups,
    upload,
    upload_tus,
    visible_ids,
)

from zkeb.settings import Settings

from support import (
    PROJECT_USED_BYTES,
    assert_bucket_holds_exactly_the_chunks,
    audit_linked,
    maintenance_pass,
    problem,
)


@pytest.fixture
def lsettings(base_settings_env: dict[str, str], database_url: str, payload_store_env: dict[str, str]) -> Settings:
    return lifecycle_settings(base_settings_env, database_url, **payload_store_env)


@pytest.fixture
async def lclient(lsettings: Settings) -> AsyncIterator[Client]:
    async with app_client(lsettings) as client:
        yield client


@pytest.fixture
async def tenant(lclient: Client, lsettings: Settings) -> Tenant:
    return await make_tenant(lclient, lsettings)


async def _backup(client: Client, tenant: Tenant, container: uuid.UUID | None = None, size: int = 100) -> str:
    response = await upload(client, tenant.project_key, sign_envelope(tenant, os.urandom(size), container_id=container))
    assert response.status_code == 201, response.text
    backup_id: str = response.json()["id"]
    return backup_id


async def _audit_actions(owner: asyncpg.Connection, organization_id: uuid.UUID) -> list[tuple[str, str, str]]:
    await audit_linked(owner, organization_id)
    rows = await owner.fetch(
        "SELECT action, actor_type, target_id FROM audit_events WHERE organization_id = $1 ORDER BY seq",
        organization_id,
    )
    return [(r["action"], r["actor_type"], r["target_id"]) for r in rows]


# --- retention -----------------------------------------------------------------------------------------------------


async def test_retention_keeps_exactly_the_newest_n_per_container(
    lclient: Client, tenant: Tenant, lsettings: Settings, owner_connection: asyncpg.Connection
) -> None:
    await set_policy(lclient, tenant, retention_keep_last=3)
    busy, quiet = uuid.uuid4(), uuid.uuid4()
    busy_ids = [await _backup(lclient, tenant, busy) for _ in range(6)]
    quiet_ids = [await _backup(lclient, tenant, quiet) for _ in range(2)]
    assert await visible_ids(lclient, tenant.project_key, busy) == busy_ids[:2:-1]
    assert await visible_ids(lclient, tenant.project_key, quiet) == quiet_ids[::-1]
    trashed = await owner_connection.fetch("SELECT id, deleted_by FROM backups WHERE deleted_at IS NOT NULL")
    assert {str(r["id"]) for r in trashed} == set(busy_ids[:3])
    assert {r["deleted_by"] for r in trashed} == {"retention"}
    events = await _audit_actions(owner_connection, tenant.organization_id)
    assert sorted(t for a, actor, t in events if a == "backup.trashed" and actor == "system") == sorted(busy_ids[:3])
    # Retention trashes, it does not free space: the trash still counts against the quota.
    usage = (await lclient.get(f"/api/v1/projects/{tenant.project_id}/usage", headers=auth(tenant.admin_key))).json()
    assert (usage["backups"], usage["trashed_backups"], usage["used_bytes"]) == (5, 3, 800)
    # The trashed backups keep their bytes (an admin may restore them) in either store.
    assert await owner_connection.fetchval("SELECT count(*) FROM backup_chunks") == 8
    await assert_bucket_holds_exactly_the_chunks(lsettings, owner_connection)


async def test_retention_applies_to_tus_uploads_and_device_tokens_too(
    lclient: Client, tenant: Tenant, lsettings: Settings, owner_connection: asyncpg.Connection
) -> None:
    await set_policy(lclient, tenant, retention_keep_last=1)
    token = await device_token(lclient, tenant, tenant.device)
    container = uuid.uuid4()
    for _ in range(3):
        response = await upload_tus(lclient, token, sign_envelope(tenant, os.urandom(50), container_id=container))
        assert response.status_code == 204, response.text
    assert await visible_ids(lclient, token, container) == [response.headers["zkeb-backup-id"]]
    assert await owner_connection.fetchval("SELECT count(*) FROM backup_chunks") == 3
    await assert_bucket_holds_exactly_the_chunks(lsettings, owner_connection)


async def test_retention_days_trashes_old_backups_but_never_a_containers_newest(
    lclient: Client, tenant: Tenant, lsettings: Settings, owner_connection: asyncpg.Connection
) -> None:
    active, abandoned = uuid.uuid4(), uuid.uuid4()
    old_active = [await _backup(lclient, tenant, active) for _ in range(2)]
    old_abandoned = [await _backup(lclient, tenant, abandoned) for _ in range(2)]
    await age_backups(owner_connection, old_active + old_abandoned, days=10)
    fresh = await _backup(lclient, tenant, active)
    await set_policy(lclient, tenant, retention_days=7)
    report = await maintenance_pass(lsettings)
    assert report.retention_trashed == 3
    assert await visible_ids(lclient, tenant.project_key, active) == [fresh]
    assert await visible_ids(lclient, tenant.project_key, abandoned) == [old_abandoned[1]]
    assert await owner_connection.fetchval("SELECT count(*) FROM backup_chunks") == 5
    await assert_bucket_holds_exactly_the_chunks(lsettings, owner_connection)


async def test_a_tightened_policy_is_applied_by_the_catch_up_without_a_new_upload(
    lclient: Client, tenant: Tenant, lsettings: Settings
) -> None:
    container = uuid.uuid4()
    ids = [await _backup(lclient, tenant, container) for _ in range(5)]
    await set_policy(lclient, tenant, retention_keep_last=2)
    assert len(await visible_ids(lclient, tenant.project_key, container)) == 5
    await maintenance_pass(lsettings)
    assert await visible_ids(lclient, tenant.project_key, container) == ids[:2:-1]
    again = await maintenance_pass(lsettings)
    assert again.retention_trashed == 0


async def test_a_restored_backup_is_left_alone_by_retention(
    lclient: Client, tenant: Tenant, lsettings: Settings
) -> None:
    await set_policy(lclient, tenant, retention_keep_last=1)
    container = uuid.uuid4()
    oldest = await _backup(lclient, tenant, container)
    newest = await _backup(lclient, tenant, container)
    restored = await lclient.post(f"/api/v1/backups/{oldest}/restore", headers=auth(tenant.admin_key))
    assert restored.status_code == 200, restored.text
    await maintenance_pass(lsettings)
    third = await _backup(lclient, tenant, container)
    assert set(await visible_ids(lclient, tenant.project_key, container)) == {oldest, third}
    assert newest not in await visible_ids(lclient, tenant.project_key, container)


# --- trash ---------------------------------------------------------------------------------------------------------


async def test_a_deleted_backup_is_hidden_everywhere_but_kept_in_the_trash(
    lclient: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    container = uuid.uuid4()
    kept = await _backup(lclient, tenant, container)
    gone = await _backup(lclient, tenant, container)
    before = await row_counts(owner_connection)
    assert (await lclient.delete(f"/api/v1/backups/{gone}", headers=auth(tenant.project_key))).status_code == 204
    assert await row_counts(owner_connection) == before
    key = auth(tenant.project_key)
    assert await visible_ids(lclient, tenant.project_key) == [kept]
    for path in (f"/api/v1/backups/{gone}", f"/api/v1/backups/{gone}/payload"):
        response = await lclient.get(path, headers=key)
        assert response.status_code == 404
        problem(response)
    latest = await lclient.get(f"/api/v1/containers/{container}/backups/latest", headers=key)
    assert latest.json()["id"] == kept
    row = await owner_connection.fetchrow("SELECT deleted_at, deleted_by FROM backups WHERE id = $1", uuid.UUID(gone))
    assert row is not None
    assert row["deleted_at"] is not None
    assert row["deleted_by"].startswith("project_key:")


async def test_a_backup_a_device_deletes_names_that_device_in_the_trash_and_the_audit_trail(
    lclient: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    # A device token's jti is stored nowhere: recorded under it, the deletion could not be traced to the device.
    backup_id = await _backup(lclient, tenant)
    token = await device_token(lclient, tenant, tenant.device)
    assert (await lclient.delete(f"/api/v1/backups/{backup_id}", headers=auth(token))).status_code == 204
    deleted_by = await owner_connection.fetchval("SELECT deleted_by FROM backups WHERE id = $1", uuid.UUID(backup_id))
    assert deleted_by == f"device:{tenant.device.id}"
    await audit_linked(owner_connection, tenant.organization_id)
    event = await owner_connection.fetchrow(
        "SELECT actor_type, actor_id FROM audit_events WHERE action = 'backup.trashed' AND target_id = $1", backup_id
    )
    assert event is not None
    assert (event["actor_type"], event["actor_id"]) == ("device", tenant.device.id)


async def test_admins_page_through_the_trash_and_restore(lclient: Client, tenant: Tenant, lsettings: Settings) -> None:
    ids = [await _backup(lclient, tenant) for _ in range(5)]
    for backup_id in ids:
        assert (
            await lclient.delete(f"/api/v1/backups/{backup_id}", headers=auth(tenant.project_key))
        ).status_code == 204
    trash_url = f"/api/v1/projects/{tenant.project_id}/trash"
    first = (await lclient.get(trash_url, params={"limit": 3}, headers=auth(tenant.admin_key))).json()
    second = (
        await lclient.get(
            trash_url, params={"limit": 3, "cursor": first["next_cursor"]}, headers=auth(tenant.admin_key)
        )
    ).json()
    assert second["next_cursor"] is None
    listed = [item["id"] for item in first["items"] + second["items"]]
    assert listed == ids[::-1]
    item = first["items"][0]
    assert item["deleted_by"].startswith("project_key:")
    assert item["purge_after"] > item["deleted_at"]
    assert "payload" not in item
    restored = await lclient.post(f"/api/v1/backups/{ids[0]}/restore", headers=auth(tenant.admin_key))
    assert restored.status_code == 200
    assert restored.json()["id"] == ids[0]
    assert await visible_ids(lclient, tenant.project_key) == [ids[0]]
    payload = await lclient.get(f"/api/v1/backups/{ids[0]}/payload", headers=auth(tenant.project_key))
    assert payload.status_code == 200
    again = await lclient.post(f"/api/v1/backups/{ids[0]}/restore", headers=auth(tenant.admin_key))
    assert again.status_code == 404
    problem(again)
    bad_cursor = await lclient.get(trash_url, params={"cursor": "nope"}, headers=auth(tenant.admin_key))
    assert bad_cursor.status_code == 400
    problem(bad_cursor)
    # Another project's trash refuses the cursor (it would go on from its position there, skipping rows).
    other = await lclient.post("/api/v1/projects", json={"name": "other"}, headers=auth(tenant.admin_key))
    assert other.status_code == 201, other.text
    elsewhere = await lclient.get(
        f"/api/v1/projects/{other.json()['id']}/trash",
        params={"cursor": first["next_cursor"]},
        headers=auth(tenant.admin_key),
    )
    assert elsewhere.status_code == 400
    assert [e["key"] for e in problem(elsewhere)["errors"]] == ["cursor"]


async def test_trash_and_restore_are_for_the_owning_org_admin_only(
    lclient: Client, tenant: Tenant, lsettings: Settings, owner_connection: asyncpg.Connection
) -> None:
    backup_id = await _backup(lclient, tenant)
    assert (await lclient.delete(f"/api/v1/backups/{backup_id}", headers=auth(tenant.project_key))).status_code == 204
    stranger = await make_tenant(lclient, lsettings, name="other")
    token = await device_token(lclient, tenant, tenant.device)
    before = await row_counts(owner_connection)
    for credential in (tenant.project_key, token, stranger.admin_key, stranger.project_key):
        for method, path in (
            ("GET", f"/api/v1/projects/{tenant.project_id}/trash"),
            ("POST", f"/api/v1/backups/{backup_id}/restore"),
            ("DELETE", f"/api/v1/backups/{backup_id}?purge=true"),
        ):
            response = await lclient.request(method, path, headers=auth(credential))
            assert response.status_code in {403, 404}, (credential, path, response.status_code)
            if credential in (stranger.admin_key, stranger.project_key):
                assert response.status_code == 404
            problem(response)
    assert await row_counts(owner_connection) == before
    deleted_at = await owner_connection.fetchval("SELECT deleted_at FROM backups WHERE id = $1", uuid.UUID(backup_id))
    assert deleted_at is not None


async def test_a_purge_removes_payload_and_chunks_frees_the_quota_and_keeps_the_nonce(
    lclient: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    envelope = sign_envelope(tenant, os.urandom(3000))
    backup_id = (await upload(lclient, tenant.project_key, envelope)).json()["id"]
    before = await row_counts(owner_connection)
    refused = await lclient.delete(
        f"/api/v1/backups/{backup_id}", params={"purge": "true"}, headers=auth(tenant.project_key)
    )
    assert refused.status_code == 403
    assert problem(refused)["reason"] == "purge_requires_org_admin"
    assert await row_counts(owner_connection) == before
    purged = await lclient.delete(
        f"/api/v1/backups/{backup_id}", params={"purge": "true"}, headers=auth(tenant.admin_key)
    )
    assert purged.status_code == 204
    after = await row_counts(owner_connection)
    assert (after["backups"], after["payloads"], after["backup_chunks"]) == (0, 0, 0)
    assert after["payload_nonces"] == 1
    usage = (await lclient.get(f"/api/v1/projects/{tenant.project_id}/usage", headers=auth(tenant.admin_key))).json()
    assert usage["used_bytes"] == 0
    replay = await upload(lclient, tenant.project_key, envelope)
    assert replay.status_code == 409
    assert problem(replay)["field"] == "payload_nonce"
    gone = await lclient.delete(
        f"/api/v1/backups/{backup_id}", params={"purge": "true"}, headers=auth(tenant.admin_key)
    )
    assert gone.status_code == 404
    events = await _audit_actions(owner_connection, tenant.organization_id)
    assert ("backup.purged", "org_admin_key", backup_id) in events


async def test_the_runner_purges_the_trash_after_trash_retention_days(
    lclient: Client, tenant: Tenant, lsettings: Settings, owner_connection: asyncpg.Connection
) -> None:
    expired, recent, visible = [await _backup(lclient, tenant, size=s) for s in (100, 200, 400)]
    await trash_backups(owner_connection, [expired], days_ago=lsettings.trash_retention_days + 1)
    await trash_backups(owner_connection, [recent], days_ago=lsettings.trash_retention_days - 1)
    report = await maintenance_pass(lsettings)
    assert (report.trash_purged, report.failed) == (1, [])
    remaining = {str(r["id"]) for r in await owner_connection.fetch("SELECT id FROM backups")}
    assert remaining == {recent, visible}
    used = await owner_connection.fetchval(
        f"SELECT {PROJECT_USED_BYTES} FROM projects p WHERE p.id = $1", tenant.project_id
    )
    assert used == 600
    events = await _audit_actions(owner_connection, tenant.organization_id)
    assert ("backup.purged", "system", expired) in events
    # The same pass freed the purged backup's objects (with S3); the others keep theirs.
    assert await owner_connection.fetchval("SELECT count(*) FROM backup_chunks") == 2
    await assert_bucket_holds_exactly_the_chunks(lsettings, owner_connection)


# --- append-only ---------------------------------------------------------------------------------------------------


async def test_append_only_refuses_deletes_by_keys_and_devices_and_allows_the_admin_after_the_minimum_age(
    lclient: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    await set_policy(lclient, tenant, append_only=True, append_only_min_age_days=7)
    backup_id = await _backup(lclient, tenant)
    token = await device_token(lclient, tenant, tenant.device)
    before = await row_counts(owner_connection)
    for credential in (tenant.project_key, token):
        for params in ({}, {"purge": "true"}):
            response = await lclient.delete(f"/api/v1/backups/{backup_id}", params=params, headers=auth(credential))
            assert response.status_code == 403
            body = problem(response)
            assert body["reason"] in {"append_only", "purge_requires_org_admin"}
    young = await lclient.delete(f"/api/v1/backups/{backup_id}", headers=auth(tenant.admin_key))
    assert young.status_code == 403
    body = problem(young)
    assert body["reason"] == "append_only_min_age"
    assert body["deletable_after"]
    assert await row_counts(owner_connection) == before
    assert await visible_ids(lclient, tenant.project_key) == [backup_id]
    # Creating and reading still work for keys and devices.
    assert (await lclient.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(token))).status_code == 200
    await age_backups(owner_connection, [backup_id], days=8)
    allowed = await lclient.delete(f"/api/v1/backups/{backup_id}", headers=auth(tenant.admin_key))
    assert allowed.status_code == 204
    purged = await lclient.delete(
        f"/api/v1/backups/{backup_id}", params={"purge": "true"}, headers=auth(tenant.admin_key)
    )
    assert purged.status_code == 204
    assert (await row_counts(owner_connection))["backups"] == 0


async def test_append_only_projects_still_apply_retention(lclient: Client, tenant: Tenant) -> None:
    await set_policy(lclient, tenant, append_only=True, retention_keep_last=2)
    container = uuid.uuid4()
    ids = [await _backup(lclient, tenant, container) for _ in range(4)]
    assert await visible_ids(lclient, tenant.project_key, container) == ids[:1:-1]


async def test_turning_append_only_off_is_audited(
    lclient: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    await set_policy(lclient, tenant, append_only=True)
    await set_policy(lclient, tenant, append_only=False)
    rows = await owner_connection.fetch(
        "SELECT details FROM audit_events WHERE organization_id = $1 AND action = 'project.updated' ORDER BY seq",
        tenant.organization_id,
    )
    assert json.loads(rows[-1]["details"]) == {"changed": {"append_only": False}, "was": {"append_only": True}}
