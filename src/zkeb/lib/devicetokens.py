"""Device tokens: short-lived HS256 JWTs for one device, with a key id so rotated secrets still verify.

A device sends one token on every request until it expires, so a process remembers the tokens it verified (keyed
by the whole token and the secrets, successes only) and on a repeat checks only the expiry: parsing and verifying
the token again costs about 300 µs of CPU, more than the rest of an envelope read in Python. Whether the device is
still enrolled is not a property of the token and is checked on every request by the caller.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from uuid import UUID

import jwt

__all__ = (
    "AUDIENCE",
    "ISSUER",
    "MAX_TOKEN_LIFETIME",
    "DeviceClaims",
    "ExpiredDeviceTokenError",
    "InvalidDeviceTokenError",
    "issue_device_token",
    "secret_key_id",
    "signing_secret",
    "verification_secrets",
    "verify_device_token",
)

ISSUER = "zkeb"
AUDIENCE = "zkeb-api"
ALGORITHM = "HS256"
MAX_TOKEN_LIFETIME = timedelta(minutes=15)
#: Verified tokens remembered per process (least recently used first out); about 1 KiB each.
VERIFIED_TOKEN_MEMORY = 4096


class InvalidDeviceTokenError(ValueError):
    """The token is malformed, forged, expired, or signed with a secret this server no longer holds."""


class ExpiredDeviceTokenError(InvalidDeviceTokenError):
    """The token is genuine (its signature verifies) but past its `exp`: the device should get a new one."""


@dataclass(frozen=True, slots=True)
class DeviceClaims:
    """What a verified device token says."""

    device_id: UUID
    organization_id: UUID
    project_id: UUID
    device_id_hash: bytes
    token_id: str
    expires_at: datetime


def secret_key_id(secret: str) -> str:
    """A stable, non-reversible id for a JWT secret (the token's `kid`)."""
    return "k-" + hashlib.sha256(b"zkeb-jwt-kid\x00" + secret.encode()).hexdigest()[:16]


def signing_secret(secret: str, secret_new: str | None) -> str:
    """The secret that signs new tokens: `JWT_SECRET_NEW` while set (the one being rotated to), else `JWT_SECRET`."""
    return secret_new or secret


def verification_secrets(secret: str, secret_new: str | None) -> tuple[str, ...]:
    """Every secret a token may be signed with: `JWT_SECRET_NEW` (when set) and `JWT_SECRET`."""
    return tuple(s for s in (secret_new, secret) if s)


def issue_device_token(
    secret: str,
    *,
    device_id: UUID,
    organization_id: UUID,
    project_id: UUID,
    device_id_hash: bytes,
    lifetime: timedelta = MAX_TOKEN_LIFETIME,
    now: datetime | None = None,
) -> tuple[str, int]:
    """Sign a token for one device; returns the token and its lifetime in seconds."""
    lifetime = min(lifetime, MAX_TOKEN_LIFETIME)
    issued = now or datetime.now(UTC)
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": str(device_id),
        "org": str(organization_id),
        "prj": str(project_id),
        "dih": device_id_hash.hex(),
        "iat": int(issued.timestamp()),
        "exp": int((issued + lifetime).timestamp()),
        "jti": uuid.uuid4().hex,
    }
    token = jwt.encode(claims, secret, algorithm=ALGORITHM, headers={"kid": secret_key_id(secret)})
    return token, int(lifetime.total_seconds())


def verify_device_token(token: str, secrets: tuple[str, ...]) -> DeviceClaims:
    """Verify signature (HS256 only), `kid`, `iss`, `aud`, `exp`, `nbf` and the claim shapes.

    A token this process verified before with the same secrets is only checked for expiry (see the module).

    Raises:
        ExpiredDeviceTokenError: the token is genuine but expired.
        InvalidDeviceTokenError: for any other failure; the message is safe to log (no token material).
    """
    claims = _verified_claims(token, secrets)
    # PyJWT's own rule (`exp <= now` is expired), applied again on every use of a remembered token.
    if claims.expires_at.timestamp() <= time.time():
        raise ExpiredDeviceTokenError("ExpiredSignatureError")
    return claims


@lru_cache(maxsize=VERIFIED_TOKEN_MEMORY)
def _verified_claims(token: str, secrets: tuple[str, ...]) -> DeviceClaims:
    """The claims of a token whose signature and claims verify (remembered; failures raise and are not)."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidDeviceTokenError("malformed token") from None
    if header.get("alg") != ALGORITHM:
        raise InvalidDeviceTokenError("algorithm not allowed")
    by_kid = {secret_key_id(secret): secret for secret in secrets if secret}
    secret = by_kid.get(str(header.get("kid")))
    if secret is None:
        raise InvalidDeviceTokenError("unknown key id")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "iat", "sub", "jti", "iss", "aud"]},
        )
    except jwt.ExpiredSignatureError:  # PyJWT checks `exp` only once the signature verified
        raise ExpiredDeviceTokenError("ExpiredSignatureError") from None
    except jwt.PyJWTError as exc:
        raise InvalidDeviceTokenError(type(exc).__name__) from None
    try:
        issued = datetime.fromtimestamp(claims["iat"], UTC)
        expires = datetime.fromtimestamp(claims["exp"], UTC)
        device_id_hash = bytes.fromhex(claims["dih"])
        result = DeviceClaims(
            device_id=UUID(claims["sub"]),
            organization_id=UUID(claims["org"]),
            project_id=UUID(claims["prj"]),
            device_id_hash=device_id_hash,
            token_id=str(claims["jti"]),
            expires_at=expires,
        )
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        raise InvalidDeviceTokenError("bad claims") from None
    if expires - issued > MAX_TOKEN_LIFETIME:
        raise InvalidDeviceTokenError("lifetime too long")
    if len(device_id_hash) != 32:
        raise InvalidDeviceTokenError("bad device hash")
    return result
