"""Helpers for the lifecycle tests: uploads, project policy changes, ageing rows, and apps with their own settings.

Tenants, devices and signed envelopes come from the backups tests' helpers (`backups_support`), so both suites build
their fixtures the same way a client would.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.app import create_app
from zkeb.settings import Settings

from support import Envelope, granian_server, make_settings

# The backups tests' helpers live in their own folder (test folders are not packages).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backups"))

from backups_support import (
    MIB,
    NOTHING_STORED,
    Device,
    HttpClient,
    Tenant,
    auth,
    device_token,
    enroll_device,
    make_tenant,
    row_counts,
    sign_envelope,
    tus_headers,
)

__all__ = (
    "MIB",
    "NOTHING_STORED",
    "Client",
    "Device",
    "Envelope",
    "HttpClient",
    "Tenant",
    "age_backups",
    "app_client",
    "auth",
    "device_token",
    "enroll_device",
    "granian_server",
    "lifecycle_settings",
    "make_tenant",
    "row_counts",
    "set_policy",
    "sign_envelope",
    "trash_backups",
    "tus_headers",
    "upload",
    "upload_tus",
    "visible_ids",
)

Client = AsyncTestClient[Litestar]


def lifecycle_settings(base: dict[str, str], database_url: str, **overrides: str) -> Settings:
    """Settings for a lifecycle test: no in-process maintenance (tests run passes themselves), a roomy pool."""
    return make_settings(base, DATABASE_URL=database_url, MAINTENANCE_INTERVAL="0", DB_POOL_SIZE="30", **overrides)


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[Client]:
    """A test client on an app built from `settings`."""
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield client


async def upload(client: HttpClient, credential: str, envelope: Envelope) -> Any:
    """POST a single-shot upload as JSON; returns the response."""
    return await client.post("/api/v1/backups", json=envelope.json(), headers=auth(credential))


async def upload_tus(client: HttpClient, credential: str, envelope: Envelope) -> Any:
    """Create a tus upload and send the whole payload in one PATCH; returns the PATCH response."""
    created = await client.post(
        "/api/v1/uploads",
        headers=tus_headers(
            credential,
            **{"Upload-Length": str(len(envelope.payload)), "Upload-Metadata": envelope.tus_metadata()},
        ),
    )
    assert created.status_code == 201, created.text
    return await client.patch(
        created.headers["location"],
        content=envelope.payload,
        headers=tus_headers(credential, **{"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}),
    )


async def set_policy(client: HttpClient, tenant: Tenant, **fields: Any) -> dict[str, Any]:
    """PATCH the tenant's project (org admin) and return the project."""
    response = await client.patch(f"/api/v1/projects/{tenant.project_id}", json=fields, headers=auth(tenant.admin_key))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def visible_ids(client: HttpClient, credential: str, container_id: uuid.UUID | None = None) -> list[str]:
    """Ids of the backups a credential lists (newest first)."""
    params = {"limit": 100, **({"container_id": str(container_id)} if container_id else {})}
    response = await client.get("/api/v1/backups", params=params, headers=auth(credential))
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


async def age_backups(owner: asyncpg.Connection, backup_ids: list[str], *, days: float) -> None:
    """Move backups' creation `days` into the past (as the owner)."""
    await owner.execute(
        "UPDATE backups SET created_at = created_at - make_interval(secs => $2) WHERE id = ANY($1::uuid[])",
        [uuid.UUID(i) for i in backup_ids],
        days * 86400,
    )


async def trash_backups(owner: asyncpg.Connection, backup_ids: list[str], *, days_ago: float) -> None:
    """Mark backups as trashed `days_ago` days ago (as the owner)."""
    await owner.execute(
        "UPDATE backups SET deleted_at = now() - make_interval(secs => $2), deleted_by = 'test' "
        "WHERE id = ANY($1::uuid[])",
        [uuid.UUID(i) for i in backup_ids],
        days_ago * 86400,
    )
