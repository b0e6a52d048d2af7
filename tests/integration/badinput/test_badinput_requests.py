"""docs/bad-inputs.md, request sections: bodies, tus headers, Range, device tokens, hostile text and cursors.

Every refusal is 4xx problem+json and changes no table; hostile text that is valid text is stored and read back
byte for byte; Range edge cases are served whole (200), in part (206) or refused (416) exactly as RFC 9110 says.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import asyncpg
import jwt
import msgspec
import pytest
from badinput_support import Client, Tenant, assert_refused, auth, make_tenant, snapshot, tus_headers
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from zkeb.lib.devicetokens import AUDIENCE, ISSUER, secret_key_id
from zkeb.settings import Settings

from support import problem

MIB = 1024 * 1024
OCTETS = "application/offset+octet-stream"


@pytest.fixture
async def tenant(client: Client, settings: Settings) -> Tenant:
    return await make_tenant(client, settings)


# --- bodies ----------------------------------------------------------------------------------------------------------


def _body_cases() -> list[Any]:
    envelope_json = b'{"container_id": "' + str(uuid.uuid4()).encode() + b'", "payload": "AAAA"'
    return [
        pytest.param("/api/v1/backups", envelope_json, "application/json", 400, id="backup-json-truncated"),
        pytest.param(
            "/api/v1/backups", b"\x8a\xacontainer_id", "application/msgpack", 400, id="backup-msgpack-truncated"
        ),
        pytest.param("/api/v1/backups", b"", "application/json", 400, id="backup-empty"),
        pytest.param("/api/v1/backups", b"[]", "application/json", 422, id="backup-json-array"),
        pytest.param("/api/v1/backups", b'"envelope"', "application/json", 422, id="backup-json-string"),
        pytest.param("/api/v1/backups", msgspec.msgpack.encode(7), "application/msgpack", 422, id="backup-msgpack-int"),
        pytest.param("/api/v1/backups", b"\xff\xfe{\x00", "application/json", 400, id="backup-json-not-utf8"),
        pytest.param("/api/v1/backups", b"[" * 100_000, "application/json", 422, id="backup-json-deeply-nested"),
        pytest.param("/api/v1/backups", b"a=b", "application/x-www-form-urlencoded", 415, id="backup-form"),
        pytest.param("/api/v1/backups", b"{}", "text/plain", 415, id="backup-text-plain"),
        pytest.param("/api/v1/backups", b" " * (16 * MIB + 1), "application/json", 413, id="backup-oversize"),
        pytest.param("/api/v1/projects", b'{"name": "a', "application/json", 400, id="project-json-truncated"),
        pytest.param("/api/v1/projects", b'{"name": 5}', "application/json", 422, id="project-name-number"),
        pytest.param("/api/v1/projects", b'{"name": ""}', "application/json", 422, id="project-name-empty"),
        pytest.param(
            "/api/v1/projects", b'{"name": "' + b"n" * 201 + b'"}', "application/json", 422, id="project-name-201"
        ),
        pytest.param(
            "/api/v1/projects", b'{"name": "a", "owner": 1}', "application/json", 422, id="project-unknown-field"
        ),
        pytest.param(
            "/api/v1/projects",
            b'{"name": "a", "storage_quota_bytes": -1}',
            "application/json",
            422,
            id="project-quota-negative",
        ),
        pytest.param(
            "/api/v1/projects",
            b'{"name": "a", "storage_quota_bytes": 1e30}',
            "application/json",
            422,
            id="project-quota-float",
        ),
        pytest.param(
            "/api/v1/projects",
            b'{"name": "a", "storage_quota_bytes": 99999999999999999999999}',
            "application/json",
            422,
            id="project-quota-huge",
        ),
        pytest.param("/api/v1/projects", b"", "application/json", 400, id="project-empty"),
        pytest.param("/api/v1/projects", b"[]", "application/json", 422, id="project-json-array"),
        # Litestar's own conversion is lenient: each of these used to be taken as the value it resembles.
        *(
            pytest.param("/api/v1/projects", b'{"name": "a", ' + field + b"}", "application/json", 422, id=case)
            for field, case in (
                (b'"append_only": "true"', "project-append-only-string"),
                (b'"append_only": 1', "project-append-only-number"),
                (b'"storage_quota_bytes": "1000"', "project-quota-string"),
                (b'"storage_quota_bytes": 1000.0', "project-quota-integral-float"),
                (b'"retention_days": "7"', "project-retention-days-string"),
            )
        ),
    ]


@pytest.mark.parametrize(("url", "content", "content_type", "status"), _body_cases())
async def test_malformed_body_is_refused(
    client: Client,
    tenant: Tenant,
    owner_connection: asyncpg.Connection,
    url: str,
    content: bytes,
    content_type: str,
    status: int,
) -> None:
    before = await snapshot(owner_connection)
    key = tenant.project_key if url == "/api/v1/backups" else tenant.admin_key
    response = await client.post(url, content=content, headers={**auth(key), "Content-Type": content_type})
    assert_refused(response, status)
    assert await snapshot(owner_connection) == before


def _update_cases() -> list[Any]:
    return [
        pytest.param(b"", 400, id="update-empty"),
        pytest.param(b"not json", 400, id="update-not-json"),
        pytest.param(b'{"append_only": "false"}', 422, id="update-append-only-string"),
        pytest.param(b'{"append_only": 0}', 422, id="update-append-only-number"),
        pytest.param(b'{"storage_quota_bytes": "1e3"}', 422, id="update-quota-string"),
        pytest.param(b'{"append_only_min_age_days": "3"}', 422, id="update-min-age-string"),
    ]


@pytest.mark.parametrize(("content", "status"), _update_cases())
async def test_malformed_project_update_is_refused(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, content: bytes, status: int
) -> None:
    # On an append-only project: a string that looked like `false` used to switch the protection off.
    turned_on = await client.patch(
        f"/api/v1/projects/{tenant.project_id}", json={"append_only": True}, headers=auth(tenant.admin_key)
    )
    assert turned_on.status_code == 200, turned_on.text
    before = await snapshot(owner_connection)
    response = await client.patch(
        f"/api/v1/projects/{tenant.project_id}",
        content=content,
        headers={**auth(tenant.admin_key), "Content-Type": "application/json"},
    )
    assert_refused(response, status)
    assert await snapshot(owner_connection) == before


def _public_key() -> str:
    """Standard base64 of a fresh, valid Ed25519 public key."""
    raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _device_cases() -> list[Any]:
    public = _public_key()
    return [
        pytest.param({"public_key": base64.b64encode(bytes(31)).decode()}, 422, id="public-key-short"),
        pytest.param({"public_key": base64.b64encode(bytes(33)).decode()}, 422, id="public-key-long"),
        pytest.param({"public_key": "@" * 44}, 422, id="public-key-not-base64"),
        pytest.param({"public_key": 5}, 422, id="public-key-number"),
        pytest.param({"device_id_hash": "ab" * 31, "public_key": public}, 422, id="device-id-hash-short"),
        pytest.param({"device_id_hash": "zz" * 32, "public_key": public}, 422, id="device-id-hash-not-hex"),
        pytest.param({"device_id_hash": base64.b64encode(bytes(32)).decode()}, 422, id="device-id-hash-base64"),
        pytest.param({"label": "l" * 201}, 422, id="label-201"),
    ]


@pytest.mark.parametrize(("changes", "status"), _device_cases())
async def test_malformed_device_enrolment_is_refused(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, changes: dict[str, Any], status: int
) -> None:
    before = await snapshot(owner_connection)
    body = {"device_id_hash": hashlib.sha256(uuid.uuid4().bytes).hexdigest(), "public_key": "", "label": "x", **changes}
    if "public_key" not in changes:
        body["public_key"] = _public_key()
    response = await client.post(
        f"/api/v1/projects/{tenant.project_id}/devices", json=body, headers=auth(tenant.admin_key)
    )
    assert_refused(response, status)
    assert await snapshot(owner_connection) == before


def _proof_cases() -> list[Any]:
    return [
        pytest.param({"timestamp_ms": -1}, 422, id="timestamp-negative"),
        pytest.param({"timestamp_ms": 2**64}, 422, id="timestamp-beyond-u64"),
        pytest.param({"timestamp_ms": "now"}, 422, id="timestamp-string"),
        pytest.param({"timestamp_ms": str(int(time.time() * 1000))}, 422, id="timestamp-numeric-string"),
        pytest.param({"timestamp_ms": 0}, 401, id="timestamp-stale"),
        pytest.param({"signature": "@" * 88}, 422, id="signature-not-base64"),
        pytest.param({"signature": base64.b64encode(bytes(63)).decode()}, 422, id="signature-short"),
        pytest.param({"signature": base64.urlsafe_b64encode(b"\xff" * 64).decode()}, 422, id="signature-base64url"),
        pytest.param({"signature": base64.b64encode(bytes(64)).decode().rstrip("=")}, 422, id="signature-unpadded"),
        pytest.param({"project_id": "not-a-uuid"}, 422, id="project-id-garbage"),
        pytest.param({"device_id_hash": "zz" * 32}, 422, id="device-id-hash-not-hex"),
    ]


@pytest.mark.parametrize(("changes", "status"), _proof_cases())
async def test_malformed_token_request_is_refused(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, changes: dict[str, Any], status: int
) -> None:
    before = await snapshot(owner_connection)
    response = await client.post("/api/v1/auth/token", json={**tenant.proof(), **changes})
    body = assert_refused(response, status)
    if status == 422:
        assert [error["key"] for error in body["errors"]] == list(changes)
    assert await snapshot(owner_connection) == before


# --- tus headers -----------------------------------------------------------------------------------------------------


def _creation_cases() -> list[Any]:
    return [
        pytest.param([], 400, id="upload-length-missing"),
        pytest.param([("Upload-Length", "-1")], 400, id="upload-length-negative"),
        pytest.param([("Upload-Length", "ten")], 400, id="upload-length-non-numeric"),
        pytest.param([("Upload-Length", "1.5")], 400, id="upload-length-fraction"),
        pytest.param([("Upload-Length", " 10")], 400, id="upload-length-leading-space"),
        pytest.param([("Upload-Length", "9" * 40)], 413, id="upload-length-huge"),
        pytest.param([("Upload-Length", str(2**63))], 413, id="upload-length-beyond-i64"),
        pytest.param([("Upload-Length", str(2**40))], 413, id="upload-length-over-max"),
        pytest.param([("Upload-Length", "0")], 422, id="upload-length-zero"),
        pytest.param([("Upload-Length", "10"), ("Upload-Length", "11")], 400, id="upload-length-duplicate"),
        pytest.param([("Upload-Length", "10"), ("Upload-Defer-Length", "1")], 400, id="upload-defer-length"),
        pytest.param([("Upload-Length", "10"), ("Upload-Metadata", "")], 422, id="upload-metadata-empty"),
        pytest.param(
            [("Upload-Length", "10"), ("Upload-Metadata", "a YQ==,a YQ==")], 400, id="upload-metadata-duplicate-key"
        ),
        pytest.param(
            [("Upload-Length", "10"), ("Upload-Metadata", "signature !!!")], 400, id="upload-metadata-not-base64"
        ),
        pytest.param(
            [("Upload-Length", "10"), ("Upload-Metadata", "a\tb YQ==")], 400, id="upload-metadata-control-key"
        ),
    ]


@pytest.mark.parametrize(("extra", "status"), _creation_cases())
async def test_tus_creation_header_is_refused(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, extra: list[tuple[str, str]], status: int
) -> None:
    before = await snapshot(owner_connection)
    envelope = tenant.envelope(b"0123456789")
    names = {name for name, _ in extra}
    headers = list(tus_headers(tenant.project_key).items()) + extra
    if "Upload-Metadata" not in names:
        headers.append(("Upload-Metadata", envelope.tus_metadata()))
    response = await client.post("/api/v1/uploads", headers=headers)
    assert_refused(response, status)
    assert await snapshot(owner_connection) == before


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        pytest.param({}, 412, id="tus-resumable-missing"),
        pytest.param({"Tus-Resumable": "0.2.2"}, 412, id="tus-resumable-old"),
        pytest.param({"Tus-Resumable": "1.0.0, 1.0.0"}, 412, id="tus-resumable-list"),
    ],
)
async def test_tus_version_header_is_refused(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, headers: dict[str, str], status: int
) -> None:
    before = await snapshot(owner_connection)
    envelope = tenant.envelope(b"0123456789")
    all_headers = {
        **auth(tenant.project_key),
        "Upload-Length": "10",
        "Upload-Metadata": envelope.tus_metadata(),
        **headers,
    }
    response = await client.post("/api/v1/uploads", headers=all_headers)
    assert_refused(response, status)
    assert await snapshot(owner_connection) == before


def _patch_cases() -> list[Any]:
    sha256_of_other = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    return [
        pytest.param([], b"01234", 400, id="upload-offset-missing"),
        pytest.param([("Upload-Offset", "-1")], b"01234", 400, id="upload-offset-negative"),
        pytest.param([("Upload-Offset", "zero")], b"01234", 400, id="upload-offset-non-numeric"),
        pytest.param([("Upload-Offset", "9" * 40)], b"01234", 400, id="upload-offset-huge"),
        pytest.param([("Upload-Offset", "0"), ("Upload-Offset", "0")], b"01234", 400, id="upload-offset-duplicate"),
        pytest.param([("Upload-Offset", "5")], b"01234", 409, id="upload-offset-ahead"),
        pytest.param([("Upload-Offset", "0")], b"0123456789AB", 413, id="body-past-upload-length"),
        pytest.param([("Upload-Offset", "0"), ("Upload-Checksum", "sha256")], b"01234", 400, id="checksum-no-digest"),
        pytest.param([("Upload-Offset", "0"), ("Upload-Checksum", "md5 AAAA")], b"01234", 400, id="checksum-md5"),
        pytest.param(
            [("Upload-Offset", "0"), ("Upload-Checksum", "sha256 !!!")], b"01234", 400, id="checksum-not-base64"
        ),
        pytest.param(
            [("Upload-Offset", "0"), ("Upload-Checksum", "sha1 AAAA")], b"01234", 400, id="checksum-short-digest"
        ),
        pytest.param(
            [("Upload-Offset", "0"), ("Upload-Checksum", f"sha256 {sha256_of_other}")],
            b"01234",
            460,
            id="checksum-mismatch",
        ),
    ]


@pytest.mark.parametrize(("extra", "content", "status"), _patch_cases())
async def test_tus_patch_header_is_refused(
    client: Client,
    tenant: Tenant,
    owner_connection: asyncpg.Connection,
    extra: list[tuple[str, str]],
    content: bytes,
    status: int,
) -> None:
    envelope = tenant.envelope(b"0123456789")
    created = await client.post(
        "/api/v1/uploads",
        headers=tus_headers(tenant.project_key, **{"Upload-Length": "10", "Upload-Metadata": envelope.tus_metadata()}),
    )
    assert created.status_code == 201, created.text
    location = created.headers["location"]
    before = await snapshot(owner_connection)
    headers = [*tus_headers(tenant.project_key, **{"Content-Type": OCTETS}).items(), *extra]
    response = await client.patch(location, content=content, headers=headers)
    assert_refused(response, status)
    # A PATCH that reached the body (checksum mismatch) renews the upload's expiry; no row and no stored byte changes.
    after = await snapshot(owner_connection)
    assert {table: rows for table, (rows, _) in after.items()} == {table: rows for table, (rows, _) in before.items()}
    assert after["backup_chunks"] == before["backup_chunks"]
    head = await client.head(location, headers=tus_headers(tenant.project_key))
    assert head.headers["upload-offset"] == "0"


async def test_tus_patch_with_wrong_content_type_is_415(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection
) -> None:
    envelope = tenant.envelope(b"0123456789")
    created = await client.post(
        "/api/v1/uploads",
        headers=tus_headers(tenant.project_key, **{"Upload-Length": "10", "Upload-Metadata": envelope.tus_metadata()}),
    )
    before = await snapshot(owner_connection)
    response = await client.patch(
        created.headers["location"],
        content=b"01234",
        headers=tus_headers(tenant.project_key, **{"Upload-Offset": "0", "Content-Type": "application/octet-stream"}),
    )
    assert_refused(response, 415)
    assert await snapshot(owner_connection) == before


# --- Range -----------------------------------------------------------------------------------------------------------

TOTAL = 256 * 40  # the tenant's committed payload


@pytest.mark.parametrize(
    ("range_header", "status", "selected"),
    [
        pytest.param(f"bytes={TOTAL}-", 416, None, id="start-at-length"),
        pytest.param("bytes=" + "9" * 30 + "-", 416, None, id="start-huge"),
        pytest.param("bytes=-0", 416, None, id="zero-suffix"),
        pytest.param("bytes=5-3", 200, slice(None), id="reversed"),
        pytest.param("bytes=0-1,5-6", 200, slice(None), id="several-ranges"),
        pytest.param("items=0-5", 200, slice(None), id="other-unit"),
        pytest.param("bytes=abc", 200, slice(None), id="garbage"),
        pytest.param("bytes=--5", 200, slice(None), id="double-dash"),
        pytest.param("bytes=", 200, slice(None), id="empty-set"),
        pytest.param("bytes=-999999", 206, slice(None), id="suffix-longer-than-payload"),
        pytest.param(f"bytes={TOTAL - 1}-{TOTAL - 1}", 206, slice(TOTAL - 1, None), id="last-byte"),
        pytest.param("bytes=0-" + "9" * 30, 206, slice(None), id="end-huge"),
        pytest.param("bytes=0-0", 206, slice(0, 1), id="first-byte"),
    ],
)
async def test_range_edge_case(
    client: Client,
    tenant: Tenant,
    owner_connection: asyncpg.Connection,
    range_header: str,
    status: int,
    selected: slice | None,
) -> None:
    before = await snapshot(owner_connection)
    response = await client.get(
        f"/api/v1/backups/{tenant.backup_id}/payload", headers={**auth(tenant.project_key), "Range": range_header}
    )
    assert response.status_code == status, response.text
    if selected is None:
        assert_refused(response, 416)
        assert response.headers["content-range"] == f"bytes */{TOTAL}"
    else:
        assert response.content == tenant.payload[selected]
    assert await snapshot(owner_connection) == before


# --- device tokens ---------------------------------------------------------------------------------------------------


def _claims(tenant: Tenant) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": tenant.device_id,
        "org": str(tenant.organization_id),
        "prj": str(tenant.project_id),
        "dih": tenant.device_id_hash.hex(),
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=5)).timestamp()),
        "jti": uuid.uuid4().hex,
    }


def _forge(case: str, tenant: Tenant, secret: str) -> str:
    """A device token for the tenant's device, broken in the way `case` names ("valid" leaves it whole)."""
    claims = _claims(tenant)
    kid = {"kid": secret_key_id(secret)}
    now = int(datetime.now(UTC).timestamp())
    changes: dict[str, dict[str, Any]] = {
        "expired": {"iat": now - 3600, "exp": now - 1800},
        "not-before-future": {"nbf": now + 3600},
        "issued-in-future": {"iat": now + 3600, "exp": now + 3900},
        "wrong-audience": {"aud": "another-api"},
        "wrong-issuer": {"iss": "someone-else"},
        "lifetime-too-long": {"exp": now + 3600},
        "other-project": {"prj": str(uuid.uuid4())},
        "other-device-hash": {"dih": hashlib.sha256(b"other").hexdigest()},
        "missing-exp": {"exp": None},
        "missing-jti": {"jti": None},
    }
    claims = {name: value for name, value in {**claims, **changes.get(case, {})}.items() if value is not None}
    if case == "alg-none":
        return jwt.encode(claims, "", algorithm="none", headers=kid)
    if case == "hs512":
        return jwt.encode(claims, secret * 2, algorithm="HS512", headers=kid)
    if case == "wrong-secret":
        return jwt.encode(claims, secret + "x", algorithm="HS256", headers=kid)
    if case == "unknown-kid":
        return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": "k-0000000000000000"})
    if case == "no-kid":
        return jwt.encode(claims, secret, algorithm="HS256")
    rsa = generate_private_key(public_exponent=65537, key_size=2048)
    if case == "rs256":
        return jwt.encode(claims, rsa, algorithm="RS256", headers=kid)
    if case == "hs256-keyed-with-rsa-public-pem":
        # The classic RS/HS confusion: a public key used as the HMAC secret. PyJWT itself refuses PEM keys for HMAC,
        # so the token is assembled by hand.
        pem = rsa.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        header = _b64url(msgspec.json.encode({"alg": "HS256", "typ": "JWT", **kid}))
        signing_input = f"{header}.{_b64url(msgspec.json.encode(claims))}"
        return f"{signing_input}.{_b64url(hmac.digest(pem, signing_input.encode(), 'sha256'))}"
    if case == "garbage":
        return "not.a.token"
    if case == "zkeb-key-shape":
        return "zkeb_" + "A" * 43
    return jwt.encode(claims, secret, algorithm="HS256", headers=kid)


def _b64url(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


# Defect: a token whose `dih` claim disagrees with the device named by `sub` is honoured (it lists that hash's
# backups). Only a holder of JWT_SECRET can mint one, so this is defence in depth, not a forgery.
TOKEN_CASES = [
    "expired",
    "not-before-future",
    "issued-in-future",
    "wrong-audience",
    "wrong-issuer",
    "lifetime-too-long",
    "other-project",
    "other-device-hash",
    "missing-exp",
    "missing-jti",
    "alg-none",
    "hs512",
    "wrong-secret",
    "unknown-kid",
    "no-kid",
    "rs256",
    "hs256-keyed-with-rsa-public-pem",
    "garbage",
    "zkeb-key-shape",
]


async def test_forged_token_is_accepted_when_nothing_is_broken(
    client: Client, tenant: Tenant, settings: Settings
) -> None:
    """The control for the next test: the forging helper makes a token the server takes."""
    token = _forge("valid", tenant, settings.secrets.jwt_secret)
    response = await client.get("/api/v1/backups", headers=auth(token))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("case", TOKEN_CASES)
async def test_bad_device_token_is_refused(
    client: Client, tenant: Tenant, settings: Settings, owner_connection: asyncpg.Connection, case: str
) -> None:
    before = await snapshot(owner_connection)
    token = _forge(case, tenant, settings.secrets.jwt_secret)
    listed = await client.get("/api/v1/backups", headers=auth(token))
    assert_refused(listed, 401)
    assert token not in listed.text
    upload = await client.post("/api/v1/backups", json=tenant.envelope().json(), headers=auth(token))
    assert_refused(upload, 401)
    assert await snapshot(owner_connection) == before


# --- hostile text ----------------------------------------------------------------------------------------------------

PRINTABLE = {
    "sql": "'; DROP TABLE backups; --",
    "html": "<script>alert(1)</script>",
    "path": "../../../etc/passwd",
    "template": "${jndi:ldap://x/a}{{7*7}}",
    "emoji": "\U0001f4be backup",
    "max-length": "n" * 200,
}
CONTROL = {
    "nul": "a\x00b",
    "escape": "\x1b[31mred",
    "crlf": "a\r\nX-Injected: 1",
    "del": "a\x7fb",
    "rtl-override": "\u202eexe.txt",  # a Unicode format character: "Trojan source" spoofing in listings
}
TEXT_FIELDS = ("project-name", "api-key-name", "device-label")


async def _create_named(client: Client, tenant: Tenant, field: str, text: str) -> tuple[Any, str]:
    """POST the text into `field`; returns the response and the URL that lists what was made."""
    if field == "project-name":
        return await client.post(
            "/api/v1/projects", json={"name": text}, headers=auth(tenant.admin_key)
        ), "/api/v1/projects"
    if field == "api-key-name":
        url = f"/api/v1/projects/{tenant.project_id}/api-keys"
        return await client.post(url, json={"name": text}, headers=auth(tenant.admin_key)), url
    url = f"/api/v1/projects/{tenant.project_id}/devices"
    body = {
        "device_id_hash": hashlib.sha256(uuid.uuid4().bytes).hexdigest(),
        "public_key": _public_key(),
        "label": text,
    }
    return await client.post(url, json=body, headers=auth(tenant.admin_key)), url


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("kind", sorted(PRINTABLE))
async def test_hostile_printable_text_is_stored_verbatim(client: Client, tenant: Tenant, field: str, kind: str) -> None:
    text = PRINTABLE[kind]
    response, list_url = await _create_named(client, tenant, field, text)
    assert response.status_code == 201, response.text
    listed = await client.get(list_url, headers=auth(tenant.admin_key))
    assert listed.status_code == 200
    names = [item.get("name", item.get("label")) for item in listed.json()["items"]]
    assert text in names


@pytest.mark.parametrize("field", TEXT_FIELDS)
@pytest.mark.parametrize("kind", sorted(CONTROL))
async def test_control_characters_in_text_are_refused(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, field: str, kind: str
) -> None:
    before = await snapshot(owner_connection)
    response, _ = await _create_named(client, tenant, field, CONTROL[kind])
    assert_refused(response, 422)
    assert await snapshot(owner_connection) == before


QUERY_CASES = [
    pytest.param("/api/v1/backups", "container_id", "'; DROP TABLE backups; --", 400, id="backups-container_id-sql"),
    pytest.param("/api/v1/backups", "container_id", "\x00", 400, id="backups-container_id-nul"),
    pytest.param("/api/v1/backups", "device_id_hash", "' OR '1'='1", 400, id="backups-device_id_hash-sql"),
    pytest.param("/api/v1/backups", "device_id_hash", "zz" * 32, 400, id="backups-device_id_hash-not-hex"),
    pytest.param("/api/v1/backups", "device_id_hash", "a\x00" * 32, 400, id="backups-device_id_hash-nul"),
    pytest.param("/api/v1/backups", "limit", "0", 400, id="backups-limit-zero"),
    pytest.param("/api/v1/backups", "limit", "101", 400, id="backups-limit-101"),
    pytest.param("/api/v1/backups", "limit", "-1", 400, id="backups-limit-negative"),
    pytest.param("/api/v1/backups", "limit", "9" * 40, 400, id="backups-limit-huge"),
    pytest.param("/api/v1/backups", "limit", "1; DROP TABLE backups", 400, id="backups-limit-sql"),
    pytest.param("/api/v1/projects", "limit", "abc", 400, id="projects-limit-text"),
    pytest.param("/api/v1/audit-events", "action", "x' OR 1=1 --", 400, id="audit-action-sql"),
    pytest.param("/api/v1/audit-events", "since", "yesterday", 400, id="audit-since-garbage"),
    pytest.param("/api/v1/audit-events", "until", "\x1b[2J", 400, id="audit-until-escape"),
]


@pytest.mark.parametrize(("url", "name", "value", "status"), QUERY_CASES)
async def test_hostile_query_parameter_is_refused(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, url: str, name: str, value: str, status: int
) -> None:
    before = await snapshot(owner_connection)
    key = tenant.project_key if url == "/api/v1/backups" else tenant.admin_key
    response = await client.get(f"{url}?{name}={quote(value)}", headers=auth(key))
    assert_refused(response, status)
    assert await snapshot(owner_connection) == before


@pytest.mark.parametrize(
    "segment",
    [
        pytest.param("'%20OR%201=1", id="sql"),
        pytest.param("..%2F..%2Fetc%2Fpasswd", id="traversal"),
        pytest.param("%00", id="nul"),
        pytest.param("0" * 300, id="long"),
    ],
)
async def test_hostile_path_id_is_not_found(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, segment: str
) -> None:
    before = await snapshot(owner_connection)
    response = await client.get(f"/api/v1/backups/{segment}", headers=auth(tenant.project_key))
    assert_refused(response, 404)
    assert await snapshot(owner_connection) == before


# --- cursors ---------------------------------------------------------------------------------------------------------


async def _next_cursor(client: Client, tenant: Tenant, listing: str) -> str:
    """A genuine `next_cursor` of `listing` (backups, projects or audit-events), making a second item first."""
    if listing == "backups":
        made = await client.post("/api/v1/backups", json=tenant.envelope().json(), headers=auth(tenant.project_key))
        assert made.status_code == 201
        response = await client.get("/api/v1/backups?limit=1", headers=auth(tenant.project_key))
    elif listing == "projects":
        made = await client.post("/api/v1/projects", json={"name": "second"}, headers=auth(tenant.admin_key))
        assert made.status_code == 201
        response = await client.get("/api/v1/projects?limit=1", headers=auth(tenant.admin_key))
    else:
        response = await client.get("/api/v1/audit-events?limit=1", headers=auth(tenant.admin_key))
    assert response.status_code == 200, response.text
    cursor: str = response.json()["next_cursor"]
    assert cursor
    return cursor


def _tamper(cursor: str, how: str) -> str:
    if how == "truncated":
        return cursor[: len(cursor) // 2]
    if how == "flipped-character":
        # In the listing's name. A flip inside the position can spell another well-formed position, which then
        # pages from there like any position (a cursor carries no authority; see zkeb.core.cursors).
        return ("A" if cursor[0] != "A" else "B") + cursor[1:]
    if how == "appended":
        return cursor + "AAAA"
    if how == "not-base64":
        return "!!!" + cursor
    if how == "json-injection":
        return base64.urlsafe_b64encode(b'{"id": "\' OR 1=1 --", "t": -1}').decode()
    if how == "oversize":
        return "A" * 5000
    return cursor


CURSOR_TAMPERING = ("truncated", "flipped-character", "appended", "not-base64", "json-injection", "oversize")
LISTINGS = {"backups": "project", "projects": "admin", "audit-events": "admin"}


async def test_genuine_cursor_pages_every_listing(client: Client, tenant: Tenant) -> None:
    """The control for the next test: the untampered cursors fetch the next page."""
    for listing, principal in LISTINGS.items():
        cursor = await _next_cursor(client, tenant, listing)
        key = tenant.project_key if principal == "project" else tenant.admin_key
        response = await client.get(f"/api/v1/{listing}?limit=1&cursor={quote(cursor)}", headers=auth(key))
        assert response.status_code == 200, response.text
        assert len(response.json()["items"]) == 1


def _cursor_cases() -> list[Any]:
    return [
        pytest.param(how, listing, id=f"{how}-{listing}") for how in CURSOR_TAMPERING for listing in sorted(LISTINGS)
    ]


@pytest.mark.parametrize(("how", "listing"), _cursor_cases())
async def test_tampered_cursor_is_refused(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, listing: str, how: str
) -> None:
    cursor = _tamper(await _next_cursor(client, tenant, listing), how)
    key = tenant.project_key if LISTINGS[listing] == "project" else tenant.admin_key
    before = await snapshot(owner_connection)
    response = await client.get(f"/api/v1/{listing}?limit=1&cursor={quote(cursor)}", headers=auth(key))
    body = assert_refused(response, 400)
    assert cursor not in str(body.get("detail", ""))
    assert await snapshot(owner_connection) == before


async def test_cursor_of_another_listing_is_refused(client: Client, tenant: Tenant) -> None:
    cursor = await _next_cursor(client, tenant, "projects")
    response = await client.get(f"/api/v1/backups?cursor={quote(cursor)}", headers=auth(tenant.project_key))
    problem(response)
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("listing", "other_filter"),
    [
        pytest.param("backups", {"container_id": "01a21ca0-e7ad-722a-9585-e64cb0b11adb"}, id="backups-container"),
        pytest.param("audit-events", {"action": "auth.failed"}, id="audit-events-action"),
    ],
)
async def test_cursor_of_the_listing_read_with_other_filters_is_refused(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, listing: str, other_filter: dict[str, str]
) -> None:
    # It resumed its position in the other list, skipping the rows before it there without a word.
    cursor = await _next_cursor(client, tenant, listing)
    before = await snapshot(owner_connection)
    principal = tenant.project_key if listing == "backups" else tenant.admin_key
    response = await client.get(
        f"/api/v1/{listing}", params={**other_filter, "cursor": cursor}, headers=auth(principal)
    )
    assert_refused(response, 400)
    assert [e["key"] for e in problem(response)["errors"]] == ["cursor"]
    assert await snapshot(owner_connection) == before


# --- Host ------------------------------------------------------------------------------------------------------------

#: Host values whose port is no port: the URL Litestar builds from them cannot be parsed (port out of range or not a
#: number). granian passes them through, so the app must answer them like any other request.
_HOSTILE_HOSTS = [
    pytest.param("h:99999", id="port-too-large"),
    pytest.param("h:abc", id="port-not-a-number"),
    pytest.param("[::1]:99999", id="ipv6-port-too-large"),
    pytest.param("h:80:80", id="two-ports"),
    pytest.param("h:-1", id="negative-port"),
]


@pytest.mark.parametrize("host", _HOSTILE_HOSTS)
async def test_a_host_with_an_invalid_port_gets_the_usual_answer(
    client: Client, tenant: Tenant, owner_connection: asyncpg.Connection, host: str
) -> None:
    before = await snapshot(owner_connection)
    headers = {"Host": host}
    assert_refused(await client.get("/api/v1/no-such-route", headers=headers), 404)
    assert_refused(await client.get("/api/v1/backups", headers=headers), 401)
    refused = await client.post(
        "/api/v1/backups",
        content=b"{",
        headers={**headers, **auth(tenant.project_key), "Content-Type": "application/json"},
    )
    assert assert_refused(refused, 400)["instance"] == "/api/v1/backups"
    # A tus creation builds its Location from Host: one naming no valid port is refused before anything is stored.
    envelope = tenant.envelope(b"0123456789")
    creation = await client.post(
        "/api/v1/uploads",
        headers={
            **headers,
            **tus_headers(tenant.project_key),
            "Upload-Length": "10",
            "Upload-Metadata": envelope.tus_metadata(),
        },
    )
    assert "Host header" in assert_refused(creation, 400)["detail"]
    assert await snapshot(owner_connection) == before
    listed = await client.get("/api/v1/backups", headers={**headers, **auth(tenant.project_key)})
    assert listed.status_code == 200, listed.text
