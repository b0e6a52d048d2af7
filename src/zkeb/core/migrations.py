"""Schema migrations (Alembic through advanced-alchemy) and the embedded PostgreSQL default."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from advanced_alchemy.alembic.commands import AlembicCommands
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection

from zkeb.core.database import (
    RUNTIME_ROLE,
    VERSION_TABLE,
    create_owner_engine,
    migrations_dir,
    provision_runtime_role,
    sqlalchemy_config,
)
from zkeb.settings import Settings, normalize_database_url

__all__ = (
    "alembic_commands",
    "current_revision",
    "database_revision",
    "head_revision",
    "known_revisions",
    "provision_runtime_login",
    "run_alembic",
    "start_embedded_postgres",
)

logger = logging.getLogger("zkeb.migrations")


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL in `data_dir/pgdata` and return its asyncpg URL.

    pgserver keeps one server per data directory and stops it when the last process using it exits.
    """
    try:
        import pgserver  # noqa: PLC0415 - only needed without DATABASE_URL
    except ImportError:
        msg = "DATABASE_URL is not set and the embedded PostgreSQL is not installed: pip install 'zkeb[embedded]'"
        raise RuntimeError(msg) from None

    pgdata = data_dir / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if not logger.isEnabledFor(logging.DEBUG):
        # pgserver logs initdb's and pg_ctl's whole output at INFO (~90 lines, including initdb's "you can now start
        # the database server using pg_ctl ..."), which reads like instructions; LOG_LEVEL=DEBUG shows it.
        logging.getLogger("pgserver").setLevel(logging.WARNING)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    return normalize_database_url(server.get_uri())


def alembic_commands(settings: Settings, url: str) -> AlembicCommands:
    """advanced-alchemy's Alembic commands, run as the schema owner."""
    return AlembicCommands(sqlalchemy_config(create_owner_engine(settings, url)))


def run_alembic(settings: Settings, url: str, command: str, *args: Any) -> None:
    """Run an Alembic command in a fresh thread (Alembic's env runs its own event loop).

    After an upgrade, the runtime role is (re)provisioned so the app can log in as it. An upgrade of a database
    that a later release already migrated (its revision is unknown here, e.g. after a rollback) changes nothing:
    migrations are expand-only, so this release runs on the newer schema (a warning says so).
    """
    errors: list[BaseException] = []

    def target() -> None:
        try:
            if command == "upgrade" and _ahead_of_this_release(asyncio.run(database_revision(settings, url))):
                return
            getattr(alembic_commands(settings, url), command)(*args)
            if command == "upgrade":
                asyncio.run(provision_runtime_login(settings, url))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"alembic-{command}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


async def provision_runtime_login(settings: Settings, url: str) -> None:
    """Connect as the owner and set the runtime role's login password (no-op before the first migration)."""
    engine = create_owner_engine(settings, url)
    try:
        async with engine.connect() as connection:
            exists = (
                await connection.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": RUNTIME_ROLE})
            ).scalar_one_or_none()
            if exists:
                await provision_runtime_role(connection, url)
    finally:
        await engine.dispose()


def head_revision() -> str | None:
    """The newest revision in `db/migrations` (read from disk, no database needed)."""
    script = ScriptDirectory(str(migrations_dir()))
    return script.get_current_head()


def known_revisions() -> frozenset[str]:
    """Every revision in `db/migrations`: a database at any other one was migrated by a later release."""
    script = ScriptDirectory(str(migrations_dir()))
    return frozenset(revision.revision for revision in script.walk_revisions())


def _ahead_of_this_release(revision: str | None) -> bool:
    if revision is None or revision in known_revisions():
        return False
    logger.warning(
        "the database schema is at revision %s, which this release does not know (its head is %s): a later release "
        "migrated it; nothing to upgrade (migrations are expand-only, so this release runs on it)",
        revision,
        head_revision(),
    )
    return True


async def database_revision(settings: Settings, url: str) -> str | None:
    """The revision the database at `url` is at (None before the first migration), read as the schema owner."""
    engine = create_owner_engine(settings, url)
    try:
        async with engine.connect() as connection:
            return await current_revision(connection)
    finally:
        await engine.dispose()


async def current_revision(connection: AsyncConnection) -> str | None:
    """The revision the connected database is at, or None before the first migration."""
    try:
        async with connection.begin_nested():
            result = await connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))  # noqa: S608
            return result.scalar_one_or_none()
    except ProgrammingError:
        return None
