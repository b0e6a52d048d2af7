"""A backup's commit: small uploads in one transaction, no hot lock between concurrent uploads, audited creation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import uuid
from typing import Any

import asyncpg
import pytest
from backups_support import (
    MIB,
    NOTHING_STORED,
    Tenant,
    auth,
    device_token,
    make_tenant,
    row_counts,
    sign_envelope,
    tus_headers,
)
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.domain.backups.services.uploads import IN_MEMORY_UPLOAD_MAX
from zkeb.settings import Settings

from support import Envelope, problem

Client = AsyncTestClient[Litestar]
OCTETS = "application/offset+octet-stream"


@pytest.fixture
async def tenant(client: Client, settings: Settings) -> Tenant:
    return await make_tenant(client, settings)


async def _create_with_upload(client: Client, tenant: Tenant, envelope: Envelope, body: bytes, **headers: str) -> Any:
    return await client.post(
        "/api/v1/uploads",
        content=body,
        headers=tus_headers(
            tenant.project_key,
            **{
                "Upload-Length": str(len(envelope.payload)),
                "Upload-Metadata": envelope.tus_metadata(),
                "Content-Type": OCTETS,
                **headers,
            },
        ),
    )


async def _audit_events(client: Client, tenant: Tenant, action: str) -> list[dict[str, Any]]:
    response = await client.get(
        "/api/v1/audit-events", params={"action": action, "limit": 100}, headers=auth(tenant.admin_key)
    )
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def _chain_is_valid(client: Client, tenant: Tenant) -> bool:
    response = await client.get("/api/v1/audit-events/verify", headers=auth(tenant.admin_key))
    assert response.status_code == 200, response.text
    valid: bool = response.json()["valid"]
    return valid


async def test_a_whole_small_tus_upload_is_committed_by_its_creation_and_leaves_no_session(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    payload = os.urandom(1000)
    envelope = sign_envelope(tenant, payload)
    response = await _create_with_upload(client, tenant, envelope, payload)
    assert response.status_code == 201, response.text
    assert response.headers["upload-offset"] == "1000"
    backup_id = response.headers["zkeb-backup-id"]
    restored = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
    assert restored.content == payload
    counts = await row_counts(owner_connection)
    assert counts == {"payloads": 1, "backup_chunks": 1, "backups": 1, "payload_nonces": 1, "upload_sessions": 0}
    head = await client.head(response.headers["location"], headers=tus_headers(tenant.project_key))
    assert head.status_code == 404


@pytest.mark.parametrize("refusal", ["checksum", "signature", "nonce", "quota"])
async def test_a_refused_whole_small_tus_upload_stores_nothing_and_names_no_upload(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, refusal: str
) -> None:
    payload = os.urandom(1000)
    envelope = sign_envelope(tenant, payload if refusal != "signature" else os.urandom(len(payload)))
    headers: dict[str, str] = {}
    if refusal == "checksum":
        headers["Upload-Checksum"] = f"sha256 {base64.b64encode(hashlib.sha256(b'other').digest()).decode()}"
    if refusal == "nonce":  # the nonce went to a backup before
        committed = await client.post(
            "/api/v1/backups",
            json=sign_envelope(tenant, b"first", payload_nonce=envelope.payload_nonce).json(),
            headers=auth(tenant.project_key),
        )
        assert committed.status_code == 201
    if refusal == "quota":
        await owner_connection.execute("UPDATE projects SET storage_quota_bytes = 999")
    before = await row_counts(owner_connection)
    response = await _create_with_upload(client, tenant, envelope, payload, **headers)
    assert response.status_code == {"checksum": 460, "signature": 422, "nonce": 409, "quota": 507}[refusal]
    problem(response)
    assert "location" not in response.headers
    assert await row_counts(owner_connection) == before
    if refusal != "nonce":
        assert before == NOTHING_STORED


async def test_uploads_wait_neither_for_the_project_row_nor_for_the_audit_chain_head(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    # Another transaction holds what every commit used to take: the project's row (its usage counter) and the
    # organization's audit chain head. A backup's commit must need neither, so uploads of one project (and of one
    # organization) never queue behind each other's commits.
    assert await _chain_is_valid(client, tenant)  # the organization's head exists (its set-up was audited)
    async with owner_connection.transaction():
        await owner_connection.execute("UPDATE projects SET name = name WHERE id = $1", tenant.project_id)
        locked = await owner_connection.fetchval(
            "SELECT seq FROM audit_chain_heads WHERE organization_id = $1 FOR UPDATE", tenant.organization_id
        )
        assert locked is not None
        single = await asyncio.wait_for(
            client.post(
                "/api/v1/backups", json=sign_envelope(tenant, b"single").json(), headers=auth(tenant.project_key)
            ),
            timeout=15,
        )
        assert single.status_code == 201, single.text
        small = os.urandom(500)
        whole = await asyncio.wait_for(
            _create_with_upload(client, tenant, sign_envelope(tenant, small), small), timeout=15
        )
        assert whole.status_code == 201, whole.text
    created = {event["target_id"] for event in await _audit_events(client, tenant, "backup.created")}
    assert created == {single.json()["id"], whole.headers["zkeb-backup-id"]}
    assert await _chain_is_valid(client, tenant)


async def test_every_committed_backup_is_audited_with_its_actor_size_and_container(
    client: Client, tenant: Tenant
) -> None:
    container = uuid.uuid4()
    by_key = await client.post(
        "/api/v1/backups",
        json=sign_envelope(tenant, b"k" * 100, container_id=container).json(),
        headers=auth(tenant.project_key),
    )
    token = await device_token(client, tenant, tenant.devices[1])
    by_device = await client.post(
        "/api/v1/backups",
        json=sign_envelope(tenant, b"d" * 200, device=tenant.devices[1], container_id=container).json(),
        headers=auth(token),
    )
    streamed_payload = os.urandom(IN_MEMORY_UPLOAD_MAX + MIB)  # through an upload session and its PATCH
    streamed_envelope = sign_envelope(tenant, streamed_payload, container_id=container)
    created = await client.post(
        "/api/v1/uploads",
        headers=tus_headers(
            tenant.project_key,
            **{"Upload-Length": str(len(streamed_payload)), "Upload-Metadata": streamed_envelope.tus_metadata()},
        ),
    )
    streamed = await client.patch(
        created.headers["location"],
        content=streamed_payload,
        headers=tus_headers(tenant.project_key, **{"Upload-Offset": "0", "Content-Type": OCTETS}),
    )
    assert (by_key.status_code, by_device.status_code, streamed.status_code) == (201, 201, 204)
    events = {event["target_id"]: event for event in await _audit_events(client, tenant, "backup.created")}
    expected = {
        by_key.json()["id"]: ("project_key", 100, tenant.device.id),
        by_device.json()["id"]: ("device", 200, tenant.devices[1].id),
        streamed.headers["zkeb-backup-id"]: ("project_key", len(streamed_payload), tenant.device.id),
    }
    assert set(events) == set(expected)
    for backup_id, (actor_type, size, device_id) in expected.items():
        event = events[backup_id]
        assert (event["actor_type"], event["target_type"], event["outcome"]) == (actor_type, "backup", "success")
        assert event["actor_id"]
        if actor_type == "device":  # the device's id, which the trail names elsewhere, not its token's jti
            assert event["actor_id"] == device_id
        assert event["details"]["size"] == size
        assert event["details"]["container_id"] == str(container)
        assert event["details"]["device_id"] == device_id
        assert event["details"]["project_id"] == str(tenant.project_id)
    assert await _chain_is_valid(client, tenant)


async def test_concurrent_uploads_of_one_project_all_commit_count_once_and_keep_the_chain_valid(
    client: Client, tenant: Tenant
) -> None:
    sizes = [100 + index for index in range(16)]
    responses = await asyncio.gather(
        *(
            client.post(
                "/api/v1/backups",
                json=sign_envelope(tenant, os.urandom(size)).json(),
                headers=auth(tenant.project_key),
            )
            for size in sizes
        )
    )
    assert [r.status_code for r in responses] == [201] * len(sizes)
    usage = (await client.get(f"/api/v1/projects/{tenant.project_id}/usage", headers=auth(tenant.admin_key))).json()
    assert (usage["used_bytes"], usage["backups"]) == (sum(sizes), len(sizes))
    project = (await client.get(f"/api/v1/projects/{tenant.project_id}", headers=auth(tenant.admin_key))).json()
    assert project["used_bytes"] == sum(sizes)
    events = await _audit_events(client, tenant, "backup.created")
    assert {event["target_id"] for event in events} == {r.json()["id"] for r in responses}
    assert await _chain_is_valid(client, tenant)
