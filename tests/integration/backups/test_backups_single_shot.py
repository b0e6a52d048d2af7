"""POST /api/v1/backups: JSON and msgpack round trips, validation, signature and nonce checks, and what is stored."""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from datetime import timedelta

import asyncpg
import msgspec
import pytest
from backups_support import MIB, NOTHING_STORED, Tenant, auth, device_token, make_tenant, row_counts, sign_envelope
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.lib.envelope import parse_rfc3339_utc
from zkeb.settings import Settings

from support import POSTGRES_ONLY, problem

Client = AsyncTestClient[Litestar]


@pytest.fixture
async def tenant(client: Client, settings: Settings) -> Tenant:
    return await make_tenant(client, settings)


async def test_json_upload_round_trips_envelope_and_payload(client: Client, tenant: Tenant) -> None:
    payload = os.urandom(3000)
    envelope = sign_envelope(tenant, payload)
    response = await client.post("/api/v1/backups", json=envelope.json(), headers=auth(tenant.project_key))
    assert response.status_code == 201, response.text
    body = response.json()
    assert "payload" not in body
    assert body["project_id"] == str(tenant.project_id)
    assert body["container_id"] == str(envelope.container_id)
    assert body["device_id_hash"] == envelope.device_id_hash.hex()
    assert body["encrypted_payload_size"] == len(payload)
    assert body["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert base64.b64decode(body["signature"]) == envelope.signature
    assert base64.b64decode(body["metadata"]) == envelope.metadata
    assert parse_rfc3339_utc(body["backup_timestamp"]) == parse_rfc3339_utc(envelope.backup_timestamp)
    assert response.headers["location"] == f"/api/v1/backups/{body['id']}"

    fetched = await client.get(f"/api/v1/backups/{body['id']}", headers=auth(tenant.project_key))
    assert fetched.status_code == 200
    assert fetched.json() == body
    restored = await client.get(f"/api/v1/backups/{body['id']}/payload", headers=auth(tenant.project_key))
    assert restored.status_code == 200
    assert restored.content == payload


async def test_msgpack_upload_round_trips_and_answers_msgpack_on_request(client: Client, tenant: Tenant) -> None:
    payload = os.urandom(MIB + 17)
    envelope = sign_envelope(tenant, payload)
    response = await client.post(
        "/api/v1/backups",
        content=envelope.msgpack(),
        headers={**auth(tenant.project_key), "Content-Type": "application/msgpack", "Accept": "application/msgpack"},
    )
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("application/msgpack")
    body = msgspec.msgpack.decode(response.content)
    assert body["device_id_hash"] == envelope.device_id_hash
    assert body["payload_nonce"] == envelope.payload_nonce
    assert body["encrypted_payload_size"] == len(payload)
    fetched = await client.get(
        f"/api/v1/backups/{body['id']}", headers={**auth(tenant.project_key), "Accept": "application/msgpack"}
    )
    assert msgspec.msgpack.decode(fetched.content) == body
    restored = await client.get(f"/api/v1/backups/{body['id']}/payload", headers=auth(tenant.project_key))
    assert restored.content == payload


@POSTGRES_ONLY  # the rows' bytes; the bucket's: test_backups_s3_store.py
async def test_stored_chunks_are_encrypted_at_rest(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    payload = b"A" * (2 * MIB + 5)
    response = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, payload).json(), headers=auth(tenant.project_key)
    )
    assert response.status_code == 201
    rows = await owner_connection.fetch("SELECT seq, byte_offset, plain_size, data FROM backup_chunks ORDER BY seq")
    assert [(r["seq"], r["byte_offset"], r["plain_size"]) for r in rows] == [
        (0, 0, MIB),
        (1, MIB, MIB),
        (2, 2 * MIB, 5),
    ]
    for row in rows:
        assert b"AAAAAAAA" not in row["data"]
        assert len(row["data"]) == row["plain_size"] + 28
    payload_row = await owner_connection.fetchrow("SELECT size, chunk_count, sha256, key_id FROM payloads")
    assert payload_row["size"] == len(payload)
    assert payload_row["chunk_count"] == 3
    assert payload_row["sha256"] == hashlib.sha256(payload).digest()
    assert payload_row["key_id"].startswith("mk-")


async def test_device_token_uploads_for_its_own_device(client: Client, tenant: Tenant) -> None:
    token = await device_token(client, tenant, tenant.device)
    envelope = sign_envelope(tenant, b"hello")
    response = await client.post("/api/v1/backups", json=envelope.json(), headers=auth(token))
    assert response.status_code == 201, response.text


async def test_device_token_cannot_upload_for_another_device(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    token = await device_token(client, tenant, tenant.devices[0])
    envelope = sign_envelope(tenant, b"hello", device=tenant.devices[1])
    response = await client.post("/api/v1/backups", json=envelope.json(), headers=auth(token))
    assert response.status_code == 422
    assert problem(response)["field"] == "device_id_hash"
    assert await row_counts(owner_connection) == NOTHING_STORED


@pytest.mark.parametrize(
    ("field", "tamper"),
    [
        ("payload", lambda e: e.with_(payload=e.payload[:-1] + bytes([e.payload[-1] ^ 1]))),
        ("metadata", lambda e: e.with_(metadata=e.metadata + b"!")),
        ("payload_nonce", lambda e: e.with_(payload_nonce=os.urandom(12))),
        ("payload_auth_tag", lambda e: e.with_(payload_auth_tag=os.urandom(16))),
        ("metadata_nonce", lambda e: e.with_(metadata_nonce=os.urandom(12))),
        ("metadata_auth_tag", lambda e: e.with_(metadata_auth_tag=os.urandom(16))),
        ("backup_timestamp", lambda e: e.with_(backup_timestamp="2020-01-01T00:00:00Z")),
        ("container_id", lambda e: e.with_(container_id=uuid.uuid4())),
    ],
)
async def test_tampered_envelope_is_rejected_and_nothing_is_stored(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, field: str, tamper: object
) -> None:
    envelope = sign_envelope(tenant, os.urandom(MIB + 3))
    tampered = tamper(envelope)  # type: ignore[operator]
    response = await client.post("/api/v1/backups", json=tampered.json(), headers=auth(tenant.project_key))
    assert response.status_code == 422, field
    assert problem(response)["field"] == "signature"
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_envelope_signed_for_another_project_is_rejected(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    envelope = sign_envelope(tenant, b"payload", project_id=uuid.uuid4())
    response = await client.post("/api/v1/backups", json=envelope.json(), headers=auth(tenant.project_key))
    assert response.status_code == 422
    assert problem(response)["field"] == "signature"
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_reused_payload_nonce_is_refused_with_409(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    nonce = os.urandom(12)
    first = await client.post(
        "/api/v1/backups",
        json=sign_envelope(tenant, b"one", payload_nonce=nonce).json(),
        headers=auth(tenant.project_key),
    )
    assert first.status_code == 201
    before = await row_counts(owner_connection)
    again = await client.post(
        "/api/v1/backups",
        json=sign_envelope(tenant, b"two", payload_nonce=nonce).json(),
        headers=auth(tenant.project_key),
    )
    assert again.status_code == 409
    assert problem(again)["field"] == "payload_nonce"
    assert "backup_id" not in problem(again)  # another envelope: nothing to say about the committed one
    assert await row_counts(owner_connection) == before
    other_device = await client.post(
        "/api/v1/backups",
        json=sign_envelope(tenant, b"two", payload_nonce=nonce, device=tenant.devices[1]).json(),
        headers=auth(tenant.project_key),
    )
    assert other_device.status_code == 201


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("device_id_hash", {"device_id_hash": "ab" * 31}),
        ("device_id_hash", {"device_id_hash": "zz" * 32}),
        ("payload_nonce", {"payload_nonce": base64.b64encode(b"x" * 11).decode()}),
        ("payload_auth_tag", {"payload_auth_tag": base64.b64encode(b"x" * 15).decode()}),
        ("metadata_nonce", {"metadata_nonce": base64.b64encode(b"x" * 13).decode()}),
        ("metadata_auth_tag", {"metadata_auth_tag": base64.b64encode(b"x" * 17).decode()}),
        ("signature", {"signature": base64.b64encode(b"x" * 63).decode()}),
        ("metadata", {"metadata": base64.b64encode(b"x" * 8193).decode()}),
        ("backup_timestamp", {"backup_timestamp": "yesterday"}),
        ("container_id", {"container_id": "not-a-uuid"}),
        ("payload", {"payload": ""}),
        ("payload", {"payload": "%%%"}),
        ("signature", {"signature": None}),
    ],
)
async def test_invalid_field_is_named_in_a_422_and_nothing_is_stored(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, field: str, change: dict[str, object]
) -> None:
    body = {**sign_envelope(tenant, b"payload").json(), **change}
    response = await client.post("/api/v1/backups", json=body, headers=auth(tenant.project_key))
    assert response.status_code == 422, response.text
    assert problem(response)["field"] == field
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_missing_field_and_unknown_field_are_422(client: Client, tenant: Tenant) -> None:
    body = sign_envelope(tenant, b"payload").json()
    del body["metadata"]
    missing = await client.post("/api/v1/backups", json=body, headers=auth(tenant.project_key))
    assert missing.status_code == 422
    assert problem(missing)["field"] == "metadata"
    extra = {**sign_envelope(tenant, b"payload").json(), "colour": "blue"}
    unknown = await client.post("/api/v1/backups", json=extra, headers=auth(tenant.project_key))
    assert unknown.status_code == 422
    problem(unknown)


async def test_unknown_or_revoked_device_is_422(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    envelope = sign_envelope(tenant, b"payload")
    unknown = envelope.with_(device_id_hash=os.urandom(32))
    response = await client.post("/api/v1/backups", json=unknown.json(), headers=auth(tenant.project_key))
    assert response.status_code == 422
    assert problem(response)["field"] == "device_id_hash"
    revoked = await client.delete(f"/api/v1/devices/{tenant.device.id}", headers=auth(tenant.admin_key))
    assert revoked.status_code == 204
    response = await client.post("/api/v1/backups", json=envelope.json(), headers=auth(tenant.project_key))
    assert response.status_code == 422
    assert problem(response)["field"] == "device_id_hash"
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_malformed_bodies_are_400_and_other_content_types_415(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    bad_json = await client.post(
        "/api/v1/backups",
        content=b"{not json",
        headers={**auth(tenant.project_key), "Content-Type": "application/json"},
    )
    assert bad_json.status_code == 400
    problem(bad_json)
    bad_msgpack = await client.post(
        "/api/v1/backups", content=b"\xc1", headers={**auth(tenant.project_key), "Content-Type": "application/msgpack"}
    )
    assert bad_msgpack.status_code == 400
    problem(bad_msgpack)
    form = await client.post(
        "/api/v1/backups", content=b"a=b", headers={**auth(tenant.project_key), "Content-Type": "text/plain"}
    )
    assert form.status_code == 415
    problem(form)
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_oversize_body_is_413_from_its_headers_and_then_dropped(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    # Refused from Content-Length alone; the body is then read and dropped (zkeb.core.connection's drain, shown
    # through granian in test_backups_live_server.py), so that a client still sending it reads the 413.
    response = await client.post(
        "/api/v1/backups",
        content=bytes(16 * MIB + 1),
        headers={
            **auth(tenant.project_key),
            "Content-Type": "application/msgpack",
            "Content-Length": str(16 * MIB + 1),
        },
    )
    assert response.status_code == 413
    detail = problem(response)["detail"]
    assert f"{16 * MIB} bytes at most" in detail
    assert "tus (POST /api/v1/uploads)" in detail
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_no_credential_is_401(client: Client, tenant: Tenant) -> None:
    response = await client.post("/api/v1/backups", json=sign_envelope(tenant, b"x").json())
    assert response.status_code == 401
    assert problem(response)["detail"] == "a bearer credential is required"  # said, not masked as a credential


async def test_org_admin_key_cannot_upload(client: Client, tenant: Tenant) -> None:
    response = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, b"x").json(), headers=auth(tenant.admin_key)
    )
    assert response.status_code == 404
    problem(response)


async def test_timestamp_with_offset_is_normalized_to_utc(client: Client, tenant: Tenant) -> None:
    envelope = sign_envelope(tenant, b"payload")
    response = await client.post("/api/v1/backups", json=envelope.json(), headers=auth(tenant.project_key))
    assert response.status_code == 201
    stamp = parse_rfc3339_utc(response.json()["backup_timestamp"])
    assert stamp.utcoffset() == timedelta(0)


async def test_resending_a_committed_envelope_is_409_naming_the_backup(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    # The first response was lost on the way back: the retry learns that its backup exists, and nothing changes.
    envelope = sign_envelope(tenant, b"sent twice")
    first = await client.post("/api/v1/backups", json=envelope.json(), headers=auth(tenant.project_key))
    assert first.status_code == 201
    before = await row_counts(owner_connection)
    retried = await client.post(
        "/api/v1/backups",
        content=envelope.msgpack(),
        headers=auth(tenant.project_key) | {"Content-Type": "application/msgpack"},
    )
    assert retried.status_code == 409
    body = problem(retried)
    assert (body["field"], body["backup_id"]) == ("payload_nonce", first.json()["id"])
    assert await row_counts(owner_connection) == before


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"filename": "notes.txt"}, "filename", id="unknown-key"),
        pytest.param({"payload_nonce": base64.b64encode(bytes(11)).decode()}, "payload_nonce", id="short-nonce"),
        pytest.param({"signature": None}, "signature", id="null-signature"),
    ],
)
async def test_an_invalid_envelope_names_its_field_in_errors_as_every_other_422_does(
    client: Client, tenant: Tenant, change: dict[str, object], field: str
) -> None:
    # An integrator's review: the token and accounts 422s named the field in `errors`, the envelope's only in
    # `field`, and an unknown key in neither.
    body = {**sign_envelope(tenant, b"named").json(), **change}
    response = await client.post("/api/v1/backups", json=body, headers=auth(tenant.project_key))

    assert response.status_code == 422
    refused = problem(response)
    assert refused["field"] == field
    assert [error["key"] for error in refused["errors"]] == [field]
    assert refused["errors"][0]["message"]
