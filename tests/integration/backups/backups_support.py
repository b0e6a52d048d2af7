"""Helpers for the backups tests: tenants, devices, signed envelopes, and a real granian server.

Tenants are made through the public API (org admin key from the service, then projects, project keys, devices and
device tokens over HTTP), and envelopes are signed exactly as a device would sign them.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from zkeb.lib.envelope import auth_message
from zkeb.settings import Settings

from support import Envelope, create_org, sign_backup

BACKUP_TABLES = ("payloads", "backup_chunks", "backups", "payload_nonces", "upload_sessions")
MIB = 1024 * 1024


#: Litestar's `AsyncTestClient` or an `httpx.AsyncClient` on a live server.
HttpClient = Any


def auth(credential: str) -> dict[str, str]:
    """The Authorization header for a bearer credential."""
    return {"Authorization": f"Bearer {credential}"}


@dataclass(frozen=True)
class Device:
    """An enrolled device with the private key it signs with."""

    id: str
    device_id_hash: bytes
    private_key: Ed25519PrivateKey


@dataclass(frozen=True)
class Tenant:
    """An organization with one project, its project key and two enrolled devices."""

    organization_id: uuid.UUID
    admin_key: str
    project_id: uuid.UUID
    project_key: str
    devices: tuple[Device, ...]

    @property
    def device(self) -> Device:
        """The first device."""
        return self.devices[0]


async def _post(client: HttpClient, url: str, body: dict[str, Any], key: str) -> dict[str, Any]:
    response = await client.post(url, json=body, headers=auth(key))
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def enroll_device(client: HttpClient, admin_key: str, project_id: uuid.UUID) -> Device:
    """Enroll a fresh device (random id, new Ed25519 key) over HTTP."""
    private_key = Ed25519PrivateKey.generate()
    device_id_hash = hashlib.sha256(uuid.uuid4().bytes).digest()
    public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    body = await _post(
        client,
        f"/api/v1/projects/{project_id}/devices",
        {"device_id_hash": device_id_hash.hex(), "public_key": base64.b64encode(public).decode(), "label": "phone"},
        admin_key,
    )
    return Device(id=body["id"], device_id_hash=device_id_hash, private_key=private_key)


async def make_tenant(client: HttpClient, settings: Settings, name: str = "acme") -> Tenant:
    """An organization, a project with a project key, and two devices, all through the public API."""
    organization_id, admin_key = await create_org(settings, f"{name}-{uuid.uuid4().hex[:6]}")
    project = await _post(client, "/api/v1/projects", {"name": "app"}, admin_key)
    project_id = uuid.UUID(project["id"])
    key = await _post(client, f"/api/v1/projects/{project_id}/api-keys", {"name": "backup"}, admin_key)
    devices = (
        await enroll_device(client, admin_key, project_id),
        await enroll_device(client, admin_key, project_id),
    )
    return Tenant(organization_id, admin_key, project_id, key["key"], devices)


async def device_token(client: HttpClient, tenant: Tenant, device: Device) -> str:
    """A device token from a fresh proof of possession."""
    timestamp = int(time.time() * 1000)
    message = auth_message(project_id=tenant.project_id, device_id_hash=device.device_id_hash, timestamp_ms=timestamp)
    response = await client.post(
        "/api/v1/auth/token",
        json={
            "project_id": str(tenant.project_id),
            "device_id_hash": device.device_id_hash.hex(),
            "timestamp_ms": timestamp,
            "signature": base64.b64encode(device.private_key.sign(message)).decode(),
        },
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def sign_envelope(
    tenant: Tenant,
    payload: bytes,
    *,
    device: Device | None = None,
    container_id: uuid.UUID | None = None,
    payload_nonce: bytes | None = None,
    metadata: bytes = b"encrypted-metadata",
    timestamp: datetime | None = None,
    project_id: uuid.UUID | None = None,
) -> Envelope:
    """An envelope for `payload` signed by one of the tenant's devices (default its first) for its project."""
    device = device or tenant.device
    return sign_backup(
        device.private_key,
        project_id=project_id or tenant.project_id,
        device_id_hash=device.device_id_hash,
        payload=payload,
        container_id=container_id,
        payload_nonce=payload_nonce,
        metadata=metadata,
        timestamp=timestamp,
    )


def tus_headers(credential: str, **extra: str) -> dict[str, str]:
    """Headers of a tus request."""
    return {"Tus-Resumable": "1.0.0", **auth(credential), **extra}


async def row_counts(connection: asyncpg.Connection) -> dict[str, int]:
    """Rows of every backups table as the owner sees them (RLS bypassed)."""
    counts: dict[str, int] = {}
    for table in BACKUP_TABLES:
        counts[table] = await connection.fetchval(f"SELECT count(*) FROM {table}")
    return counts


NOTHING_STORED = dict.fromkeys(BACKUP_TABLES, 0)


# --- a real granian server -----------------------------------------------------------------------------------------
