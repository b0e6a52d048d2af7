"""The device's key file: its identity (Ed25519 key, device id) and the 256-bit backup key.

Format (JSON, mode 0600, never overwritten)::

    {"format": "zkeb-client-key/1",
     "device_id": "<uuid>", "device_id_hash": "<hex sha256(device_id bytes)>", "public_key": "<base64>",
     "project_id": "<uuid>" | null,            # remembered by `enroll`
     "secret": {"signing_key": "<base64 32-byte Ed25519 seed>", "backup_key": "<base64 32 bytes>"}}

or, sealed with a passphrase, ``"sealed": {...}`` in place of ``"secret"``::

    {"kdf": "scrypt", "n": 131072, "r": 8, "p": 1, "salt": "<base64 16 bytes>",
     "nonce": "<base64 12 bytes>", "ciphertext": "<base64 AES-256-GCM of the secret's JSON>"}

The scrypt parameters (128 MiB of memory per guess) are stored in the file, so they can be raised later without
breaking old files; the AES-GCM associated data is the file's device id, binding the sealed secret to its identity.
The recovery form (`recovery_text`) is the device id, signing seed and backup key as grouped base32 text with a
checksum, enough to rebuild the key file on a new machine (`KeyFile.from_recovery_text`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from zkeb.client.errors import KeyFileError

__all__ = ("KeyFile", "ScryptParameters")

FORMAT = "zkeb-client-key/1"
RECOVERY_PREFIX = "ZKEB-RECOVERY-1"
KEY_LENGTH = 32


class ScryptParameters(msgspec.Struct, frozen=True):
    """scrypt cost: ``n`` (CPU/memory cost, a power of two), ``r`` (block size), ``p`` (parallelism)."""

    n: int = 2**17
    r: int = 8
    p: int = 1


class _Secret(msgspec.Struct, frozen=True):
    signing_key: bytes
    backup_key: bytes


class _Sealed(msgspec.Struct, frozen=True):
    kdf: str
    n: int
    r: int
    p: int
    salt: bytes
    nonce: bytes
    ciphertext: bytes


class _Document(msgspec.Struct, frozen=True, omit_defaults=True):
    format: str
    device_id: uuid.UUID
    device_id_hash: str
    public_key: bytes
    project_id: uuid.UUID | None = None
    secret: _Secret | None = None
    sealed: _Sealed | None = None


def _public_bytes(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes_raw()


def _scrypt(passphrase: str, salt: bytes, params: ScryptParameters) -> bytes:
    kdf = Scrypt(salt=salt, length=KEY_LENGTH, n=params.n, r=params.r, p=params.p)
    return kdf.derive(passphrase.encode())


@dataclass(frozen=True)
class KeyFile:
    """A device's keys, in memory.

    Attributes:
        device_id: The device identifier; the server only ever sees its SHA-256 (`device_id_hash`).
        signing_key: The device's Ed25519 private key.
        backup_key: The 256-bit AES key every payload and metadata blob is encrypted under.
        project_id: The project the device was enrolled in, once `enroll` has run.
    """

    device_id: uuid.UUID
    signing_key: Ed25519PrivateKey
    backup_key: bytes
    project_id: uuid.UUID | None = None

    @classmethod
    def generate(cls) -> KeyFile:
        """A new identity and backup key from the operating system's CSPRNG."""
        return cls(device_id=uuid.uuid4(), signing_key=Ed25519PrivateKey.generate(), backup_key=os.urandom(KEY_LENGTH))

    @property
    def device_id_hash(self) -> bytes:
        """SHA-256 of the device id's 16 bytes: how the server names this device."""
        return hashlib.sha256(self.device_id.bytes).digest()

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key the server verifies signatures with."""
        return _public_bytes(self.signing_key)

    def with_project(self, project_id: uuid.UUID) -> KeyFile:
        """A copy that remembers the project it is enrolled in."""
        return replace(self, project_id=project_id)

    def _secret(self) -> _Secret:
        seed = self.signing_key.private_bytes_raw()
        return _Secret(signing_key=seed, backup_key=self.backup_key)

    def to_bytes(self, passphrase: str | None = None, params: ScryptParameters | None = None) -> bytes:
        """Serialize, sealing the secret with ``passphrase`` when one is given."""
        document = _Document(
            format=FORMAT,
            device_id=self.device_id,
            device_id_hash=self.device_id_hash.hex(),
            public_key=self.public_key,
            project_id=self.project_id,
        )
        secret = self._secret()
        if passphrase is None:
            document = _replace_document(document, secret=secret)
        else:
            params = params or ScryptParameters()
            salt, nonce = os.urandom(16), os.urandom(12)
            key = _scrypt(passphrase, salt, params)
            ciphertext = AESGCM(key).encrypt(nonce, msgspec.json.encode(secret), self.device_id.bytes)
            sealed = _Sealed("scrypt", params.n, params.r, params.p, salt, nonce, ciphertext)
            document = _replace_document(document, sealed=sealed)
        return msgspec.json.format(msgspec.json.encode(document)) + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, passphrase: str | None = None) -> KeyFile:
        """Parse a key file, opening its sealed secret with ``passphrase``.

        Raises:
            KeyFileError: If the file is malformed, sealed and no or the wrong passphrase is given.
        """
        try:
            document = msgspec.json.decode(data, type=_Document)
        except msgspec.DecodeError as exc:
            raise KeyFileError(f"not a zkeb-client key file: {exc}") from None
        if document.format != FORMAT:
            raise KeyFileError(f"unsupported key file format {document.format!r}")
        if document.sealed is not None:
            secret = _open_sealed(document.sealed, document.device_id, passphrase)
        elif document.secret is not None:
            secret = document.secret
        else:
            raise KeyFileError("the key file holds no secret")
        if len(secret.signing_key) != KEY_LENGTH or len(secret.backup_key) != KEY_LENGTH:
            raise KeyFileError("the key file's keys have the wrong length")
        keys = cls(
            device_id=document.device_id,
            signing_key=Ed25519PrivateKey.from_private_bytes(secret.signing_key),
            backup_key=secret.backup_key,
            project_id=document.project_id,
        )
        if keys.public_key != document.public_key or keys.device_id_hash.hex() != document.device_id_hash:
            raise KeyFileError("the key file is inconsistent: its public part does not match its secret")
        return keys

    @staticmethod
    def is_sealed(data: bytes) -> bool:
        """Whether a key file's secret is sealed with a passphrase (without opening it)."""
        try:
            return msgspec.json.decode(data, type=_Document).sealed is not None
        except msgspec.DecodeError:
            return False

    def write_new(self, path: Path, passphrase: str | None = None) -> None:
        """Create ``path`` with mode 0600; never replaces an existing file.

        The file is written and synced under a temporary name beside ``path``, then linked to ``path`` (which fails
        if it exists): a failed write (a full disk) leaves nothing, never an empty key file. On a file system without
        hard links (FAT) it is created at ``path`` exclusively instead, and removed if writing it fails.

        Raises:
            KeyFileError: If the file already exists.
        """
        data = self.to_bytes(passphrase)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = _temporary(path)
        try:
            _write_synced(temporary, data)
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise KeyFileError(f"{path} already exists; refusing to overwrite a key file") from None
            except OSError:  # no hard links here
                try:
                    _write_synced(path, data)
                except FileExistsError:
                    raise KeyFileError(f"{path} already exists; refusing to overwrite a key file") from None
            _sync_directory(path.parent)
        finally:
            temporary.unlink(missing_ok=True)

    def rewrite(self, path: Path, passphrase: str | None = None) -> None:
        """Replace ``path`` atomically (same mode 0600), e.g. to remember the enrolled project.

        A file sealed with scrypt parameters of its own is sealed again with the same ones, never the defaults (which
        may be weaker).
        """
        with self.rewriting(path, passphrase):
            pass

    @contextmanager
    def rewriting(self, path: Path, passphrase: str | None = None) -> Iterator[None]:
        """`rewrite` in two steps: the new file is written (and synced) beside ``path`` on entry, and put in its place
        when the block succeeds; if the block (or the write) fails, it is removed and ``path`` is unchanged.

        What the block does (`enroll`'s request) thus happens only once the new file is known to fit on the disk.
        A symbolic link is followed: the file it points to is rewritten, and the link kept.
        """
        path = path.resolve()
        params = None
        try:
            sealed = msgspec.json.decode(path.read_bytes(), type=_Document).sealed
        except (FileNotFoundError, msgspec.DecodeError):
            sealed = None
        if sealed is not None:
            params = ScryptParameters(n=sealed.n, r=sealed.r, p=sealed.p)
        data = self.to_bytes(passphrase, params)
        temporary = _temporary(path)
        try:
            _write_synced(temporary, data)
            yield
            temporary.replace(path)
            _sync_directory(path.parent)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def recovery_text(self) -> str:
        """The keys as grouped base32 text with a checksum: what to print and keep offline."""
        body = self.device_id.bytes + self.signing_key.private_bytes_raw() + self.backup_key
        check = hashlib.sha256(RECOVERY_PREFIX.encode() + body).digest()[:4]
        text = base64.b32encode(body + check).decode().rstrip("=")
        groups = [text[i : i + 4] for i in range(0, len(text), 4)]
        lines = [" ".join(groups[i : i + 8]) for i in range(0, len(groups), 8)]
        return "\n".join([RECOVERY_PREFIX, *lines])

    @classmethod
    def from_recovery_text(cls, text: str) -> KeyFile:
        """Rebuild the keys from `recovery_text()`'s output (spacing and case do not matter).

        Raises:
            KeyFileError: If the text is not a recovery form or its checksum does not match.
        """
        cleaned = text.strip()
        if not cleaned.upper().startswith(RECOVERY_PREFIX):
            raise KeyFileError(f"a recovery form starts with {RECOVERY_PREFIX}")
        letters = re.sub(r"[^A-Z2-7]", "", cleaned[len(RECOVERY_PREFIX) :].upper())
        try:
            raw = base64.b32decode(letters + "=" * (-len(letters) % 8))
        except ValueError:
            raise KeyFileError("the recovery form is not valid base32") from None
        if len(raw) != 16 + 2 * KEY_LENGTH + 4:
            raise KeyFileError("the recovery form has the wrong length")
        body, check = raw[:-4], raw[-4:]
        if hashlib.sha256(RECOVERY_PREFIX.encode() + body).digest()[:4] != check:
            raise KeyFileError("the recovery form's checksum does not match (a typo?)")
        return cls(
            device_id=uuid.UUID(bytes=body[:16]),
            signing_key=Ed25519PrivateKey.from_private_bytes(body[16 : 16 + KEY_LENGTH]),
            backup_key=body[16 + KEY_LENGTH :],
        )


def _temporary(path: Path) -> Path:
    """Where a key file is written before it takes ``path``'s place: beside it, named after this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` (mode 0600; it must not exist) holding ``data``, flushed to the disk; removed if that fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)  # created by this call (O_EXCL): ours to remove
        raise


def _sync_directory(folder: Path) -> None:
    """Flush a directory's entries (a new or renamed key file) to the disk, where the system allows it (POSIX)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_document(document: _Document, **changes: object) -> _Document:
    """A copy of a key-file document with some fields changed."""
    return msgspec.structs.replace(document, **changes)


def _open_sealed(sealed: _Sealed, device_id: uuid.UUID, passphrase: str | None) -> _Secret:
    if passphrase is None:
        raise KeyFileError("the key file is sealed: give its passphrase (--passphrase or ZKEB_PASSPHRASE)")
    if sealed.kdf != "scrypt":
        raise KeyFileError(f"unsupported key derivation {sealed.kdf!r}")
    params = ScryptParameters(n=sealed.n, r=sealed.r, p=sealed.p)
    try:
        key = _scrypt(passphrase, sealed.salt, params)
        plain = AESGCM(key).decrypt(sealed.nonce, sealed.ciphertext, device_id.bytes)
    except InvalidTag:
        raise KeyFileError("wrong passphrase for the key file") from None
    except ValueError as exc:
        raise KeyFileError(f"the key file's scrypt parameters are invalid: {exc}") from None
    return msgspec.json.decode(plain, type=_Secret)
