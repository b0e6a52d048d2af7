"""Alembic environment for ZKEB.

Migrations run as the schema owner (the `DATABASE_URL` user), one at a time (a session advisory lock
serializes concurrent `zkeb db upgrade` runs and replicas migrating at start), each in its own
transaction, with a `lock_timeout` so a migration waiting on a busy table fails fast instead of
stalling live traffic behind its lock.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from advanced_alchemy.base import metadata_registry
from alembic import context
from sqlalchemy import pool, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_engine_from_config

import zkeb.db.models  # noqa: F401 - registers the models on the metadata

if TYPE_CHECKING:
    from advanced_alchemy.alembic.commands import AlembicCommandConfig
    from sqlalchemy.engine import Connection

config: AlembicCommandConfig = context.config  # type: ignore[assignment]
MIGRATION_LOCK_ID = 0x7A6B6562  # "zkeb"
LOCK_TIMEOUT = "5s"


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=metadata_registry.get(config.bind_key),
        compare_type=True,
        version_table=config.version_table_name,
        transaction_per_migration=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    """Emit SQL for the migrations without a database connection."""
    _configure(url=config.db_url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    """Run the migrations on `connection` under the migration lock."""
    connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
    connection.execute(text(f"SET lock_timeout = '{LOCK_TIMEOUT}'"))
    connection.commit()
    try:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
        connection.commit()


async def run_migrations_online() -> None:
    """Run the migrations with ZKEB's owner engine (or one built from the ini file)."""
    connectable = cast(
        "AsyncEngine",
        getattr(config, "engine", None)
        or async_engine_from_config(
            {"sqlalchemy.url": config.get_main_option("sqlalchemy.url")}, prefix="sqlalchemy.", poolclass=pool.NullPool
        ),
    )
    async with connectable.connect() as connection:
        await connection.run_sync(do_run_migrations)


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
