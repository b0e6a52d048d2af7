"""Helpers for the accounts tests: organizations, projects, devices and proofs of possession over HTTP."""

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

from support import create_org

__all__ = (
    "ACCOUNT_TABLES",
    "EnrolledDevice",
    "auth",
    "create_org",
    "create_project",
    "enroll_device",
    "proof",
    "request_token",
    "table_snapshot",
)

ACCOUNT_TABLES = ("organizations", "projects", "api_keys", "devices", "device_proofs")

Client = AsyncTestClient[Litestar]


def auth(credential: str) -> dict[str, str]:
    """The Authorization header for a bearer credential."""
    return {"Authorization": f"Bearer {credential}"}


async def create_project(client: Client, admin_key: str, name: str, **policy: Any) -> dict[str, Any]:
    """Create a project over HTTP and return its body."""
    response = await client.post("/api/v1/projects", json={"name": name, **policy}, headers=auth(admin_key))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


@dataclass(frozen=True)
class EnrolledDevice:
    """A device enrolled over HTTP, with the private key the test signs with."""

    id: str
    project_id: str
    device_id_hash: bytes
    private_key: Ed25519PrivateKey

    @property
    def hash_hex(self) -> str:
        """`device_id_hash` as the API spells it."""
        return self.device_id_hash.hex()


def public_key_b64(private_key: Ed25519PrivateKey) -> str:
    """Standard base64 of the raw 32-byte public key."""
    return base64.b64encode(private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


async def enroll_device(client: Client, admin_key: str, project_id: str, label: str = "phone") -> EnrolledDevice:
    """Enroll a fresh device in a project over HTTP."""
    private_key = Ed25519PrivateKey.generate()
    device_id_hash = hashlib.sha256(uuid.uuid4().bytes).digest()
    response = await client.post(
        f"/api/v1/projects/{project_id}/devices",
        json={"device_id_hash": device_id_hash.hex(), "public_key": public_key_b64(private_key), "label": label},
        headers=auth(admin_key),
    )
    assert response.status_code == 201, response.text
    return EnrolledDevice(
        id=response.json()["id"], project_id=project_id, device_id_hash=device_id_hash, private_key=private_key
    )


def proof(
    device: EnrolledDevice,
    *,
    project_id: str | None = None,
    timestamp_ms: int | None = None,
    private_key: Ed25519PrivateKey | None = None,
) -> dict[str, Any]:
    """A token request body signed by the device (or by `private_key`)."""
    project = project_id or device.project_id
    timestamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    message = auth_message(project_id=uuid.UUID(project), device_id_hash=device.device_id_hash, timestamp_ms=timestamp)
    signature = (private_key or device.private_key).sign(message)
    return {
        "project_id": project,
        "device_id_hash": device.hash_hex,
        "timestamp_ms": timestamp,
        "signature": base64.b64encode(signature).decode(),
    }


async def request_token(client: Client, device: EnrolledDevice) -> str:
    """A device token for `device`, from a fresh proof."""
    response = await client.post("/api/v1/auth/token", json=proof(device))
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


async def table_snapshot(connection: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every account row as the owner sees it (bypassing RLS), to show that a refused request changed nothing."""
    snapshot: dict[str, list[tuple[Any, ...]]] = {}
    for table in ACCOUNT_TABLES:
        rows = await connection.fetch(f"SELECT * FROM {table} ORDER BY id")
        # `last_used_at` moves whenever a valid key is presented, even on a refused request.
        snapshot[table] = [tuple(v for k, v in row.items() if k != "last_used_at") for row in rows]
    return snapshot
