"""The tus 1.0.0 server, section by section of https://tus.io/protocols/resumable-upload, plus ZKEB's rules."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import asyncpg
import pytest
from backups_support import (
    MIB,
    NOTHING_STORED,
    Tenant,
    auth,
    device_token,
    make_tenant,
    row_counts,
    sign_envelope,
    tus_headers,
)
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncConnection

from zkeb.app import create_app
from zkeb.core import database
from zkeb.core.database import create_app_engine
from zkeb.core.runtime import get_runtime
from zkeb.domain.backups.chunk_writes import hash_stored_chunks
from zkeb.domain.backups.controllers import uploads as uploads_controller
from zkeb.domain.backups.jobs.upload_sweeper import UploadSweeper
from zkeb.domain.backups.services import finalize, upload_patch
from zkeb.domain.backups.services import uploads as uploads_services
from zkeb.domain.backups.services.uploads import IN_MEMORY_UPLOAD_MAX
from zkeb.domain.backups.store import commits
from zkeb.settings import Settings

from support import (
    POSTGRES_ONLY,
    PROJECT_USED_BYTES,
    Envelope,
    assert_bucket_holds_exactly_the_chunks,
    maintenance_pass,
    make_settings,
    problem,
    store_chunk_size,
)

Client = AsyncTestClient[Litestar]
OCTETS = "application/offset+octet-stream"


@pytest.fixture
async def tenant(client: Client, settings: Settings) -> Tenant:
    return await make_tenant(client, settings)


async def create(client: Client, tenant: Tenant, envelope: Envelope, **headers: str) -> Any:
    return await client.post(
        "/api/v1/uploads",
        headers=tus_headers(
            tenant.project_key,
            **{"Upload-Length": str(len(envelope.payload)), "Upload-Metadata": envelope.tus_metadata(), **headers},
        ),
    )


async def patch(client: Client, tenant: Tenant, location: str, body: bytes, offset: int, **headers: str) -> Any:
    return await client.patch(
        location,
        content=body,
        headers=tus_headers(tenant.project_key, **{"Upload-Offset": str(offset), "Content-Type": OCTETS, **headers}),
    )


# --- Core protocol: Tus-Resumable ---------------------------------------------------------------------------------


async def test_every_response_carries_tus_resumable(client: Client, tenant: Tenant) -> None:
    envelope = sign_envelope(tenant, b"x" * 10)
    created = await create(client, tenant, envelope)
    assert created.headers["tus-resumable"] == "1.0.0"
    head = await client.head(created.headers["location"], headers=tus_headers(tenant.project_key))
    assert head.headers["tus-resumable"] == "1.0.0"
    unknown = await client.head(f"/api/v1/uploads/{uuid.uuid4()}", headers=tus_headers(tenant.project_key))
    assert unknown.status_code == 404
    assert unknown.headers["tus-resumable"] == "1.0.0"
    unauthenticated = await client.post("/api/v1/uploads", headers={"Tus-Resumable": "1.0.0"})
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["tus-resumable"] == "1.0.0"


async def test_wrong_tus_version_is_412_with_tus_version(client: Client, tenant: Tenant) -> None:
    envelope = sign_envelope(tenant, b"x")
    response = await create(client, tenant, envelope, **{"Tus-Resumable": "0.2.2"})
    assert response.status_code == 412
    assert response.headers["tus-version"] == "1.0.0"
    problem(response)


# --- Core protocol: OPTIONS ---------------------------------------------------------------------------------------


async def test_options_advertises_version_extensions_size_and_checksums(client: Client, settings: Settings) -> None:
    response = await client.options("/api/v1/uploads")
    assert response.status_code == 204
    assert response.headers["tus-resumable"] == "1.0.0"
    assert response.headers["tus-version"] == "1.0.0"
    assert set(response.headers["tus-extension"].split(",")) == {
        "creation",
        "creation-with-upload",
        "termination",
        "checksum",
        "expiration",
    }
    assert response.headers["tus-max-size"] == str(settings.max_upload_size)
    assert response.headers["tus-checksum-algorithm"] == "sha1,sha256"


# --- Core protocol: HEAD and PATCH --------------------------------------------------------------------------------


async def test_head_reports_offset_length_and_no_store(client: Client, tenant: Tenant) -> None:
    envelope = sign_envelope(tenant, os.urandom(100))
    location = (await create(client, tenant, envelope)).headers["location"]
    head = await client.head(location, headers=tus_headers(tenant.project_key))
    assert head.status_code == 200
    assert head.headers["upload-offset"] == "0"
    assert head.headers["upload-length"] == "100"
    assert head.headers["cache-control"] == "no-store"
    assert not head.headers["content-type"].startswith("application/json"), "a HEAD has no JSON body to describe"
    await patch(client, tenant, location, envelope.payload[:40], 0)
    head = await client.head(location, headers=tus_headers(tenant.project_key))
    assert head.headers["upload-offset"] == "40"


async def test_patches_append_and_the_completing_patch_commits(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    payload = os.urandom(2 * MIB + 300)
    envelope = sign_envelope(tenant, payload)
    location = (await create(client, tenant, envelope)).headers["location"]
    first = await patch(client, tenant, location, payload[: MIB + 7], 0)
    assert first.status_code == 204
    assert first.headers["upload-offset"] == str(MIB + 7)
    assert "zkeb-backup-id" not in first.headers
    assert (await row_counts(owner_connection))["backups"] == 0
    second = await patch(client, tenant, location, payload[MIB + 7 :], MIB + 7)
    assert second.status_code == 204
    assert second.headers["upload-offset"] == str(len(payload))
    backup_id = second.headers["zkeb-backup-id"]
    restored = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
    assert restored.content == payload
    body = (await client.get(f"/api/v1/backups/{backup_id}", headers=auth(tenant.project_key))).json()
    assert body["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    counts = await row_counts(owner_connection)
    assert counts["upload_sessions"] == 0
    assert counts["backups"] == 1
    gone = await client.head(location, headers=tus_headers(tenant.project_key))
    assert gone.status_code == 404


async def test_offset_mismatch_is_409_and_nothing_changes(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    envelope = sign_envelope(tenant, os.urandom(100))
    location = (await create(client, tenant, envelope)).headers["location"]
    await patch(client, tenant, location, envelope.payload[:10], 0)
    before = await row_counts(owner_connection)
    response = await patch(client, tenant, location, envelope.payload[20:30], 20)
    assert response.status_code == 409
    assert response.headers["tus-resumable"] == "1.0.0"
    problem(response)
    assert await row_counts(owner_connection) == before
    head = await client.head(location, headers=tus_headers(tenant.project_key))
    assert head.headers["upload-offset"] == "10"


async def test_patch_needs_offset_octet_stream_and_upload_offset(client: Client, tenant: Tenant) -> None:
    envelope = sign_envelope(tenant, os.urandom(10))
    location = (await create(client, tenant, envelope)).headers["location"]
    wrong_type = await patch(client, tenant, location, b"x", 0, **{"Content-Type": "application/octet-stream"})
    assert wrong_type.status_code == 415
    problem(wrong_type)
    no_offset = await client.patch(
        location, content=b"x", headers=tus_headers(tenant.project_key, **{"Content-Type": OCTETS})
    )
    assert no_offset.status_code == 400
    problem(no_offset)
    bad_offset = await patch(client, tenant, location, b"x", 0, **{"Upload-Offset": "-1"})
    assert bad_offset.status_code == 400


async def test_body_past_upload_length_is_413_and_nothing_is_kept(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    envelope = sign_envelope(tenant, os.urandom(10))
    location = (await create(client, tenant, envelope)).headers["location"]
    before = await row_counts(owner_connection)
    response = await patch(client, tenant, location, os.urandom(11), 0)
    assert response.status_code == 413
    problem(response)
    assert await row_counts(owner_connection) == before


# --- Creation -----------------------------------------------------------------------------------------------------


async def test_creation_returns_location_and_expiry(client: Client, tenant: Tenant) -> None:
    response = await create(client, tenant, sign_envelope(tenant, b"abc"))
    assert response.status_code == 201
    assert response.content == b""  # tus answers creation with headers only
    assert response.headers["location"].startswith("http://testserver.local/api/v1/uploads/")
    expires = parsedate_to_datetime(response.headers["upload-expires"])
    assert datetime.now(UTC) + timedelta(hours=23) < expires <= datetime.now(UTC) + timedelta(hours=24, minutes=1)


async def test_upload_length_over_max_is_413(
    client: Client, tenant: Tenant, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    response = await create(
        client, tenant, sign_envelope(tenant, b"x"), **{"Upload-Length": str(settings.max_upload_size + 1)}
    )
    assert response.status_code == 413
    problem(response)
    assert await row_counts(owner_connection) == NOTHING_STORED


@pytest.mark.parametrize(
    "header",
    [
        "container_id",  # a key without its value
        "a b c",
        "payload_nonce !!!",
        "dup YQ==,dup YQ==",
    ],
)
async def test_malformed_upload_metadata_is_400(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, header: str
) -> None:
    envelope = sign_envelope(tenant, b"x")
    if header == "container_id":
        header = envelope.tus_metadata().replace(
            f"container_id {base64.b64encode(str(envelope.container_id).encode()).decode()}", "container_id"
        )
        expected = 422
    else:
        expected = 400
    response = await create(client, tenant, envelope, **{"Upload-Metadata": header})
    assert response.status_code == expected
    problem(response)
    assert await row_counts(owner_connection) == NOTHING_STORED


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device_id_hash", b"\xa5" * 31),
        ("payload_nonce", b"\xa5" * 11),
        ("payload_auth_tag", b"\xa5" * 15),
        ("metadata_nonce", b"\xa5" * 13),
        ("metadata_auth_tag", b"\xa5" * 17),
        ("signature", b"\xa5" * 65),
        ("metadata", b"\xa5" * 8193),
        ("container_id", b"not-a-uuid"),
        ("backup_timestamp", b"yesterday"),
    ],
    ids=lambda value: value if isinstance(value, str) else f"{len(value)}-bytes",
)
async def test_invalid_metadata_field_is_422_before_any_byte(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, field: str, value: bytes
) -> None:
    envelope = sign_envelope(tenant, b"x")
    values = {**envelope.tus_metadata_values(), field: value}
    header = ",".join(f"{k} {base64.b64encode(v).decode()}" for k, v in values.items())
    response = await create(client, tenant, envelope, **{"Upload-Metadata": header})
    assert response.status_code == 422
    assert problem(response)["field"] == field
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_missing_metadata_field_and_unknown_device_are_422(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    envelope = sign_envelope(tenant, b"x")
    values = envelope.tus_metadata_values()
    del values["signature"]
    header = ",".join(f"{k} {base64.b64encode(v).decode()}" for k, v in values.items())
    missing = await create(client, tenant, envelope, **{"Upload-Metadata": header})
    assert missing.status_code == 422
    assert problem(missing)["field"] == "signature"
    unknown = await create(client, tenant, envelope.with_(device_id_hash=os.urandom(32)))
    assert unknown.status_code == 422
    assert problem(unknown)["field"] == "device_id_hash"
    empty = await create(client, tenant, envelope, **{"Upload-Length": "0"})
    assert empty.status_code == 422
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_device_id_hash_as_base64_of_hex_is_accepted(client: Client, tenant: Tenant) -> None:
    envelope = sign_envelope(tenant, b"x")
    values = {**envelope.tus_metadata_values(), "device_id_hash": envelope.device_id_hash.hex().encode()}
    header = ",".join(f"{k} {base64.b64encode(v).decode()}" for k, v in values.items())
    assert (await create(client, tenant, envelope, **{"Upload-Metadata": header})).status_code == 201


async def test_reused_nonce_is_409_at_creation(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    nonce = os.urandom(12)
    first = sign_envelope(tenant, b"one", payload_nonce=nonce)
    response = await client.post("/api/v1/backups", json=first.json(), headers=auth(tenant.project_key))
    assert response.status_code == 201
    before = await row_counts(owner_connection)
    again = await create(client, tenant, sign_envelope(tenant, b"two", payload_nonce=nonce))
    assert again.status_code == 409
    assert problem(again)["field"] == "payload_nonce"
    assert "backup_id" not in problem(again)
    resent = await create(client, tenant, first)  # the same envelope: its first attempt was committed
    assert resent.status_code == 409
    assert problem(resent)["backup_id"] == response.json()["id"]
    assert await row_counts(owner_connection) == before


async def test_concurrent_uploads_with_one_nonce_commit_once(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    nonce = os.urandom(12)
    first = sign_envelope(tenant, b"first", payload_nonce=nonce)
    second = sign_envelope(tenant, b"second", payload_nonce=nonce)
    first_location = (await create(client, tenant, first)).headers["location"]
    second_location = (await create(client, tenant, second)).headers["location"]
    assert (await patch(client, tenant, first_location, first.payload, 0)).status_code == 204
    refused = await patch(client, tenant, second_location, second.payload, 0)
    assert refused.status_code == 409
    assert problem(refused)["field"] == "payload_nonce"
    assert "backup_id" not in problem(refused)  # another envelope took the nonce: this one was never committed
    counts = await row_counts(owner_connection)
    assert counts == {"payloads": 1, "backup_chunks": 1, "backups": 1, "payload_nonces": 1, "upload_sessions": 0}


async def test_a_creation_retried_after_its_answer_was_lost_finds_the_same_upload_and_reserves_nothing_twice(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    envelope = sign_envelope(tenant, os.urandom(1000))
    first = await create(client, tenant, envelope)
    retried = await create(client, tenant, envelope)  # its first answer never reached the client
    assert (first.status_code, retried.status_code) == (201, 201)
    assert retried.headers["location"] == first.headers["location"]
    assert retried.headers["upload-offset"] == "0"
    usage = await client.get(f"/api/v1/projects/{tenant.project_id}/usage", headers=auth(tenant.admin_key))
    assert (usage.json()["open_uploads"], usage.json()["reserved_bytes"]) == (1, 1000)
    done = await patch(client, tenant, retried.headers["location"], envelope.payload, 0)
    assert done.status_code == 204
    counts = await row_counts(owner_connection)
    assert counts == {"payloads": 1, "backup_chunks": 1, "backups": 1, "payload_nonces": 1, "upload_sessions": 0}


async def test_an_identical_creation_with_a_body_gets_an_upload_of_its_own(client: Client, tenant: Tenant) -> None:
    # A refused body discards its creation's upload: it must never be an upload another request is filling.
    envelope = sign_envelope(tenant, os.urandom(1000))
    first = (await create(client, tenant, envelope)).headers["location"]
    with_body = await client.post(
        "/api/v1/uploads",
        content=envelope.payload[:10],
        headers=tus_headers(
            tenant.project_key,
            **{"Upload-Length": "1000", "Upload-Metadata": envelope.tus_metadata(), "Content-Type": OCTETS},
        ),
    )
    assert with_body.status_code == 201
    assert with_body.headers["location"] != first


async def test_a_creation_differing_in_length_or_a_field_is_another_upload(client: Client, tenant: Tenant) -> None:
    nonce = os.urandom(12)
    envelope = sign_envelope(tenant, os.urandom(100), payload_nonce=nonce)
    first = (await create(client, tenant, envelope)).headers["location"]
    longer = await create(client, tenant, envelope, **{"Upload-Length": "101"})
    other_container = await create(client, tenant, sign_envelope(tenant, envelope.payload, payload_nonce=nonce))
    assert longer.status_code == other_container.status_code == 201
    assert len({first, longer.headers["location"], other_container.headers["location"]}) == 3


async def test_a_second_upload_of_a_committed_envelope_is_409_naming_its_backup(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    # A device that lost the first upload's answer after sending some of it started another of the same envelope
    # before the first was committed (an upload that has received nothing is found again instead: see below).
    envelope = sign_envelope(tenant, b"once, in two parts")
    first_location = (await create(client, tenant, envelope)).headers["location"]
    assert (await patch(client, tenant, first_location, envelope.payload[:5], 0)).status_code == 204
    second_location = (await create(client, tenant, envelope)).headers["location"]
    assert second_location != first_location
    committed = await patch(client, tenant, first_location, envelope.payload[5:], 5)
    assert committed.status_code == 204
    refused = await patch(client, tenant, second_location, envelope.payload, 0)
    assert refused.status_code == 409
    assert problem(refused)["backup_id"] == committed.headers["zkeb-backup-id"]
    counts = await row_counts(owner_connection)  # a chunk per PATCH of the first upload
    assert counts == {"payloads": 1, "backup_chunks": 2, "backups": 1, "payload_nonces": 1, "upload_sessions": 0}


# --- Creation With Upload -----------------------------------------------------------------------------------------


async def test_creation_with_upload_can_complete_in_one_request(client: Client, tenant: Tenant) -> None:
    payload = os.urandom(MIB + 3)
    envelope = sign_envelope(tenant, payload)
    response = await client.post(
        "/api/v1/uploads",
        content=payload,
        headers=tus_headers(
            tenant.project_key,
            **{"Upload-Length": str(len(payload)), "Upload-Metadata": envelope.tus_metadata(), "Content-Type": OCTETS},
        ),
    )
    assert response.status_code == 201
    assert response.headers["upload-offset"] == str(len(payload))
    backup_id = response.headers["zkeb-backup-id"]
    restored = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
    assert restored.content == payload


async def _committed_meanwhile(database_url: str, tenant: Tenant, statement: str, *args: Any) -> None:
    """Run `statement` for `tenant` and commit it, on a connection of its own, from the server's event loop.

    For a change made "concurrently" at an exact point of a request: the server runs in the test client's event loop,
    which the test's own connections cannot be used from.
    """
    other = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        async with other.transaction():
            await other.execute("SELECT set_config('zkeb.org_id', $1, true)", str(tenant.organization_id))
            await other.execute(statement, *args)
    finally:
        await other.close()


def _before_the_commit_locks_the_project(
    monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], Awaitable[None]]
) -> None:
    """Run `meanwhile` as a tus commit, admitted and verified, locks the project row (its first lock).

    Whatever `meanwhile` changes is committed before the commit's next statement: the lease check, the inserts,
    the quota's charge.
    """
    for name in ("lock_project_row", "share_project_row"):
        original = getattr(finalize, name)

        async def lock_after(connection: asyncpg.Connection, project_id: uuid.UUID, original: Any = original) -> None:
            await meanwhile()
            await original(connection, project_id)

        monkeypatch.setattr(finalize, name, lock_after)


@pytest.mark.parametrize(
    "refusal",
    [
        pytest.param("checksum", id="460-wrong-checksum"),
        pytest.param("too-long", id="413-past-upload-length"),
        pytest.param("signature", id="422-signature-at-the-commit"),
        pytest.param("nonce", id="409-nonce-committed-meanwhile"),
    ],
)
async def test_a_refused_creation_with_upload_creates_nothing(
    database_url: str,
    client: Client,
    tenant: Tenant,
    owner_connection: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    refusal: str,
) -> None:
    # The client gets no Location with the refusal, so an upload left behind could be neither resumed nor ended.
    payload = os.urandom(IN_MEMORY_UPLOAD_MAX + 1000)  # streamed through an upload session
    envelope = sign_envelope(tenant, payload if refusal != "signature" else b"other bytes, other signature")
    headers = {"Upload-Length": str(len(payload)), "Upload-Metadata": envelope.tus_metadata(), "Content-Type": OCTETS}
    body, status = payload, {"checksum": 460, "too-long": 413, "signature": 422, "nonce": 409}[refusal]
    if refusal == "checksum":
        headers["Upload-Checksum"] = f"sha256 {base64.b64encode(hashlib.sha256(b'other').digest()).decode()}"
    if refusal == "too-long":
        body = payload + b"x"
    if refusal == "nonce":  # another upload of this envelope commits between this one's checks and its commit

        async def take_the_nonce() -> None:
            await _committed_meanwhile(
                database_url,
                tenant,
                "INSERT INTO payload_nonces"
                " (id, organization_id, project_id, device_id_hash, nonce, created_at, updated_at)"
                " VALUES (gen_random_uuid(), $1, $2, $3, $4, now(), now())",
                tenant.organization_id,
                tenant.project_id,
                envelope.device_id_hash,
                envelope.payload_nonce,
            )

        _before_the_commit_locks_the_project(monkeypatch, take_the_nonce)
    response = await client.post("/api/v1/uploads", content=body, headers=tus_headers(tenant.project_key, **headers))
    assert response.status_code == status, response.text
    problem(response)
    assert "location" not in response.headers
    counts = await row_counts(owner_connection)
    assert counts == {**NOTHING_STORED, "payload_nonces": 1 if refusal == "nonce" else 0}


async def test_a_creation_with_upload_refused_at_its_commit_by_the_quota_says_where_the_upload_is(
    database_url: str,
    client: Client,
    tenant: Tenant,
    owner_connection: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The quota is checked at creation, and again at the commit: another upload may have filled it in between
    # (here: the quota shrinks just before the commit). The upload stays, to be completed once there is room.
    payload = os.urandom(IN_MEMORY_UPLOAD_MAX + 1000)  # streamed through an upload session
    envelope = sign_envelope(tenant, payload)
    await owner_connection.execute("UPDATE projects SET storage_quota_bytes = $1", 10 * len(payload))

    async def shrink_the_quota() -> None:
        await _committed_meanwhile(database_url, tenant, "UPDATE projects SET storage_quota_bytes = 10")

    _before_the_commit_locks_the_project(monkeypatch, shrink_the_quota)
    response = await client.post(
        "/api/v1/uploads",
        content=payload,
        headers=tus_headers(
            tenant.project_key,
            **{"Upload-Length": str(len(payload)), "Upload-Metadata": envelope.tus_metadata(), "Content-Type": OCTETS},
        ),
    )
    assert response.status_code == 507, response.text
    problem(response)
    head = await client.head(response.headers["location"], headers=tus_headers(tenant.project_key))
    assert head.status_code == 200
    assert await owner_connection.fetchval("SELECT count(*) FROM backups") == 0


async def test_a_creation_with_upload_cut_by_a_database_failure_says_where_the_upload_is(
    client: Client, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The database connection drops at the commit (a failover): the bytes stay stored, so the answer must carry the
    # Location to resume from, or the client could never finish this upload.
    payload = os.urandom(IN_MEMORY_UPLOAD_MAX + 1000)  # streamed through an upload session
    envelope = sign_envelope(tenant, payload)

    async def drop_the_connection() -> None:
        raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")

    _before_the_commit_locks_the_project(monkeypatch, drop_the_connection)
    response = await client.post(
        "/api/v1/uploads",
        content=payload,
        headers=tus_headers(
            tenant.project_key,
            **{"Upload-Length": str(len(payload)), "Upload-Metadata": envelope.tus_metadata(), "Content-Type": OCTETS},
        ),
    )
    assert response.status_code == 503, response.text
    assert "resume it at its Location" in problem(response)["detail"]
    monkeypatch.undo()
    head = await client.head(response.headers["location"], headers=tus_headers(tenant.project_key))
    assert head.status_code == 200
    offset = int(head.headers["upload-offset"])
    done = await patch(client, tenant, response.headers["location"], payload[offset:], offset)
    assert done.status_code == 204, done.text
    assert "zkeb-backup-id" in done.headers


async def test_creation_with_partial_upload_reports_the_offset(client: Client, tenant: Tenant) -> None:
    payload = os.urandom(1000)
    envelope = sign_envelope(tenant, payload)
    response = await client.post(
        "/api/v1/uploads",
        content=payload[:400],
        headers=tus_headers(
            tenant.project_key,
            **{"Upload-Length": "1000", "Upload-Metadata": envelope.tus_metadata(), "Content-Type": OCTETS},
        ),
    )
    assert response.status_code == 201
    assert response.headers["upload-offset"] == "400"
    done = await patch(client, tenant, response.headers["location"], payload[400:], 400)
    assert done.status_code == 204
    assert "zkeb-backup-id" in done.headers


# --- Checksum -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
async def test_matching_checksum_is_accepted(client: Client, tenant: Tenant, algorithm: str) -> None:
    payload = os.urandom(5000)
    location = (await create(client, tenant, sign_envelope(tenant, payload))).headers["location"]
    digest = base64.b64encode(hashlib.new(algorithm, payload[:3000]).digest()).decode()
    response = await patch(client, tenant, location, payload[:3000], 0, **{"Upload-Checksum": f"{algorithm} {digest}"})
    assert response.status_code == 204
    assert response.headers["upload-offset"] == "3000"


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
async def test_checksum_mismatch_is_460_and_the_offset_is_unchanged(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, algorithm: str
) -> None:
    payload = os.urandom(2 * MIB + 10)
    location = (await create(client, tenant, sign_envelope(tenant, payload))).headers["location"]
    await patch(client, tenant, location, payload[:100], 0)
    before = await row_counts(owner_connection)
    wrong = base64.b64encode(hashlib.new(algorithm, b"something else").digest()).decode()
    response = await patch(client, tenant, location, payload[100:], 100, **{"Upload-Checksum": f"{algorithm} {wrong}"})
    assert response.status_code == 460
    assert response.headers["tus-resumable"] == "1.0.0"
    assert problem(response)["title"] == "Checksum Mismatch"  # tus's name: HTTP gives 460 none
    assert await row_counts(owner_connection) == before
    head = await client.head(location, headers=tus_headers(tenant.project_key))
    assert head.headers["upload-offset"] == "100"
    retry = await patch(client, tenant, location, payload[100:], 100)
    assert retry.status_code == 204
    restored = await client.get(
        f"/api/v1/backups/{retry.headers['zkeb-backup-id']}/payload", headers=auth(tenant.project_key)
    )
    assert restored.content == payload


async def test_unsupported_checksum_algorithm_is_400(client: Client, tenant: Tenant) -> None:
    location = (await create(client, tenant, sign_envelope(tenant, b"abc"))).headers["location"]
    response = await patch(client, tenant, location, b"abc", 0, **{"Upload-Checksum": "md5 kAFQmDzST7DWlj99KOF/cg=="})
    assert response.status_code == 400
    problem(response)


# --- Termination --------------------------------------------------------------------------------------------------


async def test_termination_deletes_the_upload_and_its_bytes(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    payload = os.urandom(MIB + 5)
    location = (await create(client, tenant, sign_envelope(tenant, payload))).headers["location"]
    await patch(client, tenant, location, payload[: MIB + 1], 0)
    response = await client.delete(location, headers=tus_headers(tenant.project_key))
    assert response.status_code == 204
    assert response.headers["tus-resumable"] == "1.0.0"
    assert await row_counts(owner_connection) == NOTHING_STORED
    assert (await client.head(location, headers=tus_headers(tenant.project_key))).status_code == 404
    event = await owner_connection.fetchrow(
        "SELECT actor_type, actor_id, target_type, target_id, details FROM audit_events WHERE action = $1",
        "upload.terminated",
    )
    assert event is not None, "the termination is not on the audit trail"
    assert (event["actor_type"], event["target_type"]) == ("project_key", "upload")
    assert event["target_id"] == location.rsplit("/", 1)[1]
    assert json.loads(event["details"])["upload_offset"] == MIB + 1


_TERMINATE = ("DELETE FROM upload_sessions WHERE payload_id = $1", "DELETE FROM payloads WHERE id = $1")
_LOSE_FIRST_CHUNK = ("DELETE FROM backup_chunks WHERE payload_id = $1 AND seq = 0",)


@POSTGRES_ONLY  # it loses a chunk row; the S3 store's twin loses an object (test_backups_s3_store.py)
@pytest.mark.parametrize(
    ("meanwhile", "status", "detail"),
    [
        pytest.param(_TERMINATE, 404, "the upload no longer exists", id="terminated"),
        pytest.param(_LOSE_FIRST_CHUNK, 503, "a stored chunk of this upload is missing", id="chunk-lost"),
    ],
)
async def test_a_resuming_patch_that_finds_its_stored_chunks_gone_says_why(
    client: Client,
    tenant: Tenant,
    owner_connection: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: tuple[str, ...],
    status: int,
    detail: str,
) -> None:
    # A resumed PATCH claims the upload, then re-reads the chunks stored before it to hash them. Whatever happens
    # in between runs here, on the server's own connection, just before that read: a termination makes the PATCH
    # answer 404 (as it would a moment later), while a chunk lost from an upload the PATCH still owns stays a 503.
    payload = os.urandom(MIB + 5)
    location = (await create(client, tenant, sign_envelope(tenant, payload))).headers["location"]
    assert (await patch(client, tenant, location, payload[: MIB + 1], 0)).status_code == 204

    async def hash_after_a_concurrent_change(connection: asyncpg.Connection, **kwargs: Any) -> None:
        async with connection.transaction():
            await connection.execute("SELECT set_config('zkeb.org_id', $1, true)", str(kwargs["organization_id"]))
            for statement in meanwhile:
                await connection.execute(statement, kwargs["payload_id"])
        await hash_stored_chunks(connection, **kwargs)

    monkeypatch.setattr(upload_patch, "hash_stored_chunks", hash_after_a_concurrent_change)
    response = await patch(client, tenant, location, payload[MIB + 1 :], MIB + 1)
    assert response.status_code == status, response.text
    assert detail in problem(response)["detail"]
    if status == 404:
        assert await row_counts(owner_connection) == NOTHING_STORED
    else:  # the PATCH gave the upload back untouched: its offset stays where the first PATCH left it
        head = await client.head(location, headers=tus_headers(tenant.project_key))
        assert head.headers["upload-offset"] == str(MIB + 1)
        assert await owner_connection.fetchval("SELECT count(*) FROM upload_sessions WHERE lease_id IS NULL") == 1


async def test_a_patch_whose_upload_is_terminated_as_it_starts_answers_404(
    database_url: str,
    client: Client,
    tenant: Tenant,
    owner_connection: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A DELETE (or the sweeper) commits between the PATCH loading its upload and reading the upload's payload: the
    # PATCH answers that its upload ended (404), as it does a moment later, not a 500 (a reviewer's race, 35 in 300).
    payload = os.urandom(1000)
    location = (await create(client, tenant, sign_envelope(tenant, payload))).headers["location"]

    async def load_then_terminated(*args: Any) -> Any:
        upload = await uploads_services.load_upload(*args)
        for statement in _TERMINATE:
            await _committed_meanwhile(database_url, tenant, statement, upload.payload_id)
        return upload

    monkeypatch.setattr(uploads_controller, "load_upload", load_then_terminated)
    response = await patch(client, tenant, location, payload, 0)
    assert response.status_code == 404, response.text
    assert "the upload no longer exists" in problem(response)["detail"]
    assert await row_counts(owner_connection) == NOTHING_STORED


@pytest.mark.parametrize(
    ("meanwhile", "status", "detail"),
    [
        pytest.param(_TERMINATE, 404, "the upload no longer exists", id="terminated"),
        pytest.param(
            ("UPDATE upload_sessions SET lease_id = gen_random_uuid() WHERE payload_id = $1",),
            409,
            "a later PATCH took it over",
            id="taken-over",
        ),
    ],
)
async def test_a_completing_patch_whose_upload_ended_during_verification_commits_nothing(
    database_url: str,
    client: Client,
    tenant: Tenant,
    owner_connection: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: tuple[str, ...],
    status: int,
    detail: str,
) -> None:
    # The last PATCH stores its bytes, then commits: admitted and verified, the commit deletes the upload's session
    # row only if this PATCH's lease still holds it. Whatever happens before that delete runs here, on another
    # connection, just as the commit locks the project row: the backup must not appear.
    payload = os.urandom(MIB + 5)
    location = (await create(client, tenant, sign_envelope(tenant, payload))).headers["location"]
    payload_id = await owner_connection.fetchval(
        "SELECT payload_id FROM upload_sessions WHERE id = $1", uuid.UUID(location.rsplit("/", 1)[1])
    )

    async def change_the_upload() -> None:
        for statement in meanwhile:
            await _committed_meanwhile(database_url, tenant, statement, payload_id)

    _before_the_commit_locks_the_project(monkeypatch, change_the_upload)
    response = await patch(client, tenant, location, payload, 0)
    assert response.status_code == status, response.text
    assert detail in problem(response)["detail"]
    assert await owner_connection.fetchval("SELECT count(*) FROM backups") == 0
    assert await owner_connection.fetchval("SELECT count(*) FROM payload_nonces") == 0
    assert await owner_connection.fetchval(f"SELECT {PROJECT_USED_BYTES} FROM projects p") == 0


async def test_a_patch_whose_upload_a_later_patch_completed_answers_404_not_the_nonce_of_that_commit(
    client: Client,
    tenant: Tenant,
    owner_connection: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    database_url: str,
) -> None:
    # A retry (PATCH B) takes the upload over from a PATCH A still storing its last bytes and commits first. When A
    # reaches its commit, the upload is gone and its nonce is B's: A answers that its upload ended (404), as a
    # PATCH whose upload ends meanwhile does, not that the nonce is used (409).
    payload = os.urandom(MIB + 5)
    envelope = sign_envelope(tenant, payload)
    location = (await create(client, tenant, envelope)).headers["location"]
    upload_id = uuid.UUID(location.rsplit("/", 1)[1])

    async def admission_after_a_later_patch_committed(connection: asyncpg.Connection, **kwargs: Any) -> Any:
        await _committed_meanwhile(database_url, tenant, "DELETE FROM upload_sessions WHERE id = $1", upload_id)
        await _committed_meanwhile(
            database_url,
            tenant,
            "INSERT INTO payload_nonces (id, organization_id, project_id, device_id_hash, nonce,"
            " created_at, updated_at) VALUES (gen_random_uuid(), $1, $2, $3, $4, now(), now())",
            tenant.organization_id,
            tenant.project_id,
            envelope.device_id_hash,
            envelope.payload_nonce,
        )
        return await commits.read_admission(connection, **kwargs)

    monkeypatch.setattr(finalize, "read_admission", admission_after_a_later_patch_committed)
    response = await patch(client, tenant, location, payload, 0)
    assert response.status_code == 404, response.text
    assert "the upload no longer exists" in problem(response)["detail"]
    assert await owner_connection.fetchval("SELECT count(*) FROM backups") == 0


# --- Expiration ---------------------------------------------------------------------------------------------------


async def test_expired_upload_is_gone_and_maintenance_purges_it_with_its_bytes(
    client: Client, settings: Settings, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    chunk = store_chunk_size(settings)
    payload = os.urandom(chunk + 5)
    stale = (await create(client, tenant, sign_envelope(tenant, payload))).headers["location"]
    await patch(client, tenant, stale, payload[: chunk + 2], 0)
    fresh_envelope = sign_envelope(tenant, payload)
    fresh = (await create(client, tenant, fresh_envelope)).headers["location"]
    await patch(client, tenant, fresh, payload[:10], 0)
    kept = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, b"kept").json(), headers=auth(tenant.project_key)
    )
    assert kept.status_code == 201
    await owner_connection.execute(
        "UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE id = $1",
        uuid.UUID(stale.rsplit("/", 1)[1]),
    )
    gone = await patch(client, tenant, stale, payload[chunk + 2 :], chunk + 2)
    assert gone.status_code == 410
    problem(gone)
    swept = await maintenance_pass(settings)
    assert (swept.expired_uploads, swept.failed) == (1, [])
    counts = await row_counts(owner_connection)
    assert counts["upload_sessions"] == 1
    assert counts["payloads"] == 2  # the fresh upload's and the kept backup's
    assert counts["backup_chunks"] == 2
    # With S3, the same pass deleted the expired upload's two objects (a full chunk and a short one).
    assert swept.objects_deleted == (2 if settings.payload_store.kind == "s3" else 0)
    await assert_bucket_holds_exactly_the_chunks(settings, owner_connection)
    assert (await client.head(stale, headers=tus_headers(tenant.project_key))).status_code == 404
    assert (await maintenance_pass(settings)).expired_uploads == 0
    assert (await patch(client, tenant, fresh, payload[10:], 10)).status_code == 204


async def test_the_sweeper_skips_an_expired_upload_whose_session_row_a_writer_holds(
    client: Client, settings: Settings, database_url: str, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    # A PATCH storing a batch holds its session row until it commits (and pushes the expiry forward with it): the
    # sweeper must pass over that upload, not wait for it nor delete it under the writer.
    payload = os.urandom(MIB + 5)
    location = (await create(client, tenant, sign_envelope(tenant, payload))).headers["location"]
    upload_id = uuid.UUID(location.rsplit("/", 1)[1])
    await owner_connection.execute(
        "UPDATE upload_sessions SET expires_at = now() - interval '1 second' WHERE id = $1", upload_id
    )
    sweeper = UploadSweeper(create_app_engine(settings, database_url))
    async with owner_connection.transaction():  # stands in for the writer
        await owner_connection.execute("SELECT 1 FROM upload_sessions WHERE id = $1 FOR UPDATE", upload_id)
        result = await asyncio.wait_for(sweeper.sweep(), timeout=30)
        assert (result.candidates, result.deleted) == (1, 0)
    assert await sweeper.sweep_once() == 1
    assert await row_counts(owner_connection) == NOTHING_STORED


async def test_sweeper_purges_orphaned_payloads_only_when_old(
    client: Client, settings: Settings, database_url: str, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    kept = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, b"kept").json(), headers=auth(tenant.project_key)
    )
    assert kept.status_code == 201
    project = await owner_connection.fetchval("SELECT project_id FROM payloads")
    await owner_connection.execute(
        "INSERT INTO payloads (id, organization_id, project_id, key_id, wrapped_key, size, chunk_count, created_at,"
        " updated_at)"
        " VALUES ($1, $2, $3, 'mk-x', '\\x00'::bytea, 0, 0, now() - interval '2 hours', now()),"
        " ($4, $2, $3, 'mk-x', '\\x00'::bytea, 0, 0, now(), now())",
        uuid.uuid4(),
        tenant.organization_id,
        project,
        uuid.uuid4(),
    )
    await owner_connection.execute("UPDATE payloads SET created_at = now() - interval '2 hours' WHERE key_id <> 'mk-x'")
    sweeper = UploadSweeper(create_app_engine(settings, database_url))
    assert await sweeper.sweep_once() == 1
    assert (await row_counts(owner_connection))["payloads"] == 2


async def test_maintenance_purges_an_orphaned_payload_with_its_chunks_and_objects(
    client: Client, settings: Settings, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    # An upload whose session row is gone but whose payload stayed (its process died between the two): after
    # ORPHAN_AGE the payload is an orphan, and one pass removes it, its chunk rows and, with S3, its objects.
    chunk = store_chunk_size(settings)
    payload = os.urandom(chunk + 5)
    location = (await create(client, tenant, sign_envelope(tenant, payload))).headers["location"]
    await patch(client, tenant, location, payload[: chunk + 2], 0)  # a full chunk and a short one
    kept = await client.post(
        "/api/v1/backups", json=sign_envelope(tenant, b"kept").json(), headers=auth(tenant.project_key)
    )
    assert kept.status_code == 201
    orphan = await owner_connection.fetchval(
        "DELETE FROM upload_sessions WHERE id = $1 RETURNING payload_id", uuid.UUID(location.rsplit("/", 1)[1])
    )
    assert (await maintenance_pass(settings)).orphaned_payloads == 0  # too young: it may still be committing
    await owner_connection.execute("UPDATE payloads SET created_at = now() - interval '2 hours' WHERE id = $1", orphan)
    swept = await maintenance_pass(settings)
    assert (swept.orphaned_payloads, swept.failed) == (1, [])
    assert swept.objects_deleted == (2 if settings.payload_store.kind == "s3" else 0)
    counts = await row_counts(owner_connection)
    assert (counts["payloads"], counts["backup_chunks"]) == (1, 1)  # the kept backup's
    await assert_bucket_holds_exactly_the_chunks(settings, owner_connection)
    restored = await client.get(f"/api/v1/backups/{kept.json()['id']}/payload", headers=auth(tenant.project_key))
    assert restored.content == b"kept"


# --- Authorization ------------------------------------------------------------------------------------------------


async def test_uploads_are_scoped_to_project_and_device(client: Client, tenant: Tenant, settings: Settings) -> None:
    envelope = sign_envelope(tenant, b"abc", device=tenant.devices[1])
    location = (await create(client, tenant, envelope)).headers["location"]
    other_device = await device_token(client, tenant, tenant.devices[0])
    stranger = await make_tenant(client, settings, name="stranger")
    for credential in (other_device, stranger.project_key):
        head = await client.head(location, headers=tus_headers(credential))
        assert head.status_code == 404
        response = await client.patch(
            location, content=b"abc", headers=tus_headers(credential, **{"Upload-Offset": "0", "Content-Type": OCTETS})
        )
        assert response.status_code == 404
        problem(response)
        assert (await client.delete(location, headers=tus_headers(credential))).status_code == 404
    own = await device_token(client, tenant, tenant.devices[1])
    done = await client.patch(
        location, content=b"abc", headers=tus_headers(own, **{"Upload-Offset": "0", "Content-Type": OCTETS})
    )
    assert done.status_code == 204


async def test_device_token_cannot_create_for_another_device(client: Client, tenant: Tenant) -> None:
    token = await device_token(client, tenant, tenant.devices[0])
    envelope = sign_envelope(tenant, b"abc", device=tenant.devices[1])
    response = await client.post(
        "/api/v1/uploads",
        headers=tus_headers(token, **{"Upload-Length": "3", "Upload-Metadata": envelope.tus_metadata()}),
    )
    assert response.status_code == 422
    assert problem(response)["field"] == "device_id_hash"


# --- Integrity ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: e.with_(payload=b"Y" + e.payload[1:]),
        lambda e: e.with_(metadata=b"other"),
        lambda e: e.with_(payload_nonce=os.urandom(12)),
        lambda e: e.with_(payload_auth_tag=os.urandom(16)),
        lambda e: e.with_(backup_timestamp="2021-02-03T04:05:06Z"),
        lambda e: e.with_(container_id=uuid.uuid4()),
    ],
    ids=["payload", "metadata", "nonce", "tag", "timestamp", "container"],
)
async def test_tampered_upload_is_422_at_completion_and_nothing_is_stored(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, tamper: Any
) -> None:
    envelope = tamper(sign_envelope(tenant, b"X" * (MIB + 9)))
    location = (await create(client, tenant, envelope)).headers["location"]
    response = await patch(client, tenant, location, envelope.payload, 0)
    assert response.status_code == 422
    assert problem(response)["field"] == "signature"
    assert await row_counts(owner_connection) == NOTHING_STORED


@pytest.mark.parametrize("first_bytes_with", ["patch", "creation"])
async def test_a_patch_that_finds_the_pool_exhausted_mid_body_is_a_503_and_the_retry_completes(
    base_settings_env: dict[str, str], database_url: str, monkeypatch: pytest.MonkeyPatch, first_bytes_with: str
) -> None:
    # One pooled connection, a short wait for it. The PATCH claims the upload, then its body's chunk writer needs
    # the connection again, which this test has checked out in between (on the server's own event loop).
    monkeypatch.setattr(database, "POOL_TIMEOUT_SECONDS", 0.5)
    settings = make_settings(base_settings_env, DATABASE_URL=database_url, DB_POOL_SIZE="1")
    app = create_app(settings)
    engine = get_runtime(app.state).engine
    held: list[AsyncConnection] = []
    claim = upload_patch.PatchReceiver._claim

    async def claim_then_take_the_pool(receiver: upload_patch.PatchReceiver, lease: Any) -> Any:
        claimed = await claim(receiver, lease)
        if not held:
            held.append(await engine.connect())
        return claimed

    monkeypatch.setattr(upload_patch.PatchReceiver, "_claim", claim_then_take_the_pool)
    async with AsyncTestClient(app=app) as client:
        tenant = await make_tenant(client, settings)
        payload = os.urandom(6 * MIB + 5)  # more chunks than wait for the writer: the refusal comes mid-body
        envelope = sign_envelope(tenant, payload)
        if first_bytes_with == "patch":
            location = (await create(client, tenant, envelope)).headers["location"]
            refused = await patch(client, tenant, location, payload, 0)
        else:  # creation-with-upload: the 503 must say where the upload is, or it could never be resumed
            refused = await client.post(
                "/api/v1/uploads",
                content=payload,
                headers=tus_headers(
                    tenant.project_key,
                    **{
                        "Upload-Length": str(len(payload)),
                        "Upload-Metadata": envelope.tus_metadata(),
                        "Content-Type": OCTETS,
                    },
                ),
            )
            location = refused.headers["location"]
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "busy" in problem(refused)["detail"]
        client.blocking_portal.call(held[0].close)
        head = await client.head(location, headers=tus_headers(tenant.project_key))
        assert head.headers["upload-offset"] == "0"
        retried = await patch(client, tenant, location, payload, 0)
        assert retried.status_code == 204, retried.text
        backup_id = retried.headers["zkeb-backup-id"]
        restored = await client.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
        assert restored.content == payload
