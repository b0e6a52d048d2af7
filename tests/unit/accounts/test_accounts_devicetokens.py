"""Device tokens: HS256 pinned, key ids per secret, rotation, and every forged or stale variant refused."""

from __future__ import annotations

import hashlib
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key

from zkeb.lib.devicetokens import (
    AUDIENCE,
    ISSUER,
    MAX_TOKEN_LIFETIME,
    ExpiredDeviceTokenError,
    InvalidDeviceTokenError,
    issue_device_token,
    secret_key_id,
    signing_secret,
    verification_secrets,
    verify_device_token,
)

OLD = "old-secret-0123456789abcdef0123456789abcdef"
NEW = "new-secret-0123456789abcdef0123456789abcdef"
DEVICE_ID = uuid.uuid4()
ORG_ID = uuid.uuid4()
PROJECT_ID = uuid.uuid4()
DEVICE_ID_HASH = hashlib.sha256(b"device").digest()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(DEVICE_ID),
        "org": str(ORG_ID),
        "prj": str(PROJECT_ID),
        "dih": DEVICE_ID_HASH.hex(),
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=5)).timestamp()),
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _hs256(claims: dict[str, Any], secret: str = OLD, **headers: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": secret_key_id(secret), **headers})


def test_an_issued_token_verifies_and_carries_the_device_claims() -> None:
    token, lifetime = issue_device_token(
        OLD, device_id=DEVICE_ID, organization_id=ORG_ID, project_id=PROJECT_ID, device_id_hash=DEVICE_ID_HASH
    )
    assert lifetime == MAX_TOKEN_LIFETIME.total_seconds() == 900
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "HS256", "typ": "JWT", "kid": secret_key_id(OLD)}
    payload = jwt.decode(token, options={"verify_signature": False})
    assert set(payload) == {"iss", "aud", "sub", "org", "prj", "dih", "iat", "exp", "jti"}
    assert payload["exp"] - payload["iat"] == 900
    claims = verify_device_token(token, (OLD,))
    assert (claims.device_id, claims.organization_id, claims.project_id) == (DEVICE_ID, ORG_ID, PROJECT_ID)
    assert claims.device_id_hash == DEVICE_ID_HASH
    assert claims.token_id == payload["jti"]


def test_lifetimes_are_capped_at_fifteen_minutes() -> None:
    token, lifetime = issue_device_token(
        OLD,
        device_id=DEVICE_ID,
        organization_id=ORG_ID,
        project_id=PROJECT_ID,
        device_id_hash=DEVICE_ID_HASH,
        lifetime=timedelta(hours=5),
    )
    assert lifetime == 900
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["exp"] - payload["iat"] == 900


def test_during_rotation_the_new_secret_signs_and_both_verify() -> None:
    assert signing_secret(OLD, NEW) == NEW
    assert signing_secret(OLD, None) == OLD
    secrets = verification_secrets(OLD, NEW)
    assert secrets == (NEW, OLD)
    for secret in (OLD, NEW):
        token, _ = issue_device_token(
            secret, device_id=DEVICE_ID, organization_id=ORG_ID, project_id=PROJECT_ID, device_id_hash=DEVICE_ID_HASH
        )
        assert verify_device_token(token, secrets).device_id == DEVICE_ID


def test_a_token_signed_with_a_retired_secret_is_refused_as_an_unknown_key_id() -> None:
    token = _hs256(_claims(), OLD)
    with pytest.raises(InvalidDeviceTokenError, match="unknown key id"):
        verify_device_token(token, verification_secrets(NEW, None))


def test_alg_none_is_refused() -> None:
    token = jwt.encode(_claims(), "", algorithm="none", headers={"kid": secret_key_id(OLD)})
    with pytest.raises(InvalidDeviceTokenError, match="algorithm"):
        verify_device_token(token, (OLD,))


def test_hs512_signed_with_the_right_secret_is_refused() -> None:
    secret = OLD * 2  # long enough for HS512, so only the algorithm is wrong
    token = jwt.encode(_claims(), secret, algorithm="HS512", headers={"kid": secret_key_id(secret)})
    with pytest.raises(InvalidDeviceTokenError, match="algorithm"):
        verify_device_token(token, (secret,))


def test_rs256_is_refused() -> None:
    private_key = generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(_claims(), private_key, algorithm="RS256", headers={"kid": secret_key_id(OLD)})
    with pytest.raises(InvalidDeviceTokenError, match="algorithm"):
        verify_device_token(token, (OLD,))


def test_a_header_claiming_hs256_over_another_signature_is_refused() -> None:
    good = _hs256(_claims())
    head, body, _ = good.split(".")
    forged_sig = _hs256(_claims(), "attacker-secret-0123456789abcdef0123").split(".")[2]
    with pytest.raises(InvalidDeviceTokenError):
        verify_device_token(f"{head}.{body}.{forged_sig}", (OLD,))


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"aud": "someone-else"}, "InvalidAudienceError"),
        ({"iss": "not-zkeb"}, "InvalidIssuerError"),
        ({"exp": timedelta(seconds=-5)}, "ExpiredSignatureError"),
        ({"nbf": timedelta(minutes=2)}, "ImmatureSignatureError"),
        ({"iat": timedelta(minutes=2)}, "ImmatureSignatureError"),
        ({"aud": None}, "MissingRequiredClaimError"),
        ({"jti": None}, "MissingRequiredClaimError"),
        ({"exp": timedelta(hours=2)}, "lifetime too long"),
        ({"dih": "abcd"}, "bad device hash"),
        ({"dih": "zz"}, "bad claims"),
        ({"sub": "not-a-uuid"}, "bad claims"),
        ({"org": None}, "bad claims"),
    ],
)
def test_tokens_with_bad_claims_are_refused(overrides: dict[str, Any], error: str) -> None:
    # Times are offsets from now, resolved when the test runs (not when it is collected).
    now = datetime.now(UTC)
    overrides = {k: int((now + v).timestamp()) if isinstance(v, timedelta) else v for k, v in overrides.items()}
    with pytest.raises(InvalidDeviceTokenError, match=error):
        verify_device_token(_hs256(_claims(**overrides)), (OLD,))


@pytest.mark.parametrize("kid", [None, "k-0000000000000000", ""])
def test_unknown_or_missing_key_ids_are_refused(kid: str | None) -> None:
    headers = {} if kid is None else {"kid": kid}
    token = jwt.encode(_claims(), OLD, algorithm="HS256", headers=headers)
    with pytest.raises(InvalidDeviceTokenError, match="unknown key id"):
        verify_device_token(token, (OLD,))


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "eyJhbGciOiJIUzI1NiJ9..", "x" * 5000])
def test_garbage_is_refused_without_crashing(token: str) -> None:
    with pytest.raises(InvalidDeviceTokenError):
        verify_device_token(token, (OLD,))


def test_a_remembered_token_is_refused_as_expired_once_its_exp_passes() -> None:
    exp = int(datetime.now(UTC).timestamp()) + 1
    token = _hs256(_claims(exp=exp))
    assert verify_device_token(token, (OLD,)).device_id == DEVICE_ID  # verified, and now remembered
    time.sleep(max(0.0, exp - time.time()) + 0.05)
    with pytest.raises(ExpiredDeviceTokenError):
        verify_device_token(token, (OLD,))


def test_a_remembered_token_is_refused_once_its_secret_is_retired_and_a_forged_twin_never_passes() -> None:
    token = _hs256(_claims(), OLD)
    assert verify_device_token(token, verification_secrets(OLD, NEW)).device_id == DEVICE_ID
    with pytest.raises(InvalidDeviceTokenError, match="unknown key id"):
        verify_device_token(token, verification_secrets(NEW, None))
    head, payload, signature = token.split(".")
    forged_payload = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(payload).replace(str(DEVICE_ID).encode(), str(uuid.uuid4()).encode())
    ).decode()
    for forged in (f"{head}.{forged_payload}.{signature}", f"{head}.{payload}.{signature[:-2]}AA"):
        with pytest.raises(InvalidDeviceTokenError):
            verify_device_token(forged, verification_secrets(OLD, NEW))
