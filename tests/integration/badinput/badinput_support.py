"""Helpers for the bad-input catalogue (docs/bad-inputs.md): a tenant made over HTTP and a snapshot of every table.

Each test sends one hostile request and then checks three things: the status, the problem+json body, and that no
table changed (`Snapshot`, taken as the schema owner so row-level security hides nothing).
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.lib.envelope import auth_message
from zkeb.settings import Settings

from support import Envelope, create_org, problem, sign_backup

__all__ = ("Client", "Tenant", "assert_refused", "auth", "make_tenant", "snapshot", "tus_headers")

Client = AsyncTestClient[Litestar]

# Every table but the audit trail, which records refused attempts on purpose.
TABLES = (
    "organizations",
    "projects",
    "api_keys",
    "devices",
    "device_proofs",
    "backups",
    "payloads",
    "backup_chunks",
    "payload_nonces",
    "upload_sessions",
)


def auth(credential: str) -> dict[str, str]:
    """The Authorization header for a bearer credential."""
    return {"Authorization": f"Bearer {credential}"}


def tus_headers(credential: str, **extra: str) -> dict[str, str]:
    """Headers of a tus request."""
    return {"Tus-Resumable": "1.0.0", **auth(credential), **extra}


@dataclass(frozen=True)
class Tenant:
    """An organization with an admin key, one project with a project key, one device and one committed backup."""

    organization_id: uuid.UUID
    admin_key: str
    project_id: uuid.UUID
    project_key: str
    device_id: str
    device_id_hash: bytes
    private_key: Ed25519PrivateKey
    backup_id: str
    payload: bytes

    def envelope(self, payload: bytes = b"ciphertext", **changes: Any) -> Envelope:
        """A fresh envelope signed by the tenant's device for its project."""
        return sign_backup(
            self.private_key, project_id=self.project_id, device_id_hash=self.device_id_hash, payload=payload, **changes
        )

    def proof(self, timestamp_ms: int | None = None) -> dict[str, Any]:
        """A valid proof-of-possession body for `POST /api/v1/auth/token`."""
        when = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        message = auth_message(project_id=self.project_id, device_id_hash=self.device_id_hash, timestamp_ms=when)
        return {
            "project_id": str(self.project_id),
            "device_id_hash": self.device_id_hash.hex(),
            "timestamp_ms": when,
            "signature": base64.b64encode(self.private_key.sign(message)).decode(),
        }


async def _created(client: Client, url: str, body: dict[str, Any], key: str) -> dict[str, Any]:
    response = await client.post(url, json=body, headers=auth(key))
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def make_tenant(client: Client, settings: Settings) -> Tenant:
    """Everything a hostile request could damage, made through the public API."""
    organization_id, admin_key = await create_org(settings, f"badinput-{uuid.uuid4().hex[:6]}")
    project_id = uuid.UUID((await _created(client, "/api/v1/projects", {"name": "app"}, admin_key))["id"])
    key = await _created(client, f"/api/v1/projects/{project_id}/api-keys", {"name": "backup"}, admin_key)
    private_key = Ed25519PrivateKey.generate()
    device_id_hash = hashlib.sha256(uuid.uuid4().bytes).digest()
    public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    device = await _created(
        client,
        f"/api/v1/projects/{project_id}/devices",
        {"device_id_hash": device_id_hash.hex(), "public_key": base64.b64encode(public).decode(), "label": "phone"},
        admin_key,
    )
    payload = bytes(range(256)) * 40
    envelope = sign_backup(private_key, project_id=project_id, device_id_hash=device_id_hash, payload=payload)
    backup = await _created(client, "/api/v1/backups", envelope.json(), key["key"])
    return Tenant(
        organization_id,
        admin_key,
        project_id,
        key["key"],
        device["id"],
        device_id_hash,
        private_key,
        backup["id"],
        payload,
    )


async def snapshot(connection: asyncpg.Connection) -> dict[str, tuple[int, str | None]]:
    """Row count and a digest of every row of every table, as the owner sees them."""
    state: dict[str, tuple[int, str | None]] = {}
    for table in TABLES:
        row = await connection.fetchrow(
            f"SELECT count(*) AS n, md5(string_agg(t::text, ',' ORDER BY t::text)) AS d FROM {table} t"
        )
        assert row is not None
        state[table] = (row["n"], row["d"])
    return state


def assert_refused(response: Any, status: int) -> dict[str, Any]:
    """Assert a problem+json refusal with `status` that echoes nothing hostile back; return its body."""
    assert response.status_code == status, response.text
    body = problem(response)
    assert response.status_code < 500
    return body
