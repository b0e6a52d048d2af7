"""Regressions for the defects a probe of the live server found (issue 16), each against granian on PostgreSQL.

Database faults (the app's backends terminated mid-upload and mid-restore), open tus uploads and the quota,
retention across devices, a metadata nonce equal to the payload nonce, the tus `Location` and invalid UTF-8 in a
JSON body.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from backups_support import (
    MIB,
    Device,
    Tenant,
    auth,
    device_token,
    make_tenant,
    sign_envelope,
    tus_headers,
)

from zkeb.lib.envelope import backup_signed_message, format_rfc3339_utc

from support import Envelope, granian_server, make_settings, problem

OCTETS = "application/offset+octet-stream"
PUBLIC_URL = "https://backups.example.com"


@pytest.fixture
def server_log(tmp_path: Path) -> Path:
    """Where the live server writes its log."""
    return tmp_path / "server.log"


@pytest.fixture
def live_url(base_settings_env: dict[str, str], database_url: str, server_log: Path) -> Iterator[str]:
    env = {**base_settings_env, "DATABASE_URL": database_url, "PUBLIC_URL": PUBLIC_URL, "MAX_OPEN_UPLOADS": "3"}
    with granian_server(env, log_path=server_log) as url:
        yield url


@pytest.fixture
async def http(live_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live_url, timeout=60) as client:
        yield client


@pytest.fixture
async def tenant(http: httpx.AsyncClient, base_settings_env: dict[str, str], database_url: str) -> Tenant:
    return await make_tenant(http, make_settings(base_settings_env, DATABASE_URL=database_url))


def _path(location: str) -> str:
    """The path of an upload's `Location` (the public URL names another host than the test server)."""
    return "/" + location.split("/", 3)[3]


async def _create_upload(http: httpx.AsyncClient, credential: str, envelope: Envelope) -> httpx.Response:
    return await http.post(
        "/api/v1/uploads",
        headers=tus_headers(
            credential, **{"Upload-Length": str(len(envelope.payload)), "Upload-Metadata": envelope.tus_metadata()}
        ),
    )


async def _terminate_app_backends(owner: asyncpg.Connection) -> int:
    """Terminate every other backend of the test's own database (the app's connections), as an operator might."""
    terminated: int = await owner.fetchval(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t"
    )
    return terminated


async def _retrying(send: Any) -> httpx.Response:
    """Send a request again while it answers 503 (what a client does after a database fault), honoring Retry-After."""
    for _ in range(30):
        response: httpx.Response = await send()
        if response.status_code != 503:
            return response
        assert "retry-after" in response.headers
        await asyncio.sleep(float(response.headers["retry-after"]) / 10)
    raise AssertionError("still 503 after 30 tries")


# --- 1. database faults ------------------------------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lowercase names) and body of one HTTP/1.1 response with a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines if line)
    }
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split(" ", 2)[1]), headers, body


async def test_a_patch_whose_database_connection_is_terminated_answers_503_and_resumes_byte_identically(
    http: httpx.AsyncClient, live_url: str, tenant: Tenant, owner_connection: asyncpg.Connection, server_log: Path
) -> None:
    payload = os.urandom(40 * MIB)
    envelope = sign_envelope(tenant, payload)
    created = await _create_upload(http, tenant.project_key, envelope)
    assert created.status_code == 201, created.text
    location = _path(created.headers["location"])
    host, port = live_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"PATCH {location} HTTP/1.1\r\nHost: test\r\nTus-Resumable: 1.0.0\r\n"
            f"Authorization: Bearer {tenant.project_key}\r\nContent-Type: {OCTETS}\r\nUpload-Offset: 0\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
        )
        writer.write(payload[: 12 * MIB])
        await writer.drain()
        await asyncio.sleep(1.5)  # the server stores what it received
        assert await _terminate_app_backends(owner_connection) > 0
        writer.write(payload[12 * MIB : 16 * MIB])  # the next chunks need the database: the writer fails
        await writer.drain()
        status, headers, body = await asyncio.wait_for(_read_response(reader), timeout=30)
    finally:
        writer.close()
    assert status == 503, body[:500]
    assert headers["content-type"].startswith("application/problem+json")
    assert int(headers["retry-after"]) >= 1
    log = await asyncio.to_thread(server_log.read_text)
    lost = [line for line in log.splitlines() if "database connection lost on PATCH" in line]
    assert lost, "the lost connection was not logged"
    assert not [line for line in lost if "PipelineError" in line], "the log names a wrapper, not the cause"

    head = await _retrying(lambda: http.head(location, headers=tus_headers(tenant.project_key)))
    assert head.status_code == 200
    offset = int(head.headers["upload-offset"])
    assert 0 < offset < len(payload)
    resumed = await _retrying(
        lambda: http.patch(
            location,
            content=payload[offset:],
            headers=tus_headers(tenant.project_key, **{"Content-Type": OCTETS, "Upload-Offset": str(offset)}),
        )
    )
    assert resumed.status_code == 204, resumed.text
    backup_id = resumed.headers["zkeb-backup-id"]
    restored = await _retrying(
        lambda: http.get(f"/api/v1/backups/{backup_id}/payload", headers=auth(tenant.project_key))
    )
    assert restored.status_code == 200
    assert hashlib.sha256(restored.content).digest() == hashlib.sha256(payload).digest()


async def _upload(http: httpx.AsyncClient, credential: str, envelope: Envelope) -> str:
    created = await _create_upload(http, credential, envelope)
    assert created.status_code == 201, created.text
    done = await http.patch(
        _path(created.headers["location"]),
        content=envelope.payload,
        headers=tus_headers(credential, **{"Content-Type": OCTETS, "Upload-Offset": "0"}),
    )
    assert done.status_code == 204, done.text
    return done.headers["zkeb-backup-id"]


async def test_a_restore_losing_its_database_connection_mid_stream_breaks_the_body_and_one_before_headers_is_503(
    http: httpx.AsyncClient, live_url: str, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    payload = os.urandom(40 * MIB)
    backup_id = await _upload(http, tenant.project_key, sign_envelope(tenant, payload))
    url = f"/api/v1/backups/{backup_id}/payload"
    received = 0

    async def download() -> None:
        nonlocal received
        async with http.stream("GET", url, headers=auth(tenant.project_key)) as response:
            assert response.status_code == 200
            async for piece in response.aiter_raw():
                received += len(piece)
                if received >= 4 * MIB and received - len(piece) < 4 * MIB:
                    await _terminate_app_backends(owner_connection)
                    await asyncio.sleep(0.6)  # past the reader's transaction window: it needs the database again

    with pytest.raises(httpx.HTTPError):  # the connection is cut: an incomplete body, never a 500 after headers
        await download()
    assert received < len(payload)

    # Before headers: the request's own pooled connections were terminated too. Each answer is the payload or a 503
    # problem, never a 500 (the old code's); a pool that replaces its dead connections unnoticed answers only 200s.
    async with httpx.AsyncClient(base_url=live_url, timeout=60) as fresh:
        statuses = set()
        await _terminate_app_backends(owner_connection)
        for _ in range(12):
            response = await fresh.get(url, headers=auth(tenant.project_key))
            statuses.add(response.status_code)
            if response.status_code == 503:
                assert problem(response)["status"] == 503
                assert "retry-after" in response.headers
            else:
                assert response.status_code == 200
                assert response.content == payload
        assert statuses <= {200, 503}


# --- 2. open tus uploads and the quota ---------------------------------------------------------------------------


async def test_open_uploads_reserve_their_length_against_the_quota(http: httpx.AsyncClient, tenant: Tenant) -> None:
    quota = 1_000_000
    patched = await http.patch(
        f"/api/v1/projects/{tenant.project_id}", json={"storage_quota_bytes": quota}, headers=auth(tenant.admin_key)
    )
    assert patched.status_code == 200, patched.text
    first = sign_envelope(tenant, os.urandom(600_000))
    assert (await _create_upload(http, tenant.project_key, first)).status_code == 201
    second = await _create_upload(http, tenant.project_key, sign_envelope(tenant, os.urandom(600_000)))
    assert second.status_code == 507, second.text
    body = problem(second)
    assert body["requested"] == 600_000
    assert body["quota"] == quota
    usage = await http.get(f"/api/v1/projects/{tenant.project_id}/usage", headers=auth(tenant.project_key))
    assert usage.status_code == 200, usage.text
    assert usage.json()["reserved_bytes"] == 600_000


async def test_a_terminated_upload_gives_its_reservation_back(http: httpx.AsyncClient, tenant: Tenant) -> None:
    await http.patch(
        f"/api/v1/projects/{tenant.project_id}", json={"storage_quota_bytes": 1_000_000}, headers=auth(tenant.admin_key)
    )
    created = await _create_upload(http, tenant.project_key, sign_envelope(tenant, os.urandom(600_000)))
    assert created.status_code == 201
    gone = await http.delete(_path(created.headers["location"]), headers=tus_headers(tenant.project_key))
    assert gone.status_code == 204
    again = sign_envelope(tenant, os.urandom(600_000))
    assert (await _create_upload(http, tenant.project_key, again)).status_code == 201


async def test_open_uploads_per_project_are_capped(http: httpx.AsyncClient, tenant: Tenant) -> None:
    for _ in range(3):  # MAX_OPEN_UPLOADS=3 in this server's settings
        assert (await _create_upload(http, tenant.project_key, sign_envelope(tenant, b"x" * 10))).status_code == 201
    refused = await _create_upload(http, tenant.project_key, sign_envelope(tenant, b"x" * 10))
    assert refused.status_code == 429, refused.text
    assert "open uploads" in problem(refused)["detail"]


# --- 3. retention across devices ---------------------------------------------------------------------------------


async def test_retention_keeps_the_last_backups_of_each_device_in_a_container(
    http: httpx.AsyncClient, tenant: Tenant
) -> None:
    policy = await http.patch(
        f"/api/v1/projects/{tenant.project_id}", json={"retention_keep_last": 1}, headers=auth(tenant.admin_key)
    )
    assert policy.status_code == 200, policy.text
    container = uuid.uuid4()
    x, y = tenant.devices
    y_token = await device_token(http, tenant, y)
    x_token = await device_token(http, tenant, x)
    y_backup = await _upload(http, y_token, sign_envelope(tenant, b"y" * 100, device=y, container_id=container))
    x_old = await _upload(http, x_token, sign_envelope(tenant, b"x" * 100, device=x, container_id=container))
    x_new = await _upload(http, x_token, sign_envelope(tenant, b"z" * 100, device=x, container_id=container))
    listed = await http.get(
        "/api/v1/backups", params={"container_id": str(container)}, headers=auth(tenant.project_key)
    )
    assert {item["id"] for item in listed.json()["items"]} == {y_backup, x_new}
    assert (await http.get(f"/api/v1/backups/{y_backup}", headers=auth(y_token))).status_code == 200
    assert (await http.get(f"/api/v1/backups/{x_old}", headers=auth(x_token))).status_code == 404


# --- 4. a metadata nonce equal to the payload nonce ------------------------------------------------------------


def _sign_with_one_nonce(tenant: Tenant, device: Device, payload: bytes) -> Envelope:
    """A correctly signed envelope whose metadata nonce is its payload nonce."""
    nonce, tag, metadata_tag, metadata = os.urandom(12), os.urandom(16), os.urandom(16), b"encrypted-metadata"
    container, when = uuid.uuid4(), datetime.now(UTC)
    message = backup_signed_message(
        project_id=tenant.project_id,
        container_id=container,
        device_id_hash=device.device_id_hash,
        backup_timestamp=when,
        payload_nonce=nonce,
        payload_auth_tag=tag,
        payload_sha256=hashlib.sha256(payload).digest(),
        payload_size=len(payload),
        metadata_nonce=nonce,
        metadata_auth_tag=metadata_tag,
        metadata_sha256=hashlib.sha256(metadata).digest(),
        metadata_size=len(metadata),
    )
    return Envelope(
        container_id=container,
        device_id_hash=device.device_id_hash,
        payload=payload,
        payload_nonce=nonce,
        payload_auth_tag=tag,
        metadata=metadata,
        metadata_nonce=nonce,
        metadata_auth_tag=metadata_tag,
        signature=device.private_key.sign(message),
        backup_timestamp=format_rfc3339_utc(when),
    )


async def test_a_metadata_nonce_equal_to_the_payload_nonce_is_refused_naming_the_field(
    http: httpx.AsyncClient, tenant: Tenant
) -> None:
    envelope = _sign_with_one_nonce(tenant, tenant.device, b"p" * 64)
    as_json = await http.post("/api/v1/backups", json=envelope.json(), headers=auth(tenant.project_key))
    as_msgpack = await http.post(
        "/api/v1/backups",
        content=envelope.msgpack(),
        headers={**auth(tenant.project_key), "Content-Type": "application/msgpack"},
    )
    as_tus = await _create_upload(http, tenant.project_key, envelope)
    for response in (as_json, as_msgpack, as_tus):
        assert response.status_code == 422, response.text
        assert problem(response)["field"] == "metadata_nonce"
    listed = await http.get("/api/v1/backups", headers=auth(tenant.project_key))
    assert listed.json()["items"] == []


# --- 5. the tus Location ---------------------------------------------------------------------------------------


async def test_the_upload_location_uses_the_public_url_whatever_the_host_header(
    http: httpx.AsyncClient, tenant: Tenant
) -> None:
    envelope = sign_envelope(tenant, b"l" * 10)
    created = await http.post(
        "/api/v1/uploads",
        headers={
            **tus_headers(tenant.project_key, **{"Upload-Length": "10", "Upload-Metadata": envelope.tus_metadata()}),
            "Host": "evil.example",
        },
    )
    assert created.status_code == 201, created.text
    assert created.headers["location"].startswith(f"{PUBLIC_URL}/api/v1/uploads/")


def _raw_request(live_url: str, request: bytes) -> bytes:
    host, port = live_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer:
                head, _, rest = answer.partition(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                if len(rest) >= length:
                    break
        return answer


async def test_an_upload_creation_without_host_is_a_400(
    base_settings_env: dict[str, str], database_url: str, tenant: Tenant
) -> None:
    env = {**base_settings_env, "DATABASE_URL": database_url}  # no PUBLIC_URL: the Location comes from Host
    envelope = sign_envelope(tenant, b"h" * 10)
    with granian_server(env) as url:
        request = (
            f"POST /api/v1/uploads HTTP/1.0\r\nTus-Resumable: 1.0.0\r\nAuthorization: Bearer {tenant.project_key}\r\n"
            f"Upload-Length: 10\r\nUpload-Metadata: {envelope.tus_metadata()}\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        answer = await asyncio.to_thread(_raw_request, url, request)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            listed = await client.get("/api/v1/backups", headers=auth(tenant.project_key))
    status = int(answer.split(b" ", 2)[1])
    assert status == 400, answer[:500]
    assert b"application/problem+json" in answer
    assert b"Host" in answer
    assert listed.json()["items"] == []


# --- 6. invalid UTF-8 in a JSON body -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80"], ids=["ff", "overlong", "surrogate"])
async def test_invalid_utf8_inside_a_json_string_of_a_backup_is_a_400(
    http: httpx.AsyncClient, tenant: Tenant, bad: bytes
) -> None:
    envelope = sign_envelope(tenant, b"u" * 10)
    body = dict(envelope.json())
    body["backup_timestamp"] = "@@TS@@"
    raw = httpx.Request("POST", "/", json=body).content.replace(b"@@TS@@", bad)
    response = await http.post(
        "/api/v1/backups", content=raw, headers={**auth(tenant.project_key), "Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert "UTF-8" in problem(response)["detail"]
