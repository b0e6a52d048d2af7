"""docs/bad-inputs.md, envelope section: every envelope field wrong in length, type and encoding, in each wire form.

JSON and msgpack single-shot bodies (`POST /api/v1/backups`) and tus `Upload-Metadata` (`POST /api/v1/uploads`).
Each case answers 4xx problem+json naming the field where it can, and no table changes.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec
import pytest
from badinput_support import Client, Tenant, assert_refused, auth, make_tenant, snapshot, tus_headers

from zkeb.settings import Settings

from support import Envelope

FIXED = {
    "device_id_hash": 32,
    "payload_nonce": 12,
    "payload_auth_tag": 16,
    "metadata_nonce": 12,
    "metadata_auth_tag": 16,
    "signature": 64,
}
METADATA_LIMIT = 8 * 1024
# Cases whose problem names another field than the one changed.
# msgspec reads a 16-byte msgpack bin as a UUID: the envelope then names another container, so its signature fails.
NAMED_FIELD = {"container_id-type-bin": "signature"}


def named_field(request: pytest.FixtureRequest, field: str) -> str:
    """The field a 422 for this case names."""
    return NAMED_FIELD.get(request.node.callspec.id, field)


@pytest.fixture
async def tenant(client: Client, settings: Settings) -> Tenant:
    return await make_tenant(client, settings)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _text(field: str, value: bytes) -> str:
    """A bytes field in its JSON text form: hex for `device_id_hash`, standard base64 for the rest."""
    return value.hex() if field == "device_id_hash" else _b64(value)


# --- JSON ------------------------------------------------------------------------------------------------------------

JsonChange = Callable[[dict[str, Any]], Any]


def _json_cases() -> list[Any]:
    cases: list[Any] = []
    for field, length in FIXED.items():
        cases += [
            pytest.param(field, _text(field, bytes(length - 1)), 422, id=f"{field}-short"),
            pytest.param(field, _text(field, bytes(length + 1)), 422, id=f"{field}-long"),
            pytest.param(field, "", 422, id=f"{field}-empty"),
            pytest.param(field, 12345, 422, id=f"{field}-type-number"),
            pytest.param(field, "@" * (2 * length), 422, id=f"{field}-encoding-garbage"),
        ]
        other = _b64(bytes(length)) if field == "device_id_hash" else bytes(length).hex()
        cases.append(pytest.param(field, other, 422, id=f"{field}-encoding-swapped"))
        if field != "device_id_hash":
            urlsafe = base64.urlsafe_b64encode(b"\xfb\xff" * length)[: len(_b64(bytes(length)))].decode()
            cases.append(pytest.param(field, urlsafe, 422, id=f"{field}-encoding-urlsafe"))
    cases += [
        pytest.param("payload", "", 422, id="payload-empty"),
        pytest.param("payload", "@@@@", 422, id="payload-encoding-garbage"),
        pytest.param("payload", "-_-_", 422, id="payload-encoding-urlsafe"),
        pytest.param("payload", 7, 422, id="payload-type-number"),
        pytest.param("payload", None, 422, id="payload-type-null"),
        pytest.param("metadata", _b64(bytes(METADATA_LIMIT + 1)), 422, id="metadata-long"),
        pytest.param("metadata", "@@@@", 422, id="metadata-encoding-garbage"),
        pytest.param("metadata", {"a": 1}, 422, id="metadata-type-object"),
        pytest.param("container_id", "not-a-uuid", 422, id="container_id-garbage"),
        pytest.param("container_id", "", 422, id="container_id-empty"),
        pytest.param("container_id", _b64(bytes(16)), 422, id="container_id-encoding-base64"),
        pytest.param("container_id", 42, 422, id="container_id-type-number"),
        pytest.param("container_id", None, 422, id="container_id-type-null"),
        pytest.param("backup_timestamp", "yesterday", 422, id="backup_timestamp-garbage"),
        pytest.param("backup_timestamp", "2026-01-01T10:00:00", 422, id="backup_timestamp-no-offset"),
        pytest.param("backup_timestamp", "2026-13-01T10:00:00Z", 422, id="backup_timestamp-month-13"),
        pytest.param("backup_timestamp", "2026-01-01T10:00:00.1234567Z", 422, id="backup_timestamp-7-fraction-digits"),
        pytest.param("backup_timestamp", 1767261600, 422, id="backup_timestamp-type-number"),
        pytest.param("backup_timestamp", None, 422, id="backup_timestamp-type-null"),
    ]
    return cases


@pytest.mark.parametrize(("field", "value", "status"), _json_cases())
async def test_json_envelope_field_is_refused(
    request: pytest.FixtureRequest,
    client: Client,
    tenant: Tenant,
    owner_connection: asyncpg.Connection,
    field: str,
    value: Any,
    status: int,
) -> None:
    before = await snapshot(owner_connection)
    body = {**tenant.envelope().json(), field: value}
    response = await client.post("/api/v1/backups", json=body, headers=auth(tenant.project_key))
    refusal = assert_refused(response, status)
    if status == 422:
        assert refusal.get("field") == named_field(request, field), refusal
    assert await snapshot(owner_connection) == before


# --- msgpack ---------------------------------------------------------------------------------------------------------


def _msgpack_cases() -> list[Any]:
    cases: list[Any] = []
    for field, length in FIXED.items():
        cases += [
            pytest.param(field, bytes(length - 1), 422, id=f"{field}-short"),
            pytest.param(field, bytes(length + 1), 422, id=f"{field}-long"),
            pytest.param(field, b"", 422, id=f"{field}-empty"),
            pytest.param(field, 12345, 422, id=f"{field}-type-number"),
            pytest.param(field, _text(field, bytes(length)), 422, id=f"{field}-type-str"),
        ]
    cases += [
        pytest.param("payload", b"", 422, id="payload-empty"),
        pytest.param("payload", "text", 422, id="payload-type-str"),
        pytest.param("payload", [1], 422, id="payload-type-array"),
        pytest.param("metadata", bytes(METADATA_LIMIT + 1), 422, id="metadata-long"),
        pytest.param("metadata", 1.5, 422, id="metadata-type-float"),
        pytest.param("container_id", bytes(16), 422, id="container_id-type-bin"),
        pytest.param("container_id", "not-a-uuid", 422, id="container_id-garbage"),
        pytest.param("backup_timestamp", 1767261600, 422, id="backup_timestamp-type-int"),
        pytest.param("backup_timestamp", b"2026-01-01T10:00:00Z", 422, id="backup_timestamp-type-bin"),
        pytest.param("backup_timestamp", "2026-02-30T10:00:00Z", 422, id="backup_timestamp-february-30"),
    ]
    return cases


@pytest.mark.parametrize(("field", "value", "status"), _msgpack_cases())
async def test_msgpack_envelope_field_is_refused(
    request: pytest.FixtureRequest,
    client: Client,
    tenant: Tenant,
    owner_connection: asyncpg.Connection,
    field: str,
    value: Any,
    status: int,
) -> None:
    before = await snapshot(owner_connection)
    body = msgspec.msgpack.encode({**tenant.envelope().fields(), field: value})
    headers = {**auth(tenant.project_key), "Content-Type": "application/msgpack"}
    response = await client.post("/api/v1/backups", content=body, headers=headers)
    refusal = assert_refused(response, status)
    if status == 422:
        assert refusal.get("field") == named_field(request, field), refusal
    assert await snapshot(owner_connection) == before


# --- tus Upload-Metadata ---------------------------------------------------------------------------------------------


def _metadata(values: dict[str, bytes | None]) -> str:
    return ",".join(key if value is None else f"{key} {_b64(value)}" for key, value in values.items())


def _tus_cases() -> list[Any]:
    cases: list[Any] = []
    for field, length in FIXED.items():
        cases += [
            pytest.param(field, bytes(length - 1), 422, id=f"{field}-raw-short"),
            pytest.param(field, bytes(length + 1), 422, id=f"{field}-raw-long"),
            pytest.param(field, _text(field, bytes(length - 1)).encode(), 422, id=f"{field}-text-short"),
            pytest.param(field, _text(field, bytes(length + 1)).encode(), 422, id=f"{field}-text-long"),
            pytest.param(field, None, 422, id=f"{field}-no-value"),
        ]
    cases += [
        pytest.param("metadata", bytes(METADATA_LIMIT + 1), 422, id="metadata-raw-long"),
        pytest.param("container_id", b"not-a-uuid", 422, id="container_id-garbage"),
        pytest.param("container_id", bytes(16), 422, id="container_id-raw-bytes"),
        pytest.param("container_id", None, 422, id="container_id-no-value"),
        pytest.param("backup_timestamp", b"yesterday", 422, id="backup_timestamp-garbage"),
        pytest.param("backup_timestamp", b"\xff\xfe", 422, id="backup_timestamp-not-utf8"),
        pytest.param("backup_timestamp", None, 422, id="backup_timestamp-no-value"),
    ]
    return cases


@pytest.mark.parametrize(("field", "value", "status"), _tus_cases())
async def test_tus_metadata_field_is_refused(
    request: pytest.FixtureRequest,
    client: Client,
    tenant: Tenant,
    owner_connection: asyncpg.Connection,
    field: str,
    value: bytes | None,
    status: int,
) -> None:
    before = await snapshot(owner_connection)
    envelope: Envelope = tenant.envelope()
    values: dict[str, bytes | None] = {**envelope.tus_metadata_values(), field: value}
    headers = tus_headers(
        tenant.project_key, **{"Upload-Length": str(len(envelope.payload)), "Upload-Metadata": _metadata(values)}
    )
    response = await client.post("/api/v1/uploads", headers=headers)
    refusal = assert_refused(response, status)
    if status == 422:
        assert refusal.get("field") == named_field(request, field), refusal
    assert await snapshot(owner_connection) == before
