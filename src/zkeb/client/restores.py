"""Restoring: fetch a backup, verify it end to end, decrypt, and publish it only once every check has passed.

Checks, in order: the backup was made by this key file's device and its Ed25519 signature verifies over the
envelope and the server's payload digest (before any download); the metadata decrypts; while streaming, the
ciphertext's SHA-256 matches the signed digest and the server's `Repr-Digest`; at the end the AES-GCM tag verifies
and the plaintext's SHA-256 and size match the metadata. The plaintext goes to a temporary file beside the
destination and is renamed into place (a directory is extracted into a temporary folder first), so a failure leaves
nothing at the destination. Their names carry the restoring process's id (``.NAME.<pid>.<random>.zkeb-part``): a
restore to NAME removes those a killed restore left, whose process is gone. A dropped connection resumes with
`Range` and `If-Range` (the payload's ETag).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import os
import shutil
import socket
import tempfile
import threading
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
from zkeb.client.models import LeftOut, RestoreResult, ServerEnvelope, VerifyResult
from zkeb.client.state import process_alive
from zkeb.client.transport import RETRYABLE_STATUS, Transport, api_error, retry_after_seconds, transport_failure

__all__ = ("Restorer", "Verified", "check_envelope")

Progress = Callable[[int, int], None]

#: Bytes gathered before a block goes to the worker threads.
BLOCK_SIZE = 1024 * 1024
#: Blocks handed to the worker threads and not yet done with: how far the network may run ahead of them.
BLOCKS_IN_FLIGHT = 3


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


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A retryable answer to a download request: its status, `Retry-After` in seconds, and what it said."""

    status: int
    retry_after: float | None
    error: str


class _StoppedError(Exception):
    """The download was abandoned by its caller: the worker thread stops reading."""


class _Transfer:
    """One payload's download in progress, across the requests that resume it.

    The body is read by a worker thread through httpx's blocking client: per received piece (httpcore reads 64 KiB at
    a time) that costs about a third of the CPU time of its asyncio stack, and the socket reads release the GIL.
    Pieces are gathered into blocks of about 1 MiB, joined once, and each block goes to two more threads: one hashes
    the ciphertext, the other decrypts it, hashes the plaintext and writes it, each taking the blocks in order
    (hashlib, AES-GCM and file writes release the GIL, so on two cores they run beside the network reads). At most
    `BLOCKS_IN_FLIGHT` blocks wait for those threads, so memory stays at a few MiB whatever the size.
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
        self._in_flight: deque[tuple[Future[None], Future[None]]] = deque()
        self._stopping = threading.Event()
        self._socket: socket.socket | None = None  # the connection the body is being read from, to cut on stop()

    def _decrypt(self, block: bytes) -> None:
        plain = self.decryptor.decrypt(block)
        if self.sink is not None:
            self.sink.write(plain)

    def _wait_oldest(self) -> None:
        for step in self._in_flight.popleft():
            step.result()  # a failed write (a full disk) is raised here

    def _submit(self, pieces: list[bytes]) -> None:
        while len(self._in_flight) >= BLOCKS_IN_FLIGHT:
            self._wait_oldest()
        block = b"".join(pieces)  # one copy of about 1 MiB
        self._in_flight.append(
            (self._hasher.submit(self.decryptor.hash_ciphertext, block), self._decrypter.submit(self._decrypt, block))
        )

    def receive(self, response: httpx.Response) -> None:
        """Decrypt a response's body into the sink (a 206 continuing where the last one stopped); blocking.

        Raises:
            ApiError: If the server refused the request.
            IntegrityError: If the answer is not the signed payload, or continues a different one.
            httpx.TransportError: If the connection was lost (what arrived is kept, for the next request to continue).
        """
        if response.status_code not in {200, 206}:
            response.read()
            raise api_error(response)
        if self.received and response.status_code != 206:
            raise IntegrityError("the payload changed on the server during the download")
        digest = _repr_digest(response.headers.get("repr-digest"))
        if digest is not None and digest.hex() != self.envelope.payload_sha256:
            raise IntegrityError("the server's digest of the payload is not the signed one")
        total = self.envelope.encrypted_payload_size
        pieces: list[bytes] = []
        gathered = 0
        stream = response.extensions.get("network_stream")
        self._socket = stream.get_extra_info("socket") if stream is not None else None
        if self._stopping.is_set():
            raise _StoppedError
        try:
            for piece in response.iter_bytes():
                if self._stopping.is_set():
                    raise _StoppedError
                self.received += len(piece)
                if self.received > total:
                    raise IntegrityError("the server sent more bytes than the signed payload size")
                pieces.append(piece)
                gathered += len(piece)
                if gathered >= BLOCK_SIZE:
                    self._submit(pieces)
                    pieces, gathered = [], 0
                    if self.progress is not None:
                        self.progress(self.received, total)
        finally:
            # What arrived before a dropped connection is kept (in order): the next request asks for the rest.
            if pieces:
                self._submit(pieces)
        if self.progress is not None:
            self.progress(self.received, total)

    def stop(self) -> None:
        """Make `receive` stop (the caller was cancelled, e.g. by Ctrl-C): at its next piece, or at once when its read
        has stalled, by shutting its connection down (a read blocked in another thread wakes up with an error)."""
        self._stopping.set()
        connection = self._socket
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def finish(self, metadata: BackupMetadata) -> None:
        """Wait for the last block, then check the ciphertext digest, the tag, and the plaintext's SHA-256."""
        while self._in_flight:
            self._wait_oldest()
        if self.decryptor.cipher_sha256.hexdigest() != self.envelope.payload_sha256:
            raise IntegrityError("the payload's SHA-256 is not the signed one (altered on the server?)")
        self.decryptor.finish()
        if self.decryptor.plain_sha256.hexdigest() != metadata.sha256:
            raise IntegrityError("the decrypted data's SHA-256 does not match the backup's record")

    def close(self) -> None:
        """Stop the workers (after a failure, without waiting for queued blocks that no longer matter)."""
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
        report: Progress | None = None
        if progress is not None:
            # The transfer runs in worker threads; the caller's callback still runs on its event loop.
            loop, callback = asyncio.get_running_loop(), progress

            def report_on_loop(done: int, total: int) -> None:
                loop.call_soon_threadsafe(callback, done, total)

            report = report_on_loop
        transfer = _Transfer(
            PayloadDecryptor(self.keys.backup_key, envelope.payload_nonce, envelope.payload_auth_tag),
            envelope,
            sink,
            report,
        )
        try:
            await self._fetch(transfer)
            await asyncio.to_thread(transfer.finish, verified.metadata)
        finally:
            transfer.close()

    def _receive_once(self, transfer: _Transfer, url: str, headers: dict[str, str]) -> _Refusal | None:
        """One request for the rest of the payload, in a worker thread: None once its body is in, or why to retry."""
        with self.transport.blocking_stream("GET", url, headers) as response:
            if response.status_code in RETRYABLE_STATUS:
                response.read()
                return _Refusal(response.status_code, retry_after_seconds(response), str(api_error(response)))
            transfer.receive(response)
            return None

    async def _fetch(self, transfer: _Transfer) -> None:
        """Receive the whole payload, resuming with `Range`/`If-Range` after connection loss, 408, 429 and 503.

        Only failures in a row that received nothing count against the retry policy's attempts: a link that drops
        every few MiB still delivers the payload, while one that delivers nothing fails after ``attempts`` tries. A
        429 is the server pacing the client, not a failure: ``max_rate_limited`` of them in a row end the download.
        """
        envelope = transfer.envelope
        policy = self.transport.retry
        url = self.transport.url(f"/api/v1/backups/{envelope.id}/payload")
        failures = 0
        rate_limited = 0
        received_before = transfer.received
        while transfer.received < envelope.encrypted_payload_size:
            if transfer.received > received_before:
                failures, received_before = 0, transfer.received
            headers = await self.transport.authorization()
            if transfer.received:
                headers |= {"Range": f"bytes={transfer.received}-", "If-Range": f'"{envelope.payload_sha256}"'}
            attempt = asyncio.ensure_future(asyncio.to_thread(self._receive_once, transfer, url, headers))
            try:
                refused = await asyncio.shield(attempt)
            except httpx.LocalProtocolError as exc:
                raise TransferError(transport_failure(exc)) from None  # sending it again cannot help
            except httpx.TransportError as exc:
                wait, error = policy.delay(failures, None), transport_failure(exc)
            except asyncio.CancelledError:
                transfer.stop()  # nothing may write to the sink once the caller has gone on to discard it
                await asyncio.wait([attempt])
                if not attempt.cancelled():
                    attempt.exception()  # retrieved: how the stopped read ended no longer matters
                raise
            else:
                if refused is None:
                    continue
                if refused.status == 429:
                    wait = policy.delay(rate_limited, refused.retry_after)
                    rate_limited += 1
                    if rate_limited >= policy.max_rate_limited:
                        raise TransferError(
                            f"the download was refused as rate limited {rate_limited} times in a row "
                            f"({refused.error.strip()}); try again later"
                        )
                    await asyncio.sleep(wait)
                    continue
                wait, error = policy.delay(failures, refused.retry_after), refused.error
            rate_limited = 0
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
        self, envelope: ServerEnvelope, destination: str | os.PathLike[str], progress: Progress | None = None
    ) -> RestoreResult:
        """Restore a backup to ``destination`` (inside it, under the backup's name, when it is a directory, or when
        it is written with a trailing separator: ``restored/`` is a folder, made if missing).

        Raises:
            ConfigurationError: If the destination already exists.
            IntegrityError: If any check fails; nothing is left at the destination.
        """
        verified = check_envelope(self.keys, envelope)
        meta = verified.metadata
        target, created = await asyncio.to_thread(_target_and_parents, os.fspath(destination), meta.name)
        published = False
        try:
            temporary = await asyncio.to_thread(self._prepare, target)
            try:
                with temporary.open("wb") as sink:
                    await self._download(verified, sink, progress)
                left_out = await asyncio.to_thread(self._publish, temporary, target, meta)
                published = True
            finally:
                await asyncio.to_thread(temporary.unlink, missing_ok=True)
        finally:
            if not published:
                await asyncio.to_thread(_remove_if_empty, created)
        return RestoreResult(
            id=envelope.id,
            path=target,
            name=meta.name,
            kind=meta.kind,
            size=meta.size,
            sha256=meta.sha256,
            left_out=left_out,
        )

    @staticmethod
    def _prepare(target: Path) -> Path:
        """An empty temporary file beside ``target``, which must not exist yet."""
        if target.exists() or target.is_symlink():
            raise ConfigurationError(f"{target} already exists; refusing to overwrite it")
        _remove_stale_parts(target)
        fd, temporary = tempfile.mkstemp(prefix=_part_prefix(target), suffix=PART_SUFFIX, dir=target.parent)
        os.close(fd)
        return Path(temporary)

    @classmethod
    def _publish(cls, temporary: Path, target: Path, meta: BackupMetadata) -> list[LeftOut]:
        """Put the verified plaintext in place, never replacing what appeared there meanwhile; for a directory, the
        archive members it skipped.

        Raises:
            ConfigurationError: If something now exists at ``target`` (created during the download).
        """
        if meta.kind == "directory":
            return cls._publish_directory(temporary, target, meta.name)
        os.utime(temporary, (meta.mtime, meta.mtime))
        try:
            os.link(temporary, target)  # fails if the name exists, where a rename would replace it
        except FileExistsError:
            raise _appeared(target) from None
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # A file system without hard links (FAT, some network shares): check, then rename. Something created
            # between the two would be replaced; that window is the length of one system call, not of the download.
            if target.exists() or target.is_symlink():
                raise _appeared(target) from None
            temporary.rename(target)
        return []

    @staticmethod
    def _publish_directory(archive: Path, target: Path, name: str) -> list[LeftOut]:
        folder = Path(tempfile.mkdtemp(prefix=_part_prefix(target), suffix=PART_SUFFIX, dir=target.parent))
        try:
            left_out = extract_tar(archive, folder)
            entries = list(folder.iterdir())
            if [entry.name for entry in entries] != [name] or not entries[0].is_dir():
                raise IntegrityError("the backup's archive does not hold exactly the directory it names")
            # A rename replaces an empty directory: reserve the name first (mkdir fails if it exists), then rename
            # onto the reservation, which fails unless it is still the empty directory made here.
            try:
                target.mkdir()
            except FileExistsError:
                raise _appeared(target) from None
            try:
                entries[0].rename(target)
            except OSError as exc:
                if exc.errno in {errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR}:
                    raise _appeared(target) from None
                with contextlib.suppress(OSError):
                    target.rmdir()  # the reservation, still empty
                raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return left_out


#: What ends the name of a restore's temporary file or folder beside its destination.
PART_SUFFIX = ".zkeb-part"


def _part_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _remove_stale_parts(target: Path) -> None:
    """Remove the temporary files and folders that killed restores to ``target`` left beside it: named
    ``.NAME.<pid>.<random>.zkeb-part`` with a process id that no longer runs. A running restore's part, a part of
    another name (``.NAME.1.<pid>.<random>`` is NAME.1's) and one without a process id are left alone."""
    prefix = f".{target.name}."
    with os.scandir(target.parent) as entries:
        for entry in entries:
            if not (entry.name.startswith(prefix) and entry.name.endswith(PART_SUFFIX)):
                continue
            middle = entry.name[len(prefix) : -len(PART_SUFFIX)].split(".")
            if len(middle) != 2 or not middle[0].isdigit() or process_alive(int(middle[0])):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


#: What `os.link` fails with on a file system that has no hard links.
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


def _appeared(target: Path) -> ConfigurationError:
    return ConfigurationError(
        f"{target} appeared during the restore; refusing to overwrite it (the restored copy was discarded)"
    )


def _target_and_parents(destination: str, name: str) -> tuple[Path, list[Path]]:
    """Where the restore goes (``name`` inside ``destination`` when it is a directory or ends with a separator), its
    missing parents made."""
    folder = destination.endswith((os.sep, "/")) or Path(destination).is_dir()
    target = Path(destination) / name if folder else Path(destination)
    return target, _make_parents(target)


def _make_parents(target: Path) -> list[Path]:
    """Create ``target``'s missing parent directories; the ones this call created, outermost first."""
    missing = [folder for folder in reversed(target.parents) if not folder.is_dir()]
    created: list[Path] = []
    for folder in missing:
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # made by someone else meanwhile: not ours to remove
        created.append(folder)
    return created


def _remove_if_empty(created: list[Path]) -> None:
    """Remove the directories a failed restore created, innermost first, while they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (something else is in it now), or gone: leave it and its parents
