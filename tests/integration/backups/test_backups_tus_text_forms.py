"""`Upload-Metadata` bytes fields in their JSON text form, as string-only tus clients send them, beside the raw form."""

from __future__ import annotations

import base64
import os
from typing import Any

import asyncpg
import pytest
from backups_support import NOTHING_STORED, Tenant, auth, make_tenant, row_counts, sign_envelope, tus_headers
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.settings import Settings

from support import Envelope, problem

Client = AsyncTestClient[Litestar]
OCTETS = "application/offset+octet-stream"


@pytest.fixture
async def tenant(client: Client, settings: Settings) -> Tenant:
    return await make_tenant(client, settings)


def header_of(values: dict[str, bytes]) -> str:
    return ",".join(f"{key} {base64.b64encode(value).decode()}" for key, value in values.items())


def text_values(envelope: Envelope) -> dict[str, bytes]:
    return {name: value.encode() for name, value in envelope.tus_text_metadata().items()}


async def create(client: Client, tenant: Tenant, envelope: Envelope, metadata: str) -> Any:
    headers = {"Upload-Length": str(len(envelope.payload)), "Upload-Metadata": metadata}
    return await client.post("/api/v1/uploads", headers=tus_headers(tenant.project_key, **headers))


async def upload(client: Client, tenant: Tenant, envelope: Envelope, metadata: str) -> Any:
    created = await create(client, tenant, envelope, metadata)
    assert created.status_code == 201, created.text
    headers = {"Upload-Offset": "0", "Content-Type": OCTETS}
    return await client.patch(
        created.headers["location"], content=envelope.payload, headers=tus_headers(tenant.project_key, **headers)
    )


async def test_text_form_metadata_commits_the_backup_the_device_signed(client: Client, tenant: Tenant) -> None:
    # Encrypted metadata that spells base64 itself, so the text form is base64 of base64.
    envelope = sign_envelope(tenant, os.urandom(3000), metadata=base64.b64encode(os.urandom(30)))
    committed = await upload(client, tenant, envelope, envelope.tus_metadata(text=True))
    assert committed.status_code == 204, committed.text
    backup_id = committed.headers["zkeb-backup-id"]
    body = (await client.get(f"/api/v1/backups/{backup_id}", headers=auth(tenant.project_key))).json()
    assert {name: body[name] for name in envelope.tus_text_metadata() if name != "backup_timestamp"} == {
        name: value for name, value in envelope.tus_text_metadata().items() if name != "backup_timestamp"
    }
    restored = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
    assert restored.content == envelope.payload


async def test_raw_metadata_that_spells_base64_is_still_read_raw(client: Client, tenant: Tenant) -> None:
    envelope = sign_envelope(tenant, os.urandom(100), metadata=b"QUJDRA==")
    committed = await upload(client, tenant, envelope, envelope.tus_metadata())
    assert committed.status_code == 204, committed.text
    backup_id = committed.headers["zkeb-backup-id"]
    body = (await client.get(f"/api/v1/backups/{backup_id}", headers=auth(tenant.project_key))).json()
    assert base64.b64decode(body["metadata"]) == b"QUJDRA=="


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ("payload_nonce", base64.b64encode(bytes(11)) + b"A"),  # 16 characters, not canonical base64
        ("payload_auth_tag", base64.b64encode(bytes(15))),
        ("metadata_nonce", b"!" * 16),
        ("metadata_auth_tag", base64.b64encode(bytes(16)).rstrip(b"=")),
        ("signature", base64.b64encode(bytes(65))),
        ("device_id_hash", b"z" * 64),
        ("metadata", b"not base64"),
    ],
)
async def test_a_text_value_that_fits_neither_form_is_422_naming_the_field(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, field: str, text: bytes
) -> None:
    envelope = sign_envelope(tenant, b"x")
    response = await create(client, tenant, envelope, header_of({**text_values(envelope), field: text}))
    assert response.status_code == 422
    body = problem(response)
    assert body["field"] == field
    assert body["detail"].startswith(f"{field}: ")
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_base64_fields_in_mixed_forms_are_422_naming_the_one_that_differs(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    envelope = sign_envelope(tenant, b"x")
    mixed = {**text_values(envelope), "signature": envelope.signature}
    response = await create(client, tenant, envelope, header_of(mixed))
    assert response.status_code == 422
    assert problem(response)["field"] == "signature"
    assert "one form" in problem(response)["detail"]
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_a_misread_metadata_value_fails_the_signature_and_commits_nothing(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    # The client means its metadata as text but sends every other field raw: the server reads the metadata raw (the
    # text's own bytes). The upload is accepted, but the signature covers the metadata, so nothing can commit.
    envelope = sign_envelope(tenant, os.urandom(5000))
    misread = {**envelope.tus_metadata_values(), "metadata": base64.b64encode(envelope.metadata)}
    response = await upload(client, tenant, envelope, header_of(misread))
    assert response.status_code == 422
    assert problem(response)["field"] == "signature"
    assert await row_counts(owner_connection) == NOTHING_STORED
