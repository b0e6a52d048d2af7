"""Row-level security: the runtime role sees only its tenant's rows, whatever the query forgets."""

from __future__ import annotations

import datetime
import uuid

import asyncpg
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from zkeb.core.database import RUNTIME_ROLE, RuntimeRoleError, check_runtime_role, create_app_engine
from zkeb.core.migrations import run_alembic
from zkeb.core.tenancy import install_tenant_setter, tenant_scope
from zkeb.db.models import ApiKey, AuditEvent, Device, Organization, Project
from zkeb.settings import Settings

from support import embedded_cluster, make_settings


async def _create_org_with_project(engine: AsyncEngine, name: str) -> uuid.UUID:
    org_id = uuid.uuid4()
    with tenant_scope(org_id):
        async with async_sessionmaker(engine)() as session, session.begin():
            session.add(Organization(id=org_id, name=name))
            await session.flush()
            session.add(Project(organization_id=org_id, name=f"{name}-project"))
    return org_id


async def test_a_tenant_sees_none_of_another_tenants_rows_without_any_where_clause(engine: AsyncEngine) -> None:
    org_a = await _create_org_with_project(engine, "a")
    org_b = await _create_org_with_project(engine, "b")
    for org, other in ((org_a, org_b), (org_b, org_a)):
        with tenant_scope(org):
            async with async_sessionmaker(engine)() as session:
                projects = (await session.execute(select(Project))).scalars().all()
                organizations = (await session.execute(select(Organization))).scalars().all()
        assert [p.organization_id for p in projects] == [org]
        assert [o.id for o in organizations] == [org]
        assert other not in {o.id for o in organizations}


async def test_without_a_tenant_nothing_is_visible(engine: AsyncEngine) -> None:
    await _create_org_with_project(engine, "a")
    async with async_sessionmaker(engine)() as session:
        assert (await session.execute(select(func.count()).select_from(Project))).scalar_one() == 0
        assert (await session.execute(select(func.count()).select_from(Organization))).scalar_one() == 0


async def test_writing_a_row_for_another_tenant_is_refused(engine: AsyncEngine) -> None:
    org_a = await _create_org_with_project(engine, "a")
    org_b = await _create_org_with_project(engine, "b")
    with tenant_scope(org_a), pytest.raises(DBAPIError, match="row-level security"):
        async with async_sessionmaker(engine)() as session, session.begin():
            session.add(Project(organization_id=org_b, name="smuggled"))


async def test_updates_and_deletes_cannot_reach_another_tenant(engine: AsyncEngine) -> None:
    org_a = await _create_org_with_project(engine, "a")
    org_b = await _create_org_with_project(engine, "b")
    with tenant_scope(org_a):
        async with async_sessionmaker(engine)() as session, session.begin():
            updated = await session.execute(text("UPDATE projects SET name = 'hijacked'"))
            deleted = await session.execute(text("DELETE FROM projects WHERE organization_id = :b"), {"b": org_b})
    assert updated.rowcount == 1  # type: ignore[attr-defined]
    assert deleted.rowcount == 0  # type: ignore[attr-defined]
    with tenant_scope(org_b):
        async with async_sessionmaker(engine)() as session:
            names = (await session.execute(select(Project.name))).scalars().all()
    assert names == ["b-project"]


async def test_the_tenant_setting_does_not_leak_to_the_next_transaction_on_a_pooled_connection(
    settings: Settings, database_url: str
) -> None:
    install_tenant_setter()
    engine = create_app_engine(settings, database_url)
    try:
        org = await _create_org_with_project(engine, "a")
        async with engine.connect() as connection:
            value = (await connection.execute(text("SELECT current_setting('zkeb.org_id', true)"))).scalar_one()
            visible = (await connection.execute(text("SELECT count(*) FROM projects"))).scalar_one()
        assert value in ("", None)
        assert visible == 0
        assert org
    finally:
        await engine.dispose()


async def test_the_runtime_role_cannot_become_the_owner_or_bypass_rls(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT current_user"))).scalar_one() == RUNTIME_ROLE
        session_user = (await connection.execute(text("SELECT session_user"))).scalar_one()
        with pytest.raises(DBAPIError, match="permission denied"):
            await connection.execute(text("SET ROLE postgres"))
        assert session_user == RUNTIME_ROLE
    async with engine.connect() as connection:
        with pytest.raises(DBAPIError, match="permission denied"):
            await connection.execute(text("SET SESSION AUTHORIZATION postgres"))
    async with engine.connect() as connection:
        with pytest.raises(DBAPIError, match=r"permission denied|must be owner"):
            await connection.execute(text("ALTER TABLE projects DISABLE ROW LEVEL SECURITY"))
    async with engine.connect() as connection:
        await connection.execute(text("SET row_security = off"))
        with pytest.raises(DBAPIError, match="row-level security"):
            await connection.execute(text("SELECT 1 FROM projects"))


async def test_the_runtime_role_may_append_to_but_never_rewrite_the_audit_log(engine: AsyncEngine) -> None:
    org = await _create_org_with_project(engine, "a")
    with tenant_scope(org):
        async with async_sessionmaker(engine)() as session, session.begin():
            session.add(
                AuditEvent(
                    organization_id=org,
                    seq=1,
                    occurred_at=datetime.datetime.now(datetime.UTC),
                    actor_type="system",
                    action="test",
                    outcome="success",
                    prev_hash=bytes(32),
                    hash=bytes(32),
                )
            )
        for statement in ("UPDATE audit_events SET action = 'x'", "DELETE FROM audit_events"):
            async with async_sessionmaker(engine)() as session:
                with pytest.raises(DBAPIError, match="permission denied"):
                    await session.execute(text(statement))


async def test_api_key_lookup_function_sees_keys_before_the_tenant_is_known(
    engine: AsyncEngine, owner_connection: asyncpg.Connection
) -> None:
    org = await _create_org_with_project(engine, "a")
    with tenant_scope(org):
        async with async_sessionmaker(engine)() as session, session.begin():
            session.add(
                ApiKey(organization_id=org, kind="org_admin", name="k", prefix="abcdefghijkl", key_hash=bytes(32))
            )
    async with engine.connect() as connection:
        direct = (await connection.execute(text("SELECT count(*) FROM api_keys"))).scalar_one()
        found = (await connection.execute(text("SELECT organization_id FROM zkeb_find_api_keys('abcdefghijkl')"))).all()
    assert direct == 0
    assert [row[0] for row in found] == [org]
    assert await owner_connection.fetchval("SELECT count(*) FROM api_keys") == 1


async def test_device_state_function_answers_only_for_the_exact_device_a_token_names(
    engine: AsyncEngine, owner_connection: asyncpg.Connection
) -> None:
    org = await _create_org_with_project(engine, "a")
    project = await owner_connection.fetchval("SELECT id FROM projects WHERE organization_id = $1", org)
    device_hash = bytes(range(32))
    with tenant_scope(org):
        async with async_sessionmaker(engine)() as session, session.begin():
            device_id = uuid.uuid4()
            session.add(
                Device(
                    id=device_id,
                    organization_id=org,
                    project_id=project,
                    device_id_hash=device_hash,
                    public_key=bytes(32),
                )
            )
    lookup = text("SELECT revoked_at FROM zkeb_device_state(:org, :id, :project_id, :hash)")
    exact = {"org": org, "id": device_id, "project_id": project, "hash": device_hash}
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT count(*) FROM devices"))).scalar_one() == 0  # no tenant
        assert [tuple(row) for row in (await connection.execute(lookup, exact)).all()] == [(None,)]
        other_org = await _create_org_with_project(engine, "b")
        for wrong in ({"org": other_org}, {"id": uuid.uuid4()}, {"project_id": uuid.uuid4()}, {"hash": bytes(32)}):
            assert (await connection.execute(lookup, {**exact, **wrong})).all() == []
    await owner_connection.execute("UPDATE devices SET revoked_at = now() WHERE id = $1", device_id)
    async with engine.connect() as connection:
        [(revoked_at,)] = (await connection.execute(lookup, exact)).all()
    assert revoked_at is not None


async def test_self_check_passes_for_the_runtime_role(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await check_runtime_role(connection)


async def test_self_check_refuses_when_a_tenant_table_is_not_forced(
    engine: AsyncEngine, owner_connection: asyncpg.Connection
) -> None:
    await owner_connection.execute("ALTER TABLE backups NO FORCE ROW LEVEL SECURITY")
    async with engine.connect() as connection:
        with pytest.raises(RuntimeRoleError, match="backups"):
            await check_runtime_role(connection)


async def test_self_check_refuses_a_role_that_bypasses_rls(base_settings_env: dict[str, str]) -> None:
    # On a cluster of its own: the role is cluster-wide, and on a shared one every other test's app would refuse to
    # start meanwhile (a parallel worker's did, once).
    with embedded_cluster() as url:
        settings = make_settings(base_settings_env, DATABASE_URL=url)
        run_alembic(settings, url, "upgrade", "head")
        owner = await asyncpg.connect(url.replace("+asyncpg", ""))
        engine = create_app_engine(settings, url)
        try:
            await owner.execute(f"ALTER ROLE {RUNTIME_ROLE} BYPASSRLS")
            async with engine.connect() as connection:
                with pytest.raises(RuntimeRoleError, match="BYPASSRLS"):
                    await check_runtime_role(connection)
        finally:
            await engine.dispose()
            await owner.close()


async def test_self_check_refuses_an_owner_connection(owner_connection: asyncpg.Connection, settings: Settings) -> None:
    owner_engine = create_async_engine(settings.database_url or "")
    try:
        async with owner_engine.connect() as connection:
            with pytest.raises(RuntimeRoleError, match="not 'zkeb_app'"):
                await check_runtime_role(connection)
    finally:
        await owner_engine.dispose()
    assert owner_connection
