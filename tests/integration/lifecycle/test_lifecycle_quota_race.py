"""Uploads racing a quota on a real granian server (two worker processes): exactly as many as fit are admitted.

The in-process test client serializes requests, so the race runs against live workers, each upload on its own
HTTP client. The single-shot race runs with each payload store (conftest.py): with S3, the objects a refused upload
staged are gone too.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
from lifecycle_support import (
    Envelope,
    Tenant,
    auth,
    granian_server,
    make_tenant,
    row_counts,
    sign_envelope,
    tus_headers,
)

from zkeb.settings import Settings

from support import assert_bucket_holds_exactly_the_chunks, make_settings

SIZE = 1000
OCTETS = "application/offset+octet-stream"


@pytest.fixture
def live_url(base_settings_env: dict[str, str], database_url: str, payload_store_env: dict[str, str]) -> Iterator[str]:
    # Each of the 20 concurrent PATCHes may hold two connections at once (its body's and its commit's), all on one
    # worker at worst: a pool that fits them all, as the README advises, so a slow machine cannot turn the race into
    # pool timeouts (503).
    env = {
        **base_settings_env,
        **payload_store_env,
        "DATABASE_URL": database_url,
        "MAINTENANCE_INTERVAL": "0",
        "DB_POOL_SIZE": "40",
    }
    with granian_server(env, workers=2) as url:
        yield url


@pytest.fixture
def settings_for_live(
    base_settings_env: dict[str, str], database_url: str, payload_store_env: dict[str, str]
) -> Settings:
    return make_settings({**base_settings_env, **payload_store_env}, DATABASE_URL=database_url)


async def _tenant_with_quota(live_url: str, settings: Settings, quota: int) -> Tenant:
    async with httpx.AsyncClient(base_url=live_url, timeout=60) as http:
        tenant = await make_tenant(http, settings)
        response = await http.patch(
            f"/api/v1/projects/{tenant.project_id}", json={"storage_quota_bytes": quota}, headers=auth(tenant.admin_key)
        )
        assert response.status_code == 200, response.text
    return tenant


async def _usage(live_url: str, tenant: Tenant) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=live_url, timeout=60) as http:
        response = await http.get(f"/api/v1/projects/{tenant.project_id}/usage", headers=auth(tenant.admin_key))
    body: dict[str, object] = response.json()
    return body


async def test_twenty_concurrent_single_shot_uploads_admit_exactly_as_many_as_fit(
    live_url: str, settings_for_live: Settings, owner_connection: asyncpg.Connection
) -> None:
    tenant = await _tenant_with_quota(live_url, settings_for_live, 7 * SIZE + SIZE // 2)
    envelopes = [sign_envelope(tenant, os.urandom(SIZE)) for _ in range(20)]
    start = asyncio.Event()

    async def one(envelope: Envelope) -> tuple[int, dict[str, object]]:
        async with httpx.AsyncClient(base_url=live_url, timeout=60) as http:
            await start.wait()
            response = await http.post("/api/v1/backups", json=envelope.json(), headers=auth(tenant.project_key))
            return response.status_code, response.json()

    tasks = [asyncio.create_task(one(e)) for e in envelopes]
    start.set()
    results = await asyncio.gather(*tasks)
    assert sorted(status for status, _ in results) == [201] * 7 + [507] * 13
    for status, body in results:
        if status == 507:
            assert body["quota"] == 7 * SIZE + SIZE // 2
            assert body["requested"] == SIZE
            assert isinstance(body["used"], int)
            assert body["used"] + SIZE > body["quota"]
    usage = await _usage(live_url, tenant)
    assert (usage["used_bytes"], usage["backups"]) == (7 * SIZE, 7)
    counts = await row_counts(owner_connection)
    assert (counts["backups"], counts["payloads"], counts["payload_nonces"]) == (7, 7, 7)
    await assert_bucket_holds_exactly_the_chunks(settings_for_live, owner_connection)


async def test_twenty_tus_creations_at_once_reserve_exactly_as_many_as_fit_and_those_complete(
    live_url: str, settings_for_live: Settings, owner_connection: asyncpg.Connection
) -> None:
    # An open upload reserves its Upload-Length: creations race for the room, and each admitted upload can commit.
    tenant = await _tenant_with_quota(live_url, settings_for_live, 5 * SIZE)
    envelopes = [sign_envelope(tenant, os.urandom(SIZE)) for _ in range(20)]
    start = asyncio.Event()

    async def create(envelope: Envelope) -> tuple[int, str | None]:
        async with httpx.AsyncClient(base_url=live_url, timeout=60) as http:
            await start.wait()
            created = await http.post(
                "/api/v1/uploads",
                headers=tus_headers(
                    tenant.project_key, **{"Upload-Length": str(SIZE), "Upload-Metadata": envelope.tus_metadata()}
                ),
            )
            return created.status_code, created.headers.get("location")

    tasks = [asyncio.create_task(create(e)) for e in envelopes]
    start.set()
    created = await asyncio.gather(*tasks)
    assert sorted(status for status, _ in created) == [201] * 5 + [507] * 15
    assert (await _usage(live_url, tenant))["reserved_bytes"] == 5 * SIZE
    headers = tus_headers(tenant.project_key, **{"Upload-Offset": "0", "Content-Type": OCTETS})
    admitted = [(url, e) for (status, url), e in zip(created, envelopes, strict=True) if status == 201]

    async def complete(url: str | None, envelope: Envelope) -> int:
        assert url is not None
        async with httpx.AsyncClient(timeout=60) as http:
            return (await http.patch(url, content=envelope.payload, headers=headers)).status_code

    statuses = await asyncio.gather(*(complete(u, e) for u, e in admitted))
    assert statuses == [204] * 5
    counts = await row_counts(owner_connection)
    assert (counts["backups"], counts["upload_sessions"]) == (5, 0)
    usage = await _usage(live_url, tenant)
    assert (usage["used_bytes"], usage["reserved_bytes"]) == (5 * SIZE, 0)
