"""API key format and hashing: `zkeb_` + 256 random bits, stored only as an HMAC-SHA256 under `API_KEY_SALT`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

__all__ = (
    "API_KEY_PREFIX",
    "PUBLIC_PREFIX_LENGTH",
    "generate_api_key",
    "hash_api_key",
    "hashing_salt",
    "matching_salt",
    "public_prefix",
    "salts_in_use",
)

API_KEY_PREFIX = "zkeb_"
PUBLIC_PREFIX_LENGTH = 12
_KEY_BYTES = 32
_KEY_PATTERN = re.compile(r"zkeb_[A-Za-z0-9_-]{43}")


def generate_api_key() -> str:
    """A new API key: `zkeb_` followed by 32 random bytes in unpadded URL-safe base64."""
    return API_KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(_KEY_BYTES)).rstrip(b"=").decode()


def public_prefix(key: str) -> str | None:
    """The short, non-secret lookup prefix of a well-formed key, or None for anything else."""
    if not _KEY_PATTERN.fullmatch(key):
        return None
    return key[len(API_KEY_PREFIX) : len(API_KEY_PREFIX) + PUBLIC_PREFIX_LENGTH]


def hash_api_key(salt: str, key: str) -> bytes:
    """HMAC-SHA256(salt, key): what the database stores instead of the key."""
    return hmac.new(salt.encode(), key.encode(), hashlib.sha256).digest()


def salts_in_use(salt: str, salt_new: str | None) -> tuple[str, ...]:
    """The salts a stored hash may be under, preferred first: `API_KEY_SALT_NEW` (when set), then `API_KEY_SALT`."""
    return tuple(s for s in (salt_new, salt) if s)


def hashing_salt(salt: str, salt_new: str | None) -> str:
    """The salt new keys are hashed under: `API_KEY_SALT_NEW` while set (the one being rotated to), else `API_KEY_SALT`.

    Hashing new keys under the new salt means they keep working once it is promoted to `API_KEY_SALT`.
    """
    return salt_new or salt


def matching_salt(key: str, stored_hash: bytes, salts: tuple[str, ...]) -> int | None:
    """The index in `salts` of the salt `stored_hash` was computed under for `key`, or None.

    Every salt is tried with a constant-time comparison, so the time taken does not depend on which matched.
    """
    found: int | None = None
    for index, salt in enumerate(salts):
        if hmac.compare_digest(bytes(stored_hash), hash_api_key(salt, key)) and found is None:
            found = index
    return found
