"""Every sensitive accounts action leaves an audit event, with its actor and outcome, and never a secret."""

from __future__ import annotations

import uuid

import asyncpg
from accounts_support import auth, create_org, create_project, enroll_device, proof, request_token
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.settings import Settings

Client = AsyncTestClient[Litestar]


async def test_sensitive_actions_are_audited_with_actor_target_and_outcome_and_no_secrets(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    org_id, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    key_response = await client.post(
        f"/api/v1/projects/{project['id']}/api-keys", json={"name": "ci"}, headers=auth(admin_key)
    )
    project_key = key_response.json()
    device = await enroll_device(client, admin_key, project["id"])
    token = await request_token(client, device)
    refused = await client.post("/api/v1/auth/token", json=proof(device, private_key=Ed25519PrivateKey.generate()))
    assert refused.status_code == 401
    await client.patch(f"/api/v1/projects/{project['id']}", json={"append_only": True}, headers=auth(admin_key))
    assert (await client.delete(f"/api/v1/api-keys/{project_key['id']}", headers=auth(admin_key))).status_code == 204
    assert (await client.get("/api/v1/projects", headers=auth(project_key["key"]))).status_code == 401
    assert (await client.delete(f"/api/v1/devices/{device.id}", headers=auth(admin_key))).status_code == 204

    rows = await owner_connection.fetch(
        "SELECT action, actor_type, actor_id, target_type, target_id, outcome, request_id, details::text AS details "
        "FROM audit_events WHERE organization_id = $1 ORDER BY seq",
        org_id,
    )
    admin_key_id = str(await owner_connection.fetchval("SELECT id FROM api_keys WHERE kind = 'org_admin'"))
    summary = [(r["action"], r["actor_type"], r["outcome"], r["target_type"]) for r in rows]
    assert summary == [
        ("organization.created", "cli", "success", "organization"),
        ("api_key.created", "cli", "success", "api_key"),
        ("project.created", "org_admin_key", "success", "project"),
        ("api_key.created", "org_admin_key", "success", "api_key"),
        ("device.enrolled", "org_admin_key", "success", "device"),
        ("device_token.issued", "device", "success", "device"),
        ("auth.token_refused", "device", "failure", "project"),
        ("project.updated", "org_admin_key", "success", "project"),
        ("api_key.revoked", "org_admin_key", "success", "api_key"),
        ("auth.failed", "project_key", "failure", None),
        ("device.revoked", "org_admin_key", "success", "device"),
    ]
    by_action = {r["action"]: r for r in rows}
    assert by_action["project.created"]["actor_id"] == admin_key_id
    assert by_action["project.created"]["target_id"] == project["id"]
    assert by_action["api_key.revoked"]["target_id"] == project_key["id"]
    assert by_action["device.revoked"]["target_id"] == device.id
    assert by_action["auth.failed"]["actor_id"] == project_key["id"]
    assert "bad signature" in by_action["auth.token_refused"]["details"]
    assert all(r["request_id"] for r in rows[2:])
    everything = "\n".join(str(tuple(r.values())) for r in rows)
    for secret in (admin_key, project_key["key"], token, settings.secrets.api_key_salt, settings.secrets.jwt_secret):
        assert secret not in everything
    assert uuid.UUID(by_action["device_token.issued"]["actor_id"]) == uuid.UUID(device.id)


async def test_audit_writing_can_be_turned_off(
    base_settings_env: dict[str, str], database_url: str, owner_connection: asyncpg.Connection
) -> None:
    from zkeb.app import create_app  # noqa: PLC0415

    from support import make_settings  # noqa: PLC0415

    settings = make_settings(base_settings_env, DATABASE_URL=database_url, ENABLE_AUDIT_LOGS="false")
    async with AsyncTestClient(app=create_app(settings)) as client:
        _, admin_key = await create_org(settings, "acme")
        await create_project(client, admin_key, "mobile")
    assert await owner_connection.fetchval("SELECT count(*) FROM audit_events") == 0


async def test_a_revoked_key_used_again_and_again_adds_one_audit_event_a_minute_per_key(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    org_id, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    revoked = []
    for name in ("ci", "laptop"):
        key = (
            await client.post(
                f"/api/v1/projects/{project['id']}/api-keys", json={"name": name}, headers=auth(admin_key)
            )
        ).json()
        assert (await client.delete(f"/api/v1/api-keys/{key['id']}", headers=auth(admin_key))).status_code == 204
        revoked.append(key)

    for _ in range(12):  # 24 refusals: under the address's 30 a minute (`TOKEN_RATE_LIMIT_PER_MINUTE`)
        for key in revoked:
            assert (await client.get("/api/v1/backups", headers=auth(key["key"]))).status_code == 401

    rows = await owner_connection.fetch(
        "SELECT actor_id, details FROM audit_events WHERE organization_id = $1 AND action = 'auth.failed' ORDER BY seq",
        org_id,
    )
    for key in revoked:
        events = [row for row in rows if row["actor_id"] == key["id"]]
        assert 1 <= len(events) <= 2, events  # two only if the tries straddled a minute's end
        assert '"window_seconds": 60' in events[0]["details"]
        assert '"failures_in_previous_window": 0' in events[0]["details"]
    verify = await client.get("/api/v1/audit-events/verify", headers=auth(admin_key))
    assert verify.json()["valid"] is True
