"""Health domain over HTTP: probes, readiness, problem+json errors and request ids, on real services."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.engine import make_url

from zkeb.app import create_app
from zkeb.core.migrations import SchemaMismatchError, head_revision, known_revisions, run_alembic
from zkeb.core.runtime import get_runtime

from support import make_settings, problem

RFC3339_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z")


async def test_health_reports_every_check_healthy(client: AsyncTestClient[Litestar]) -> None:
    response = await client.get("/api/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["checks"]["database"]["status"] == "healthy"
    assert body["checks"]["database"]["schema_revision"] == body["checks"]["database"]["schema_head"] == head_revision()
    assert body["checks"]["redis"]["status"] == "disabled"
    assert response.headers["cache-control"] == "no-store"


async def test_live_ready_db_and_redis_probes(client: AsyncTestClient[Litestar]) -> None:
    assert (await client.get("/api/health/live")).json() == {"status": "alive"}
    assert (await client.get("/api/health/ready")).json() == {
        "status": "ready",
        "reasons": [],
        "payload_store": "postgres",
    }
    db = await client.get("/api/health/db")
    assert db.status_code == 200
    assert db.json()["pool_size"] >= 1
    redis = await client.get("/api/health/redis")
    assert redis.status_code == 200
    assert redis.json()["status"] == "disabled"


async def test_db_probe_keeps_the_reference_fields_database_and_the_databases_clock(
    client: AsyncTestClient[Litestar],
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    body = (await client.get("/api/health/db")).json()
    after = datetime.now(UTC) + timedelta(seconds=5)
    assert body["status"] == "healthy"
    assert body["database"] == "postgresql"
    assert RFC3339_UTC.fullmatch(body["timestamp"]), body["timestamp"]
    assert before <= datetime.fromisoformat(body["timestamp"]) <= after


async def test_redis_probe_names_the_cache_even_when_disabled(client: AsyncTestClient[Litestar]) -> None:
    body = (await client.get("/api/health/redis")).json()
    assert body == {"status": "disabled", "cache": "redis", "detail": body["detail"]}


async def test_version_reports_build_and_schema(base_settings_env: dict[str, str], database_url: str) -> None:
    settings = make_settings(
        base_settings_env, DATABASE_URL=database_url, ZKEB_COMMIT="abc1234", ZKEB_BUILD_DATE="2026-11-27T00:00:00Z"
    )
    async with AsyncTestClient(app=create_app(settings)) as client:
        body = (await client.get("/api/version")).json()
    assert body["commit"] == "abc1234"
    assert body["build_date"] == "2026-11-27T00:00:00Z"
    assert body["schema_revision"] == head_revision()
    assert body["version"]


async def test_redis_probe_is_healthy_with_redis(
    base_settings_env: dict[str, str], database_url: str, redis_url: str
) -> None:
    settings = make_settings(base_settings_env, DATABASE_URL=database_url, REDIS_URL=redis_url)
    async with AsyncTestClient(app=create_app(settings)) as client:
        response = await client.get("/api/health/redis")
        overall = await client.get("/api/health")
    assert response.status_code == 200
    assert response.json()["status"] == "healthy"
    assert response.json()["cache"] == "redis"
    assert response.json()["response"] == "PONG"
    assert overall.json()["checks"]["redis"]["status"] == "healthy"


async def test_unreachable_redis_answers_503_quickly(base_settings_env: dict[str, str], database_url: str) -> None:
    settings = make_settings(base_settings_env, DATABASE_URL=database_url, REDIS_URL="redis://127.0.0.1:1/0")
    async with AsyncTestClient(app=create_app(settings)) as client:
        response = await client.get("/api/health/redis")
        overall = await client.get("/api/health")
    assert response.status_code == 503
    assert response.json()["status"] == "unhealthy"
    assert response.json()["cache"] == "redis"
    assert "response" not in response.json()
    assert overall.status_code == 503


async def test_database_unreachable_makes_health_and_ready_503_but_live_200(
    base_settings_env: dict[str, str],
) -> None:
    settings = make_settings(base_settings_env, DATABASE_URL="postgresql://postgres@127.0.0.1:1/nowhere")
    async with AsyncTestClient(app=create_app(settings)) as client:
        ready = await client.get("/api/health/ready")
        health = await client.get("/api/health")
        db = await client.get("/api/health/db")
        live = await client.get("/api/health/live")
    assert ready.status_code == 503
    assert ready.json()["status"] == "not_ready"
    assert health.status_code == 503
    assert health.json()["status"] == "unhealthy"
    assert db.status_code == 503
    assert db.json()["database"] == "postgresql"
    assert "timestamp" not in db.json()
    assert "127.0.0.1" not in db.text
    assert live.status_code == 200


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers: a hung database."""
    writers: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield port
    for writer in writers:
        writer.close()
    server.close()


async def test_hung_database_answers_503_when_the_probe_times_out(
    base_settings_env: dict[str, str], silent_server: int
) -> None:
    settings = make_settings(base_settings_env, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{silent_server}/x")
    app = create_app(settings)
    get_runtime(app.state).role_checked = True  # start-up would otherwise spend its own 5 s budget first
    # The client's own timeout only guards against a hang; "timed out" proves the probe's budget cut it short.
    async with AsyncTestClient(app=app, timeout=30) as client:
        response = await client.get("/api/health/ready")
    assert response.status_code == 503
    assert "timed out" in response.json()["reasons"][0]


async def test_database_going_away_and_coming_back(
    client: AsyncTestClient[Litestar], database_url: str, pg_server_url: str
) -> None:
    name = make_url(database_url).database
    assert (await client.get("/api/health/ready")).status_code == 200
    admin = await asyncpg.connect(pg_server_url.replace("+asyncpg", ""))
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        down = await client.get("/api/health/ready")
        assert down.status_code == 503
        assert down.json()["reasons"][0].startswith("database:")
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    assert (await client.get("/api/health/ready")).status_code == 200


async def test_schema_behind_the_code_is_not_ready(
    client: AsyncTestClient[Litestar], owner_connection: asyncpg.Connection
) -> None:
    older = sorted(known_revisions() - {head_revision()})[0]
    await owner_connection.execute("UPDATE alembic_version SET version_num = $1", older)
    response = await client.get("/api/health/ready")
    assert response.status_code == 503
    assert "behind this release's migrations" in response.json()["reasons"][0]


async def test_schema_ahead_of_the_code_is_ready_so_a_rollback_deploys(
    client: AsyncTestClient[Litestar],
    owner_connection: asyncpg.Connection,
    base_settings_env: dict[str, str],
    database_url: str,
) -> None:
    # A later release migrated the database (a revision this code does not know), then was rolled back: migrations
    # are expand-only, so this release serves, and its pre-deploy `zkeb db upgrade` leaves the schema alone.
    await owner_connection.execute("UPDATE alembic_version SET version_num = 'f00d'")
    ready = await client.get("/api/health/ready")
    assert ready.status_code == 200, ready.text
    health = (await client.get("/api/health")).json()
    assert health["checks"]["database"]["status"] == "healthy"
    assert "ahead of this release's migrations" in health["checks"]["database"]["detail"]
    settings = make_settings(base_settings_env, DATABASE_URL=database_url)
    await asyncio.to_thread(run_alembic, settings, database_url, "upgrade", "head")
    assert await owner_connection.fetchval("SELECT version_num FROM alembic_version") == "f00d"


async def test_draining_server_is_not_ready(app: Litestar, client: AsyncTestClient[Litestar]) -> None:
    get_runtime(app.state).draining = True
    response = await client.get("/api/health/ready")
    assert response.status_code == 503
    assert response.json()["reasons"] == ["draining: shutting down"]
    assert (await client.get("/api/health/live")).status_code == 200


async def test_unknown_route_is_problem_json_with_request_id(client: AsyncTestClient[Litestar]) -> None:
    response = await client.get("/api/nope", headers={"X-Request-Id": "req-123"})
    assert response.status_code == 404
    body = problem(response)
    assert body["request_id"] == "req-123"
    assert body["instance"] == "/api/nope"
    assert response.headers["x-request-id"] == "req-123"


async def test_wrong_method_is_problem_json_405(client: AsyncTestClient[Litestar]) -> None:
    response = await client.delete("/api/health")
    assert response.status_code == 405
    body = problem(response)
    assert body["request_id"] == response.headers["x-request-id"]


async def test_request_id_is_generated_when_missing_or_unsafe(client: AsyncTestClient[Litestar]) -> None:
    generated = await client.get("/api/health/live")
    assert len(generated.headers["x-request-id"]) == 32
    unsafe = await client.get("/api/health/live", headers={"X-Request-Id": "bad id\twith spaces"})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"
    assert len(unsafe.headers["x-request-id"]) == 32


async def test_openapi_document_lists_the_health_routes(client: AsyncTestClient[Litestar]) -> None:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    assert {"/api/health", "/api/health/ready", "/api/version"} <= set(document["paths"])
    assert {"OrgAdminKey", "ProjectKey", "DeviceToken"} <= set(document["components"]["securitySchemes"])


async def test_an_unknown_revision_on_a_schema_lacking_this_releases_columns_is_not_taken_for_ahead(
    client: AsyncTestClient[Litestar],
    owner_connection: asyncpg.Connection,
    base_settings_env: dict[str, str],
    database_url: str,
) -> None:
    # Another application's database (its own alembic_version), or a branch never merged: not a later release's
    # schema, so neither ready nor silently left alone by `zkeb db upgrade`.
    await owner_connection.execute("UPDATE alembic_version SET version_num = 'f00d'")
    await owner_connection.execute("ALTER TABLE backups DROP COLUMN restored_at")
    ready = await client.get("/api/health/ready")
    assert ready.status_code == 503
    assert "does not know and lacks its tables" in ready.json()["reasons"][0]
    settings = make_settings(base_settings_env, DATABASE_URL=database_url)
    with pytest.raises(SchemaMismatchError, match=r"revision f00d.*lacks backups\.restored_at"):
        await asyncio.to_thread(run_alembic, settings, database_url, "upgrade", "head")


async def test_openapi_documents_the_reference_fields_of_the_probes(client: AsyncTestClient[Litestar]) -> None:
    document = (await client.get("/schema/openapi.json")).json()
    schemas = document["components"]["schemas"]

    def response_schema(path: str) -> dict[str, Any]:
        ref = document["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        schema: dict[str, Any] = schemas[ref.rsplit("/", 1)[1]]
        return schema

    database = response_schema("/api/health/db")
    assert "database" in database["required"]
    assert database["properties"]["database"].get("const", database["properties"]["database"].get("enum")) in (
        "postgresql",
        ["postgresql"],
    )
    assert "timestamp" in database["properties"]
    redis = response_schema("/api/health/redis")
    assert "cache" in redis["required"]
    assert "response" in redis["properties"]
