"""The `zkeb` command line: serve, database migrations and administration."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast
from uuid import UUID

import click

from zkeb.settings import LISTEN_ADDRESS_RULE, Settings, SettingsError

__all__ = ("main",)

F = TypeVar("F", bound=Callable[..., Any])


def _load_settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


def _warn_dev_secrets(settings: Settings) -> None:
    if settings.secrets.generated_dev_secrets:
        click.secho(
            f"WARNING: using DEVELOPMENT secrets generated in {settings.data_dir / 'dev-secrets.json'}.\n"
            "         Never use them in production: set ZKEB_ENV=production and real secrets.",
            fg="yellow",
            bold=True,
            err=True,
        )


def _database_url(settings: Settings) -> str:
    """The configured database, or the embedded one (started now, kept for this process's lifetime)."""
    if settings.database_url:
        return settings.database_url
    from zkeb.core.migrations import start_embedded_postgres  # noqa: PLC0415 - slow import, only when needed

    click.echo(f"Starting embedded PostgreSQL in {settings.data_dir / 'pgdata'} ...", err=True)
    return start_embedded_postgres(settings.data_dir)


def _friendly_errors(func: F) -> F:
    """One line instead of a traceback when the database cannot be reached, refuses the connection or cannot start."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from advanced_alchemy.exceptions import AdvancedAlchemyError  # noqa: PLC0415 - slow imports, only when used
        from alembic.util.exc import CommandError  # noqa: PLC0415
        from asyncpg import PostgresError  # noqa: PLC0415
        from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

        # Nothing from zkeb.core here: `serve` must set up prometheus_client's multiprocess mode before any zkeb.core
        # module imports it.
        try:
            return func(*args, **kwargs)
        except CommandError as exc:  # e.g. an unknown revision, nothing to downgrade
            raise click.ClickException(f"migration refused: {exc}") from None
        except TimeoutError:  # asyncpg's connect timeout: no text of its own
            raise click.ClickException("cannot reach the database: it did not answer in time") from None
        except OSError as exc:
            if exc.filename is not None:  # a file, not the network: say which
                raise click.ClickException(f"{exc.strerror or exc}: {exc.filename}") from None
            raise click.ClickException(f"cannot reach the database: {exc.strerror or exc}") from None
        except (SQLAlchemyError, AdvancedAlchemyError, PostgresError) as exc:
            raise click.ClickException(_explain_database_error(exc)) from None
        except Exception as exc:
            from zkeb.core.migrations import EmbeddedPostgresError, SchemaMismatchError  # noqa: PLC0415 - see above

            if isinstance(exc, SchemaMismatchError | EmbeddedPostgresError):
                raise click.ClickException(str(exc)) from None
            raise

    return wrapper  # type: ignore[return-value]


def _explain_database_error(exc: BaseException) -> str:
    """One line naming what went wrong, from the driver's error at the root of the chain.

    PostgreSQL's message line names objects (a database, a role, a relation), never a password or a row's values.
    """
    chain = _error_chain(exc)
    names = {type(error).__name__ for error in chain}
    root = chain[-1]
    message = str(root).strip().splitlines()[0] if str(root).strip() else ""
    if {"InvalidPasswordError", "InvalidAuthorizationSpecificationError"} & names and "zkeb_app" in message:
        return "cannot log in as the runtime role zkeb_app: run `zkeb db upgrade` with the owner's DATABASE_URL"
    if {"InvalidPasswordError", "InvalidAuthorizationSpecificationError", "InvalidCatalogNameError"} & names:
        return f"the database refused: {message}"
    if {"ConnectionRefusedError", "CannotConnectNowError", "ConnectionDoesNotExistError"} & names:
        return "cannot reach the database"
    name = type(root).__name__
    return f"database error ({name}): {message}" if message else f"database error ({name})"


_NOT_MIGRATED = "the database schema is not migrated: run `zkeb db upgrade` first"


def _require_migrated(settings: Settings, url: str) -> None:
    """Refuse in one line a command whose work would fail on every table of a database nobody migrated yet."""
    from zkeb.core.migrations import database_revision  # noqa: PLC0415

    if asyncio.run(database_revision(settings, url)) is None:
        raise click.ClickException(_NOT_MIGRATED)


def _admin_errors(func: F) -> F:
    """Turn refusals and database failures of an admin command into one clear line on stderr (exit status 1)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from advanced_alchemy.exceptions import AdvancedAlchemyError  # noqa: PLC0415
        from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

        from zkeb.core.errors import ProblemError  # noqa: PLC0415

        try:
            return func(*args, **kwargs)
        except ProblemError as exc:
            raise click.ClickException(str(exc.detail)) from None
        except (SQLAlchemyError, AdvancedAlchemyError) as exc:
            if _is_unmigrated(exc):  # an admin command on a database nobody migrated yet
                raise click.ClickException(_NOT_MIGRATED) from None
            raise

    return _friendly_errors(cast("F", wrapper))


@click.group()
@click.version_option(package_name="zkeb")
def main() -> None:
    """ZKEB: zero-knowledge encrypted backup server."""


def _listen_address(_context: click.Context, _parameter: click.Parameter, value: str | None) -> str | None:
    """`--host` as an IP address (granian binds an address, it does not resolve a name)."""
    if value is None:
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise click.BadParameter(f"{LISTEN_ADDRESS_RULE} (got {value!r})") from None
    return value


@main.command()
@click.option("--host", default=None, callback=_listen_address, help="Interface to listen on (HOST, default 0.0.0.0).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (PORT, default 3000).")
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Worker processes (WEB_CONCURRENCY, default 1)."
)
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Run the API under granian; SIGTERM drains in-flight requests before exiting."""
    from zkeb.prometheus_multiprocess import prepare_multiprocess_dir  # noqa: PLC0415

    settings = _load_settings()
    worker_count = workers or settings.web_concurrency
    # Before anything imports prometheus_client (any zkeb.core module does): forked workers inherit its value store.
    prepare_multiprocess_dir(needed=worker_count > 1 or settings.metrics_port is not None)
    from zkeb.core.logging import configure_logging, log_format  # noqa: PLC0415
    from zkeb.core.metrics import serve_metrics_for_workers  # noqa: PLC0415
    from zkeb.server import production_server  # noqa: PLC0415

    configure_logging(settings.log_level, log_format(settings.env))
    _preflight(settings)
    _check_listen_address(host or settings.host, port or settings.port)
    if settings.metrics_port is not None:
        if settings.metrics_port == (port or settings.port):
            raise click.ClickException(f"METRICS_PORT must differ from the API's port ({settings.metrics_port})")
        _check_listen_address(host or settings.host, settings.metrics_port, what="METRICS_PORT: ")
    _warn_dev_secrets(settings)
    url = _served_database(settings)
    # Workers inherit the resolved database and do not migrate again.
    os.environ["DATABASE_URL"] = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    os.environ["ZKEB_AUTO_MIGRATE"] = "false"
    serve_metrics_for_workers(settings, host or settings.host)
    server = production_server(
        "zkeb.app:create_app", settings, host=host or settings.host, port=port or settings.port, workers=worker_count
    )
    click.echo(f"ZKEB listening on http://{host or settings.host}:{port or settings.port}", err=True)
    server.serve()


@_friendly_errors
def _served_database(settings: Settings) -> str:
    """The database `serve` uses, migrated when auto-migration is on (database failures as one line)."""
    from zkeb.core.migrations import run_alembic  # noqa: PLC0415

    url = _database_url(settings)
    if settings.auto_migrate:
        run_alembic(settings, url, "upgrade", "head")
    else:
        asyncio.run(_check_owner_login(settings, url))
    return url


#: SQLSTATEs of a server that answers but will not let the owner in: class 28 (a wrong password, an unknown role)
#: and 3D000 (an unknown database). Fixing them takes the operator, so every worker would crash on them.
_REFUSED_LOGIN_PREFIXES = ("28", "3D000")


async def _check_owner_login(settings: Settings, url: str) -> None:
    """Log in once as the owner, so a refused login is one line here instead of each worker's crash at start.

    A database that does not answer (down, unresolvable, still starting) is left to the workers: they start and
    readiness answers 503 until it does.
    """
    from asyncpg import PostgresError  # noqa: PLC0415

    from zkeb.core.database import create_owner_engine  # noqa: PLC0415

    engine = create_owner_engine(settings, url)
    try:
        async with engine.connect():
            pass
    except PostgresError as exc:
        if str(getattr(exc, "sqlstate", "")).startswith(_REFUSED_LOGIN_PREFIXES):
            raise
    except (OSError, TimeoutError):
        pass
    finally:
        await engine.dispose()


def _check_listen_address(host: str, port: int, *, what: str = "") -> None:
    """Refuse in one line, starting with `what`, when `host:port` cannot be bound (granian, or the metrics listener,
    would report it in a long traceback)."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as granian: a closing socket's port is free
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise click.ClickException(f"{what}port {port} is already in use on {host}") from None
            raise click.ClickException(f"{what}cannot listen on {host} port {port}: {exc.strerror or exc}") from None


def _preflight(settings: Settings) -> None:
    """Check here, once, the configuration each worker reads at start: a bad value would crash-loop the workers."""
    from zkeb.core.telemetry import TracingConfig  # noqa: PLC0415
    from zkeb.domain.backups.context import build_keyring  # noqa: PLC0415

    try:
        build_keyring(settings)
        TracingConfig.from_env()
    except SettingsError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    if settings.payload_store.kind == "s3":
        _check_payload_store(settings)


def _check_payload_store(settings: Settings, *, timeout: float = 20.0) -> None:
    """Refuse to start, in one line, when the S3 bucket cannot be used (before any worker starts)."""
    from zkeb.domain.backups.store.s3 import PayloadStoreUnavailableError, S3ChunkStore  # noqa: PLC0415

    async def check() -> None:
        async with asyncio.timeout(timeout), S3ChunkStore(settings.payload_store) as store:
            await store.check()

    try:
        asyncio.run(check())
    except PayloadStoreUnavailableError as exc:
        raise click.ClickException(f"payload store: {exc.detail}") from None
    except TimeoutError:
        raise click.ClickException(f"payload store: the S3 store did not answer within {timeout:g} s") from None


@main.group()
def db() -> None:
    """Database schema migrations (Alembic)."""


@db.command()
@click.argument("revision", default="head")
@_friendly_errors
def upgrade(revision: str) -> None:
    """Upgrade the schema to REVISION (default: head)."""
    from zkeb.core.migrations import run_alembic  # noqa: PLC0415

    settings = _load_settings()
    url = _database_url(settings)
    _report_revision(settings, url, lambda: run_alembic(settings, url, "upgrade", revision))


@db.command()
@click.argument("revision", default="-1")
@_friendly_errors
def downgrade(revision: str) -> None:
    """Downgrade the schema to REVISION (default: one step; `base` removes everything)."""
    from zkeb.core.migrations import run_alembic  # noqa: PLC0415

    settings = _load_settings()
    url = _database_url(settings)
    _report_revision(settings, url, lambda: run_alembic(settings, url, "downgrade", revision))


@db.command()
@_friendly_errors
def current() -> None:
    """Show the schema revision the database is at."""
    from zkeb.core.migrations import run_alembic  # noqa: PLC0415

    settings = _load_settings()
    run_alembic(settings, _database_url(settings), "current", True)


@db.command()
@_friendly_errors
def history() -> None:
    """List the migrations (marking the database's current one when DATABASE_URL is set)."""
    from zkeb.core.migrations import run_alembic  # noqa: PLC0415

    settings = _load_settings()
    # Without DATABASE_URL, list them from disk: no embedded server to start just to read files.
    url = settings.database_url or "postgresql+asyncpg://unused/unused"
    run_alembic(settings, url, "history", None, True, settings.database_url is not None)


def _report_revision(settings: Settings, url: str, change: Callable[[], None]) -> None:
    """Run a schema change and say where it left the schema (for a pre-deploy log)."""
    from zkeb.core.migrations import database_revision  # noqa: PLC0415

    before = asyncio.run(database_revision(settings, url))
    change()
    after = asyncio.run(database_revision(settings, url))
    moved = f"from {before or 'an empty database'} to {after or 'no schema'}" if after != before else "unchanged"
    click.echo(f"database schema at revision {after or '(none)'}: {moved}", err=True)


@db.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_admin_errors
def seed(*, as_json: bool) -> None:
    """Create the demo organization, project, project key and device (idempotent; development only)."""
    from zkeb.domain.accounts.seed import seed_demo_data  # noqa: PLC0415

    settings = _load_settings()
    if settings.is_production:
        raise click.ClickException("refusing to seed demo data with ZKEB_ENV=production")
    url = _admin_database(settings)
    result = asyncio.run(seed_demo_data(settings, url))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "organization_id": str(result.organization_id),
                    "project_id": str(result.project_id),
                    "device_id": str(result.device_id),
                    "device_id_hash": result.device_id_hash,
                    "device_private_key_seed": result.device_private_key_seed,
                    "admin_key": result.admin_key,
                    "project_key": result.project_key,
                    "created": list(result.created),
                }
            )
        )
        return
    click.echo(f"Demo organization {result.organization_id}, project {result.project_id}, device {result.device_id}")
    click.echo(f"Created: {', '.join(result.created) or 'nothing (already seeded)'}")
    if result.admin_key:
        click.echo(f"Org admin API key (shown once): {result.admin_key}")
    if result.project_key:
        click.echo(f"Project API key (shown once): {result.project_key}")
    click.echo(f"Demo device private key seed (development only): {result.device_private_key_seed}")


@main.group()
def admin() -> None:
    """Administration: organizations and their keys."""


def _is_unmigrated(exc: BaseException) -> bool:
    return any(type(error).__name__ in {"UndefinedTableError", "UndefinedFunctionError"} for error in _error_chain(exc))


def _error_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes, outermost first (the driver's error last), at most ten."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _validated_name(name: str, param_hint: str) -> str:
    from zkeb.core.errors import ProblemError  # noqa: PLC0415
    from zkeb.domain.accounts.services import validated_name  # noqa: PLC0415

    try:
        return validated_name(name)
    except ProblemError as exc:
        raise click.BadParameter(str(exc.detail).removeprefix("name: "), param_hint=param_hint) from None


def _admin_database(settings: Settings) -> str:
    """The database URL for an admin command, migrated when auto-migration is on, with the runtime login set."""
    from zkeb.core.migrations import provision_runtime_login, run_alembic  # noqa: PLC0415

    url = _database_url(settings)
    if settings.auto_migrate:
        run_alembic(settings, url, "upgrade", "head")
    asyncio.run(provision_runtime_login(settings, url))
    return url


@admin.command("create-org")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_admin_errors
def create_org(name: str, *, as_json: bool) -> None:
    """Create organization NAME and print its first org admin API key (shown once).

    With --json, stdout is exactly one JSON object: {"organization_id": "...", "api_key": "zkeb_..."}.
    """
    name = _validated_name(name, "NAME")
    settings = _load_settings()
    _warn_dev_secrets(settings)
    url = _admin_database(settings)
    organization_id, key = asyncio.run(_create_org(settings, url, name))
    if as_json:
        click.echo(json.dumps({"organization_id": organization_id, "api_key": key}))
        return
    click.echo(f"Organization {name!r} created: {organization_id}")
    click.echo(f"Org admin API key (shown once, store it now): {key}")


@admin.command("create-key")
@click.argument("name")
@click.option("--org", "organization", required=True, type=click.UUID, help="The organization's id.")
@click.option("--project", type=click.UUID, default=None, help="A project key for this project (default: org admin).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_admin_errors
def create_key(name: str, organization: UUID, project: UUID | None, *, as_json: bool) -> None:
    """Create API key NAME: an org admin key, or with --project a project key; printed once.

    With --json, stdout is exactly one JSON object: {"id", "api_key", "organization_id", "project_id", "kind"}.
    """
    name = _validated_name(name, "NAME")
    settings = _load_settings()
    _warn_dev_secrets(settings)
    url = _admin_database(settings)
    key_id, kind, key = asyncio.run(_create_key(settings, url, organization, project, name))
    if as_json:
        body = {
            "id": key_id,
            "api_key": key,
            "organization_id": str(organization),
            "project_id": str(project) if project else None,
            "kind": kind,
        }
        click.echo(json.dumps(body))
        return
    click.echo(f"{'Project' if project else 'Org admin'} API key {name!r} created: {key_id}")
    click.echo(f"API key (shown once, store it now): {key}")


async def _create_org(settings: Settings, url: str, name: str) -> tuple[str, str]:
    from sqlalchemy.ext.asyncio import async_sessionmaker  # noqa: PLC0415

    from zkeb.core.database import create_app_engine  # noqa: PLC0415
    from zkeb.core.tenancy import install_tenant_setter  # noqa: PLC0415
    from zkeb.domain.accounts.services import OrganizationService  # noqa: PLC0415
    from zkeb.lib.apikeys import hashing_salt  # noqa: PLC0415

    install_tenant_setter()
    engine = create_app_engine(settings, url)
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            organization, admin_key = await OrganizationService(session=session).create_with_admin_key(
                name,
                salt=hashing_salt(settings.secrets.api_key_salt, settings.secrets.api_key_salt_new),
                settings=settings,
            )
            return str(organization.id), admin_key.key
    finally:
        await engine.dispose()


async def _create_key(
    settings: Settings, url: str, organization_id: UUID, project_id: UUID | None, name: str
) -> tuple[str, str, str]:
    from sqlalchemy.ext.asyncio import async_sessionmaker  # noqa: PLC0415

    from zkeb.core.database import create_app_engine  # noqa: PLC0415
    from zkeb.core.tenancy import install_tenant_setter  # noqa: PLC0415
    from zkeb.domain.accounts.services import OrganizationService  # noqa: PLC0415
    from zkeb.lib.apikeys import hashing_salt  # noqa: PLC0415

    install_tenant_setter()
    engine = create_app_engine(settings, url)
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            new_key = await OrganizationService(session=session).issue_key(
                organization_id=organization_id,
                project_id=project_id,
                name=name,
                salt=hashing_salt(settings.secrets.api_key_salt, settings.secrets.api_key_salt_new),
                settings=settings,
            )
            return str(new_key.record.id), new_key.record.kind, new_key.key
    finally:
        await engine.dispose()


@main.group()
def audit() -> None:
    """The audit log: verify each organization's hash chain."""


@audit.command("verify")
@click.option("--org", "organization", type=click.UUID, default=None, help="Only this organization (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per organization on stdout.")
@_friendly_errors
def audit_verify(organization: UUID | None, *, as_json: bool) -> None:
    """Verify audit chains as the schema owner; exit status 1 when any chain is broken."""
    settings = _load_settings()
    url = _database_url(settings)
    _require_migrated(settings, url)
    reports = asyncio.run(_verify_audit(settings, url, organization))
    if not reports and not as_json:
        click.echo(
            "no organizations found (listing them all needs an owner that bypasses row-level security)", err=True
        )
    broken = False
    for organization_id, report in reports:
        failure = report.first_broken
        broken = broken or failure is not None
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "organization_id": str(organization_id),
                        "valid": report.valid,
                        "events": report.events,
                        "head": report.head.hex(),
                        "first_broken": None
                        if failure is None
                        else {"seq": failure.seq, "id": str(failure.event_id), "reason": failure.reason},
                    }
                )
            )
        elif failure is None:
            click.echo(f"{organization_id}: valid, {report.events} events, head {report.head.hex()}")
        else:
            click.echo(
                f"{organization_id}: BROKEN at seq {failure.seq} (event {failure.event_id}): {failure.reason}; "
                f"{report.events} events"
            )
    if broken:
        sys.exit(1)


async def _verify_audit(settings: Settings, url: str, organization: UUID | None) -> list[tuple[UUID, Any]]:
    from zkeb.core.database import create_owner_engine  # noqa: PLC0415
    from zkeb.domain.audit.services import verify_all_chains  # noqa: PLC0415

    engine = create_owner_engine(settings, url)
    try:
        return list(await verify_all_chains(engine, None if organization is None else [organization]))
    finally:
        await engine.dispose()


@main.group()
def maintenance() -> None:
    """Background maintenance: expired uploads, trash purge, retention catch-up."""


@maintenance.command("run")
@click.option("--once", is_flag=True, help="Work until nothing is left to do, then exit (for cron).")
@click.option("--batch-size", type=click.IntRange(1, 10000), default=100, show_default=True, help="Items per task.")
@click.option("--interval", type=click.FloatRange(min=1.0), default=None, help="Seconds between passes [60].")
@_admin_errors
def maintenance_run(*, once: bool, batch_size: int, interval: float | None) -> None:
    """Run the maintenance tasks the server also runs in-process (safe to run alongside it, on any replica).

    With --once, exit status 1 when a task failed.
    """
    settings = _load_settings()
    url = _admin_database(settings)
    _require_migrated(settings, url)  # each task would fail alone, with a traceback of its own
    failed = asyncio.run(_run_maintenance(settings, url, once=once, batch_size=batch_size, interval=interval))
    if failed:
        raise click.ClickException(f"maintenance task(s) failed: {', '.join(sorted(failed))} (see the log)")


async def _run_maintenance(
    settings: Settings, url: str, *, once: bool, batch_size: int, interval: float | None
) -> set[str]:
    from zkeb.core.database import create_app_engine  # noqa: PLC0415
    from zkeb.domain.backups.jobs.maintenance import MaintenanceRunner  # noqa: PLC0415
    from zkeb.domain.backups.plugin import payload_stores  # noqa: PLC0415

    pause = interval or settings.maintenance_interval_seconds or 60.0
    engine = create_app_engine(settings, url)
    _, objects = payload_stores(settings)
    if objects is not None:
        await objects.__aenter__()
    runner = MaintenanceRunner(engine, settings, batch=batch_size, interval=pause, objects=objects)
    failed: set[str] = set()
    try:
        for _ in range(10_000):
            report = await runner.run_once()
            failed.update(report.failed)
            removed = {
                "expired_uploads": report.expired_uploads,
                "orphaned_payloads": report.orphaned_payloads,
                "trash_purged": report.trash_purged,
                "retention_trashed": report.retention_trashed,
                "objects_deleted": report.objects_deleted,
            }
            if any(removed.values()) or report.failed:
                click.echo(json.dumps({**removed, "failed": report.failed}))
            if once and not report.more:
                break
            if not once:
                await asyncio.sleep(1.0 if report.more else pause)
    finally:
        if objects is not None:
            await objects.close()
        await engine.dispose()
    return failed


@main.group()
def storage() -> None:
    """Where payloads live (PAYLOAD_STORE; docs/storage.md)."""


@storage.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_admin_errors
def storage_status(*, as_json: bool) -> None:
    """Payloads, bytes and chunks per store, deletions waiting, and (with S3) the bucket's chunk objects.

    Exit status 1 when the S3 store cannot be used. Listing the bucket reads every key under the prefix.
    """
    settings = _load_settings()
    url = _admin_database(settings)
    status, problem = asyncio.run(_storage_status(settings, url))
    if as_json:
        click.echo(json.dumps(status))
    else:
        click.echo(f"New payloads go to: {status['payload_store']}")
        for name, usage in status["stores"].items():
            click.echo(f"  {name}: {usage['payloads']} payloads, {usage['bytes']} bytes, {usage['chunks']} chunks")
        click.echo(f"Payloads whose objects await deletion: {status['pending_object_deletions']}")
        if "bucket" in status:
            bucket = status["bucket"]
            click.echo(f"Bucket {bucket['name']}: {bucket['objects']} chunk objects, {bucket['bytes']} bytes")
    if problem:
        raise click.ClickException(problem)


async def _storage_status(settings: Settings, url: str) -> tuple[dict[str, Any], str | None]:
    from zkeb.core.database import create_app_engine  # noqa: PLC0415
    from zkeb.domain.backups.plugin import payload_stores  # noqa: PLC0415
    from zkeb.domain.backups.store.outbox import store_usage  # noqa: PLC0415
    from zkeb.domain.backups.store.s3 import PayloadStoreUnavailableError  # noqa: PLC0415

    engine = create_app_engine(settings, url)
    try:
        usage = await store_usage(engine)
    finally:
        await engine.dispose()
    status: dict[str, Any] = {
        "payload_store": settings.payload_store.kind,
        "stores": usage.stores,
        "pending_object_deletions": usage.pending_object_deletions,
    }
    _, objects = payload_stores(settings)
    if objects is None:
        return status, None
    async with objects:
        try:
            await objects.check()
            count = size = 0
            async for found in objects.list_all():
                count, size = count + 1, size + found.size
        except PayloadStoreUnavailableError as exc:
            return status, f"payload store: {exc.detail}"
    status["bucket"] = {
        "name": objects.bucket,
        "prefix": settings.payload_store.prefix,
        "objects": count,
        "bytes": size,
    }
    return status, None


def _bucket_settings(settings: Settings) -> Any:
    """The bucket of the `S3_*` variables, also under `PAYLOAD_STORE=postgres` (moving payloads back)."""
    from zkeb.settings import PayloadStoreSettings  # noqa: PLC0415

    if settings.payload_store.kind == "s3":
        return settings.payload_store
    try:
        return PayloadStoreSettings.bucket_from_env()
    except SettingsError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


@storage.command("reconcile")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option(
    "--min-age",
    type=click.FloatRange(min=0.0),
    default=25 * 3600.0,
    show_default=True,
    help="Seconds: younger objects with no row may be in flight and are only counted.",
)
@click.option("--delete-orphans", is_flag=True, help="Delete the objects with no row that are older than --min-age.")
@_admin_errors
def storage_reconcile(*, as_json: bool, min_age: float, delete_orphans: bool) -> None:
    """Compare the bucket's chunk objects with the chunk rows: objects with no row, rows with no object.

    Reports keys, ids and sizes (never payload bytes) and deletes nothing unless --delete-orphans. Exit status 1
    when a row has no object or an orphan older than --min-age is left.
    """
    from datetime import timedelta  # noqa: PLC0415

    settings = _load_settings()
    bucket = _bucket_settings(settings)
    url = _admin_database(settings)
    report = asyncio.run(_reconcile(settings, url, bucket, min_age=timedelta(seconds=min_age), delete=delete_orphans))
    body = report.as_dict()
    if as_json:
        click.echo(json.dumps(body))
    else:
        click.echo(f"Checked {body['objects']} chunk objects and {body['rows']} chunk rows of S3 payloads.")
        for name, label in (
            ("missing", "Rows whose object is missing"),
            ("orphans", "Objects with no row"),
            ("recent_orphans", f"Objects with no row, younger than {min_age:g} s (maybe in flight)"),
            ("awaiting_deletion", "Objects of deleted or moved payloads awaiting the maintenance pass"),
        ):
            tally = body[name]
            click.echo(f"{label}: {tally['count']} ({tally['bytes']} bytes)")
            for item in tally["items"] if name in {"missing", "orphans"} else []:
                click.echo(f"  {' '.join(f'{key}={value}' for key, value in item.items())}")
        if delete_orphans:
            click.echo(f"Deleted {body['orphans_deleted']} orphan objects.")
    if not report.clean:
        sys.exit(1)


async def _reconcile(settings: Settings, url: str, bucket: Any, *, min_age: Any, delete: bool) -> Any:
    from zkeb.core.database import create_app_engine  # noqa: PLC0415
    from zkeb.domain.backups.jobs.storage_reconcile import Reconciler  # noqa: PLC0415
    from zkeb.domain.backups.store.s3 import S3ChunkStore  # noqa: PLC0415

    engine = create_app_engine(settings, url)
    try:
        async with S3ChunkStore(bucket) as objects:
            await objects.check()
            return await Reconciler(engine, objects).run(min_age=min_age, delete_orphans=delete)
    finally:
        await engine.dispose()


@storage.command("migrate")
@click.option("--to", "target", type=click.Choice(["s3", "postgres"]), required=True, help="The store to move to.")
@click.option("--batch", type=click.IntRange(1, 10000), default=100, show_default=True, help="Payloads per listing.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Move at most this many payloads, then stop.")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
@_admin_errors
def storage_migrate(*, target: str, batch: int, limit: int | None, no_progress: bool) -> None:
    """Move every complete payload to the other store: copy, verify by digest, switch, free the source.

    Resumable (run it again after a stop or a kill); safe while the service runs, restores included. Set
    PAYLOAD_STORE to the target first, so that new uploads go there. Exit status 1 when a payload failed.
    """
    settings = _load_settings()
    keyring = _keyring(settings)
    bucket = _bucket_settings(settings)
    if settings.payload_store.kind != target:
        click.echo(f"PAYLOAD_STORE is {settings.payload_store.kind}: new uploads keep going there.", err=True)
    url = _admin_database(settings)
    report = asyncio.run(
        _migrate(settings, url, bucket, keyring, target=target, batch=batch, limit=limit, progress=not no_progress)
    )
    click.echo(
        f"Moved {report.moved} payloads ({report.moved_bytes} bytes) to {target}; {report.remaining} left in the "
        f"other store ({report.incomplete_skipped} open uploads skipped), {len(report.failed)} failed."
    )
    if report.pending_object_deletions:
        click.echo(
            f"{report.pending_object_deletions} payloads' objects await deletion: run the migration again once the "
            "bucket answers (or the maintenance pass of a server with PAYLOAD_STORE=s3 frees them).",
            err=True,
        )
    for payload_id, reason in report.failed.items():
        click.echo(f"  payload {payload_id}: {reason}", err=True)
    if report.failed:
        raise click.ClickException(f"{len(report.failed)} payload(s) were not moved (run again after fixing the cause)")


async def _migrate(
    settings: Settings,
    url: str,
    bucket: Any,
    keyring: Any,
    *,
    target: Any,
    batch: int,
    limit: int | None,
    progress: bool,
) -> Any:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: PLC0415

    from zkeb.core.database import create_app_engine  # noqa: PLC0415
    from zkeb.domain.backups.crypto import PayloadCrypto  # noqa: PLC0415
    from zkeb.domain.backups.jobs.storage_migration import PayloadMover  # noqa: PLC0415
    from zkeb.domain.backups.store.outbox import store_usage  # noqa: PLC0415
    from zkeb.domain.backups.store.s3 import S3ChunkStore  # noqa: PLC0415

    engine = create_app_engine(settings, url)
    try:
        async with S3ChunkStore(bucket) as objects:
            await objects.check()
            mover = PayloadMover(engine, objects, PayloadCrypto(keyring))
            source = "s3" if target == "postgres" else "postgres"
            total = (await store_usage(engine)).stores.get(source, {}).get("bytes", 0)
            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
            with Progress(*columns, disable=not progress, transient=True) as bar:
                task = bar.add_task(f"Moving payloads to {target}", total=total)
                return await mover.migrate(
                    target, batch=batch, limit=limit, on_payload=lambda size: bar.advance(task, size)
                )
    finally:
        await engine.dispose()


@main.group()
def keys() -> None:
    """The master encryption key: rotation status and re-wrapping data keys (`ZKEB_MASTER_ENCRYPTION_KEY_NEW`)."""


def _keyring(settings: Settings) -> Any:
    from zkeb.domain.backups.context import build_keyring  # noqa: PLC0415

    try:
        return build_keyring(settings)
    except SettingsError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


@keys.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@_admin_errors
def keys_status(*, as_json: bool) -> None:
    """Show the configured master key ids and how many data keys remain under each (never a key itself).

    Exits 1 when some data keys are under a master key that is not configured (their payloads cannot be restored).
    """
    settings = _load_settings()
    keyring = _keyring(settings)
    url = _admin_database(settings)
    status = asyncio.run(_key_status(settings, url, keyring))
    if as_json:
        body = {
            "active_key_id": status.active_key_id,
            "configured": status.configured,
            "data_keys": status.data_keys,
            "remaining": status.remaining,
            "unknown_key_ids": status.unknown_key_ids,
        }
        click.echo(json.dumps(body))
        if status.unknown_key_ids:
            sys.exit(1)
        return
    names = {key_id: name for name, key_id in status.configured.items()}
    click.echo(f"Active master key: {status.active_key_id} ({names.get(status.active_key_id, '?')})")
    click.echo("Data keys by master key id:")
    for key_id, count in sorted(status.data_keys.items(), key=lambda item: item[0] != status.active_key_id):
        if key_id == status.active_key_id:
            note = "active"
        elif key_id in names:
            note = f"{names[key_id]}: run `zkeb keys rotate`" if count else f"{names[key_id]}: nothing left"
        else:
            note = "NOT CONFIGURED: these payloads cannot be decrypted"
        click.echo(f"  {key_id}  {count:>10}  {note}")
    if status.unknown_key_ids:
        raise click.ClickException(
            f"data keys are wrapped with master keys that are not configured ({', '.join(status.unknown_key_ids)}): "
            "set the key that wrapped them (see docs/key-rotation.md)"
        )
    if status.remaining == 0:
        click.echo("Every data key is under the active key: the old master key may now be dropped.")


async def _key_status(settings: Settings, url: str, keyring: Any) -> Any:
    from zkeb.core.database import create_app_engine  # noqa: PLC0415
    from zkeb.domain.backups.jobs.key_rotation import KeyRotator  # noqa: PLC0415

    engine = create_app_engine(settings, url)
    try:
        return await KeyRotator(engine, keyring, settings).status()
    finally:
        await engine.dispose()


@keys.command("rotate")
@click.option(
    "--batch-size", type=click.IntRange(1, 10000), default=500, show_default=True, help="Data keys per transaction."
)
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
@_admin_errors
def keys_rotate(*, batch_size: int, no_progress: bool) -> None:
    """Re-wrap every data key under the active master key (ZKEB_MASTER_ENCRYPTION_KEY_NEW while it is set).

    Chunks are not rewritten. Safe while the service runs; stop it and run it again at will. Exit status 1 when
    some data keys could not be re-wrapped.
    """
    settings = _load_settings()
    keyring = _keyring(settings)
    if not settings.secrets.master_key_new:
        click.echo(
            "ZKEB_MASTER_ENCRYPTION_KEY_NEW is not set: re-wrapping onto ZKEB_MASTER_ENCRYPTION_KEY "
            "(only data keys under another configured key id would move).",
            err=True,
        )
    url = _admin_database(settings)
    report = asyncio.run(_rotate_keys(settings, url, keyring, batch_size=batch_size, progress=not no_progress))
    click.echo(f"Re-wrapped {report.rewrapped} data keys under {keyring.active_id}.")
    if report.failed_payloads:
        click.echo(f"{len(report.failed_payloads)} data keys did not open with their master key (see the log).")
    if not report.complete:
        raise click.ClickException(
            f"{report.remaining} data keys are not under the active key: run `zkeb keys status` for details"
        )


async def _rotate_keys(settings: Settings, url: str, keyring: Any, *, batch_size: int, progress: bool) -> Any:
    from zkeb.core.database import create_app_engine  # noqa: PLC0415
    from zkeb.domain.backups.jobs.key_rotation import KeyRotator  # noqa: PLC0415

    engine = create_app_engine(settings, url)
    try:
        rotator = KeyRotator(engine, keyring, settings)
        total = (await rotator.status()).remaining
        if not progress or total == 0:
            return await rotator.rotate(batch_size=batch_size)
        with click.progressbar(length=total, label="Re-wrapping data keys", file=sys.stderr) as bar:
            return await rotator.rotate(batch_size=batch_size, on_progress=bar.update)
    finally:
        await engine.dispose()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
