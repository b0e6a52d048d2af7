"""Database engines: the app's pooled engine (runtime role) and the owner's engine for migrations, and a raw
asyncpg connection from the app's pool (`pooled_connection`) for the paths that skip SQLAlchemy's statement layer.

The app's pooled connections log in as the runtime role, which owns no table and has no BYPASSRLS, so
row-level security holds even when `DATABASE_URL` names a superuser. Logging in as that role (rather
than `SET ROLE` on an owner's connection) matters: PostgreSQL checks `SET ROLE`/`RESET ROLE` against
the *session* user, so a superuser session could always switch back, e.g. through an injected
statement. The role's password is derived from the owner's credentials (or `ZKEB_DB_RUNTIME_PASSWORD`)
and set by the owner at migration and at start-up, so every replica computes the same one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from advanced_alchemy.extensions.litestar import AlembicAsyncConfig, AsyncSessionConfig, SQLAlchemyAsyncConfig
from litestar.exceptions import HTTPException
from sqlalchemy import pool, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from zkeb.db.models import TENANT_TABLES
from zkeb.settings import Settings

__all__ = (
    "POOL_TIMEOUT_SECONDS",
    "RUNTIME_ROLE",
    "RuntimeRoleError",
    "check_runtime_role",
    "create_app_engine",
    "create_owner_engine",
    "migrations_dir",
    "pooled_connection",
    "provision_runtime_role",
    "runtime_role_url",
    "sqlalchemy_config",
)

logger = logging.getLogger("zkeb.database")

RUNTIME_ROLE = "zkeb_app"
#: How long a request waits for a free pooled connection before it is answered 503.
POOL_TIMEOUT_SECONDS = 5.0
VERSION_TABLE = "alembic_version"


class RuntimeRoleError(RuntimeError):
    """The runtime role could bypass tenant isolation; the service refuses to serve."""


def migrations_dir() -> Path:
    """The Alembic script directory: bundled in the wheel, else the repository's `db/migrations`."""
    bundled = Path(__file__).resolve().parent.parent / "migrations"
    if (bundled / "env.py").exists():
        return bundled
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "db" / "migrations"
        if (candidate / "env.py").exists():
            return candidate
    return Path.cwd() / "db" / "migrations"


def _connect_args(settings: Settings) -> dict[str, Any]:
    return {
        "server_settings": {"application_name": "zkeb"},
        "timeout": 5,
        "command_timeout": settings.request_timeout_ms / 1000,
    }


def _runtime_password(owner_url: str) -> str:
    configured = os.environ.get("ZKEB_DB_RUNTIME_PASSWORD")
    if configured:
        return configured
    owner = make_url(owner_url)
    material = f"{owner.username}:{owner.password or ''}@{owner.host or owner.query.get('host')}:{owner.port}"
    digest = hmac.new(b"zkeb-runtime-role-v1", material.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def runtime_role_url(owner_url: str) -> str:
    """The owner's URL with the runtime role's credentials: what the app's pool connects with."""
    url = make_url(owner_url).set(username=RUNTIME_ROLE, password=_runtime_password(owner_url))
    return url.render_as_string(hide_password=False)


async def provision_runtime_role(connection: AsyncConnection, owner_url: str) -> None:
    """As the owner: let the runtime role log in with its derived password (idempotent).

    Roles are cluster-wide, so processes migrating different databases of one server may alter the
    role at once; PostgreSQL then fails one with "tuple concurrently updated", which a retry settles.
    """
    password = _runtime_password(owner_url).replace("'", "''")
    statement = text(f"ALTER ROLE {RUNTIME_ROLE} WITH LOGIN PASSWORD '{password}'")
    for attempt in range(5):
        try:
            await connection.execute(statement)
            await connection.commit()
        except DBAPIError as exc:
            await connection.rollback()
            if "concurrently updated" not in str(exc.orig) or attempt == 4:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
        else:
            return


def create_app_engine(settings: Settings, url: str) -> AsyncEngine:
    """The request-serving engine: `DB_POOL_SIZE` connections logged in as the runtime role.

    `url` is the owner's URL (`DATABASE_URL`); the engine swaps in the runtime role's credentials.

    The pool is fixed: no overflow. With overflow, load that hovers around the pool size keeps opening connections
    and closing them again on check-in, and each new connection costs a SCRAM login on both sides; measured with
    16 concurrent listing requests on a pool of 10, ~1900 logins in 8000 requests and ~70 % more CPU per request.
    A request that finds every connection busy waits up to `POOL_TIMEOUT_SECONDS`, then gets a 503.
    """
    return create_async_engine(
        runtime_role_url(url),
        pool_size=settings.db_pool_size,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT_SECONDS,
        pool_pre_ping=False,
        pool_recycle=1800,
        # A failed statement's exception text would otherwise carry its parameters (ciphertext, nonces, signatures,
        # wrapped keys) into the logged traceback.
        hide_parameters=True,
        connect_args=_connect_args(settings),
    )


def create_owner_engine(settings: Settings, url: str) -> AsyncEngine:
    """An unpooled engine as the `DATABASE_URL` user (the schema owner) for migrations and the CLI."""
    return create_async_engine(url, poolclass=pool.NullPool, hide_parameters=True, connect_args=_connect_args(settings))


def sqlalchemy_config(engine: AsyncEngine) -> SQLAlchemyAsyncConfig:
    """advanced-alchemy's configuration around `engine`, with Alembic pointed at `db/migrations`."""
    script_location = migrations_dir()
    return SQLAlchemyAsyncConfig(
        engine_instance=engine,
        session_config=AsyncSessionConfig(expire_on_commit=False),
        before_send_handler="autocommit",
        # Our own handlers render repository errors as problem+json (core/errors.py).
        set_default_exception_handler=False,
        alembic_config=AlembicAsyncConfig(
            script_location=str(script_location),
            script_config=str(script_location / "alembic.ini"),
            version_table_name=VERSION_TABLE,
        ),
    )


async def check_runtime_role(connection: AsyncConnection) -> None:
    """Refuse to serve unless the connection's role cannot escape row-level security.

    Raises:
        RuntimeRoleError: the role is a superuser, has BYPASSRLS, owns a table, or a tenant table lacks
            enabled and forced row-level security.
    """
    role = (
        await connection.execute(
            text("SELECT current_user, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
        )
    ).one()
    problems: list[str] = []
    if role.current_user != RUNTIME_ROLE:
        problems.append(f"connections run as {role.current_user!r}, not {RUNTIME_ROLE!r}")
    if role.rolsuper:
        problems.append("the runtime role is a superuser")
    if role.rolbypassrls:
        problems.append("the runtime role has BYPASSRLS")
    owned = (
        await connection.execute(
            text(
                "SELECT count(*) FROM pg_class WHERE relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)"
            )
        )
    ).scalar_one()
    if owned:
        problems.append(f"the runtime role owns {owned} relation(s)")
    rows = (
        await connection.execute(
            text(
                "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
                "WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace AND relname = ANY(:tables)"
            ),
            {"tables": list(TENANT_TABLES)},
        )
    ).all()
    found = {r.relname: (r.relrowsecurity, r.relforcerowsecurity) for r in rows}
    for table in TENANT_TABLES:
        enabled, forced = found.get(table, (False, False))
        if not (enabled and forced):
            problems.append(f"row-level security is not enabled and forced on {table}")
    if problems:
        raise RuntimeRoleError("refusing to serve: " + "; ".join(problems))


@contextlib.asynccontextmanager
async def pooled_connection(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A raw asyncpg connection from the app's pool (the runtime role), outside any ORM session.

    On an error the connection is invalidated rather than returned, so a transaction broken mid-way never reaches
    another request; a refusal (an HTTP error) or a statement PostgreSQL refused, raised once the transaction has
    rolled back, leaves a clean connection that goes back to the pool.
    """
    async with engine.connect() as connection:
        fairy = await connection.get_raw_connection()
        driver: asyncpg.Connection = fairy.driver_connection
        try:
            yield driver
        except BaseException as exc:
            clean = isinstance(exc, HTTPException | asyncpg.PostgresError) and not driver.is_in_transaction()
            if not clean or driver.is_closed():
                await connection.invalidate()
            raise
