"""Schema migrations (Alembic through advanced-alchemy) and the embedded PostgreSQL default."""

from __future__ import annotations

import asyncio
import functools
import logging
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Any

from advanced_alchemy.alembic.commands import AlembicCommands
from advanced_alchemy.base import metadata_registry
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
    "EmbeddedPostgresError",
    "SchemaMismatchError",
    "alembic_commands",
    "current_revision",
    "database_revision",
    "head_revision",
    "known_revisions",
    "provision_runtime_login",
    "run_alembic",
    "schema_lacks",
    "start_embedded_postgres",
)

logger = logging.getLogger("zkeb.migrations")


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL in `data_dir/pgdata` and return its asyncpg URL.

    pgserver keeps one server per data directory and stops it when the last process using it exits.
    """
    try:
        with warnings.catch_warnings():
            # pgserver puts its lock file in the user's runtime directory, which platformdirs replaces with
            # /tmp/runtime-<uid> (and warns, on every command) where XDG_RUNTIME_DIR is unset: containers, CI, sudo.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set", category=UserWarning)
            import pgserver  # noqa: PLC0415 - only needed without DATABASE_URL
    except ImportError:
        msg = "DATABASE_URL is not set and the embedded PostgreSQL is not installed: pip install 'zkeb[embedded]'"
        raise EmbeddedPostgresError(msg) from None

    pgdata = data_dir / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    pgserver_logger = logging.getLogger("pgserver")
    failures = _PgserverFailures(keep=logger.isEnabledFor(logging.DEBUG))
    if not logger.isEnabledFor(logging.DEBUG):
        # pgserver logs initdb's and pg_ctl's whole output at INFO (~90 lines, including initdb's "you can now start
        # the database server using pg_ctl ..."), which reads like instructions; LOG_LEVEL=DEBUG shows it.
        pgserver_logger.setLevel(logging.WARNING)
    pgserver_logger.addFilter(failures)  # every pgserver module logs as "pgserver" itself
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        program = Path(str(exc.cmd[0])).name if isinstance(exc.cmd, list | tuple) and exc.cmd else "PostgreSQL"
        how = f"timed out after {exc.timeout:g} s" if isinstance(exc, subprocess.TimeoutExpired) else "failed"
        why = f": {failures.reason}" if failures.reason else ""
        msg = f"the embedded PostgreSQL could not start in {pgdata} ({program} {how}){why}"
        raise EmbeddedPostgresError(msg) from None
    finally:
        pgserver_logger.removeFilter(failures)
    return normalize_database_url(server.get_uri())


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL is not installed or could not start; the message says why, in one line."""


class _PgserverFailures(logging.Filter):
    """Keeps why a pgserver command failed (the first line of its stderr: initdb's and pg_ctl's own error line) and,
    unless `keep`, drops the failure's ~20 logged lines, which the raised error sums up; warnings pass."""

    def __init__(self, *, keep: bool) -> None:
        super().__init__()
        self.keep = keep
        self.reason = ""

    def filter(self, record: logging.LogRecord) -> bool:
        """Take the first `...: error: ...` or `FATAL:` line of a failure's output; pass the record on or not."""
        if record.levelno < logging.ERROR:
            return True
        for line in record.getMessage().splitlines():
            if not self.reason and (": error: " in line or "FATAL:" in line):
                self.reason = line.strip()
        return self.keep


def alembic_commands(settings: Settings, url: str) -> AlembicCommands:
    """advanced-alchemy's Alembic commands, run as the schema owner."""
    return AlembicCommands(sqlalchemy_config(create_owner_engine(settings, url)))


class SchemaMismatchError(Exception):
    """The database is at a revision this release does not know, and lacks tables or columns it needs."""


def run_alembic(settings: Settings, url: str, command: str, *args: Any) -> None:
    """Run an Alembic command in a fresh thread (Alembic's env runs its own event loop).

    After an upgrade, the runtime role is (re)provisioned so the app can log in as it. An upgrade of a database
    that a later release already migrated (its revision is unknown here, e.g. after a rollback, and it has every
    table and column this release's models declare) changes nothing: migrations are expand-only, so this release
    runs on the newer schema (a warning says so).

    Raises:
        SchemaMismatchError: an unknown revision on a database that lacks this release's tables or columns (another
            application's database, or a branch never merged).
    """
    errors: list[BaseException] = []

    def target() -> None:
        try:
            if command == "upgrade" and asyncio.run(_ahead_of_this_release(settings, url)):
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


@functools.cache
def _scripts() -> ScriptDirectory:
    # Read from disk once per process (about 7 ms): every app's runtime asks for the head and the known revisions.
    return ScriptDirectory(str(migrations_dir()))


def head_revision() -> str | None:
    """The newest revision in `db/migrations` (read from disk, no database needed)."""
    return _scripts().get_current_head()


def known_revisions() -> frozenset[str]:
    """Every revision in `db/migrations`: a database at any other one was migrated by a later release."""
    return frozenset(revision.revision for revision in _scripts().walk_revisions())


async def _ahead_of_this_release(settings: Settings, url: str) -> bool:
    engine = create_owner_engine(settings, url)
    try:
        async with engine.connect() as connection:
            revision = await current_revision(connection)
            if revision is None or revision in known_revisions():
                return False
            lacking = await schema_lacks(connection)
    finally:
        await engine.dispose()
    if lacking:
        msg = (
            f"the database is at revision {revision}, which this release does not know, and lacks "
            f"{', '.join(lacking[:5])}{' ...' if len(lacking) > 5 else ''} that it needs: is DATABASE_URL the right "
            "database?"
        )
        raise SchemaMismatchError(msg)
    logger.warning(
        "the database schema is at revision %s, which this release does not know (its head is %s): a later release "
        "migrated it; nothing to upgrade (migrations are expand-only, so this release runs on it)",
        revision,
        head_revision(),
    )
    return True


_COLUMNS_PRESENT = text(
    "SELECT c.relname AS table_name, a.attname AS column_name FROM pg_attribute a"
    " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped"
)


async def schema_lacks(connection: AsyncConnection) -> list[str]:
    """`table.column` of this release's models that the database lacks (none when its schema covers them).

    Read from the catalog (any role may), so the runtime role can ask too.
    """
    import zkeb.db.models  # noqa: F401, PLC0415 - registers every model's table in the metadata

    present = {(row.table_name, row.column_name) for row in await connection.execute(_COLUMNS_PRESENT)}
    tables = metadata_registry.get(None).sorted_tables
    return sorted(f"{t.name}.{c.name}" for t in tables for c in t.columns if (t.name, c.name) not in present)


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
