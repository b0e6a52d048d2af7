"""The SDK: `AsyncClient` (asyncio) and `Client` (blocking), one device's view of a ZKEB project.

Both do the same things on files, bytes and streams; `Client` runs an `AsyncClient` on its own event loop, so it
must not be used from inside a running loop (use `AsyncClient` there).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO, Literal, Self, TypeVar

import msgspec

from zkeb.client.archive import pack_directory
from zkeb.client.crypto import decrypt_metadata
from zkeb.client.errors import ApiError, ConfigurationError, ZkebClientError
from zkeb.client.keys import KeyFile
from zkeb.client.models import (
    BackupRecord,
    BackupResult,
    Enrollment,
    LeftOut,
    RestoreResult,
    ServerEnvelope,
    VerifyResult,
)
from zkeb.client.restores import Restorer
from zkeb.client.state import StateStore
from zkeb.client.transport import RetryPolicy, Transport
from zkeb.client.uploads import SINGLE_SHOT_THRESHOLD, Progress, Source, Uploader

__all__ = ("AsyncClient", "Client")

T = TypeVar("T")


class _Page(msgspec.Struct):
    items: list[ServerEnvelope]
    next_cursor: str | None


class _Device(Enrollment, frozen=True, kw_only=True):
    public_key: str
    revoked_at: datetime | None = None


class _DevicePage(msgspec.Struct):
    items: list[_Device]
    next_cursor: str | None


def _file_source(path: Path, name: str, kind: Literal["file", "directory"], resume_id: str | None) -> Source:
    def current() -> tuple[int, int]:
        now = path.stat()
        return now.st_size, now.st_mtime_ns

    size, mtime_ns = current()
    return Source(
        open=lambda: path.open("rb"),
        size=size,
        name=name,
        kind=kind,
        mtime_ns=mtime_ns,
        resume_id=resume_id,
        current=current,
    )


class AsyncClient:
    """A device's client for one ZKEB server and project.

    Args:
        server: The server's base URL, e.g. ``http://127.0.0.1:3000``.
        keys: The device's key file (needed for backup, restore, verify and enroll).
        api_key: An org-admin key (for `enroll`) or a project key (for ls/rm without a key file).
        project_id: The project; defaults to the one the key file was enrolled in.
        state_dir: Where unfinished uploads are recorded for resume (default: the XDG state directory).
        retry: Retry policy for connection loss, 408, 429, 502, 503 and 504.
        single_shot_threshold: Payloads up to this size go in one request; larger ones by tus.
    """

    def __init__(
        self,
        server: str,
        *,
        keys: KeyFile | None = None,
        api_key: str | None = None,
        project_id: uuid.UUID | None = None,
        state_dir: Path | None = None,
        retry: RetryPolicy | None = None,
        single_shot_threshold: int = SINGLE_SHOT_THRESHOLD,
    ) -> None:
        self.keys = keys
        self.project_id = project_id or (keys.project_id if keys is not None else None)
        self.transport = Transport(server, api_key=api_key, keys=keys, project_id=self.project_id, retry=retry)
        self.states = StateStore(state_dir)
        self.single_shot_threshold = single_shot_threshold

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.transport.aclose()

    def _device(self) -> tuple[KeyFile, uuid.UUID]:
        if self.keys is None:
            raise ConfigurationError("this needs the device's key file (--identity or ZKEB_IDENTITY)")
        if self.project_id is None:
            raise ConfigurationError("this needs the project id (--project or ZKEB_PROJECT, or `enroll` first)")
        return self.keys, self.project_id

    def _uploader(self) -> Uploader:
        keys, project_id = self._device()
        return Uploader(self.transport, keys, project_id, self.states, threshold=self.single_shot_threshold)

    def _restorer(self) -> Restorer:
        return Restorer(self.transport, self._device()[0])

    async def enroll(self, label: str | None = None) -> Enrollment:
        """Register this key file's device in the project (needs an org-admin API key).

        A device the project already has with this same public key (enrolled before, or a key file rebuilt from its
        recovery form) is that enrollment, not an error; another key under the same device id stays a 409 `ApiError`.

        Raises:
            ZkebClientError: If this device was enrolled and has since been revoked.
        """
        keys, project_id = self._device()
        public_key = base64.b64encode(keys.public_key).decode()
        try:
            response = await self.transport.request(
                "POST",
                f"/api/v1/projects/{project_id}/devices",
                credential="api_key",
                json={"device_id_hash": keys.device_id_hash.hex(), "public_key": public_key, "label": label},
                expect=(201,),
            )
        except ApiError as exc:
            # The server's 409 says only that the device id is taken: whether by this key, its device list tells.
            if exc.status != 409:
                raise
            found = await self._enrolled(project_id, keys.device_id_hash.hex(), public_key)
            if found is None:
                raise
            if found.revoked_at is not None:
                raise ZkebClientError(
                    f"this device was enrolled in project {project_id} and has been revoked; it cannot enroll again"
                ) from None
            return Enrollment(
                id=found.id, project_id=found.project_id, device_id_hash=found.device_id_hash, label=found.label
            )
        return msgspec.json.decode(response.content, type=Enrollment)

    async def _enrolled(self, project_id: uuid.UUID, device_id_hash: str, public_key: str) -> _Device | None:
        """The project's device with this id hash and public key, revoked or not; None when it has none."""
        params = {"limit": "100"}
        while True:
            response = await self.transport.request(
                "GET", f"/api/v1/projects/{project_id}/devices", credential="api_key", params=params
            )
            page = msgspec.json.decode(response.content, type=_DevicePage)
            for device in page.items:
                if device.device_id_hash == device_id_hash and device.public_key == public_key:
                    return device
            if page.next_cursor is None:
                return None
            params["cursor"] = page.next_cursor

    async def max_upload_size(self) -> int:
        """The largest payload the server takes."""
        return await self._uploader().max_upload_size()

    async def backup_file(
        self, path: str | os.PathLike[str], container_id: uuid.UUID, progress: Progress | None = None
    ) -> BackupResult:
        """Back up a file, or a directory as a tar stream; an interrupted call, repeated, resumes.

        A directory's special files (FIFOs, sockets, devices) hold no data: they are left out, and named in the
        result's ``left_out``.
        """
        uploader = self._uploader()
        limit = None
        if await asyncio.to_thread(Path(path).is_dir):
            # Packing copies the whole tree: a server that is down, a device it refuses or a tree over its size limit
            # fails first, not after the copy.
            limit = await uploader.max_upload_size()
            await self.transport.authorization()
        stop = threading.Event()
        try:
            source, pack_key, left_out = await asyncio.to_thread(
                self._source, Path(path), uploader, container_id, limit, stop
            )
        except BaseException:
            stop.set()  # cancelled: the packing thread stops at its next entry and removes its partial pack
            raise
        try:
            result = await uploader.backup(source, container_id, progress)
        except BaseException:
            if pack_key is not None and self.states.load(pack_key) is None:
                self.states.discard(pack_key)  # no upload to resume: the plaintext copy goes
            raise
        if pack_key is not None:
            self.states.discard(pack_key)  # the directory's tar stream, once backed up
        return msgspec.structs.replace(result, left_out=left_out) if left_out else result

    def _source(
        self, path: Path, uploader: Uploader, container_id: uuid.UUID, limit: int | None, stop: threading.Event
    ) -> tuple[Source, str | None, list[LeftOut]]:
        """A file as it is; a directory packed (reproducibly) into a tar file in the state directory, its key, and
        the special files left out of it. Packing stops once the pack would pass ``limit`` or ``stop`` is set."""
        self.states.remove_stale_packs()
        absolute = path.absolute()
        if not absolute.is_dir():
            if not absolute.is_file():
                raise ConfigurationError(f"{path} is not a file or directory")
            return _file_source(absolute, absolute.name, "file", str(absolute)), None, []
        resume_id = f"dir:{absolute}"
        key = self.states.key(
            server=self.transport.server,
            project_id=uploader.project_id,
            container_id=container_id,
            device_id_hash=uploader.keys.device_id_hash,
            source=resume_id,
        )
        pack = self.states.scratch(key)
        temporary = pack.with_suffix(f".{os.getpid()}.tmp")
        try:
            left_out = pack_directory(absolute, temporary, state_dir=self.states.root, limit=limit, stop=stop)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        # The same bytes as the last run's pack give the same ciphertext: keep the old pack (and its mtime) to resume.
        if pack.exists() and _same_content(pack, temporary):
            temporary.unlink()
        else:
            temporary.replace(pack)
        return _file_source(pack, absolute.name, "directory", resume_id), key, left_out

    async def backup_bytes(
        self, data: bytes, container_id: uuid.UUID, name: str = "data", progress: Progress | None = None
    ) -> BackupResult:
        """Back up bytes held in memory."""
        source = Source(open=lambda: io.BytesIO(data), size=len(data), name=name, kind="file", mtime_ns=0)
        return await self._uploader().backup(source, container_id, progress)

    async def backup_stream(
        self, stream: BinaryIO, container_id: uuid.UUID, name: str = "stream", progress: Progress | None = None
    ) -> BackupResult:
        """Back up a binary stream; one that cannot seek is spooled to a temporary file first (read twice)."""
        if stream.seekable():
            start = stream.tell()
            size = stream.seek(0, io.SEEK_END) - start

            def reopen() -> AbstractContextManager[IO[bytes]]:
                stream.seek(start)
                return nullcontext(stream)  # the caller's stream: each pass rewinds it, none closes it

            source = Source(open=reopen, size=size, name=name, kind="file", mtime_ns=0)
            return await self._uploader().backup(source, container_id, progress)
        with tempfile.TemporaryFile() as spool:
            await asyncio.to_thread(shutil.copyfileobj, stream, spool, 1024 * 1024)
            spool.seek(0)
            return await self.backup_stream(spool, container_id, name, progress)

    async def envelope(
        self, backup_id: uuid.UUID | None = None, *, container_id: uuid.UUID | None = None
    ) -> ServerEnvelope:
        """A backup's stored envelope, by id or as the newest in ``container_id``."""
        restorer = self._restorer()
        if backup_id is not None:
            return await restorer.envelope(backup_id)
        if container_id is None:
            raise ConfigurationError("give a backup id, or a container for the latest backup")
        return await restorer.latest(container_id)

    async def restore_file(
        self,
        backup_id: uuid.UUID | None,
        destination: str | os.PathLike[str],
        *,
        container_id: uuid.UUID | None = None,
        progress: Progress | None = None,
    ) -> RestoreResult:
        """Restore a backup (``backup_id``, or the latest in ``container_id``) to a path, atomically: inside it, under
        the backup's name, when it is a directory or is written with a trailing separator (made if missing)."""
        envelope = await self.envelope(backup_id, container_id=container_id)
        return await self._restorer().to_path(envelope, destination, progress)

    async def restore_stream(
        self, backup_id: uuid.UUID, sink: BinaryIO, progress: Progress | None = None
    ) -> RestoreResult:
        """Decrypt a backup into ``sink``; the bytes are authentic only once this returns (else discard them)."""
        return await self._restorer().to_stream(await self.envelope(backup_id), sink, progress)

    async def restore_bytes(self, backup_id: uuid.UUID, progress: Progress | None = None) -> bytes:
        """A backup's plaintext in memory (a directory backup's is its tar stream)."""
        buffer = io.BytesIO()
        await self.restore_stream(backup_id, buffer, progress)
        return buffer.getvalue()

    async def verify(self, backup_id: uuid.UUID, progress: Progress | None = None) -> VerifyResult:
        """Download a backup and check its signature, digest and decryption, writing nothing."""
        return await self._restorer().verify(await self.envelope(backup_id), progress)

    async def list(self, container_id: uuid.UUID | None = None) -> list[BackupRecord]:
        """Backups, newest first (a device token sees its own device's; a project key every device's)."""
        records: list[BackupRecord] = []
        params: dict[str, str] = {"limit": "100"}
        if container_id is not None:
            params["container_id"] = str(container_id)
        while True:
            response = await self.transport.request(
                "GET", "/api/v1/backups", params=params, headers={"Accept": "application/json"}
            )
            page = msgspec.json.decode(response.content, type=_Page)
            records.extend(self._record(item) for item in page.items)
            if page.next_cursor is None:
                return records
            params["cursor"] = page.next_cursor

    def _record(self, envelope: ServerEnvelope) -> BackupRecord:
        name = size = kind = None
        if self.keys is not None and envelope.device_id_hash == self.keys.device_id_hash.hex():
            try:
                meta = decrypt_metadata(
                    self.keys.backup_key, envelope.metadata, envelope.metadata_nonce, envelope.metadata_auth_tag
                )
            except ZkebClientError:
                pass
            else:
                name, size, kind = meta.name, meta.size, meta.kind
        return BackupRecord(
            id=envelope.id,
            container_id=envelope.container_id,
            device_id_hash=envelope.device_id_hash,
            created_at=envelope.created_at,
            encrypted_size=envelope.encrypted_payload_size,
            name=name,
            size=size,
            kind=kind,
        )

    async def delete(self, backup_id: uuid.UUID) -> None:
        """Move a backup to the project's trash (an org admin can bring it back or purge it).

        A retry whose earlier attempt may have reached the server takes its `404` as done: that attempt moved it.
        """
        await self.transport.request("DELETE", f"/api/v1/backups/{backup_id}", expect=(204,), after_lost_answer=(404,))


def _same_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as left, b.open("rb") as right:
        while True:
            chunk = left.read(1024 * 1024)
            if chunk != right.read(1024 * 1024):
                return False
            if not chunk:
                return True


class Client:
    """The blocking SDK: each method runs the `AsyncClient` method of the same name to completion.

    Use as a context manager, or call `close()`.
    """

    def __init__(self, server: str, **options: Any) -> None:
        self._runner = asyncio.Runner()
        self._client = self._runner.run(_make(server, options))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool and the event loop."""
        self._runner.run(self._client.aclose())
        self._runner.close()

    def _run(self, call: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        return self._runner.run(call(*args, **kwargs))

    def enroll(self, label: str | None = None) -> Enrollment:
        """See `AsyncClient.enroll`."""
        return self._run(self._client.enroll, label)

    def max_upload_size(self) -> int:
        """See `AsyncClient.max_upload_size`."""
        return self._run(self._client.max_upload_size)

    def backup_file(
        self, path: str | os.PathLike[str], container_id: uuid.UUID, progress: Progress | None = None
    ) -> BackupResult:
        """See `AsyncClient.backup_file`."""
        return self._run(self._client.backup_file, path, container_id, progress)

    def backup_bytes(
        self, data: bytes, container_id: uuid.UUID, name: str = "data", progress: Progress | None = None
    ) -> BackupResult:
        """See `AsyncClient.backup_bytes`."""
        return self._run(self._client.backup_bytes, data, container_id, name, progress)

    def backup_stream(
        self, stream: BinaryIO, container_id: uuid.UUID, name: str = "stream", progress: Progress | None = None
    ) -> BackupResult:
        """See `AsyncClient.backup_stream`."""
        return self._run(self._client.backup_stream, stream, container_id, name, progress)

    def restore_file(
        self,
        backup_id: uuid.UUID | None,
        destination: str | os.PathLike[str],
        *,
        container_id: uuid.UUID | None = None,
        progress: Progress | None = None,
    ) -> RestoreResult:
        """See `AsyncClient.restore_file`."""
        return self._run(
            self._client.restore_file, backup_id, destination, container_id=container_id, progress=progress
        )

    def restore_stream(self, backup_id: uuid.UUID, sink: BinaryIO, progress: Progress | None = None) -> RestoreResult:
        """See `AsyncClient.restore_stream`."""
        return self._run(self._client.restore_stream, backup_id, sink, progress)

    def restore_bytes(self, backup_id: uuid.UUID, progress: Progress | None = None) -> bytes:
        """See `AsyncClient.restore_bytes`."""
        return self._run(self._client.restore_bytes, backup_id, progress)

    def verify(self, backup_id: uuid.UUID, progress: Progress | None = None) -> VerifyResult:
        """See `AsyncClient.verify`."""
        return self._run(self._client.verify, backup_id, progress)

    def list(self, container_id: uuid.UUID | None = None) -> list[BackupRecord]:
        """See `AsyncClient.list`."""
        return self._run(self._client.list, container_id)

    def delete(self, backup_id: uuid.UUID) -> None:
        """See `AsyncClient.delete`."""
        self._run(self._client.delete, backup_id)


async def _make(server: str, options: dict[str, Any]) -> AsyncClient:
    # httpx binds its pool to the loop it is first used on: build the client on the runner's loop.
    return AsyncClient(server, **options)
