"""Migrations: up, down and up again on a real database; models and migrations agree; lock_timeout is set."""

from __future__ import annotations

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

from support import make_settings


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
