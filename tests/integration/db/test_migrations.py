"""Migrations: up, down and up again on a real database; models and migrations agree; lock_timeout is set."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest
from advanced_alchemy.base import metadata_registry
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

import zkeb.db.models
from zkeb.core.migrations import head_revision, run_alembic
from zkeb.settings import Settings

from support import embedded_cluster, make_settings


async def _tables(url: str) -> set[str]:
    connection = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await connection.close()
    return {r["tablename"] for r in rows}


async def test_upgrade_downgrade_upgrade_round_trip(empty_database_url: str, base_settings_env: dict[str, str]) -> None:
    settings = make_settings(base_settings_env, DATABASE_URL=empty_database_url)
    run_alembic(settings, empty_database_url, "upgrade", "head")
    tables = await _tables(empty_database_url)
    assert set(zkeb.db.models.TENANT_TABLES) <= tables
    run_alembic(settings, empty_database_url, "downgrade", "base")
    assert await _tables(empty_database_url) == {"alembic_version"}
    run_alembic(settings, empty_database_url, "upgrade", "head")
    assert set(zkeb.db.models.TENANT_TABLES) <= await _tables(empty_database_url)


async def _wait_until_waiting_for_a_lock(dsn: str, database: str, running: asyncio.Task[None]) -> None:
    """Until a session of `database` waits for a lock (read on a connection of its own: inside a transaction,
    pg_stat_activity keeps the snapshot it first took)."""
    watcher = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(60):
            while not await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'", database
            ):
                assert not running.done(), running.exception()
                await asyncio.sleep(0.05)
    finally:
        await watcher.close()


async def test_a_database_migrates_while_another_of_its_cluster_creates_the_runtime_role(
    base_settings_env: dict[str, str],
) -> None:
    # Roles are cluster-wide. Two databases of one cluster migrating at once (two deployments, or the test workers on
    # a fresh server): the second's CREATE ROLE waits for the first's uncommitted one, then failed on its unique name.
    # A cluster of its own: the shared one has had the role since its first migration. (The owner's GRANT of the
    # role races alike on PostgreSQL 15, and the migration tolerates it too; pgserver's PostgreSQL 16 makes a second
    # GRANT wait and then find the membership, so it cannot be shown here.)
    with embedded_cluster() as cluster:
        dsn = cluster.replace("+asyncpg", "")
        first = await asyncpg.connect(dsn)
        try:
            await first.execute('CREATE DATABASE "second"')
            provisioning = first.transaction()
            await provisioning.start()
            # The first database's migration, not yet committed.
            await first.execute("CREATE ROLE zkeb_app NOLOGIN; GRANT zkeb_app TO CURRENT_USER")
            second_url = cluster.replace("/postgres?", "/second?", 1)
            migrating = asyncio.create_task(
                asyncio.to_thread(
                    run_alembic,
                    make_settings(base_settings_env, DATABASE_URL=second_url),
                    second_url,
                    "upgrade",
                    "head",
                )
            )
            await _wait_until_waiting_for_a_lock(dsn, "second", migrating)
            await provisioning.commit()
            await migrating
        finally:
            await first.close()
        assert set(zkeb.db.models.TENANT_TABLES) <= await _tables(second_url)


async def test_models_match_the_migrated_schema(database_url: str) -> None:
    engine = create_async_engine(database_url)
    metadata = metadata_registry.get(None)
    try:
        async with engine.connect() as connection:
            diff = await connection.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync, opts={"compare_type": False}), metadata)
            )
    finally:
        await engine.dispose()
    assert diff == []


def test_every_migration_sets_lock_timeout(project_root: Path) -> None:
    versions = sorted((project_root / "db" / "migrations" / "versions").glob("*.py"))
    assert versions
    for path in versions:
        source = path.read_text()
        assert source.count("SET LOCAL lock_timeout") >= 2, (
            f"{path.name} must set lock_timeout in upgrade and downgrade"
        )


def test_head_revision_is_read_from_disk(project_root: Path) -> None:
    versions = project_root / "db" / "migrations" / "versions"
    declared = {
        line.split("=", 1)[1].strip().strip("'\"")
        for p in versions.glob("*.py")
        for line in p.read_text().splitlines()
        if line.startswith("revision = ")
    }
    assert head_revision() in declared


@pytest.mark.parametrize("table", zkeb.db.models.TENANT_TABLES)
async def test_rls_is_enabled_and_forced(owner_connection: asyncpg.Connection, table: str) -> None:
    row = await owner_connection.fetchrow(
        "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = $1", table
    )
    assert row is not None
    assert row["relrowsecurity"]
    assert row["relforcerowsecurity"]


_ = Settings
