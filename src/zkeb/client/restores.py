"""Restoring: fetch a backup, verify it end to end, decrypt, and publish it only once every check has passed.

Checks, in order: the backup was made by this key file's device and its Ed25519 signature verifies over the
envelope and the server's payload digest (before any download); the metadata decrypts; while streaming, the
ciphertext's SHA-256 matches the signed digest and the server's `Repr-Digest`; at the end the AES-GCM tag verifies
and the plaintext's SHA-256 and size match the metadata. The plaintext goes to a temporary file beside the
destination and is renamed into place (a directory is extracted into a temporary folder first), so a failure leaves
nothing at the destination. A dropped connection resumes with `Range` and `If-Range` (the payload's ETag).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx
import msgspec

from zkeb.client.archive import extract_tar
from zkeb.client.crypto import (
    BackupMetadata,
    PayloadDecryptor,
    backup_signed_message,
    decrypt_metadata,
    verify_signature,
)
from zkeb.client.errors import ConfigurationError, IntegrityError, TransferError
from zkeb.client.keys import KeyFile
from zkeb.client.models import RestoreResult, ServerEnvelope, VerifyResult
from zkeb.client.transport import RETRYABLE_STATUS, Transport, api_error, retry_after_seconds

__all__ = ("Restorer", "Verified", "check_envelope")

Progress = Callable[[int, int], None]

#: Bytes gathered before a block goes to the worker thread.
BLOCK_SIZE = 1024 * 1024


@dataclass(frozen=True)
class Verified:
    """A backup whose envelope verified: its metadata, and how to download its payload."""

    envelope: ServerEnvelope
    metadata: BackupMetadata


def _repr_digest(value: str | None) -> bytes | None:
    """The SHA-256 named by a `Repr-Digest` header (``sha-256=:<base64>:``), if any."""
    for item in (value or "").split(","):
        name, _, rest = item.strip().partition("=")
        if name.strip().lower() == "sha-256" and rest.startswith(":") and rest.endswith(":"):
            try:
                return base64.b64decode(rest[1:-1])
            except ValueError:
                return None
    return None


def check_envelope(keys: KeyFile, envelope: ServerEnvelope) -> Verified:
    """Verify the envelope's signature with this device's public key and open its metadata.

    Raises:
        IntegrityError: If another device made the backup, the signature does not verify, or the metadata
            does not decrypt with this key file's backup key.
    """
    if envelope.device_id_hash != keys.device_id_hash.hex():
        raise IntegrityError(f"backup {envelope.id} was made by another device; restore it with that device's key file")
    message = backup_signed_message(
        project_id=envelope.project_id,
        container_id=envelope.container_id,
        device_id_hash=keys.device_id_hash,
        backup_timestamp=envelope.backup_timestamp,
        payload_nonce=envelope.payload_nonce,
        payload_auth_tag=envelope.payload_auth_tag,
        payload_sha256=bytes.fromhex(envelope.payload_sha256),
        payload_size=envelope.encrypted_payload_size,
        metadata=envelope.metadata,
        metadata_nonce=envelope.metadata_nonce,
        metadata_auth_tag=envelope.metadata_auth_tag,
    )
    verify_signature(keys.public_key, envelope.signature, message)
    metadata = decrypt_metadata(keys.backup_key, envelope.metadata, envelope.metadata_nonce, envelope.metadata_auth_tag)
    return Verified(envelope, metadata)


class _Transfer:
    """One payload's download in progress, across the requests that resume it.

    Received pieces (httpx hands over about 64 KiB at a time) are gathered into blocks of about 1 MiB, joined once
    (no growing buffer copied again). Two worker threads take each block: one hashes the ciphertext, the other
    decrypts it, hashes the plaintext and writes it, each in order, while the event loop reads the next block from the
    network (hashlib releases the GIL for large buffers, as file writes do, so on two cores the two SHA-256 run
    side by side). A block is handed over only once both workers are done with the previous one, so memory stays at
    a few MiB.
    """

    def __init__(
        self, decryptor: PayloadDecryptor, envelope: ServerEnvelope, sink: BinaryIO | None, progress: Progress | None
    ) -> None:
        self.decryptor = decryptor
        self.envelope = envelope
        self.sink = sink
        self.progress = progress
        self.received = 0
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zkeb-restore-hash")
        self._decrypter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zkeb-restore-decrypt")
        self._pending: tuple[asyncio.Future[None], ...] = ()

    def _decrypt(self, block: bytes) -> None:
        plain = self.decryptor.decrypt(block)
        if self.sink is not None:
            self.sink.write(plain)

    async def _submit(self, pieces: list[bytes]) -> None:
        for step in self._pending:
            await step
        block = b"".join(pieces)  # one copy of about 1 MiB
        loop = asyncio.get_running_loop()
        self._pending = (
            loop.run_in_executor(self._hasher, self.decryptor.hash_ciphertext, block),
            loop.run_in_executor(self._decrypter, self._decrypt, block),
        )

    async def receive(self, response: httpx.Response) -> None:
        """Decrypt a response's body into the sink (a 206 continuing where the last one stopped)."""
        if response.status_code not in {200, 206}:
            await response.aread()
            raise api_error(response)
        if self.received and response.status_code != 206:
            raise IntegrityError("the payload changed on the server during the download")
        digest = _repr_digest(response.headers.get("repr-digest"))
        if digest is not None and digest.hex() != self.envelope.payload_sha256:
            raise IntegrityError("the server's digest of the payload is not the signed one")
        total = self.envelope.encrypted_payload_size
        pieces: list[bytes] = []
        gathered = 0
        try:
            async for piece in response.aiter_bytes():
                self.received += len(piece)
                if self.received > total:
                    raise IntegrityError("the server sent more bytes than the signed payload size")
                pieces.append(piece)
                gathered += len(piece)
                if gathered >= BLOCK_SIZE:
                    await self._submit(pieces)
                    pieces, gathered = [], 0
                    if self.progress is not None:
                        self.progress(self.received, total)
        finally:
            # What arrived before a dropped connection is kept (in order): the next request asks for the rest.
            if pieces:
                await self._submit(pieces)
        if self.progress is not None:
            self.progress(self.received, total)

    async def finish(self, metadata: BackupMetadata) -> None:
        """Wait for the last block, then check the ciphertext digest, the tag, and the plaintext's SHA-256."""
        for step in self._pending:
            await step
        self._hasher.shutdown()
        self._decrypter.shutdown()
        if self.decryptor.cipher_sha256.hexdigest() != self.envelope.payload_sha256:
            raise IntegrityError("the payload's SHA-256 is not the signed one (altered on the server?)")
        self.decryptor.finish()
        if self.decryptor.plain_sha256.hexdigest() != metadata.sha256:
            raise IntegrityError("the decrypted data's SHA-256 does not match the backup's record")

    def close(self) -> None:
        """Stop the worker (after a failure, without waiting for queued blocks that no longer matter)."""
        self._hasher.shutdown(wait=True, cancel_futures=True)
        self._decrypter.shutdown(wait=True, cancel_futures=True)


class Restorer:
    """Downloads and verifies backups made by one device's key file."""

    def __init__(self, transport: Transport, keys: KeyFile) -> None:
        self.transport = transport
        self.keys = keys

    async def envelope(self, backup_id: uuid.UUID) -> ServerEnvelope:
        """The stored envelope of a backup (no payload)."""
        response = await self.transport.request(
            "GET", f"/api/v1/backups/{backup_id}", headers={"Accept": "application/json"}
        )
        return msgspec.json.decode(response.content, type=ServerEnvelope)

    async def latest(self, container_id: uuid.UUID) -> ServerEnvelope:
        """The newest backup's envelope in a container."""
        response = await self.transport.request(
            "GET", f"/api/v1/containers/{container_id}/backups/latest", headers={"Accept": "application/json"}
        )
        return msgspec.json.decode(response.content, type=ServerEnvelope)

    async def _download(self, verified: Verified, sink: BinaryIO | None, progress: Progress | None) -> None:
        """Stream, decrypt and check the payload, writing plaintext to ``sink`` (unauthenticated until this returns)."""
        envelope = verified.envelope
        transfer = _Transfer(
            PayloadDecryptor(self.keys.backup_key, envelope.payload_nonce, envelope.payload_auth_tag),
            envelope,
            sink,
            progress,
        )
        try:
            await self._fetch(transfer)
            await transfer.finish(verified.metadata)
        finally:
            transfer.close()

    async def _fetch(self, transfer: _Transfer) -> None:
        """Receive the whole payload, resuming with `Range`/`If-Range` after connection loss, 429 and 503."""
        envelope = transfer.envelope
        policy = self.transport.retry
        path = f"/api/v1/backups/{envelope.id}/payload"
        failures = 0
        while transfer.received < envelope.encrypted_payload_size:
            headers = await self.transport.authorization()
            if transfer.received:
                headers |= {"Range": f"bytes={transfer.received}-", "If-Range": f'"{envelope.payload_sha256}"'}
            try:
                async with self.transport.stream("GET", path, headers) as response:
                    if response.status_code in RETRYABLE_STATUS:
                        await response.aread()
                        wait, error = policy.delay(failures, retry_after_seconds(response)), str(api_error(response))
                    else:
                        await transfer.receive(response)
                        continue
            except httpx.TransportError as exc:
                wait, error = policy.delay(failures, None), f"{exc.__class__.__name__} {exc}"
            failures += 1
            if failures >= policy.attempts:
                raise TransferError(f"the download kept failing ({error.strip()})")
            await asyncio.sleep(wait)

    async def verify(self, envelope: ServerEnvelope, progress: Progress | None = None) -> VerifyResult:
        """Download and check a backup end to end, writing nothing."""
        verified = check_envelope(self.keys, envelope)
        await self._download(verified, None, progress)
        meta = verified.metadata
        return VerifyResult(id=envelope.id, name=meta.name, kind=meta.kind, size=meta.size, sha256=meta.sha256)

    async def to_stream(
        self, envelope: ServerEnvelope, sink: BinaryIO, progress: Progress | None = None
    ) -> RestoreResult:
        """Decrypt a backup into ``sink``, which receives unauthenticated bytes: discard it if this raises."""
        verified = check_envelope(self.keys, envelope)
        await self._download(verified, sink, progress)
        meta = verified.metadata
        return RestoreResult(
            id=envelope.id, path=None, name=meta.name, kind=meta.kind, size=meta.size, sha256=meta.sha256
        )

    async def to_path(
        self, envelope: ServerEnvelope, destination: Path, progress: Progress | None = None
    ) -> RestoreResult:
        """Restore a backup to ``destination`` (inside it, under the backup's name, when it is a directory).

        Raises:
            ConfigurationError: If the destination already exists.
            IntegrityError: If any check fails; nothing is left at the destination.
        """
        verified = check_envelope(self.keys, envelope)
        meta = verified.metadata
        target, temporary = await asyncio.to_thread(self._prepare, destination, meta.name)
        try:
            with temporary.open("wb") as sink:
                await self._download(verified, sink, progress)
            await asyncio.to_thread(self._publish, temporary, target, meta)
        finally:
            await asyncio.to_thread(temporary.unlink, missing_ok=True)
        return RestoreResult(
            id=envelope.id, path=target, name=meta.name, kind=meta.kind, size=meta.size, sha256=meta.sha256
        )

    @staticmethod
    def _prepare(destination: Path, name: str) -> tuple[Path, Path]:
        """The final path, and an empty temporary file beside it."""
        target = destination / name if destination.is_dir() else destination
        if target.exists() or target.is_symlink():
            raise ConfigurationError(f"{target} already exists; refusing to overwrite it")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".zkeb-part", dir=target.parent)
        os.close(fd)
        return target, Path(temporary)

    @classmethod
    def _publish(cls, temporary: Path, target: Path, meta: BackupMetadata) -> None:
        if meta.kind == "directory":
            cls._publish_directory(temporary, target, meta.name)
        else:
            os.utime(temporary, (meta.mtime, meta.mtime))
            temporary.rename(target)

    @staticmethod
    def _publish_directory(archive: Path, target: Path, name: str) -> None:
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".zkeb-part", dir=target.parent))
        try:
            extract_tar(archive, folder)
            entries = list(folder.iterdir())
            if [entry.name for entry in entries] != [name] or not entries[0].is_dir():
                raise IntegrityError("the backup's archive does not hold exactly the directory it names")
            entries[0].rename(target)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
