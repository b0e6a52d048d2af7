"""The maintenance runner: several at once never remove anything twice nor fail; `zkeb maintenance run --once`.

Each test runs once with each payload store (conftest.py); with S3, the runners also drain the deleted
payloads' objects, and the bucket must hold exactly the chunks of what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import uuid

import asyncpg
import pytest
from lifecycle_support import (
    Tenant,
    app_client,
    auth,
    lifecycle_settings,
    make_tenant,
    set_policy,
    sign_envelope,
    trash_backups,
    tus_headers,
    upload,
)

from zkeb.core.database import create_app_engine
from zkeb.domain.backups.jobs.maintenance import MaintenanceReport, MaintenanceRunner
from zkeb.domain.backups.plugin import payload_stores
from zkeb.settings import Settings

from support import PROJECT_USED_BYTES, assert_bucket_holds_exactly_the_chunks, maintenance_pass

TRASHED_PER_TENANT = 12
EXPIRED_UPLOADS_PER_TENANT = 4
OVER_RETENTION_PER_TENANT = 5


async def _populate(settings: Settings, owner: asyncpg.Connection) -> list[Tenant]:
    """Two tenants, each with expired trash, expired half-sent tus uploads and backups beyond a just-tightened
    policy."""
    tenants = []
    async with app_client(settings) as client:
        for name in ("north", "south"):
            tenant = await make_tenant(client, settings, name=name)
            trashed = []
            for _ in range(TRASHED_PER_TENANT):
                response = await upload(client, tenant.project_key, sign_envelope(tenant, os.urandom(100)))
                trashed.append(response.json()["id"])
            await trash_backups(owner, trashed, days_ago=settings.trash_retention_days + 1)
            container = uuid.uuid4()
            for _ in range(OVER_RETENTION_PER_TENANT + 1):
                envelope = sign_envelope(tenant, os.urandom(10), container_id=container)
                assert (await upload(client, tenant.project_key, envelope)).status_code == 201
            await set_policy(client, tenant, retention_keep_last=1)
            for _ in range(EXPIRED_UPLOADS_PER_TENANT):
                envelope = sign_envelope(tenant, os.urandom(10))
                created = await client.post(
                    "/api/v1/uploads",
                    headers=tus_headers(
                        tenant.project_key, **{"Upload-Length": "10", "Upload-Metadata": envelope.tus_metadata()}
                    ),
                )
                assert created.status_code == 201
                patched = await client.patch(
                    created.headers["location"],
                    content=envelope.payload[:5],
                    headers=tus_headers(
                        tenant.project_key,
                        **{"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
                    ),
                )
                assert patched.status_code == 204
            tenants.append(tenant)
    await owner.execute("UPDATE upload_sessions SET expires_at = now() - interval '1 minute'")
    return tenants


async def _drain(settings: Settings, database_url: str) -> list[MaintenanceReport]:
    """Passes of one runner (its own engine and S3 client, as another process would have) until nothing is left."""
    engine = create_app_engine(settings, database_url)
    _, objects = payload_stores(settings)
    try:
        async with contextlib.AsyncExitStack() as stack:
            if objects is not None:
                await stack.enter_async_context(objects)
            # Small batches, so two runners interleave over many transactions.
            runner = MaintenanceRunner(engine, settings, batch=3, objects=objects)
            reports = [await runner.run_once()]
            while reports[-1].more:
                reports.append(await runner.run_once())
            return reports
    finally:
        await engine.dispose()


async def test_two_runners_at_once_never_remove_anything_twice_or_fail(
    base_settings_env: dict[str, str],
    database_url: str,
    payload_store_env: dict[str, str],
    owner_connection: asyncpg.Connection,
) -> None:
    settings = lifecycle_settings(base_settings_env, database_url, **payload_store_env)
    tenants = await _populate(settings, owner_connection)
    results = await asyncio.gather(*(_drain(settings, database_url) for _ in range(2)))
    reports = [report for runner_reports in results for report in runner_reports]
    assert [r.failed for r in reports if r.failed] == []
    assert sum(r.trash_purged for r in reports) == 2 * TRASHED_PER_TENANT
    assert sum(r.expired_uploads for r in reports) == 2 * EXPIRED_UPLOADS_PER_TENANT
    assert sum(r.retention_trashed for r in reports) == 2 * OVER_RETENTION_PER_TENANT
    assert await owner_connection.fetchval("SELECT count(*) FROM upload_sessions") == 0
    for tenant in tenants:
        actions = await owner_connection.fetch(
            "SELECT action, target_id FROM audit_events WHERE organization_id = $1 AND actor_type = 'system'",
            tenant.organization_id,
        )
        purged = [r["target_id"] for r in actions if r["action"] == "backup.purged"]
        retained = [r["target_id"] for r in actions if r["action"] == "backup.trashed"]
        expired = [r["target_id"] for r in actions if r["action"] == "upload.expired"]
        assert len(purged) == len(set(purged)) == TRASHED_PER_TENANT
        assert len(retained) == len(set(retained)) == OVER_RETENTION_PER_TENANT
        assert len(expired) == len(set(expired)) == EXPIRED_UPLOADS_PER_TENANT
        # Every byte freed once: usage equals what the remaining backups hold.
        used, held = await owner_connection.fetchrow(
            f"SELECT {PROJECT_USED_BYTES}, (SELECT coalesce(sum(encrypted_payload_size), 0) FROM backups b "
            "WHERE b.project_id = p.id) FROM projects p WHERE p.id = $1",
            tenant.project_id,
        )
        assert used == held == 60
        chain = await owner_connection.fetch(
            "SELECT seq FROM audit_events WHERE organization_id = $1 ORDER BY seq", tenant.organization_id
        )
        assert [r["seq"] for r in chain] == list(range(1, len(chain) + 1))
    # Left: each tenant's retention container, one chunk a backup (the newest and, in the trash, the rest); the
    # purged backups' and the expired uploads' objects are gone from the bucket.
    assert await owner_connection.fetchval("SELECT count(*) FROM backup_chunks") == 2 * (OVER_RETENTION_PER_TENANT + 1)
    await assert_bucket_holds_exactly_the_chunks(settings, owner_connection)
    # A later pass finds nothing left to do.
    last = await maintenance_pass(settings)
    removed = (last.trash_purged, last.expired_uploads, last.retention_trashed, last.objects_deleted)
    assert (removed, last.failed) == ((0, 0, 0, 0), [])


async def test_a_pass_while_the_database_is_down_logs_one_line_per_task_without_a_traceback(
    base_settings_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    down = "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"
    settings = lifecycle_settings(base_settings_env, down)
    engine = create_app_engine(settings, down)
    try:
        with caplog.at_level(logging.WARNING, logger="zkeb.backups.maintenance"):
            report = await MaintenanceRunner(engine, settings).run_once()
    finally:
        await engine.dispose()
    assert report.failed == ["uploads", "trash", "retention"]
    records = [r for r in caplog.records if r.name == "zkeb.backups.maintenance"]
    assert [r.getMessage().split(":")[0] for r in records] == [
        f"maintenance task {name} skipped" for name in report.failed
    ]
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in records)


async def test_the_server_runs_no_maintenance_when_the_interval_is_zero(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    settings = lifecycle_settings(base_settings_env, database_url)
    async with app_client(settings) as client:
        runner = client.app.state["backups_maintenance"]
        assert isinstance(runner, MaintenanceRunner)
        assert runner.interval == 0
        assert runner._task is None
        response = await client.get("/api/health/live")
        assert response.status_code == 200


async def test_maintenance_run_once_from_the_command_line(
    base_settings_env: dict[str, str],
    database_url: str,
    payload_store_env: dict[str, str],
    owner_connection: asyncpg.Connection,
) -> None:
    settings = lifecycle_settings(base_settings_env, database_url, **payload_store_env)
    async with app_client(settings) as client:
        tenant = await make_tenant(client, settings)
        response = await upload(client, tenant.project_key, sign_envelope(tenant, os.urandom(100)))
        backup_id = response.json()["id"]
        deleted = await client.delete(f"/api/v1/backups/{backup_id}", headers=auth(tenant.project_key))
        assert deleted.status_code == 204
    await trash_backups(owner_connection, [backup_id], days_ago=settings.trash_retention_days + 1)
    env = {**os.environ, **base_settings_env, "DATABASE_URL": database_url, **payload_store_env}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "zkeb", "maintenance", "run", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sum(line["trash_purged"] for line in lines) == 1
    assert sum(line["objects_deleted"] for line in lines) == (1 if payload_store_env else 0)
    assert await owner_connection.fetchval("SELECT count(*) FROM backups") == 0
    await assert_bucket_holds_exactly_the_chunks(settings, owner_connection)
