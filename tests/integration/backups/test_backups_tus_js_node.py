"""tus-js-client 4 in Node against granian on PostgreSQL: unmodified, with the text-form metadata a JS client sends."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from backups_support import MIB, Tenant, auth, make_tenant, row_counts, sign_envelope
from tus_js_support import CuttingProxy, ensure_node_modules, run_node

from support import Envelope, granian_server, make_settings

TWELVE_MB = 12_000_000
FIVE_MIB = 5 * MIB


@pytest.fixture
def live_url(base_settings_env: dict[str, str], database_url: str) -> Iterator[str]:
    ensure_node_modules()
    with granian_server({**base_settings_env, "DATABASE_URL": database_url}) as url:
        yield url


@pytest.fixture
async def http(live_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live_url, timeout=60) as client:
        yield client


@pytest.fixture
async def tenant(http: httpx.AsyncClient, base_settings_env: dict[str, str], database_url: str) -> Tenant:
    return await make_tenant(http, make_settings(base_settings_env, DATABASE_URL=database_url))


async def upload_with_tus_js(
    base_url: str, tenant: Tenant, envelope: Envelope, tmp_path: Path, **options: Any
) -> dict[str, Any]:
    payload_path = tmp_path / "payload.bin"
    payload_path.write_bytes(envelope.payload)
    job = {
        "endpoint": f"{base_url}/api/v1/uploads",
        "token": tenant.project_key,
        "metadata": envelope.tus_text_metadata(),
        "payloadPath": str(payload_path),
        "chunkSize": FIVE_MIB,
        "uploadDataDuringCreation": False,
        "retryDelays": None,
        **options,
    }
    return await run_node("tus_node_upload.mjs", job)


async def restore(http: httpx.AsyncClient, tenant: Tenant, backup_id: str) -> bytes:
    response = await http.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
    assert response.status_code == 200, response.text
    return response.content


def calls(result: dict[str, Any]) -> list[tuple[str, int | None]]:
    return [(r["method"], None if r["offset"] is None else int(r["offset"])) for r in result["requests"]]


async def test_a_12_mb_backup_in_5_mib_chunks_with_text_form_metadata_restores_byte_identical(
    http: httpx.AsyncClient, live_url: str, tenant: Tenant, tmp_path: Path
) -> None:
    # The largest encrypted metadata (8 KiB): its text form, base64 again for tus, is a 15 KB header.
    envelope = sign_envelope(tenant, os.urandom(TWELVE_MB), metadata=os.urandom(8192))
    result = await upload_with_tus_js(live_url, tenant, envelope, tmp_path)
    assert result["ok"], result
    assert calls(result) == [("POST", None), ("PATCH", 0), ("PATCH", FIVE_MIB), ("PATCH", 2 * FIVE_MIB)]
    assert await restore(http, tenant, result["backupId"]) == envelope.payload
    backup = await http.get(f"/api/v1/backups/{result['backupId']}", headers=auth(tenant.project_key))
    assert backup.json()["metadata"] == envelope.tus_text_metadata()["metadata"]


async def test_upload_data_during_creation_sends_the_first_chunk_with_the_post(
    http: httpx.AsyncClient, live_url: str, tenant: Tenant, tmp_path: Path
) -> None:
    for size, expected in (
        (FIVE_MIB + MIB, [("POST", None), ("PATCH", FIVE_MIB)]),
        (MIB + 3, [("POST", None)]),  # the whole backup in the POST, which commits it
    ):
        envelope = sign_envelope(tenant, os.urandom(size))
        result = await upload_with_tus_js(live_url, tenant, envelope, tmp_path, uploadDataDuringCreation=True)
        assert result["ok"], result
        assert calls(result) == expected
        assert await restore(http, tenant, result["backupId"]) == envelope.payload


async def test_a_connection_dropped_mid_patch_is_resumed_by_the_clients_own_retry_logic(
    http: httpx.AsyncClient, live_url: str, tenant: Tenant, tmp_path: Path, owner_connection: asyncpg.Connection
) -> None:
    envelope = sign_envelope(tenant, os.urandom(2 * FIVE_MIB))
    port = int(live_url.rsplit(":", 1)[1])
    # Cut 2 MiB into the second PATCH; tus-js-client retries (HEAD, then PATCH from the offset the server kept).
    async with CuttingProxy(port, cut_after=FIVE_MIB + 2 * MIB) as proxy:
        result = await upload_with_tus_js(
            f"http://127.0.0.1:{proxy.port}", tenant, envelope, tmp_path, retryDelays=[200, 1000, 3000, 5000]
        )
    assert proxy.cut
    assert result["ok"], result
    made = calls(result)
    assert made[:3] == [("POST", None), ("PATCH", 0), ("PATCH", FIVE_MIB)]
    assert made[3] == ("HEAD", None)
    resumed_at = made[4][1]
    assert made[4][0] == "PATCH"
    assert resumed_at is not None
    # The retry resumes where the server says (from the bytes it kept of the cut PATCH, if it recorded them by the
    # time of the HEAD), never from the start.
    assert FIVE_MIB <= resumed_at <= FIVE_MIB + 2 * MIB
    assert await restore(http, tenant, result["backupId"]) == envelope.payload
    counts = await row_counts(owner_connection)
    assert (counts["backups"], counts["upload_sessions"]) == (1, 0)
