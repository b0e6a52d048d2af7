"""Backing up: encrypt, sign and upload a file's bytes, in one request when small and by tus when large.

A tus upload's metadata carries the payload's tag and signature, so a large file is read twice: a first pass
encrypts it to learn the tag and digests (the ciphertext is dropped), the second encrypts it again, with the same key
and nonce, while sending. The same plaintext gives the same ciphertext, which is also how a re-run resumes an
interrupted upload: the resume record keeps the nonce and envelope, and the first pass checks the file still has
the SHA-256 it had; a changed file abandons the old upload and starts afresh with a new nonce, so a nonce never
encrypts two different plaintexts. Memory stays at a few 1 MiB chunks whatever the size.

This is our own resumable transfer on httpx rather than a tus library: tus clients want a seekable file of
ciphertext (which would need a second copy of the data on disk), are synchronous or bring another HTTP stack, and
cannot produce the body on the fly from an encryptor; here the body is an async generator of freshly encrypted
chunks, and the protocol used (create, HEAD, PATCH from the offset) is small.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Literal

import httpx
import msgspec

from zkeb.client.crypto import (
    BackupMetadata,
    PayloadEncryptor,
    backup_signed_message,
    encrypt_metadata,
    new_nonce,
    rfc3339,
    seal_payload,
)
from zkeb.client.errors import ApiError, TransferError, ZkebClientError
from zkeb.client.keys import KeyFile
from zkeb.client.models import BackupResult
from zkeb.client.state import StateStore, UploadState
from zkeb.client.transport import RETRYABLE_STATUS, Transport, api_error, retry_after_seconds, transport_failure

__all__ = ("CHUNK_SIZE", "SINGLE_SHOT_THRESHOLD", "Progress", "Source", "Uploader")

CHUNK_SIZE = 1024 * 1024
SINGLE_SHOT_THRESHOLD = 8 * 1024 * 1024
TUS_HEADERS = {"Tus-Resumable": "1.0.0"}
BACKUP_ID_HEADER = "zkeb-backup-id"

#: Called with (bytes done, bytes in all) as a transfer advances.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Source:
    """What to back up: a readable, seekable binary stream of ``size`` bytes and how to describe it.

    Attributes:
        open: Opens the stream at its start (called once per pass).
        resume_id: Names the source for resume records (an absolute path); None means no resume.
        mtime_ns: The source's modification time, part of the quick "did it change" check.
        current: The source's (size, mtime_ns) now, for a source that can change under us (a file); checked before
            each PATCH so that bytes already shown to the server under this nonce are never re-sent from changed data.
    """

    open: Callable[[], AbstractContextManager[IO[bytes]]]
    size: int
    name: str
    kind: Literal["file", "directory"]
    mtime_ns: int
    resume_id: str | None = None
    current: Callable[[], tuple[int, int]] | None = None


@dataclass(frozen=True, slots=True)
class _Retry:
    """Why a PATCH is to be sent again: the error, the answer's status (None: the connection was lost), its
    `Retry-After` in seconds, and the server's offset a 409 named."""

    error: str
    status: int | None = None
    retry_after: float | None = None
    server_offset: int | None = None


def _chunks(handle: IO[bytes]) -> Iterator[bytes]:
    while chunk := handle.read(CHUNK_SIZE):
        yield chunk


def _read_all(source: Source, stop: threading.Event | None = None) -> Iterator[bytes]:
    """The source's bytes in chunks; cut short (an incomplete read, to be discarded) once ``stop`` is set."""
    with source.open() as handle:
        for chunk in _chunks(handle):
            if stop is not None and stop.is_set():
                return
            yield chunk


def tus_metadata(fields: dict[str, bytes]) -> str:
    """The `Upload-Metadata` header: each value base64 of its raw bytes, as tus requires."""
    return ",".join(f"{name} {base64.b64encode(value).decode()}" for name, value in fields.items())


class Uploader:
    """Backs up sources for one device into one project."""

    def __init__(
        self,
        transport: Transport,
        keys: KeyFile,
        project_id: uuid.UUID,
        states: StateStore,
        *,
        threshold: int = SINGLE_SHOT_THRESHOLD,
    ) -> None:
        self.transport = transport
        self.keys = keys
        self.project_id = project_id
        self.states = states
        self.threshold = threshold
        self._max_size: int | None = None

    async def max_upload_size(self) -> int:
        """The server's largest payload (`Tus-Max-Size` of `OPTIONS /api/v1/uploads`)."""
        if self._max_size is None:
            response = await self.transport.request("OPTIONS", "/api/v1/uploads", credential="none", expect=(200, 204))
            self._max_size = int(response.headers["tus-max-size"])
        return self._max_size

    def _sign(
        self,
        container_id: uuid.UUID,
        timestamp: datetime,
        *,
        nonce: bytes,
        tag: bytes,
        digest: bytes,
        size: int,
        metadata: tuple[bytes, bytes, bytes],
    ) -> bytes:
        message = backup_signed_message(
            project_id=self.project_id,
            container_id=container_id,
            device_id_hash=self.keys.device_id_hash,
            backup_timestamp=timestamp,
            payload_nonce=nonce,
            payload_auth_tag=tag,
            payload_sha256=digest,
            payload_size=size,
            metadata=metadata[0],
            metadata_nonce=metadata[1],
            metadata_auth_tag=metadata[2],
        )
        return self.keys.signing_key.sign(message)

    async def backup(self, source: Source, container_id: uuid.UUID, progress: Progress | None = None) -> BackupResult:
        """Encrypt, sign and upload ``source`` into ``container_id``.

        Raises:
            ZkebClientError: If the source is empty or larger than the server takes (before any upload), the source
                changed during the upload, or the server refused it (`ApiError`).
        """
        if source.size == 0:
            raise ZkebClientError(f"{source.name} is empty; a backup holds at least one byte")
        if source.size <= self.threshold:
            await self._check_size(source)
            return await self._single_shot(source, container_id, progress)
        return await self._tus(source, container_id, progress)

    async def _check_size(self, source: Source) -> None:
        limit = await self.max_upload_size()
        if source.size > limit:
            raise ZkebClientError(f"{source.name} is {source.size} bytes; the server takes at most {limit} bytes")

    async def _single_shot(self, source: Source, container_id: uuid.UUID, progress: Progress | None) -> BackupResult:
        nonce = new_nonce()
        encryptor = PayloadEncryptor(self.keys.backup_key, nonce)
        payload = b"".join(encryptor.update(chunk) for chunk in _read_all(source))
        tag = encryptor.finish()
        if encryptor.size != source.size or (
            source.current is not None and source.current() != (source.size, source.mtime_ns)
        ):
            raise ZkebClientError(f"{source.name} changed while it was being backed up; run the command again")
        plain_sha256 = encryptor.plain_sha256.hexdigest()
        metadata = encrypt_metadata(
            self.keys.backup_key,
            BackupMetadata(source.name, encryptor.size, source.mtime_ns / 1e9, plain_sha256, source.kind),
        )
        timestamp = datetime.now(UTC)
        digest = encryptor.cipher_sha256.digest()
        signature = self._sign(
            container_id, timestamp, nonce=nonce, tag=tag, digest=digest, size=len(payload), metadata=metadata
        )
        body = msgspec.msgpack.encode(
            {
                "container_id": str(container_id),
                "device_id_hash": self.keys.device_id_hash,
                "payload": payload,
                "payload_nonce": nonce,
                "payload_auth_tag": tag,
                "metadata": metadata[0],
                "metadata_nonce": metadata[1],
                "metadata_auth_tag": metadata[2],
                "signature": signature,
                "backup_timestamp": rfc3339(timestamp),
            }
        )
        try:
            response = await self.transport.request(
                "POST",
                "/api/v1/backups",
                content=body,
                headers={"Content-Type": "application/msgpack", "Accept": "application/json"},
                expect=(201,),
            )
        except ApiError as exc:
            if exc.backup_id is None:
                raise
            backup_id = exc.backup_id  # a retry: the attempt whose answer was lost committed this very envelope
        else:
            backup_id = uuid.UUID(response.json()["id"])
        if progress is not None:
            progress(len(payload), len(payload))
        return BackupResult(
            id=backup_id,
            container_id=container_id,
            name=source.name,
            kind=source.kind,
            size=encryptor.size,  # what was read and stored
            encrypted_size=len(payload),
            sha256=plain_sha256,
            transfer="single-shot",
        )

    def _new_state(self, source: Source, container_id: uuid.UUID, stop: threading.Event) -> UploadState:
        nonce = new_nonce()
        sealed = seal_payload(self.keys.backup_key, nonce, _read_all(source, stop))
        metadata = encrypt_metadata(
            self.keys.backup_key,
            BackupMetadata(source.name, sealed.size, source.mtime_ns / 1e9, sealed.plain_sha256.hex(), source.kind),
        )
        timestamp = datetime.now(UTC)
        signature = self._sign(
            container_id,
            timestamp,
            nonce=nonce,
            tag=sealed.tag,
            digest=sealed.cipher_sha256,
            size=sealed.size,
            metadata=metadata,
        )
        return UploadState(
            location="",
            source_size=source.size,
            source_mtime_ns=source.mtime_ns,
            plain_sha256=sealed.plain_sha256,
            payload_nonce=nonce,
            payload_auth_tag=sealed.tag,
            payload_sha256=sealed.cipher_sha256,
            payload_size=sealed.size,
            metadata=metadata[0],
            metadata_nonce=metadata[1],
            metadata_auth_tag=metadata[2],
            signature=signature,
            backup_timestamp=timestamp,
        )

    def _still_same(self, state: UploadState, source: Source) -> bool:
        """Whether ``source`` still encrypts, under the recorded nonce, to the recorded payload."""
        if state.source_size != source.size or state.source_mtime_ns != source.mtime_ns:
            return False
        sealed = seal_payload(self.keys.backup_key, state.payload_nonce, _read_all(source))
        return sealed.plain_sha256 == state.plain_sha256 and sealed.tag == state.payload_auth_tag

    async def _create(self, state: UploadState, container_id: uuid.UUID) -> str | uuid.UUID:
        """Create the upload of ``state``'s envelope: its URL, or the backup it was already committed as (§6.5).

        A creation retried after its answer was lost gets the same upload back (the server finds an identical one that
        has received nothing), so nothing is left behind.
        """
        fields = {
            "container_id": str(container_id).encode(),
            "device_id_hash": self.keys.device_id_hash,
            "payload_nonce": state.payload_nonce,
            "payload_auth_tag": state.payload_auth_tag,
            "metadata": state.metadata,
            "metadata_nonce": state.metadata_nonce,
            "metadata_auth_tag": state.metadata_auth_tag,
            "signature": state.signature,
            "backup_timestamp": rfc3339(state.backup_timestamp).encode(),
        }
        headers = {**TUS_HEADERS, "Upload-Length": str(state.payload_size), "Upload-Metadata": tus_metadata(fields)}
        try:
            response = await self.transport.request("POST", "/api/v1/uploads", headers=headers, expect=(201,))
        except ApiError as exc:
            if exc.backup_id is None:
                raise
            return exc.backup_id
        return self.transport.url(response.headers["location"])

    async def _resume_point(
        self, state: UploadState, container_id: uuid.UUID, key: str | None
    ) -> tuple[UploadState, int] | uuid.UUID:
        """Where to continue ``state``'s upload: its offset, or, when the upload is gone, the backup it became.

        An upload that is gone (completed, expired or purged) either was committed — its completing PATCH's answer was
        lost — and creating it again answers with that backup's id, or it was not, and the new upload starts from 0
        with the same envelope, so the same key and nonce encrypt the same bytes again.
        """
        found = await self._offset(state.location)
        if found is not None:
            return state, found
        created = await self._create(state, container_id)
        if isinstance(created, uuid.UUID):
            return created
        state = msgspec.structs.replace(state, location=created)
        if key is not None:
            self.states.save(key, state)
        return state, 0

    async def _offset(self, location: str) -> int | None:
        """The upload's offset on the server, or None when the upload is gone (finished, expired or purged)."""
        try:
            response = await self.transport.request("HEAD", location, headers=TUS_HEADERS)
        except ApiError as exc:
            if exc.status in {404, 410}:
                return None
            raise
        return int(response.headers["upload-offset"])

    async def _tus(self, source: Source, container_id: uuid.UUID, progress: Progress | None) -> BackupResult:
        key = None
        if source.resume_id is not None:
            key = self.states.key(
                server=self.transport.server,
                project_id=self.project_id,
                container_id=container_id,
                device_id_hash=self.keys.device_id_hash,
                source=source.resume_id,
            )
        recorded = self.states.load(key) if key is not None else None
        state: UploadState | None = None
        offset = 0
        committed: uuid.UUID | None = None
        if recorded is not None:
            point = await self._resume_recorded(recorded, source, container_id, key)
            if isinstance(point, uuid.UUID):
                state, committed, offset = recorded, point, recorded.payload_size
            elif point is not None:
                state, offset = point
        resumed_from = offset
        if state is None:
            fresh = await self._seal_and_prepare(source, container_id)
            created = await self._create(fresh, container_id)
            if isinstance(created, uuid.UUID):
                state, committed = fresh, created
            else:
                state = msgspec.structs.replace(fresh, location=created)
                if key is not None:
                    self.states.save(key, state)
        if committed is None:
            committed = await self._send_all(state, source, offset, progress, container_id=container_id, key=key)
        if key is not None:
            self.states.discard(key)
        return BackupResult(
            id=committed,
            container_id=container_id,
            name=source.name,
            kind=source.kind,
            size=source.size,
            encrypted_size=state.payload_size,
            sha256=state.plain_sha256.hex(),
            transfer="tus",
            resumed_from=resumed_from,
        )

    async def _resume_recorded(
        self, state: UploadState, source: Source, container_id: uuid.UUID, key: str | None
    ) -> tuple[UploadState, int] | uuid.UUID | None:
        """An earlier run's upload: where to continue it, the backup it became, or None to start afresh.

        A source that changed since abandons the old upload (a new nonce will encrypt the new bytes).
        """
        await self._check_size(source)
        if not await asyncio.to_thread(self._still_same, state, source):
            await self._abandon(state.location)
            return None
        try:
            return await self._resume_point(state, container_id, key)
        except ApiError as exc:
            if exc.status != 409:
                raise
            return None  # its nonce went to another envelope since (committed, then deleted): start afresh

    async def _seal_and_prepare(self, source: Source, container_id: uuid.UUID) -> UploadState:
        """A new upload's state from the sealing pass over the file.

        The round trips it does not depend on (the server's size limit, then the device token) go while it reads; a
        source over the limit stops it at its next chunk and is refused before anything is uploaded.
        """
        stop = threading.Event()
        sealing = asyncio.ensure_future(asyncio.to_thread(self._new_state, source, container_id, stop))
        try:
            await self._check_size(source)
            await self.transport.authorization()
        except BaseException:
            stop.set()
            await asyncio.wait([sealing])
            raise
        return await sealing

    async def _abandon(self, location: str) -> None:
        """Terminate an upload whose source changed (best effort: an expired one is gone anyway)."""
        try:
            await self.transport.request("DELETE", location, headers=TUS_HEADERS, expect=(204, 404, 410))
        except ZkebClientError:
            return

    async def _send_all(
        self,
        state: UploadState,
        source: Source,
        offset: int,
        progress: Progress | None,
        *,
        container_id: uuid.UUID,
        key: str | None,
    ) -> uuid.UUID:
        """PATCH the ciphertext from ``offset`` until the server commits, resuming after each failure.

        An upload found gone after a failure (its completing PATCH's answer lost, or expired) is asked about again by
        `_resume_point`: the backup it became, or a new upload of the same envelope from 0. Only failures in a row
        after which the server's offset did not advance count against the retry policy's attempts: a link that drops
        every few MiB still delivers the upload, while one that delivers nothing fails after ``attempts`` tries.

        A 429 refuses a PATCH before storing any of it, and a 503 usually does, so the offset is still the one sent:
        once the wait is over, the PATCH goes again from there without a HEAD (under a tight rate limit the HEAD
        would take the slot the wait freed, and the PATCH after it be refused again). A PATCH that stored some of its
        bytes before its 503 is answered 409 at the old offset, and the HEAD after that resumes it. A 429 does not
        count as a failure either (the server is pacing the client); ``max_rate_limited`` of them in a row end the
        upload.

        A 409 names the server's offset: the PATCH goes again from there at once. One ahead of the offset sent is
        progress, not a failure: the HEAD after a lost connection can answer before the server has recorded what the
        cut PATCH stored, and the PATCH sent from that stale offset learns the true one this way.
        """
        policy = self.transport.retry
        failures = 0
        rate_limited = 0
        while True:
            outcome = await self._attempt(state, source, offset, progress)
            if isinstance(outcome, uuid.UUID):
                return outcome
            error, status, retry_after = outcome.error, outcome.status, outcome.retry_after
            if outcome.server_offset is not None and outcome.server_offset > offset:
                offset, failures, rate_limited = outcome.server_offset, 0, 0
                continue
            if status == 429:
                wait = policy.delay(rate_limited, retry_after)
                rate_limited += 1
                if rate_limited >= policy.max_rate_limited:
                    raise TransferError(
                        f"the upload was refused as rate limited {rate_limited} times in a row ({error}); "
                        "run the same command again later to resume"
                    )
            else:
                wait = policy.delay(failures, retry_after)
                rate_limited = 0
                failures += 1
                if failures >= policy.attempts:
                    raise TransferError(f"the upload kept failing ({error}); run the same command again to resume")
            await asyncio.sleep(wait)
            if status in {429, 503}:
                continue
            point = await self._resume_point(state, container_id, key)
            if isinstance(point, uuid.UUID):
                return point
            previous, (state, offset) = offset, point
            if offset > previous:
                failures = 0  # the server kept what the failed PATCH sent: progress, not a failure

    async def _attempt(
        self, state: UploadState, source: Source, offset: int, progress: Progress | None
    ) -> uuid.UUID | _Retry:
        """One PATCH from ``offset``: the backup it committed, or why to retry.

        Raises:
            ApiError: If the server refused the PATCH for good.
            TransferError: If the request cannot be sent at all.
        """
        try:
            response = await self._patch(state, source, offset, progress)
        except httpx.LocalProtocolError as exc:
            raise TransferError(transport_failure(exc)) from None  # sending it again cannot help
        except httpx.TransportError as exc:
            return _Retry(transport_failure(exc))
        backup_id = response.headers.get(BACKUP_ID_HEADER)
        if response.status_code == 204 and backup_id is not None:
            return uuid.UUID(backup_id)
        if response.status_code not in {*RETRYABLE_STATUS, 204, 404, 409, 410}:
            raise api_error(response)
        server_offset = response.headers.get("upload-offset") if response.status_code == 409 else None
        return _Retry(
            str(api_error(response)),
            response.status_code,
            retry_after_seconds(response),
            int(server_offset) if server_offset is not None and server_offset.isdigit() else None,
        )

    async def _patch(
        self, state: UploadState, source: Source, offset: int, progress: Progress | None
    ) -> httpx.Response:
        total = state.payload_size
        if source.current is not None and source.current() != (state.source_size, state.source_mtime_ns):
            raise ZkebClientError(f"{source.name} changed while it was being backed up; run the command again")

        async def body() -> AsyncIterator[bytes]:
            encryptor = PayloadEncryptor(self.keys.backup_key, state.payload_nonce, digests=False)
            position, sent = 0, offset
            with source.open() as handle:
                for chunk in _chunks(handle):
                    ciphertext = encryptor.update(chunk)
                    end = position + len(ciphertext)
                    if end > offset:
                        piece = ciphertext[max(offset - position, 0) :]
                        yield piece
                        sent += len(piece)
                        if progress is not None:
                            progress(sent, total)
                    position = end
            if encryptor.finish() != state.payload_auth_tag or position != total:
                raise ZkebClientError(f"{source.name} changed while it was being backed up; run the command again")

        headers = {
            **TUS_HEADERS,
            **await self.transport.authorization(),
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": str(offset),
            "Content-Length": str(total - offset),
        }
        request = self.transport.build_request("PATCH", state.location, headers=headers, content=body())
        response = await self.transport.send_stream(request)
        await response.aread()
        await response.aclose()
        return response
