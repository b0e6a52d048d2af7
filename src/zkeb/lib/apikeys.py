"""API key format and hashing: `zkeb_` + 256 random bits, stored only as an HMAC-SHA256 under `API_KEY_SALT`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

__all__ = ("API_KEY_PREFIX", "PUBLIC_PREFIX_LENGTH", "generate_api_key", "hash_api_key", "public_prefix")

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
