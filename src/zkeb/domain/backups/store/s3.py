"""Encrypted payload chunks as objects in an S3-compatible bucket (docs/storage.md).

One object per at-rest chunk, at `{prefix}payloads/{organization_id}/{payload_id}/{seq:08d}`, holding exactly the
bytes the PostgreSQL store keeps in `backup_chunks.data` (AES-GCM under the payload's data key): nothing else goes to
the bucket, no metadata, no key. Writes are conditional (`If-None-Match: *`), so a chunk is never overwritten.

Two clients share the bucket: aiobotocore for everything but reading chunks (conditional puts, lists, deletes, the
start-up check), and obstore (Rust's `object_store`) for the GETs of restores, which receives each object outside
the event loop and without the GIL, at about two thirds of aiobotocore's CPU per byte. Both sign with the
credentials of botocore's standard chain.

Every failure of the store (an error status, a timeout, no connection) is a `PayloadStoreUnavailableError`, a 503
for the client, with a message naming the operation and never a key, body or credential. A store that refuses a
write for lack of room (a MinIO drive past its free-space threshold, a MinIO or Ceph quota) is a
`PayloadStoreFullError`, a 507, as a full PostgreSQL is.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from uuid import UUID

import obstore
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from obstore.exceptions import BaseError as ObstoreError
from obstore.store import S3Store

from zkeb.core.errors import ServiceUnavailableError
from zkeb.domain.backups.store.connection import raw_tenant_transaction
from zkeb.domain.backups.store.payloads import (
    Blob,
    ChunkWrite,
    Handover,
    PayloadStore,
    RowsHook,
    StoredChunksMissingError,
    StoreKind,
    delete_chunk_rows_from,
    insert_chunk_rows,
)
from zkeb.settings import PayloadStoreSettings

if TYPE_CHECKING:
    import asyncpg
    from obstore.store import ClientConfig, S3Credential
    from sqlalchemy.ext.asyncio import AsyncEngine
    from types_aiobotocore_s3 import S3Client

__all__ = (
    "ChunkConflictError",
    "ChunkMissingError",
    "PayloadStoreFullError",
    "PayloadStoreUnavailableError",
    "S3ChunkStore",
    "S3PayloadStore",
    "StoredObject",
)

logger = logging.getLogger("zkeb.backups.s3")

#: Plaintext bytes per chunk object of new payloads. Every request to an object store has a fixed cost (signing,
#: a round trip, the store's own per-object work), so larger objects move bytes faster and cost fewer requests;
#: but a chunk is also the unit held in memory, encrypted and authenticated at once, and what a small Range read
#: fetches. 4 MiB: against 1 MiB, bench/upload.py --store s3 restores about twice as fast and uploads faster, for
#: about 20 MiB more memory per upload or restore in flight (docs/storage.md, section 2).
S3_CHUNK_SIZE = 4 << 20
#: Objects fetched or stored at once by one call (a batch of the pipelines is a few chunks).
CONCURRENCY = 8
#: Chunk objects a restore fetches ahead of the one it sends next (memory: about this many chunks per restore).
READ_AHEAD = 4
#: The longest one chunk GET may take, however steadily its bytes come (4 MiB in 10 minutes is about 7 KB/s).
OBJECT_DEADLINE = timedelta(minutes=10)
#: How long obstore may sign with credentials before asking botocore's chain again (which refreshes expiring ones).
#: obstore asks again once less than 5 minutes of a credential's life are left, so this must be well above that.
CREDENTIALS_REUSE = timedelta(minutes=15)
#: The key a read check GETs, beside the payloads (where a bucket policy scoped to them allows reads): never written,
#: so a working store answers 404 (a 403 without `s3:ListBucket`, which the store needs anyway for its cleanups).
_READ_CHECK_KEY = "payloads/zkeb-read-check"
#: Times a batch's PUTs are tried when keys are taken by a writer that lost the payload (`write_batch`). Such a
#: writer has one PUT per chunk in flight, which botocore may send again; past this, the client is told to retry.
CONFLICT_ATTEMPTS = 3
#: Keys per DeleteObjects request (the S3 API's maximum).
DELETE_BATCH = 1000
_SEQ_DIGITS = 8
#: Error codes of a store out of room: MinIO's drive past its free-space threshold (507) and bucket quota (400),
#: Ceph RGW's bucket or user quota (403). Any 507 (Insufficient Storage) counts too.
_STORE_FULL_CODES = frozenset({"XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "QuotaExceeded"})


class PayloadStoreUnavailableError(ServiceUnavailableError):
    """The object store failed or could not be reached; the client may retry (503, `Retry-After: 5`)."""

    def __init__(self, detail: str = "", *, headers: dict[str, str] | None = None) -> None:
        # botocore has already retried a few times within the request: come back in seconds, not at once.
        super().__init__(detail, headers={"Retry-After": "5", **(headers or {})})


class PayloadStoreFullError(PayloadStoreUnavailableError):
    """The object store refused a write for lack of room; nothing was stored, retry once an operator made room (507)."""

    status_code: int = 507


class ChunkConflictError(PayloadStoreUnavailableError):
    """A conditional PUT found the chunk's key taken: another writer got there first."""


class ChunkMissingError(StoredChunksMissingError, PayloadStoreUnavailableError):
    """A chunk the database lists has no object."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One chunk object found in the bucket."""

    organization_id: UUID
    payload_id: UUID
    seq: int
    size: int
    #: When the object was written (the reconciler's age of an orphan); not part of its identity.
    last_modified: datetime | None = field(default=None, compare=False)


class S3ChunkStore:
    """Puts, gets, deletes and lists the chunk objects of payloads in one bucket under one prefix.

    Use as an async context manager (it opens its two clients, each with its connection pool, for the process).
    """

    def __init__(self, settings: PayloadStoreSettings, *, connect_timeout: float = 5.0, read_timeout: float = 30.0):
        """Prepare a client for `settings` (credentials from botocore's standard chain)."""
        self._settings = settings
        self._config = AioConfig(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": 3},
            max_pool_connections=32,
            # No CRC32 of every body on PUT and GET: each chunk is AES-GCM, whose tag already authenticates every
            # byte on read (a corrupted object fails the restore), while botocore's CRC32 of each body, fed in small
            # pieces, was about 5 % of the worker's CPU on a restore (py-spy). Operations the S3 API requires a
            # checksum for (DeleteObjects) still send one.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._timeouts = (connect_timeout, read_timeout)
        self._session: AioSession | None = None
        self._client: S3Client | None = None
        self._reader: S3Store | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> S3ChunkStore:
        """Open the clients."""
        stack = contextlib.AsyncExitStack()
        self._session = get_session()
        self._client = await stack.enter_async_context(
            self._session.create_client(
                "s3",
                region_name=self._settings.region,
                endpoint_url=self._settings.endpoint_url,
                config=self._config,
            )
        )
        # The endpoint botocore resolved (S3_ENDPOINT_URL, else `AWS_ENDPOINT_URL*` or AWS's regional one), so both
        # clients always talk to the same store; path-style requests, which every S3-compatible store serves. The
        # same limits as botocore's: 3 attempts, the same connect timeout, and the read timeout between two reads of
        # a response (obstore's own default, 30 s for a whole request, would fail a slow but moving transfer; its
        # bound here is `OBJECT_DEADLINE`).
        # A private CA botocore trusts (`AWS_CA_BUNDLE`, `ca_bundle` in the AWS config) is trusted for reads too; the
        # addressing and signing are pinned, so that obstore's own `AWS_*` variables cannot make them differ.
        endpoint = self._client.meta.endpoint_url
        connect_timeout, read_timeout = self._timeouts
        client_options: ClientConfig = {
            "allow_http": endpoint.lower().startswith("http://"),
            "connect_timeout": timedelta(seconds=connect_timeout),
            "read_timeout": timedelta(seconds=read_timeout),
            "timeout": OBJECT_DEADLINE,
        }
        ca_bundle = self._session.get_config_variable("ca_bundle")
        if ca_bundle:
            client_options["root_certificate"] = await asyncio.to_thread(Path(ca_bundle).read_bytes)
        self._reader = S3Store(
            self.bucket,
            region=self._settings.region,
            endpoint=endpoint,
            virtual_hosted_style_request=False,
            skip_signature=False,
            credential_provider=self._credentials,
            client_options=client_options,
            retry_config={"max_retries": 2, "retry_timeout": timedelta(seconds=3 * read_timeout)},
        )
        self._stack = stack
        return self

    async def _credentials(self) -> S3Credential:
        """botocore's credentials, for obstore's reads (the chain refreshes a role's before they expire)."""
        if self._session is None:
            raise RuntimeError("the S3 chunk store is not open")
        credentials = await self._session.get_credentials()
        if credentials is None:
            raise NoCredentialsError
        frozen = await credentials.get_frozen_credentials()
        if frozen.access_key is None or frozen.secret_key is None:
            raise NoCredentialsError
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": datetime.now(UTC) + CREDENTIALS_REUSE,
        }

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the clients and their connections."""
        await self.close()

    async def close(self) -> None:
        """Close the clients and their connections (nothing when they are not open)."""
        stack, self._stack, self._client, self._reader = self._stack, None, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def _s3(self) -> S3Client:
        if self._client is None:
            raise RuntimeError("the S3 chunk store is not open")
        return self._client

    @property
    def bucket(self) -> str:
        """The bucket's name."""
        return self._settings.bucket

    def payload_prefix(self, organization_id: UUID, payload_id: UUID) -> str:
        """The key prefix of one payload's chunks."""
        return f"{self._settings.prefix}payloads/{organization_id}/{payload_id}/"

    def key(self, organization_id: UUID, payload_id: UUID, seq: int) -> str:
        """The key of chunk `seq` of a payload."""
        return f"{self.payload_prefix(organization_id, payload_id)}{seq:0{_SEQ_DIGITS}d}"

    async def check(self) -> None:
        """Raise unless the bucket exists and the credentials may use it.

        Raises:
            PayloadStoreUnavailableError: the message says what is wrong, in one line.
        """
        try:
            await self._s3.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = _status(exc)
            if status == 404:
                reason = "does not exist"
            elif status in {401, 403}:
                reason = "refuses these credentials (403)"
            else:
                reason = f"answered {status or _code(exc)}"
            raise PayloadStoreUnavailableError(f"the S3 bucket {self.bucket!r} {reason}") from None
        except NoCredentialsError:
            raise PayloadStoreUnavailableError(
                "no AWS credentials found (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a role)"
            ) from None
        except BotoCoreError as exc:
            raise PayloadStoreUnavailableError(f"cannot reach the S3 store: {_describe(exc)}") from None

    async def check_reads(self) -> None:
        """Raise unless a read goes through obstore (a GET of a key never written answers 404).

        The reads have their own client: a region that AWS redirects (botocore follows the redirect, obstore does
        not) or a certificate only one of them trusts would let uploads through and fail every restore. Not for the
        process that forks the workers: obstore's first request starts threads a forked child would lack.

        Raises:
            PayloadStoreUnavailableError: the message says what is wrong, in one line.
        """
        if self._reader is None:
            raise RuntimeError("the S3 chunk store is not open")
        try:
            await obstore.get_async(self._reader, f"{self._settings.prefix}{_READ_CHECK_KEY}")
        except FileNotFoundError:
            return
        except (ObstoreError, OSError) as exc:
            raise PayloadStoreUnavailableError(f"the S3 store refuses reads: {_describe(exc)}") from None

    async def put_chunk(self, organization_id: UUID, payload_id: UUID, seq: int, blob: bytes | memoryview) -> None:
        """Store chunk `seq`, refusing to overwrite an existing object.

        Raises:
            ChunkConflictError: the key already holds an object.
            PayloadStoreUnavailableError: the store failed.
        """
        try:
            await self._s3.put_object(
                Bucket=self.bucket,
                Key=self.key(organization_id, payload_id, seq),
                Body=bytes(blob),
                IfNoneMatch="*",
            )
        except ClientError as exc:
            if _status(exc) == 412:
                raise ChunkConflictError(f"chunk {seq} of the payload is already stored") from None
            raise _unavailable("store a chunk", exc) from None
        except BotoCoreError as exc:
            raise _unavailable("store a chunk", exc) from None

    async def put_chunks(
        self, organization_id: UUID, payload_id: UUID, chunks: Sequence[tuple[int, bytes | memoryview]]
    ) -> None:
        """Store several chunks concurrently (see `put_chunk`); all are stored when this returns.

        Raises:
            ChunkConflictError: a key already holds an object (the others are stored).
            PayloadStoreUnavailableError: the store failed.
        """
        if taken := await self.put_chunks_where_free(organization_id, payload_id, chunks):
            raise ChunkConflictError(f"chunk {taken[0]} of the payload is already stored")

    async def put_chunks_where_free(
        self, organization_id: UUID, payload_id: UUID, chunks: Sequence[tuple[int, bytes | memoryview]]
    ) -> list[int]:
        """Store several chunks concurrently, none over an existing object; the seqs whose key was taken, in order.

        Raises:
            PayloadStoreUnavailableError: the store failed.
        """

        async def put(seq: int, blob: bytes | memoryview) -> int | None:
            try:
                await self.put_chunk(organization_id, payload_id, seq, blob)
            except ChunkConflictError:
                return seq
            return None

        stored = await _gather_limited([put(seq, blob) for seq, blob in chunks], CONCURRENCY)
        return [seq for seq in stored if seq is not None]

    async def get_chunk(self, organization_id: UUID, payload_id: UUID, seq: int) -> memoryview:
        """The stored bytes of chunk `seq` (a view of the buffer obstore received them into, no copy).

        Raises:
            ChunkMissingError: there is no such object.
            PayloadStoreUnavailableError: the store failed.
        """
        if self._reader is None:
            raise RuntimeError("the S3 chunk store is not open")
        try:
            found = await obstore.get_async(self._reader, self.key(organization_id, payload_id, seq))
            return memoryview(await found.bytes_async())
        except FileNotFoundError:  # obstore's "not found" (a 404)
            raise ChunkMissingError(f"chunk {seq} of the payload is missing from the object store") from None
        except (ObstoreError, OSError) as exc:
            raise _unavailable("read a chunk", exc) from None

    async def get_chunks(self, organization_id: UUID, payload_id: UUID, seqs: Sequence[int]) -> list[Blob]:
        """The stored bytes of several chunks, fetched concurrently, in the order of `seqs`."""
        return await _gather_limited([self.get_chunk(organization_id, payload_id, seq) for seq in seqs], CONCURRENCY)

    async def list_payload(self, organization_id: UUID, payload_id: UUID) -> list[StoredObject]:
        """The chunk objects of one payload, by sequence number."""
        found = [obj async for obj in self._list(self.payload_prefix(organization_id, payload_id))]
        return sorted(found, key=lambda obj: obj.seq)

    async def list_all(self) -> AsyncIterator[StoredObject]:
        """Every chunk object under the prefix (for the reconciler); keys that are not chunks are skipped."""
        async for obj in self._list(f"{self._settings.prefix}payloads/"):
            yield obj

    async def list_organization(self, organization_id: UUID) -> AsyncIterator[StoredObject]:
        """The chunk objects of one organization, in key order (payload id, then `seq`), a listing page at a time."""
        async for obj in self._list(f"{self._settings.prefix}payloads/{organization_id}/"):
            yield obj

    async def list_organizations(self) -> AsyncIterator[UUID]:
        """The organizations that have objects under the prefix (one `/`-delimited listing, a page at a time)."""
        paginator = self._s3.get_paginator("list_objects_v2")
        root = f"{self._settings.prefix}payloads/"
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=root, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    with contextlib.suppress(ValueError):
                        yield UUID(common.get("Prefix", "").removeprefix(root).rstrip("/"))
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable("list chunks", exc) from None

    async def delete_objects(self, objects: Sequence[StoredObject]) -> None:
        """Delete these chunk objects (the reconciler's orphans)."""
        await self._delete_keys([self.key(obj.organization_id, obj.payload_id, obj.seq) for obj in objects])

    async def delete_chunks_from(self, organization_id: UUID, payload_id: UUID, first_seq: int) -> int:
        """Delete the payload's chunk objects with `seq >= first_seq` (written past an acknowledged offset).

        Returns:
            How many objects were deleted.
        """
        stored = await self.list_payload(organization_id, payload_id)
        keys = [self.key(organization_id, payload_id, obj.seq) for obj in stored if obj.seq >= first_seq]
        await self._delete_keys(keys)
        return len(keys)

    async def delete_chunks(self, organization_id: UUID, payload_id: UUID, seqs: Sequence[int]) -> None:
        """Delete the payload's chunk objects `seqs` (deleting one that is not there is no error)."""
        await self._delete_keys([self.key(organization_id, payload_id, seq) for seq in seqs])

    async def delete_payload(self, organization_id: UUID, payload_id: UUID) -> int:
        """Delete every chunk object of a payload; how many there were."""
        return await self.delete_chunks_from(organization_id, payload_id, 0)

    async def _delete_keys(self, keys: Sequence[str]) -> None:
        for first in range(0, len(keys), DELETE_BATCH):
            batch = keys[first : first + DELETE_BATCH]
            try:
                response = await self._s3.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                raise _unavailable("delete chunks", exc) from None
            if errors := response.get("Errors"):
                raise PayloadStoreUnavailableError(
                    f"the object store refused to delete {len(errors)} chunk(s): {errors[0].get('Code', 'unknown')}"
                )

    async def _list(self, prefix: str) -> AsyncIterator[StoredObject]:
        paginator = self._s3.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    parsed = self._parse_key(item.get("Key", ""), item.get("Size", 0), item.get("LastModified"))
                    if parsed is not None:
                        yield parsed
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable("list chunks", exc) from None

    def _parse_key(self, key: str, size: int, last_modified: datetime | None) -> StoredObject | None:
        parts = key.removeprefix(self._settings.prefix).split("/")
        if len(parts) != 4 or parts[0] != "payloads" or len(parts[3]) != _SEQ_DIGITS or not parts[3].isdigit():
            return None
        try:
            return StoredObject(UUID(parts[1]), UUID(parts[2]), int(parts[3]), size, last_modified)
        except ValueError:
            return None


class S3PayloadStore(PayloadStore):
    """Chunk bytes as objects (`S3ChunkStore`), rows in PostgreSQL with an empty `data` (docs/storage.md).

    A batch's objects are stored before its rows are committed, so a row always has its object; an object without
    a row (a PATCH that died in between) is deleted by the next claim of the upload.
    """

    kind: ClassVar[StoreKind] = "s3"
    stages_bytes: ClassVar[bool] = True
    chunk_size: ClassVar[int] = S3_CHUNK_SIZE

    def __init__(self, objects: S3ChunkStore, *, check_timeout: float = 5.0) -> None:
        """Store chunk bytes through `objects` (opened and closed by the owner)."""
        self.objects = objects
        self._check_timeout = check_timeout

    async def write_batch(
        self,
        connection: asyncpg.Connection,
        *,
        organization_id: UUID,
        payload_id: UUID,
        chunks: Sequence[ChunkWrite],
        before_rows: RowsHook | None = None,
        fence: RowsHook | None = None,
    ) -> None:
        """PUT the objects (conditionally), then commit the rows (see `PayloadStore.write_batch`).

        A key already taken holds what a writer that lost the payload put after this one took it over (a PATCH
        whose retry claimed the upload while its PUT was in flight: the claim cleared the objects past the offset
        before that PUT landed), or this writer's own PUT that the client retried after its answer was lost. It has
        no row, and can get none (that writer's rows fail its lease), so with `fence` it is replaced: deleted while
        `fence` holds the payload for this writer, so that no later writer's object is ever deleted, then PUT
        again. A writer that lost the payload itself finds out there, from `fence`.
        """
        pending = list(chunks)
        for attempt in range(CONFLICT_ATTEMPTS):
            taken = await self.objects.put_chunks_where_free(
                organization_id, payload_id, [(c.seq, c.blob) for c in pending]
            )
            if not taken:
                break
            if fence is None or attempt == CONFLICT_ATTEMPTS - 1:
                raise ChunkConflictError(f"chunk {taken[0]} of the payload is already stored")
            async with raw_tenant_transaction(connection, organization_id):
                await fence(connection)
                await self.objects.delete_chunks(organization_id, payload_id, taken)
            logger.info("payload %s: replaced %d chunk object(s) left by a writer that lost it", payload_id, len(taken))
            replaced = set(taken)
            pending = [chunk for chunk in pending if chunk.seq in replaced]
        # Not flushed here: the synchronous commit that makes the backup visible flushes these rows too.
        async with raw_tenant_transaction(connection, organization_id, synchronous_commit=False):
            if before_rows is not None:
                await before_rows(connection)
            await insert_chunk_rows(
                connection, organization_id=organization_id, payload_id=payload_id, chunks=chunks, keep_bytes=False
            )

    async def read_batches(
        self,
        engine: AsyncEngine,  # noqa: ARG002 - the interface's: objects need no database connection
        *,
        organization_id: UUID,
        payload_id: UUID,
        seqs: Sequence[int],
        handover: Handover,
    ) -> None:
        """Up to `READ_AHEAD` objects in flight, each handed over in order as soon as it and those before it are in.

        A sliding window, not batches: a GET's latency (per request, on any object store) overlaps the others'
        instead of the slowest of a batch holding the next one back. No database connection is held.
        """
        pending: deque[asyncio.Task[memoryview]] = deque()
        following = iter(seqs)
        try:
            while True:
                for seq in itertools.islice(following, READ_AHEAD - len(pending)):
                    pending.append(asyncio.ensure_future(self.objects.get_chunk(organization_id, payload_id, seq)))
                if not pending:
                    return
                await handover([await pending.popleft()])
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def read_stored(
        self,
        connection: asyncpg.Connection,  # noqa: ARG002 - the interface's: objects need no database connection
        *,
        organization_id: UUID,
        payload_id: UUID,
        first: int,
        stop: int,
    ) -> list[Blob]:
        """The objects of chunks `first .. stop-1` (see `PayloadStore.read_stored`)."""
        return await self.objects.get_chunks(organization_id, payload_id, range(first, stop))

    async def delete_chunks_from(
        self, connection: asyncpg.Connection, *, organization_id: UUID, payload_id: UUID, offset: int
    ) -> None:
        """Delete the rows, then every object from the first chunk no row keeps (see the class docstring)."""
        kept = await delete_chunk_rows_from(connection, payload_id=payload_id, offset=offset)
        await self.objects.delete_chunks_from(organization_id, payload_id, kept)

    async def stage(self, organization_id: UUID, payload_id: UUID, chunks: Sequence[tuple[int, bytes]]) -> None:
        """PUT the objects (conditionally), concurrently."""
        await self.objects.put_chunks(organization_id, payload_id, chunks)

    async def unstage(self, organization_id: UUID, payload_id: UUID) -> None:
        """Delete the payload's objects; one left behind (the store failing again) is the reconciler's to report."""
        try:
            await self.objects.delete_payload(organization_id, payload_id)
        except PayloadStoreUnavailableError:
            logger.warning("objects of the refused payload %s stay in the bucket until reconciled", payload_id)

    async def check(self) -> str | None:
        """Why the bucket cannot be used now, or None."""
        try:
            async with asyncio.timeout(self._check_timeout):
                await self.objects.check()
                await self.objects.check_reads()
        except TimeoutError:
            return f"payload store: the S3 store did not answer within {self._check_timeout:g} s"
        except PayloadStoreUnavailableError as exc:
            return f"payload store: {exc.detail}"
        except Exception as exc:  # noqa: BLE001 - a readiness probe reports a failing client, it does not crash
            # e.g. botocore's redirect handling recursing without end on a store answering 301 with no region
            logger.warning("object store: the readiness check failed: %s", type(exc).__name__)
            return f"payload store: the S3 check failed ({type(exc).__name__})"
        return None


async def _gather_limited(coroutines: Sequence[Any], limit: int) -> list[Any]:
    """Run `coroutines` at most `limit` at a time; their results in order. The first failure cancels the rest."""
    semaphore = asyncio.Semaphore(limit)

    async def limited(coroutine: Any) -> Any:
        async with semaphore:
            return await coroutine

    tasks = [asyncio.ensure_future(limited(coroutine)) for coroutine in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _status(exc: ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))


_QUOTED_ANSWER = re.compile(r"(status code: \d{3}[^:]*):.*")
_BODY_START = re.compile(r"[<{]")


def _describe(exc: BaseException) -> str:
    """The first line of a client's message, up to any response body it quotes.

    botocore's messages name the endpoint, the operation and the error code; obstore's go on to quote the store's
    answer (`...status code: 403 Forbidden: <?xml ...`), whose XML can echo the request (an access key id, the string
    that was signed): none of that goes to a log.
    """
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = _QUOTED_ANSWER.sub(r"\1", text)  # obstore: "...status code: 403 Forbidden: <the body>"
    return _BODY_START.split(text, maxsplit=1)[0].rstrip(": ") or type(exc).__name__


def _unavailable(action: str, exc: BaseException) -> PayloadStoreUnavailableError:
    if isinstance(exc, ClientError) and (_status(exc) == 507 or _code(exc) in _STORE_FULL_CODES):
        logger.error("object store: cannot %s: it is full (answered %s %s)", action, _status(exc), _code(exc))
        return PayloadStoreFullError(
            "the object store is full; what this request was writing was not stored: retry later",
            headers={"Retry-After": "60"},
        )
    if isinstance(exc, ClientError):
        detail = f"answered {_status(exc) or ''} {_code(exc)}".replace("  ", " ")
    else:
        detail = _describe(exc)
    logger.warning("object store: cannot %s: %s", action, detail)
    return PayloadStoreUnavailableError(f"the object store is unavailable (could not {action})")
