"""The audit writer: one contiguous, verifiable hash chain per organization, whatever the concurrency."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from zkeb.core.audit import chained_fields, record_event
from zkeb.core.database import create_app_engine
from zkeb.core.tenancy import install_tenant_setter, tenant_scope
from zkeb.lib.hashchain import verify_chain
from zkeb.settings import Settings


@pytest.fixture
async def engine(settings: Settings, database_url: str) -> AsyncIterator[AsyncEngine]:
    install_tenant_setter()
    engine = create_app_engine(settings, database_url)
    yield engine
    await engine.dispose()


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
                    details={"n": n, "api_key": "zkeb_must_not_be_stored", "key_id": "k1"},
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
