"""The client's cryptography: AES-256-GCM over streams, the encrypted metadata, and the messages a device signs.

Written from the protocol (docs/protocol.md, "Backup envelope" and "Device tokens"), not shared with the server: the
client is a separate package, and a test checks both sides build the same bytes.

A payload is one AES-256-GCM message under the backup key with a random 96-bit nonce. Encryption streams (bounded
memory); decryption streams too, but its output is unauthenticated until `finish()` checks the tag, so callers write
it to a temporary file and only publish it afterwards.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from uuid import UUID

import msgspec
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from zkeb.client.errors import IntegrityError

__all__ = (
    "NONCE_LENGTH",
    "TAG_LENGTH",
    "BackupMetadata",
    "PayloadDecryptor",
    "PayloadEncryptor",
    "SealedPayload",
    "auth_message",
    "backup_signed_message",
    "decrypt_metadata",
    "encrypt_metadata",
    "new_nonce",
    "rfc3339",
    "seal_payload",
    "verify_signature",
)

BACKUP_DOMAIN = b"ZKEB-BACKUP-V1\x00"
AUTH_DOMAIN = b"ZKEB-AUTH-V1\x00"
NONCE_LENGTH = 12
TAG_LENGTH = 16
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class BackupMetadata(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """What the encrypted metadata blob holds: the server never sees it.

    Attributes:
        name: The file's or directory's base name.
        size: Plaintext size in bytes (for a directory, the size of its tar stream).
        mtime: Modification time, seconds since the Unix epoch.
        sha256: Hex SHA-256 of the plaintext (the tar stream for a directory); checked after decryption.
        kind: ``"file"`` or ``"directory"`` (a tar stream to extract).
    """

    name: str
    size: int
    mtime: float
    sha256: str
    kind: Literal["file", "directory"]


def new_nonce() -> bytes:
    """A fresh random 96-bit AES-GCM nonce (never derived, never counted: each backup draws its own)."""
    return os.urandom(NONCE_LENGTH)


def encrypt_metadata(key: bytes, metadata: BackupMetadata) -> tuple[bytes, bytes, bytes]:
    """Encrypt the metadata under the backup key with its own fresh nonce.

    Returns:
        ``(ciphertext, nonce, tag)``, the tag split off as the envelope carries it.
    """
    nonce = new_nonce()
    sealed = AESGCM(key).encrypt(nonce, msgspec.json.encode(metadata), None)
    return sealed[:-TAG_LENGTH], nonce, sealed[-TAG_LENGTH:]


def decrypt_metadata(key: bytes, ciphertext: bytes, nonce: bytes, tag: bytes) -> BackupMetadata:
    """Decrypt and decode the metadata blob.

    Raises:
        IntegrityError: If the key is wrong or the blob was altered.
    """
    try:
        plain = AESGCM(key).decrypt(nonce, ciphertext + tag, None)
    except InvalidTag:
        raise IntegrityError("the backup's metadata does not decrypt with this key (wrong key file?)") from None
    try:
        return msgspec.json.decode(plain, type=BackupMetadata)
    except msgspec.ValidationError as exc:
        raise IntegrityError(f"the backup's metadata is not a zkeb-client record: {exc}") from None


class PayloadEncryptor:
    """Streaming AES-256-GCM encryption of one payload, hashing the plaintext and the ciphertext as it goes.

    With ``digests=False`` it only encrypts: the pass that re-sends a payload already sealed needs just the bytes
    and the tag (compared with the sealed one), and skipping two SHA-256 over the whole payload is most of its cost.
    """

    def __init__(self, key: bytes, nonce: bytes, *, digests: bool = True) -> None:
        self._encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce)).encryptor()
        self._digests = digests
        self.plain_sha256 = hashlib.sha256()
        self.cipher_sha256 = hashlib.sha256()
        self.size = 0

    def update(self, plaintext: bytes) -> bytes:
        """Encrypt the next plaintext bytes; returns as many ciphertext bytes (GCM is a stream mode)."""
        out = self._encryptor.update(plaintext)
        if self._digests:
            self.plain_sha256.update(plaintext)
            self.cipher_sha256.update(out)
        self.size += len(out)
        return out

    def finish(self) -> bytes:
        """End the message; returns the 16-byte authentication tag."""
        self._encryptor.finalize()
        return self._encryptor.tag


@dataclass(frozen=True)
class SealedPayload:
    """What a full encryption pass learns about a payload, all of it needed before the tus upload is created."""

    nonce: bytes
    tag: bytes
    size: int
    plain_sha256: bytes
    cipher_sha256: bytes


def seal_payload(key: bytes, nonce: bytes, chunks: Iterable[bytes]) -> SealedPayload:
    """Encrypt a whole plaintext stream, keeping only its tag and digests (the ciphertext is dropped).

    The caller encrypts the same plaintext again with the same key and nonce to send it: the same bytes, so the same
    ciphertext, which is what lets a tus upload be created (its metadata carries the tag and signature) before the
    first byte is sent, and lets an interrupted upload resume.

    The two SHA-256 are most of the cost, and hashlib releases the GIL for large buffers: each chunk's plaintext and
    ciphertext are hashed by two threads while this one reads and encrypts the next chunk. Each digest still sees its
    chunks in order (a chunk is handed over only once the previous one is hashed), and at most two chunks are held.
    """
    encryptor = PayloadEncryptor(key, nonce, digests=False)
    plain, cipher = hashlib.sha256(), hashlib.sha256()
    pending: tuple[Future[None], ...] = ()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="zkeb-seal") as pool:
        for chunk in chunks:
            ciphertext = encryptor.update(chunk)
            for hashed in pending:
                hashed.result()
            pending = (pool.submit(plain.update, chunk), pool.submit(cipher.update, ciphertext))
        for hashed in pending:
            hashed.result()
    tag = encryptor.finish()
    return SealedPayload(
        nonce=nonce, tag=tag, size=encryptor.size, plain_sha256=plain.digest(), cipher_sha256=cipher.digest()
    )


class PayloadDecryptor:
    """Streaming AES-256-GCM decryption; nothing it returns is authentic until `finish()` has returned."""

    def __init__(self, key: bytes, nonce: bytes, tag: bytes) -> None:
        self._decryptor = Cipher(algorithms.AES(key), modes.GCM(nonce, tag)).decryptor()
        self.cipher_sha256 = hashlib.sha256()
        self.plain_sha256 = hashlib.sha256()

    def update(self, ciphertext: bytes) -> bytes:
        """Hash and decrypt the next ciphertext bytes (`hash_ciphertext` then `decrypt`)."""
        self.hash_ciphertext(ciphertext)
        return self.decrypt(ciphertext)

    def hash_ciphertext(self, ciphertext: bytes) -> None:
        """Add the next ciphertext bytes to the ciphertext's SHA-256 (independent of `decrypt`: another thread may)."""
        self.cipher_sha256.update(ciphertext)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """Decrypt the next ciphertext bytes, adding the plaintext to its SHA-256."""
        out = self._decryptor.update(ciphertext)
        self.plain_sha256.update(out)
        return out

    def finish(self) -> None:
        """Check the tag.

        Raises:
            IntegrityError: If the ciphertext, nonce or tag was altered, or the key is not the one that encrypted it.
        """
        try:
            self._decryptor.finalize()
        except InvalidTag:
            raise IntegrityError("the payload does not decrypt with this key, or it was altered") from None


def _micros(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware")
    return (moment - _EPOCH) // timedelta(microseconds=1)


def rfc3339(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ``: microsecond precision, exactly what the signed message carries."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def backup_signed_message(
    *,
    project_id: UUID,
    container_id: UUID,
    device_id_hash: bytes,
    backup_timestamp: datetime,
    payload_nonce: bytes,
    payload_auth_tag: bytes,
    payload_sha256: bytes,
    payload_size: int,
    metadata: bytes,
    metadata_nonce: bytes,
    metadata_auth_tag: bytes,
) -> bytes:
    """The 223-byte message a device signs for one backup (big-endian integers; see docs/protocol.md)."""
    return b"".join(
        (
            BACKUP_DOMAIN,
            project_id.bytes,
            container_id.bytes,
            device_id_hash,
            struct.pack(">q", _micros(backup_timestamp)),
            payload_nonce,
            payload_auth_tag,
            payload_sha256,
            struct.pack(">Q", payload_size),
            metadata_nonce,
            metadata_auth_tag,
            hashlib.sha256(metadata).digest(),
            struct.pack(">Q", len(metadata)),
        )
    )


def auth_message(*, project_id: UUID, device_id_hash: bytes, timestamp_ms: int) -> bytes:
    """The proof-of-possession message a device signs for a device token."""
    return AUTH_DOMAIN + project_id.bytes + device_id_hash + struct.pack(">Q", timestamp_ms)


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Check an Ed25519 signature.

    Raises:
        IntegrityError: If it does not verify under ``public_key``.
    """
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise IntegrityError("the backup's signature does not verify with this device's public key") from None
