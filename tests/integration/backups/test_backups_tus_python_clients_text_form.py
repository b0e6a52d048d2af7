"""tuspy and aiotus with the text-form metadata map, strings as-is (no latin-1 trick), against granian."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Iterator

import aiotus
import httpx
import pytest
from backups_support import MIB, Tenant, auth, make_tenant, sign_envelope
from tusclient import client as tus_client

from support import granian_server, make_settings


@pytest.fixture
def live_url(base_settings_env: dict[str, str], database_url: str) -> Iterator[str]:
    with granian_server({**base_settings_env, "DATABASE_URL": database_url}) as url:
        yield url


@pytest.fixture
async def http(live_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live_url, timeout=60) as client:
        yield client


@pytest.fixture
async def tenant(http: httpx.AsyncClient, base_settings_env: dict[str, str], database_url: str) -> Tenant:
    return await make_tenant(http, make_settings(base_settings_env, DATABASE_URL=database_url))


async def latest_payload(http: httpx.AsyncClient, tenant: Tenant, container: str) -> bytes:
    latest = await http.get(f"/api/v1/containers/{container}/backups/latest", headers=auth(tenant.project_key))
    assert latest.status_code == 200, latest.text
    payload = await http.get(f"/api/v1/backups/{latest.json()['id']}/payload", headers=auth(tenant.project_key))
    return payload.content


async def test_tuspy_and_aiotus_upload_with_the_text_form_metadata_map(
    http: httpx.AsyncClient, live_url: str, tenant: Tenant
) -> None:
    by_tuspy = sign_envelope(tenant, os.urandom(2 * MIB + 11))
    uploader = tus_client.TusClient(f"{live_url}/api/v1/uploads", headers=auth(tenant.project_key)).uploader(
        file_stream=io.BytesIO(by_tuspy.payload), chunk_size=MIB, metadata=by_tuspy.tus_text_metadata()
    )
    await asyncio.to_thread(uploader.upload)
    assert await latest_payload(http, tenant, str(by_tuspy.container_id)) == by_tuspy.payload

    by_aiotus = sign_envelope(tenant, os.urandom(MIB + 7))
    location = await aiotus.upload(
        f"{live_url}/api/v1/uploads",
        io.BytesIO(by_aiotus.payload),
        metadata={name: value.encode() for name, value in by_aiotus.tus_text_metadata().items()},
        headers=auth(tenant.project_key),
        chunksize=MIB,
    )
    assert location is not None
    assert await latest_payload(http, tenant, str(by_aiotus.container_id)) == by_aiotus.payload
