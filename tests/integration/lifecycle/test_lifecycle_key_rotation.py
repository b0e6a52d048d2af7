"""Master-key rotation: both keys set, `zkeb keys rotate`, then only the new key; every backup restores intact.

The main scenario runs with each payload store (conftest.py): rotation re-wraps data keys only, so neither a chunk
row nor an S3 object is rewritten."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from typing import Any

import asyncpg
import pytest
from lifecycle_support import Client, Tenant, app_client, auth, lifecycle_settings, make_tenant, sign_envelope, upload

from zkeb.core.database import create_app_engine
from zkeb.domain.backups.context import build_keyring
from zkeb.domain.backups.jobs.key_rotation import KeyRotator, StoredKeysCheck
from zkeb.lib.atrest import master_key_id, parse_master_key
from zkeb.settings import Settings

from support import raw_s3_client

NEW_KEY = base64.b64encode(bytes(range(100, 132))).decode()


async def _restore_all(client: Client, tenant: Tenant, payloads: dict[str, bytes]) -> None:
    for backup_id, payload in payloads.items():
        response = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
        assert response.status_code == 200, response.text
        assert response.content == payload


async def _upload_some(client: Client, tenant: Tenant, count: int) -> dict[str, bytes]:
    payloads = {}
    for index in range(count):
        payload = os.urandom(1 + index * 700_000)  # some span several chunks
        response = await upload(client, tenant.project_key, sign_envelope(tenant, payload))
        assert response.status_code == 201, response.text
        payloads[response.json()["id"]] = payload
    return payloads


async def _stored_chunks(settings: Settings, owner: asyncpg.Connection) -> list[tuple[str, bytes]]:
    """Every stored chunk's bytes, by row id or object key: the chunk rows' `data`, or the bucket's objects."""
    store = settings.payload_store
    if store.kind != "s3":
        return [(str(r["id"]), bytes(r["data"])) for r in await owner.fetch("SELECT id, data FROM backup_chunks")]
    assert await owner.fetchval("SELECT count(*) FROM backup_chunks WHERE length(data) > 0") == 0  # bytes in objects
    chunks = []
    async with raw_s3_client(store) as client:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
        async for page in pages:
            for item in page.get("Contents", []):
                answer = await client.get_object(Bucket=store.bucket, Key=item["Key"])
                async with answer["Body"] as body:
                    chunks.append((item["Key"], await body.read()))
    return chunks


def _zkeb(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zkeb", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_rotation_with_both_keys_then_only_the_new_one_restores_every_backup_byte_identically(
    base_settings_env: dict[str, str],
    database_url: str,
    owner_connection: asyncpg.Connection,
    payload_store_env: dict[str, str],
) -> None:
    old_key = base_settings_env["ZKEB_MASTER_ENCRYPTION_KEY"]
    old_id = master_key_id(parse_master_key(old_key, name="old"))
    new_id = master_key_id(parse_master_key(NEW_KEY, name="new"))
    base_settings_env = {**base_settings_env, **payload_store_env}
    before = lifecycle_settings(base_settings_env, database_url)
    async with app_client(before) as client:
        tenant = await make_tenant(client, before)
        payloads = await _upload_some(client, tenant, 4)
    chunks_before = await _stored_chunks(before, owner_connection)
    assert len(chunks_before) >= 4

    during = lifecycle_settings(base_settings_env, database_url, ZKEB_MASTER_ENCRYPTION_KEY_NEW=NEW_KEY)
    async with app_client(during) as client:
        payloads.update(await _upload_some(client, tenant, 2))  # new backups go under the new key
        await _restore_all(client, tenant, payloads)  # old ones still open
    keys = dict(await owner_connection.fetch("SELECT key_id, count(*) FROM payloads GROUP BY key_id"))
    assert keys == {old_id: 4, new_id: 2}

    env = {**base_settings_env, "DATABASE_URL": database_url, "ZKEB_MASTER_ENCRYPTION_KEY_NEW": NEW_KEY}
    status = await asyncio.to_thread(_zkeb, env, "keys", "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["active_key_id"] == new_id
    assert report["configured"] == {"ZKEB_MASTER_ENCRYPTION_KEY": old_id, "ZKEB_MASTER_ENCRYPTION_KEY_NEW": new_id}
    assert report["data_keys"] == {new_id: 2, old_id: 4}
    assert report["remaining"] == 4
    rotated = await asyncio.to_thread(_zkeb, env, "keys", "rotate", "--batch-size", "3")
    assert rotated.returncode == 0, rotated.stderr
    assert "Re-wrapped 4 data keys" in rotated.stdout
    assert NEW_KEY not in rotated.stdout + rotated.stderr
    after = json.loads((await asyncio.to_thread(_zkeb, env, "keys", "status", "--json")).stdout)
    assert after["data_keys"] == {new_id: 6, old_id: 0}
    assert after["remaining"] == 0
    # No chunk was rewritten: those of the first four backups are byte for byte what they were.
    assert set(chunks_before) <= set(await _stored_chunks(before, owner_connection))

    promoted = {**base_settings_env, "ZKEB_MASTER_ENCRYPTION_KEY": NEW_KEY}
    only_new = lifecycle_settings(promoted, database_url)
    async with app_client(only_new) as client:
        await _restore_all(client, tenant, payloads)
    final = json.loads(
        (await asyncio.to_thread(_zkeb, {**promoted, "DATABASE_URL": database_url}, "keys", "status", "--json")).stdout
    )
    assert final["data_keys"] == {new_id: 6}
    assert final["configured"] == {"ZKEB_MASTER_ENCRYPTION_KEY": new_id}
    events = await owner_connection.fetchval(
        "SELECT count(*) FROM audit_events WHERE organization_id = $1 AND action = 'master_key.rewrapped'",
        tenant.organization_id,
    )
    assert events == 1


class _InterruptedError(Exception):
    pass


async def test_an_interrupted_rotation_resumes_where_it_stopped(
    base_settings_env: dict[str, str], database_url: str, owner_connection: asyncpg.Connection
) -> None:
    before = lifecycle_settings(base_settings_env, database_url)
    async with app_client(before) as client:
        tenant = await make_tenant(client, before)
        payloads = await _upload_some(client, tenant, 5)
    during = lifecycle_settings(base_settings_env, database_url, ZKEB_MASTER_ENCRYPTION_KEY_NEW=NEW_KEY)
    engine = create_app_engine(during, database_url)
    rotator = KeyRotator(engine, build_keyring(during), during)
    seen: list[int] = []

    def stop_after_first_batch(count: int) -> None:
        seen.append(count)
        raise _InterruptedError

    try:
        with pytest.raises(_InterruptedError):
            await rotator.rotate(batch_size=2, on_progress=stop_after_first_batch)
        assert (await rotator.status()).remaining == 3  # the first batch committed before the interruption
        report = await rotator.rotate(batch_size=2)
        assert (report.rewrapped, report.remaining, report.complete) == (3, 0, True)
    finally:
        await engine.dispose()
    assert seen == [2]
    only_new = lifecycle_settings({**base_settings_env, "ZKEB_MASTER_ENCRYPTION_KEY": NEW_KEY}, database_url)
    async with app_client(only_new) as client:
        await _restore_all(client, tenant, payloads)


async def test_keys_status_names_ids_only_and_rotate_without_new_key_changes_nothing(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    env: dict[str, Any] = {**base_settings_env, "DATABASE_URL": database_url}
    status = await asyncio.to_thread(_zkeb, env, "keys", "status")
    assert status.returncode == 0, status.stderr
    assert "Active master key: mk-" in status.stdout
    assert base_settings_env["ZKEB_MASTER_ENCRYPTION_KEY"] not in status.stdout + status.stderr
    rotated = await asyncio.to_thread(_zkeb, env, "keys", "rotate", "--no-progress")
    assert rotated.returncode == 0, rotated.stderr
    assert "Re-wrapped 0 data keys" in rotated.stdout
    bad = await asyncio.to_thread(_zkeb, {**env, "ZKEB_MASTER_ENCRYPTION_KEY_NEW": "not-a-key"}, "keys", "status")
    assert bad.returncode == 1
    assert "ZKEB_MASTER_ENCRYPTION_KEY_NEW" in bad.stderr
    assert "not-a-key" not in bad.stderr


async def test_a_master_key_that_opens_none_of_the_stored_data_keys_is_not_ready_and_keys_status_says_so(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    # A wrong ZKEB_MASTER_ENCRYPTION_KEY (or the old one dropped before `keys rotate` finished) served happily and
    # answered 503 to every restore: not ready, a deployment with it never takes traffic.
    old_id = master_key_id(parse_master_key(base_settings_env["ZKEB_MASTER_ENCRYPTION_KEY"], name="old"))
    before = lifecycle_settings(base_settings_env, database_url)
    async with app_client(before) as client:
        tenant = await make_tenant(client, before)
        await _upload_some(client, tenant, 1)
        assert (await client.get("/api/health/ready")).status_code == 200
    wrong = {**base_settings_env, "ZKEB_MASTER_ENCRYPTION_KEY": NEW_KEY}
    async with app_client(lifecycle_settings(wrong, database_url)) as client:
        ready = await client.get("/api/health/ready")
        assert ready.status_code == 503
        [reason] = ready.json()["reasons"]
        assert f"wrapped with {old_id}" in reason
        assert NEW_KEY not in ready.text
        assert base_settings_env["ZKEB_MASTER_ENCRYPTION_KEY"] not in ready.text
        assert (await client.get("/api/health/live")).status_code == 200
    env = {**wrong, "DATABASE_URL": database_url}
    status = await asyncio.to_thread(_zkeb, env, "keys", "status")
    assert status.returncode == 1
    assert f"{old_id}" in status.stdout
    assert "not configured" in status.stderr
    as_json = await asyncio.to_thread(_zkeb, env, "keys", "status", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["unknown_key_ids"] == [old_id]
    # Both keys configured (a rotation's first step): ready again.
    both = lifecycle_settings(base_settings_env, database_url, ZKEB_MASTER_ENCRYPTION_KEY_NEW=NEW_KEY)
    async with app_client(both) as client:
        assert (await client.get("/api/health/ready")).status_code == 200


async def test_the_stored_keys_check_passes_when_it_cannot_read_the_key_ids(base_settings_env: dict[str, str]) -> None:
    # The database check reports an outage; this one must not be what keeps a healthy fleet from deploying.
    settings = lifecycle_settings(base_settings_env, "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    engine = create_app_engine(settings, "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    check = StoredKeysCheck(engine, build_keyring(settings))
    try:
        assert await check() is None
    finally:
        await check.stop()
        await engine.dispose()
