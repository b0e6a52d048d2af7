"""Helpers for the observability tests: an in-memory span exporter installed for one test, accounts over HTTP."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from litestar import Litestar
from litestar.testing import AsyncTestClient
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from zkeb.core.telemetry import install_tracer_provider, uninstall_tracer_provider

from support import create_org, sign_backup

__all__ = (
    "auth",
    "committed_backup",
    "create_org",
    "create_project_key",
    "enroll_device",
    "signed_envelope",
    "spans_by_id",
    "traced",
)

Client = AsyncTestClient[Litestar]

_exporter = InMemorySpanExporter()
_provider = TracerProvider(resource=Resource.create({"service.name": "zkeb-test"}))
_provider.add_span_processor(SimpleSpanProcessor(_exporter))


@contextmanager
def traced() -> Iterator[InMemorySpanExporter]:
    """Apps created inside the block trace into the returned in-memory exporter (emptied first)."""
    _exporter.clear()
    install_tracer_provider(_provider)
    try:
        yield _exporter
    finally:
        uninstall_tracer_provider()
        _exporter.clear()


def spans_by_id(spans: tuple[ReadableSpan, ...]) -> dict[int, ReadableSpan]:
    """Spans keyed by span id."""
    return {span.context.span_id: span for span in spans if span.context is not None}


def auth(credential: str) -> dict[str, str]:
    """The Authorization header for a bearer credential."""
    return {"Authorization": f"Bearer {credential}"}


async def create_project_key(client: Client, admin_key: str) -> tuple[dict[str, Any], str]:
    """A project and one project API key for it, over HTTP."""
    project = await client.post("/api/v1/projects", json={"name": "telemetry"}, headers=auth(admin_key))
    assert project.status_code == 201, project.text
    body: dict[str, Any] = project.json()
    key = await client.post(f"/api/v1/projects/{body['id']}/api-keys", json={"name": "ci"}, headers=auth(admin_key))
    assert key.status_code == 201, key.text
    secret: str = key.json()["key"]
    return body, secret


async def enroll_device(client: Client, admin_key: str, project_id: str) -> tuple[bytes, Ed25519PrivateKey]:
    """A device enrolled over HTTP: its `device_id_hash` and private key."""
    private_key = Ed25519PrivateKey.generate()
    device_id_hash = hashlib.sha256(uuid.uuid4().bytes).digest()
    public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    response = await client.post(
        f"/api/v1/projects/{project_id}/devices",
        json={"device_id_hash": device_id_hash.hex(), "public_key": base64.b64encode(public_key).decode()},
        headers=auth(admin_key),
    )
    assert response.status_code == 201, response.text
    return device_id_hash, private_key


def signed_envelope(
    project_id: str, device_id_hash: bytes, private_key: Ed25519PrivateKey, payload: bytes
) -> tuple[dict[str, Any], bytes]:
    """A JSON backup envelope for `payload`, signed as DESIGN.md specifies, and its signature."""
    envelope = sign_backup(
        private_key, project_id=uuid.UUID(project_id), device_id_hash=device_id_hash, payload=payload
    )
    return envelope.json(), envelope.signature


async def committed_backup(client: Client, admin_key: str, payload: bytes) -> tuple[str, dict[str, Any]]:
    """A new project's key and a backup of `payload` committed with it (single shot, JSON) for a new device of it."""
    project, project_key = await create_project_key(client, admin_key)
    device_id_hash, private_key = await enroll_device(client, admin_key, project["id"])
    body, _ = signed_envelope(project["id"], device_id_hash, private_key, payload)
    created = await client.post("/api/v1/backups", json=body, headers=auth(project_key))
    assert created.status_code == 201, created.text
    backup: dict[str, Any] = created.json()
    return project_key, backup
