"""The audit writer: one contiguous, verifiable hash chain per organization, whatever the concurrency."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid

import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from zkeb.app import create_app
from zkeb.core.audit import chained_fields, record_event, record_event_on_connection
from zkeb.core.audit_linker import AuditLinker
from zkeb.core.tenancy import tenant_scope
from zkeb.domain.audit.plugin import ChainHeadLogger
from zkeb.lib.hashchain import verify_chain
from zkeb.settings import Settings

from support import make_settings


async def _new_org(owner_connection: asyncpg.Connection, name: str = "acme") -> uuid.UUID:
    org_id = uuid.uuid4()
    await owner_connection.execute(
        "INSERT INTO organizations (id, name, created_at, updated_at) VALUES ($1, $2, now(), now())", org_id, name
    )
    return org_id


async def _stored_chain(owner_connection: asyncpg.Connection, org_id: uuid.UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await owner_connection.fetch(
        "SELECT * FROM audit_events WHERE organization_id = $1 ORDER BY seq", org_id
    )
    return rows


def _chain_is_valid(rows: list[asyncpg.Record]) -> bool:
    def fields(row: asyncpg.Record) -> dict[str, object]:
        mapping = dict(row)
        mapping["details"] = json.loads(mapping["details"])
        return chained_fields(mapping)

    return verify_chain((fields(r), r["prev_hash"], r["hash"]) for r in rows) is None


async def test_concurrent_writers_build_one_contiguous_valid_chain(
    engine: AsyncEngine, owner_connection: asyncpg.Connection, settings: Settings
) -> None:
    org_id = await _new_org(owner_connection)

    async def write(n: int) -> None:
        with tenant_scope(org_id):
            async with async_sessionmaker(engine)() as session, session.begin():
                await record_event(
                    session,
                    organization_id=org_id,
                    action="test.write",
                    actor_type="cli",
                    actor_id=f"writer-{n}",
                    details={"n": n, "api_key": "zkeb_must_not_be_stored", "key_id": "k1"},  # pragma: allowlist secret
                    settings=settings,
                )

    await asyncio.gather(*(write(n) for n in range(200)))
    rows = await _stored_chain(owner_connection, org_id)
    assert [r["seq"] for r in rows] == list(range(1, 201))
    assert _chain_is_valid(rows)
    assert all("api_key" not in r["details"] and "zkeb_must_not_be_stored" not in r["details"] for r in rows)
    head = await owner_connection.fetchrow("SELECT seq, hash FROM audit_chain_heads WHERE organization_id = $1", org_id)
    assert head is not None
    assert (head["seq"], head["hash"]) == (200, rows[-1]["hash"])


async def test_disabled_audit_logs_write_nothing(
    engine: AsyncEngine, owner_connection: asyncpg.Connection, base_settings_env: dict[str, str], database_url: str
) -> None:
    org_id = await _new_org(owner_connection)
    disabled = make_settings(base_settings_env, DATABASE_URL=database_url, ENABLE_AUDIT_LOGS="false")
    with tenant_scope(org_id):
        async with async_sessionmaker(engine)() as session, session.begin():
            await record_event(
                session, organization_id=org_id, action="test.off", actor_type="cli", actor_id=None, settings=disabled
            )
    assert await _stored_chain(owner_connection, org_id) == []


async def test_a_connection_acting_for_another_tenant_records_and_keeps_its_tenant(
    engine: AsyncEngine, owner_connection: asyncpg.Connection, settings: Settings
) -> None:
    org_id = await _new_org(owner_connection)
    async with engine.begin() as connection:
        await record_event_on_connection(
            connection,
            organization_id=org_id,
            action="auth.failed",
            actor_type="anonymous",
            actor_id=None,
            outcome="failure",
            details={"reason": "bad\nkey"},
            settings=settings,
        )
        tenant = (await connection.execute(text("SELECT current_setting('zkeb.org_id', true)"))).scalar_one()
    assert tenant in {None, ""}
    rows = await _stored_chain(owner_connection, org_id)
    assert [(r["action"], r["outcome"], r["seq"]) for r in rows] == [("auth.failed", "failure", 1)]
    assert json.loads(rows[0]["details"]) == {"reason": "bad\\x0akey"}
    assert _chain_is_valid(rows)


async def test_an_event_without_an_organization_goes_to_the_log_only(
    engine: AsyncEngine, owner_connection: asyncpg.Connection, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with engine.begin() as connection:
        with caplog.at_level("WARNING", logger="zkeb.audit"):
            await record_event_on_connection(
                connection,
                organization_id=None,
                action="auth.failed",
                actor_type="anonymous",
                actor_id="x\ny",
                outcome="failure",
                settings=settings,
            )
    assert await owner_connection.fetchval("SELECT count(*) FROM audit_events") == 0
    [record] = [r for r in caplog.records if "audit event without organization" in r.getMessage()]
    assert "\n" not in record.getMessage()


async def test_chain_heads_are_logged_at_shutdown(
    owner_connection: asyncpg.Connection, engine: AsyncEngine, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    org_id = await _new_org(owner_connection)
    with tenant_scope(org_id):
        async with async_sessionmaker(engine)() as session, session.begin():
            await record_event(
                session, organization_id=org_id, action="test.x", actor_type="cli", actor_id=None, settings=settings
            )
    head_hash = await owner_connection.fetchval("SELECT hash FROM audit_chain_heads WHERE organization_id = $1", org_id)
    with caplog.at_level("INFO", logger="zkeb.audit"):
        async with AsyncTestClient(app=create_app(settings)):
            pass
    records = [r for r in caplog.records if r.getMessage().startswith("audit chain head")]
    assert any(f"organization_id={org_id} seq=1 hash={head_hash.hex()}" in r.getMessage() for r in records)
    # The same values as fields of the JSON line, for a pipeline that anchors them.
    [ours] = [r for r in records if getattr(r, "organization_id", None) == str(org_id)]
    assert (getattr(ours, "seq", None), getattr(ours, "hash", None)) == (1, head_hash.hex())


async def test_chain_heads_with_the_database_down_are_one_line(caplog: pytest.LogCaptureFixture) -> None:
    # An operator review: SIGTERM while PostgreSQL was down logged a 6.5 KB traceback at WARNING from the last
    # chain-head log. A database that cannot be reached is one line; an unexpected failure keeps its traceback.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    engine = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/zkeb")
    try:
        with caplog.at_level("WARNING", logger="zkeb.audit"):
            await ChainHeadLogger.log_once(engine)
    finally:
        await engine.dispose()
    [record] = [r for r in caplog.records if "chain heads" in r.getMessage()]
    assert (
        record.getMessage() == "could not log audit chain heads: the database is unreachable (ConnectionRefusedError)"
    )
    assert record.exc_info is None


async def test_a_linker_finding_the_pool_busy_says_so_in_one_warning(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # An operator review: every pooled connection busy (requests answering 503) made the linker log an ERROR with a
    # full traceback, while requests logged the same condition as one warning.
    engine = create_async_engine(
        database_url.replace("postgresql://", "postgresql+asyncpg://", 1), pool_size=1, max_overflow=0, pool_timeout=0.1
    )
    linker = AuditLinker(engine, sweep_interval=0.05)
    try:
        with caplog.at_level("WARNING", logger="zkeb.audit"):
            async with engine.connect() as held:  # the only connection: the linker's sweep waits in vain
                await held.execute(text("SELECT 1"))
                linker.start()
                await asyncio.sleep(0.5)
            await linker.stop()
    finally:
        await engine.dispose()
    failures = [r for r in caplog.records if r.name == "zkeb.audit" and "linking audit events failed" in r.getMessage()]

    assert failures, "the linker never found the pool busy"
    assert {r.getMessage() for r in failures} == {
        "linking audit events failed: no database connection was free; retrying later"
    }
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in failures)
