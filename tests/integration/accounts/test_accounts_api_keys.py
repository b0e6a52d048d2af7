"""Project API keys: shown once, stored as HMACs, listed without secrets, revoked at once; salt rotation."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import pytest
from accounts_support import auth, create_org, create_project, table_snapshot
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import async_sessionmaker

from zkeb.app import create_app
from zkeb.core.database import create_app_engine
from zkeb.domain.accounts.services import OrganizationService
from zkeb.lib.apikeys import hash_api_key
from zkeb.settings import Settings

from support import make_settings, problem

Client = AsyncTestClient[Litestar]

OLD_SALT = "test-api-key-salt-0123456789abcdef"  # base_settings_env's API_KEY_SALT
NEW_SALT = "rotated-api-key-salt-fedcba9876543210"
#: RFC 6750 §3's challenges: for a bearer token that was refused, and for a request that presented none.
INVALID_TOKEN_CHALLENGE = 'Bearer realm="zkeb", error="invalid_token"'
NO_CREDENTIAL_CHALLENGE = 'Bearer realm="zkeb"'


async def _new_key(client: Client, admin_key: str, project_id: str, name: str = "ci") -> dict[str, Any]:
    response = await client.post(
        f"/api/v1/projects/{project_id}/api-keys", json={"name": name}, headers=auth(admin_key)
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def _admin_key(settings: Settings, organization_id: uuid.UUID, name: str) -> tuple[str, str]:
    assert settings.database_url is not None
    engine = create_app_engine(settings, settings.database_url)
    try:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            new_key = await OrganizationService(session=session).issue_key(
                organization_id=organization_id, project_id=None, name=name, salt=settings.secrets.api_key_salt
            )
    finally:
        await engine.dispose()
    return str(new_key.record.id), new_key.key


async def test_a_project_key_is_shown_once_and_only_its_hmac_is_stored(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    response = await client.post(
        f"/api/v1/projects/{project['id']}/api-keys", json={"name": "ci"}, headers=auth(admin_key)
    )
    assert response.status_code == 201
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"id", "key", "name", "prefix", "project_id", "created_at"}
    assert body["key"].startswith("zkeb_")
    assert (body["name"], body["project_id"]) == ("ci", project["id"])
    row = await owner_connection.fetchrow("SELECT * FROM api_keys WHERE id = $1", uuid.UUID(body["id"]))
    assert row is not None
    assert bytes(row["key_hash"]) == hash_api_key(OLD_SALT, body["key"])
    assert row["kind"] == "project"
    assert body["key"] == "zkeb_" + row["prefix"] + body["key"][5 + len(row["prefix"]) :]
    assert all(body["key"] not in str(value) for value in row.values())
    listed = await client.get(f"/api/v1/projects/{project['id']}/api-keys", headers=auth(admin_key))
    assert listed.status_code == 200
    items = listed.json()["items"]
    assert [set(item) for item in items] == [
        {"id", "name", "prefix", "project_id", "created_at", "last_used_at", "revoked_at"}
    ]
    assert body["key"] not in listed.text


async def test_a_project_key_authenticates_as_its_project_and_records_its_last_use(
    client: Client, settings: Settings
) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    key = await _new_key(client, admin_key, project["id"])
    assert (await client.get(f"/api/v1/projects/{project['id']}", headers=auth(key["key"]))).status_code == 200
    listed = (await client.get(f"/api/v1/projects/{project['id']}/api-keys", headers=auth(admin_key))).json()
    assert listed["items"][0]["last_used_at"] is not None


async def test_a_revoked_key_is_refused_at_once_and_revoking_again_is_harmless(
    client: Client, settings: Settings
) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    key = await _new_key(client, admin_key, project["id"])
    url = f"/api/v1/projects/{project['id']}"
    assert (await client.get(url, headers=auth(key["key"]))).status_code == 200
    revoked = await client.delete(f"/api/v1/api-keys/{key['id']}", headers=auth(admin_key))
    assert revoked.status_code == 204
    refused = await client.get(url, headers=auth(key["key"]))
    assert refused.status_code == 401
    problem(refused)
    listed = (await client.get(f"/api/v1/projects/{project['id']}/api-keys", headers=auth(admin_key))).json()
    first_revoked_at = listed["items"][0]["revoked_at"]
    assert first_revoked_at is not None
    assert (await client.delete(f"/api/v1/api-keys/{key['id']}", headers=auth(admin_key))).status_code == 204
    listed = (await client.get(f"/api/v1/projects/{project['id']}/api-keys", headers=auth(admin_key))).json()
    assert listed["items"][0]["revoked_at"] == first_revoked_at


async def test_a_revocation_on_one_replica_holds_on_another_at_once(settings: Settings, client: Client) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    key = await _new_key(client, admin_key, project["id"])
    async with AsyncTestClient(app=create_app(settings)) as replica:
        url = f"/api/v1/projects/{project['id']}"
        assert (await replica.get(url, headers=auth(key["key"]))).status_code == 200
        assert (await client.delete(f"/api/v1/api-keys/{key['id']}", headers=auth(admin_key))).status_code == 204
        assert (await replica.get(url, headers=auth(key["key"]))).status_code == 401


async def test_the_last_active_org_admin_key_cannot_be_revoked_but_others_can(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    org_id, admin_key = await create_org(settings, "acme")
    first_id = str(await owner_connection.fetchval("SELECT id FROM api_keys WHERE organization_id = $1", org_id))
    before = await table_snapshot(owner_connection)
    refused = await client.delete(f"/api/v1/api-keys/{first_id}", headers=auth(admin_key))
    assert refused.status_code == 409
    assert "last active org admin key" in problem(refused)["detail"]
    assert await table_snapshot(owner_connection) == before
    second_id, second_key = await _admin_key(settings, org_id, "second admin")
    assert (await client.delete(f"/api/v1/api-keys/{first_id}", headers=auth(second_key))).status_code == 204
    assert (await client.get("/api/v1/projects", headers=auth(admin_key))).status_code == 401
    assert (await client.get("/api/v1/projects", headers=auth(second_key))).status_code == 200
    last = await client.delete(f"/api/v1/api-keys/{second_id}", headers=auth(second_key))
    assert last.status_code == 409
    problem(last)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "ok", "kind": "org_admin"}, "kind"),
    ],
)
async def test_invalid_key_requests_are_422_naming_the_field_and_create_nothing(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection, body: dict[str, Any], field: str
) -> None:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    before = await table_snapshot(owner_connection)
    response = await client.post(f"/api/v1/projects/{project['id']}/api-keys", json=body, headers=auth(admin_key))
    assert response.status_code == 422
    assert field in problem(response)["detail"]
    assert await table_snapshot(owner_connection) == before


async def test_keys_hashed_under_the_old_salt_keep_working_through_a_salt_rotation(
    base_settings_env: dict[str, str], database_url: str, owner_connection: asyncpg.Connection
) -> None:
    before = make_settings(base_settings_env, DATABASE_URL=database_url)
    during = make_settings(base_settings_env, DATABASE_URL=database_url, API_KEY_SALT_NEW=NEW_SALT)
    after = make_settings(base_settings_env, DATABASE_URL=database_url, API_KEY_SALT=NEW_SALT)
    org_id, admin_key = await create_org(before, "acme")
    async with AsyncTestClient(app=create_app(before)) as client:
        project = await create_project(client, admin_key, "mobile")
        old_key = await _new_key(client, admin_key, project["id"], "old")
    stored = await owner_connection.fetchval("SELECT key_hash FROM api_keys WHERE id = $1", uuid.UUID(old_key["id"]))
    assert bytes(stored) == hash_api_key(OLD_SALT, old_key["key"])

    # A use just before the stage deploy: `last_used_at` is not rewritten for another minute by plain uses.
    async with AsyncTestClient(app=create_app(before)) as client:
        assert (await client.get(f"/api/v1/projects/{project['id']}", headers=auth(old_key["key"]))).status_code == 200
    used_before = await owner_connection.fetchval(
        "SELECT last_used_at FROM api_keys WHERE id = $1", uuid.UUID(old_key["id"])
    )

    async with AsyncTestClient(app=create_app(during)) as client:
        assert (await client.get(f"/api/v1/projects/{project['id']}", headers=auth(old_key["key"]))).status_code == 200
        # Used once under rotation: re-hashed under the new salt, and the use recorded (how operators tell).
        stored, used = await owner_connection.fetchrow(
            "SELECT key_hash, last_used_at FROM api_keys WHERE id = $1", uuid.UUID(old_key["id"])
        )
        assert bytes(stored) == hash_api_key(NEW_SALT, old_key["key"])
        assert used > used_before
        # Keys issued during rotation are hashed under the new salt straight away.
        fresh = await _new_key(client, admin_key, project["id"], "fresh")
        stored = await owner_connection.fetchval("SELECT key_hash FROM api_keys WHERE id = $1", uuid.UUID(fresh["id"]))
        assert bytes(stored) == hash_api_key(NEW_SALT, fresh["key"])

    async with AsyncTestClient(app=create_app(after)) as client:
        for key in (admin_key, old_key["key"], fresh["key"]):
            response = await client.get(f"/api/v1/projects/{project['id']}", headers=auth(key))
            assert response.status_code == 200, key[:9]
    assert org_id


async def test_a_key_whose_salt_was_retired_without_rotation_is_refused(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    before = make_settings(base_settings_env, DATABASE_URL=database_url)
    retired = make_settings(base_settings_env, DATABASE_URL=database_url, API_KEY_SALT=NEW_SALT)
    _, admin_key = await create_org(before, "acme")
    async with AsyncTestClient(app=create_app(retired)) as client:
        response = await client.get("/api/v1/projects", headers=auth(admin_key))
    assert response.status_code == 401
    problem(response)


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer ", "Basic abc", "zkeb_abc", "Bearer zkeb_short", "Bearer " + "zkeb_" + "A" * 5000],
)
async def test_malformed_authorization_headers_are_401(client: Client, settings: Settings, header: str) -> None:
    await create_org(settings, "acme")
    response = await client.get("/api/v1/projects", headers={"Authorization": header})
    assert response.status_code == 401
    problem(response)


async def test_a_refused_api_key_is_challenged_as_an_invalid_token(client: Client, settings: Settings) -> None:
    # RFC 6750 §3.1: a bearer token was presented and is no good, so the challenge says `error="invalid_token"`
    # (the device tokens' refusals said so; the API keys' did not).
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    revoked = await _new_key(client, admin_key, project["id"])
    assert (await client.delete(f"/api/v1/api-keys/{revoked['id']}", headers=auth(admin_key))).status_code == 204
    keys = {
        "unknown": "zkeb_" + "A" * 43,
        "malformed": "zkeb_short",
        "revoked": revoked["key"],
        "too long to read": "zkeb_" + "A" * 5000,
    }
    for name, key in keys.items():
        response = await client.get("/api/v1/projects", headers=auth(key))
        assert response.status_code == 401, name
        assert response.headers["www-authenticate"] == INVALID_TOKEN_CHALLENGE, name
        problem(response)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer  "},
        {"Authorization": "Basic abc"},
    ],
    ids=["no header", "empty", "bearer without a token", "bearer and blanks", "another scheme"],
)
async def test_a_request_without_a_bearer_credential_is_challenged_without_an_error(
    client: Client, settings: Settings, headers: dict[str, str]
) -> None:
    # RFC 6750 §3.1: "If the request lacks any authentication information, the resource server SHOULD NOT include
    # an error code".
    await create_org(settings, "acme")
    response = await client.get("/api/v1/projects", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == NO_CREDENTIAL_CHALLENGE
    problem(response)


async def test_two_admins_revoking_each_other_at_once_leave_exactly_one_active_admin_key(
    settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    import asyncio  # noqa: PLC0415

    from zkeb.core.errors import ConflictError  # noqa: PLC0415
    from zkeb.core.tenancy import install_tenant_setter, tenant_scope  # noqa: PLC0415
    from zkeb.domain.accounts.services import ApiKeyService  # noqa: PLC0415

    org_id, _ = await create_org(settings, "acme")
    first_id = await owner_connection.fetchval("SELECT id FROM api_keys WHERE organization_id = $1", org_id)
    second_id, _ = await _admin_key(settings, org_id, "second admin")
    assert settings.database_url is not None
    install_tenant_setter()
    engine = create_app_engine(settings, settings.database_url)

    async def revoke(key_id: uuid.UUID) -> str:
        async with async_sessionmaker(engine, expire_on_commit=False)() as session:
            try:
                await ApiKeyService(session=session).revoke(key_id, organization_id=org_id)
            except ConflictError:
                return "conflict"
            await session.commit()
            return "revoked"

    # Hold the organization's row lock so both revocations pass their checks' starting line together.
    blocker = owner_connection.transaction()
    await blocker.start()
    await owner_connection.execute("SELECT id FROM organizations WHERE id = $1 FOR UPDATE", org_id)
    try:
        with tenant_scope(org_id):
            tasks = [asyncio.create_task(revoke(key)) for key in (uuid.UUID(second_id), first_id)]
        waiting = 0
        for _ in range(600):
            # Statistics are a per-transaction snapshot: drop it so each poll sees the server now.
            await owner_connection.execute("SELECT pg_stat_clear_snapshot()")
            waiting = await owner_connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting >= 2:
                break
            await asyncio.sleep(0.05)
        assert waiting == 2
        await blocker.rollback()
        outcomes = await asyncio.gather(*tasks)
    finally:
        await engine.dispose()
    assert sorted(outcomes) == ["conflict", "revoked"]
    active = await owner_connection.fetchval(
        "SELECT count(*) FROM api_keys WHERE organization_id = $1 AND kind = 'org_admin' AND revoked_at IS NULL", org_id
    )
    assert active == 1
