"""Device tokens: proof of possession (fresh, once, across processes) and the JWTs' validation at the edge."""

from __future__ import annotations

import base64
import datetime
import hashlib
import time
import uuid
from typing import Any

import asyncpg
import jwt
import pytest
from accounts_support import (
    EnrolledDevice,
    auth,
    create_org,
    create_project,
    enroll_device,
    proof,
    request_token,
    table_snapshot,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key
from litestar import Litestar
from litestar.testing import AsyncTestClient

from zkeb.app import create_app
from zkeb.lib.devicetokens import AUDIENCE, ISSUER, secret_key_id
from zkeb.settings import Settings

from support import make_settings, problem

Client = AsyncTestClient[Litestar]

JWT_SECRET = (
    "test-jwt-secret-0123456789abcdef0123456789abcdef"  # pragma: allowlist secret - base_settings_env's JWT_SECRET
)
NEW_JWT_SECRET = "rotated-jwt-secret-fedcba9876543210fedcba98765432"  # pragma: allowlist secret
MINUTE_MS = 60_000


async def _device(client: Client, settings: Settings) -> tuple[str, dict[str, Any], EnrolledDevice]:
    _, admin_key = await create_org(settings, "acme")
    project = await create_project(client, admin_key, "mobile")
    return admin_key, project, await enroll_device(client, admin_key, project["id"])


def _claims(device: EnrolledDevice, organization_id: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": device.id,
        "org": organization_id,
        "prj": device.project_id,
        "dih": device.hash_hex,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return claims


async def test_a_valid_proof_gets_a_short_lived_bearer_token(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    _, project, device = await _device(client, settings)
    body = proof(device)
    response = await client.post("/api/v1/auth/token", json=body)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    token = response.json()
    assert set(token) == {"access_token", "token_type", "expires_in"}
    assert token["token_type"] == "Bearer"
    assert 0 < token["expires_in"] <= 900
    header = jwt.get_unverified_header(token["access_token"])
    assert (header["alg"], header["kid"]) == ("HS256", secret_key_id(JWT_SECRET))
    claims = jwt.decode(token["access_token"], JWT_SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    assert claims["sub"] == device.id
    assert claims["exp"] - claims["iat"] <= 900
    assert {"kid", "alg"} <= set(header)
    assert {"iss", "aud", "sub", "iat", "exp", "jti"} <= set(claims)
    spent = await owner_connection.fetchval("SELECT proof_sha256 FROM device_proofs")
    assert bytes(spent) == hashlib.sha256(base64.b64decode(body["signature"])).digest()
    own = await client.get(f"/api/v1/projects/{project['id']}", headers=auth(token["access_token"]))
    assert own.status_code == 200


async def test_a_replayed_proof_is_refused(client: Client, settings: Settings) -> None:
    _, _, device = await _device(client, settings)
    body = proof(device)
    assert (await client.post("/api/v1/auth/token", json=body)).status_code == 200
    replay = await client.post("/api/v1/auth/token", json=body)
    assert replay.status_code == 401
    assert problem(replay)["detail"] == "invalid proof of possession"


async def test_a_proof_spent_on_one_process_is_refused_by_another(
    client: Client, settings: Settings, base_settings_env: dict[str, str], database_url: str
) -> None:
    _, _, device = await _device(client, settings)
    body = proof(device)
    other_process = create_app(make_settings(base_settings_env, DATABASE_URL=database_url))
    async with AsyncTestClient(app=other_process) as other:
        assert (await other.post("/api/v1/auth/token", json=body)).status_code == 200
    replay = await client.post("/api/v1/auth/token", json=body)
    assert replay.status_code == 401
    problem(replay)


@pytest.mark.parametrize("offset_ms", [-6 * MINUTE_MS, 6 * MINUTE_MS, -60 * MINUTE_MS, 10**12])
async def test_stale_or_future_proofs_are_refused(client: Client, settings: Settings, offset_ms: int) -> None:
    _, _, device = await _device(client, settings)
    response = await client.post(
        "/api/v1/auth/token", json=proof(device, timestamp_ms=int(time.time() * 1000) + offset_ms)
    )
    assert response.status_code == 401
    assert problem(response)["detail"] == "invalid proof of possession"


@pytest.mark.parametrize("offset_ms", [-4 * MINUTE_MS, 4 * MINUTE_MS])
async def test_proofs_within_five_minutes_of_the_server_clock_are_accepted(
    client: Client, settings: Settings, offset_ms: int
) -> None:
    _, _, device = await _device(client, settings)
    response = await client.post(
        "/api/v1/auth/token", json=proof(device, timestamp_ms=int(time.time() * 1000) + offset_ms)
    )
    assert response.status_code == 200


async def test_every_refusal_looks_the_same_and_issues_nothing(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    admin_key, project, device = await _device(client, settings)
    other_project = await create_project(client, admin_key, "other")
    revoked = await enroll_device(client, admin_key, project["id"])
    assert (await client.delete(f"/api/v1/devices/{revoked.id}", headers=auth(admin_key))).status_code == 204
    stranger = EnrolledDevice(
        id=str(uuid.uuid4()),
        project_id=project["id"],
        device_id_hash=hashlib.sha256(b"stranger").digest(),
        private_key=Ed25519PrivateKey.generate(),
    )
    good = proof(device)
    cases = {
        "bad signature": proof(device, private_key=Ed25519PrivateKey.generate()),
        "signed for another project": {**proof(device, project_id=other_project["id"]), "project_id": project["id"]},
        "unknown project": proof(device, project_id=str(uuid.uuid4())),
        "unknown device": proof(stranger),
        "revoked device": proof(revoked),
        "tampered timestamp": {**good, "timestamp_ms": good["timestamp_ms"] + 1},
    }
    before = await table_snapshot(owner_connection)
    details = set()
    for name, body in cases.items():
        response = await client.post("/api/v1/auth/token", json=body)
        assert response.status_code == 401, name
        assert response.headers["www-authenticate"].startswith("Bearer"), name
        details.add(problem(response)["detail"])
    assert details == {"invalid proof of possession"}
    assert await table_snapshot(owner_connection) == before


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"device_id_hash": "xyz"}, "device_id_hash"),
        ({"project_id": "not-a-uuid"}, "project_id"),
        ({"timestamp_ms": -1}, "timestamp_ms"),
        ({"timestamp_ms": "soon"}, "timestamp_ms"),
        ({"signature": None}, "signature"),
        ({"extra": 1}, "extra"),
    ],
)
async def test_malformed_token_requests_are_422_naming_the_field(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection, overrides: dict[str, Any], field: str
) -> None:
    _, _, device = await _device(client, settings)
    before = await table_snapshot(owner_connection)
    response = await client.post("/api/v1/auth/token", json={**proof(device), **overrides})
    assert response.status_code == 422, response.text
    assert field in problem(response)["detail"]
    assert await table_snapshot(owner_connection) == before


async def test_expired_spent_proofs_are_purged_on_issuance(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    _, _, device = await _device(client, settings)
    await request_token(client, device)
    await owner_connection.execute("UPDATE device_proofs SET expires_at = now() - interval '1 hour'")
    body = proof(device, timestamp_ms=int(time.time() * 1000) - 1000)
    await client.post("/api/v1/auth/token", json=body)
    hashes = [bytes(r["proof_sha256"]) for r in await owner_connection.fetch("SELECT proof_sha256 FROM device_proofs")]
    assert hashes == [hashlib.sha256(base64.b64decode(body["signature"])).digest()]


async def _organization_of(owner_connection: asyncpg.Connection, project_id: str) -> str:
    return str(
        await owner_connection.fetchval("SELECT organization_id FROM projects WHERE id = $1", uuid.UUID(project_id))
    )


async def test_forged_and_ill_formed_tokens_are_refused_at_the_edge(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    _, project, device = await _device(client, settings)
    org = await _organization_of(owner_connection, project["id"])
    kid = {"kid": secret_key_id(JWT_SECRET)}
    now = int(time.time())
    rsa_key = generate_private_key(public_exponent=65537, key_size=2048)
    long_secret = JWT_SECRET * 2
    tokens = {
        "alg none": jwt.encode(_claims(device, org), "", algorithm="none", headers=kid),
        "HS512": jwt.encode(
            _claims(device, org), long_secret, algorithm="HS512", headers={"kid": secret_key_id(long_secret)}
        ),
        "HS512 same kid": jwt.encode(_claims(device, org), long_secret, algorithm="HS512", headers=kid),
        "RS256": jwt.encode(_claims(device, org), rsa_key, algorithm="RS256", headers=kid),
        "wrong aud": jwt.encode(_claims(device, org, aud="other"), JWT_SECRET, algorithm="HS256", headers=kid),
        "wrong iss": jwt.encode(_claims(device, org, iss="other"), JWT_SECRET, algorithm="HS256", headers=kid),
        "expired": jwt.encode(
            _claims(device, org, iat=now - 600, exp=now - 1), JWT_SECRET, algorithm="HS256", headers=kid
        ),
        "future nbf": jwt.encode(_claims(device, org, nbf=now + 300), JWT_SECRET, algorithm="HS256", headers=kid),
        "unknown kid": jwt.encode(_claims(device, org), JWT_SECRET, algorithm="HS256", headers={"kid": "k-unknown"}),
        "no kid": jwt.encode(_claims(device, org), JWT_SECRET, algorithm="HS256"),
        "forged secret": jwt.encode(
            _claims(device, org), "guessed-secret-0123456789abcdef0123", algorithm="HS256", headers=kid
        ),
        "too long lived": jwt.encode(_claims(device, org, exp=now + 3600), JWT_SECRET, algorithm="HS256", headers=kid),
        "expired and forged": jwt.encode(
            _claims(device, org, iat=now - 600, exp=now - 1),
            "guessed-secret-0123456789abcdef0123",
            algorithm="HS256",
            headers=kid,
        ),
        "other org claim": jwt.encode(_claims(device, str(uuid.uuid4())), JWT_SECRET, algorithm="HS256", headers=kid),
    }
    url = f"/api/v1/projects/{project['id']}"
    control = jwt.encode(_claims(device, org), JWT_SECRET, algorithm="HS256", headers=kid)
    assert (await client.get(url, headers=auth(control))).status_code == 200
    for name, token in tokens.items():
        response = await client.get(url, headers=auth(token))
        assert response.status_code == 401, name
        detail = problem(response)["detail"]
        assert response.headers["www-authenticate"].startswith('Bearer realm="zkeb", error="invalid_token"'), name
        # Only a genuine token past its expiry is told so (RFC 6750's error_description), so the device knows to
        # fetch a new one; a forged one learns nothing.
        assert ("expired" in detail) == (name == "expired"), (name, detail)
        assert ("error_description" in response.headers["www-authenticate"]) == (name == "expired"), name


async def test_tokens_verify_through_a_jwt_secret_rotation_and_a_retired_secret_is_refused(
    base_settings_env: dict[str, str], database_url: str
) -> None:
    before = make_settings(base_settings_env, DATABASE_URL=database_url)
    during = make_settings(base_settings_env, DATABASE_URL=database_url, JWT_SECRET_NEW=NEW_JWT_SECRET)
    after = make_settings(base_settings_env, DATABASE_URL=database_url, JWT_SECRET=NEW_JWT_SECRET)
    async with AsyncTestClient(app=create_app(before)) as client:
        _, project, device = await _device(client, before)
        old_token = await request_token(client, device)
    url = f"/api/v1/projects/{project['id']}"
    async with AsyncTestClient(app=create_app(during)) as client:
        assert (await client.get(url, headers=auth(old_token))).status_code == 200
        new_token = await request_token(client, device)
        assert jwt.get_unverified_header(new_token)["kid"] == secret_key_id(NEW_JWT_SECRET)
        assert (await client.get(url, headers=auth(new_token))).status_code == 200
    async with AsyncTestClient(app=create_app(after)) as client:
        assert (await client.get(url, headers=auth(new_token))).status_code == 200
        retired = await client.get(url, headers=auth(old_token))
        assert retired.status_code == 401
        problem(retired)


async def test_a_device_token_is_bound_to_its_device(
    client: Client, settings: Settings, owner_connection: asyncpg.Connection
) -> None:
    admin_key, project, device = await _device(client, settings)
    other = await enroll_device(client, admin_key, project["id"])
    token = await request_token(client, device)
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    assert (claims["sub"], claims["dih"]) == (device.id, device.hash_hex)
    # Swapping the subject needs the server's secret: with it re-signed by anyone else the token is refused.
    org = await _organization_of(owner_connection, project["id"])
    swapped = jwt.encode(
        _claims(other, org),
        "not-the-secret-0123456789abcdef01234",
        algorithm="HS256",
        headers={"kid": secret_key_id(JWT_SECRET)},
    )
    assert (await client.get(f"/api/v1/projects/{project['id']}", headers=auth(swapped))).status_code == 401
    assert datetime.datetime.fromtimestamp(claims["exp"], datetime.UTC) > datetime.datetime.now(datetime.UTC)
