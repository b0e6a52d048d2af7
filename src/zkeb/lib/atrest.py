"""At-rest encryption of stored payload chunks with AES-256-GCM.

Each backup gets its own random data key; the data key is stored wrapped (encrypted) by a master key, identified by
a key id, so rotating the master key re-wraps data keys without rewriting chunks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import struct
from dataclasses import dataclass, field
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_LENGTH = 32
NONCE_LENGTH = 12
TAG_LENGTH = 16
CHUNK_OVERHEAD = NONCE_LENGTH + TAG_LENGTH
WRAPPED_DATA_KEY_LENGTH = NONCE_LENGTH + KEY_LENGTH + TAG_LENGTH

_KEY_ID_DOMAIN = b"zkeb-master-key-id\x00"
_DATA_KEY_AAD_DOMAIN = b"zkeb-dek-v1\x00"
_U64_MAX = 2**64 - 1
_HEX_KEY_PATTERN = re.compile(r"[0-9A-Fa-f]{64}")
_BASE64_PATTERN = re.compile(r"[A-Za-z0-9+/\-_]+={0,2}")


class UnknownKeyIdError(ValueError):
    """No master key with the requested key id is configured."""


class DataKeyUnwrapError(ValueError):
    """A wrapped data key could not be decrypted: wrong master key, wrong payload, or tampered bytes."""


class ChunkIntegrityError(ValueError):
    """A stored chunk failed authentication: it was altered, truncated, reordered or moved between payloads."""


def parse_master_key(value: str, *, name: str) -> bytes:
    """Decode a 32-byte master key given as standard or URL-safe base64 (padding optional) or 64 hex characters.

    Args:
        value: The encoded key, typically from an environment variable.
        name: The environment variable's name, used in the error message.

    Returns:
        The 32 key bytes.

    Raises:
        ValueError: If the value is not an encoding of exactly 32 bytes. The message names ``name`` and never
            contains the value.
    """
    text = value.strip()
    if _HEX_KEY_PATTERN.fullmatch(text):
        return bytes.fromhex(text)
    key: bytes | None = None
    if _BASE64_PATTERN.fullmatch(text):
        standard = text.rstrip("=").replace("-", "+").replace("_", "/")
        try:
            key = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
        except (binascii.Error, ValueError):
            key = None
    if key is None or len(key) != KEY_LENGTH:
        # The value is a secret: never echo it, and suppress the decoder's exception context.
        raise ValueError(f"{name} must be a 32-byte key encoded as base64 or as 64 hex characters") from None
    return key


def master_key_id(key: bytes) -> str:
    """Return a stable, non-secret identifier for a master key, e.g. ``"mk-0123456789abcdef"``."""
    return "mk-" + hashlib.sha256(_KEY_ID_DOMAIN + key).hexdigest()[:16]


@dataclass(frozen=True, repr=False)
class MasterKeyring:
    """The active master key (used to wrap new data keys) and older keys still accepted for unwrapping.

    Attributes:
        active: The key that wraps new data keys.
        others: Keys that can still unwrap data keys wrapped before a rotation.
    """

    active: bytes
    others: tuple[bytes, ...] = ()
    _by_id: dict[str, bytes] = field(init=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        """Check key lengths and index the keys by id."""
        by_id: dict[str, bytes] = {}
        for key in (self.active, *self.others):
            if len(key) != KEY_LENGTH:
                raise ValueError(f"master keys must be {KEY_LENGTH} bytes")
            by_id.setdefault(master_key_id(key), key)
        object.__setattr__(self, "_by_id", by_id)

    def __repr__(self) -> str:
        """Show key ids only, never key bytes."""
        return f"MasterKeyring(active_id={self.active_id!r}, ids={self.ids!r})"

    @property
    def active_id(self) -> str:
        """The key id of the active key."""
        return master_key_id(self.active)

    @property
    def ids(self) -> tuple[str, ...]:
        """All distinct key ids, the active one first."""
        return tuple(self._by_id)

    def get(self, key_id: str) -> bytes:
        """Return the key with ``key_id``.

        Raises:
            UnknownKeyIdError: If no configured key has that id.
        """
        try:
            return self._by_id[key_id]
        except KeyError:
            raise UnknownKeyIdError(f"no configured master key has id {key_id!r}") from None


def new_data_key() -> bytes:
    """Return a fresh random 256-bit data key."""
    return os.urandom(KEY_LENGTH)


def _data_key_aad(payload_id: UUID) -> bytes:
    return _DATA_KEY_AAD_DOMAIN + payload_id.bytes


def wrap_data_key(master_key: bytes, data_key: bytes, *, payload_id: UUID) -> bytes:
    """Encrypt a data key under a master key, bound to one payload.

    Returns:
        ``nonce(12) || ciphertext(32) || tag(16)``.

    Raises:
        ValueError: If either key is not 32 bytes.
    """
    if len(master_key) != KEY_LENGTH or len(data_key) != KEY_LENGTH:
        raise ValueError(f"master and data keys must be {KEY_LENGTH} bytes")
    nonce = os.urandom(NONCE_LENGTH)
    return nonce + AESGCM(master_key).encrypt(nonce, data_key, _data_key_aad(payload_id))


def unwrap_data_key(master_key: bytes, wrapped: bytes, *, payload_id: UUID) -> bytes:
    """Decrypt a data key produced by :func:`wrap_data_key` for the same payload.

    Raises:
        DataKeyUnwrapError: If the master key, payload id or wrapped bytes do not match.
    """
    if len(master_key) != KEY_LENGTH:
        raise ValueError(f"master keys must be {KEY_LENGTH} bytes")
    if len(wrapped) != WRAPPED_DATA_KEY_LENGTH:
        raise DataKeyUnwrapError("wrapped data key has the wrong length")
    view = memoryview(wrapped)
    try:
        return AESGCM(master_key).decrypt(view[:NONCE_LENGTH], view[NONCE_LENGTH:], _data_key_aad(payload_id))
    except InvalidTag:
        raise DataKeyUnwrapError("wrapped data key failed authentication") from None


class ChunkCipher:
    """Encrypts and decrypts the chunks of one payload under its data key.

    The associated data binds every chunk to its payload id and sequence number, so chunks cannot be reordered,
    dropped into another position, or moved to another payload without failing authentication.
    """

    __slots__ = ("_aead", "_payload_id_bytes")

    def __init__(self, data_key: bytes, payload_id: UUID) -> None:
        """Create a cipher for the payload ``payload_id``.

        Raises:
            ValueError: If ``data_key`` is not 32 bytes.
        """
        if len(data_key) != KEY_LENGTH:
            raise ValueError(f"data keys must be {KEY_LENGTH} bytes")
        self._aead = AESGCM(data_key)
        self._payload_id_bytes = payload_id.bytes

    def __repr__(self) -> str:
        """Show the payload id only, never the key."""
        return f"ChunkCipher(payload_id={UUID(bytes=self._payload_id_bytes)!s})"

    def _aad(self, seq: int) -> bytes:
        if not 0 <= seq <= _U64_MAX:
            raise ValueError("chunk sequence number must be between 0 and 2**64-1")
        return self._payload_id_bytes + struct.pack(">Q", seq)

    def encrypt(self, seq: int, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt chunk number ``seq``.

        Returns:
            ``nonce(12) || ciphertext || tag(16)``, i.e. ``len(plaintext) + CHUNK_OVERHEAD`` bytes.
        """
        # Random rather than counter nonces: a retried upload may rewrite the same seq with different bytes, and
        # with one key per backup (a few hundred chunks at most) the collision probability is negligible.
        nonce = os.urandom(NONCE_LENGTH)
        return nonce + self._aead.encrypt(nonce, plaintext, self._aad(seq))

    def decrypt(self, seq: int, blob: bytes | memoryview) -> bytes:
        """Decrypt chunk number ``seq`` produced by :meth:`encrypt`.

        Raises:
            ChunkIntegrityError: If the blob is too short or fails authentication for this payload and position.
        """
        aad = self._aad(seq)
        if len(blob) < CHUNK_OVERHEAD:
            raise ChunkIntegrityError(f"chunk {seq} is too short to be valid")
        view = memoryview(blob)
        try:
            return self._aead.decrypt(view[:NONCE_LENGTH], view[NONCE_LENGTH:], aad)
        except InvalidTag:
            raise ChunkIntegrityError(f"chunk {seq} failed authentication") from None
