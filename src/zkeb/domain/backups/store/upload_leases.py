"""The statements about tus upload sessions: the PATCH lease, the commit's end of a session, termination and the
sweeper's lookups.

One PATCH at a time owns an upload through `upload_sessions.lease_id`: it claims the session, each chunk batch it
stores checks (and extends) the lease in the batch's own transaction, and it releases the lease when it stops.
Every writer locks an upload's session row before its payload's rows: the claim and each chunk batch, the commit
(`zkeb.domain.backups.services.finalize.commit_stored`), termination and the sweeper.

The lease and commit statements run on a raw asyncpg connection inside `raw_tenant_transaction`; termination's and
the sweeper's on SQLAlchemy connections, in the request's session or `tenant_transaction`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy import text

if TYPE_CHECKING:
    from collections.abc import Sequence

    import asyncpg
    from sqlalchemy.engine import Row
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

__all__ = (
    "UploadLease",
    "advance",
    "claim",
    "delete_payload",
    "discard_leased",
    "end_leased",
    "keep",
    "lease_holds",
    "lock_session",
    "lock_session_of_payload",
    "record_chunks",
    "release",
    "release_at",
    "session_exists",
    "still_sweepable",
    "sweepable_payloads",
    "unclaimed_state",
)


@dataclass(frozen=True, slots=True)
class UploadLease:
    """The claim through which one PATCH owns a tus upload while it writes (`upload_sessions.lease_id`)."""

    upload_id: UUID
    lease_id: UUID


# --- the PATCH lease and the commit's end of a session (asyncpg) ------------------------------------------------

_CLAIM = (
    "UPDATE upload_sessions s SET lease_id = $2, expires_at = now() + $3::interval, updated_at = now()"
    " WHERE s.id = $1 AND s.upload_offset = $4 AND s.expires_at > now()"
    " RETURNING s.expires_at, (SELECT p.chunk_count FROM payloads p WHERE p.id = s.payload_id)"
)
_UNCLAIMED = "SELECT upload_offset, expires_at <= now() AS expired FROM upload_sessions WHERE id = $1"
_KEEP = "UPDATE upload_sessions SET expires_at = now() + $3::interval WHERE id = $1 AND lease_id = $2 RETURNING 1"
_ADVANCE = (
    "UPDATE upload_sessions SET upload_offset = $3, expires_at = now() + $4::interval, updated_at = now()"
    " WHERE id = $1 AND lease_id = $2 RETURNING expires_at"
)
_RELEASE_AT = (
    "UPDATE upload_sessions SET upload_offset = $3, lease_id = NULL, updated_at = now()"
    " WHERE id = $1 AND lease_id = $2 RETURNING expires_at"
)
_RECORD_CHUNKS = "UPDATE payloads SET chunk_count = $2, size = $3, updated_at = now() WHERE id = $1"
_RELEASE = "UPDATE upload_sessions SET lease_id = NULL WHERE id = $1 AND lease_id = $2 RETURNING upload_offset"
_END_LEASED = "DELETE FROM upload_sessions WHERE id = $1 AND lease_id = $2 RETURNING id"
_DELETE_PAYLOAD_NOW = "DELETE FROM payloads WHERE id = $1"
_SESSION_EXISTS = "SELECT 1 FROM upload_sessions WHERE id = $1"
_LEASE_HOLDS = "SELECT 1 FROM upload_sessions WHERE id = $1 AND lease_id = $2"


async def claim(
    connection: asyncpg.Connection, lease: UploadLease, *, offset: int, expiry: timedelta
) -> tuple[int, datetime] | None:
    """Take the upload over at `offset` (a later PATCH wins over an earlier one): its chunk count and new expiry.

    None when the upload is gone, expired, or no longer at `offset` (`unclaimed_state` says which).
    """
    claimed = await connection.fetchrow(_CLAIM, lease.upload_id, lease.lease_id, expiry, offset)
    return None if claimed is None else (claimed["chunk_count"], claimed["expires_at"])


async def unclaimed_state(connection: asyncpg.Connection, upload_id: UUID) -> tuple[int, bool] | None:
    """Why a claim failed: the upload's offset and whether it expired; None when the upload is gone."""
    current = await connection.fetchrow(_UNCLAIMED, upload_id)
    return None if current is None else (current["upload_offset"], current["expired"])


async def keep(connection: asyncpg.Connection, lease: UploadLease, *, expiry: timedelta) -> bool:
    """Extend the upload's expiry while `lease` still holds it; False once it does not."""
    return await connection.fetchval(_KEEP, lease.upload_id, lease.lease_id, expiry) is not None


async def advance(connection: asyncpg.Connection, lease: UploadLease, *, offset: int, expiry: timedelta) -> bool:
    """Record the offset a stored batch reached and extend the expiry while `lease` holds; False once it does not."""
    return await connection.fetchval(_ADVANCE, lease.upload_id, lease.lease_id, offset, expiry) is not None


async def release_at(connection: asyncpg.Connection, lease: UploadLease, *, offset: int) -> datetime | None:
    """Give the upload back at `offset`; its expiry, or None when `lease` no longer holds it."""
    expires_at: datetime | None = await connection.fetchval(_RELEASE_AT, lease.upload_id, lease.lease_id, offset)
    return expires_at


async def release(connection: asyncpg.Connection, lease: UploadLease) -> int | None:
    """Give the upload back at its recorded offset, which it returns; None when `lease` no longer holds it."""
    offset: int | None = await connection.fetchval(_RELEASE, lease.upload_id, lease.lease_id)
    return offset


async def record_chunks(connection: asyncpg.Connection, payload_id: UUID, *, chunk_count: int, size: int) -> None:
    """Record how many chunks (and bytes) of an upload's payload are stored."""
    await connection.execute(_RECORD_CHUNKS, payload_id, chunk_count, size)


async def end_leased(connection: asyncpg.Connection, lease: UploadLease) -> bool:
    """Delete the upload's session row (its commit ends it), provided `lease` still holds it; False if not."""
    return await connection.fetchval(_END_LEASED, lease.upload_id, lease.lease_id) is not None


async def discard_leased(connection: asyncpg.Connection, lease: UploadLease, payload_id: UUID) -> None:
    """Delete the upload, then its payload (the chunks go with it), provided `lease` still holds it."""
    # The session row first, then the payload: the order every writer locks them in.
    if await connection.fetchval(_END_LEASED, lease.upload_id, lease.lease_id) is not None:
        await connection.execute(_DELETE_PAYLOAD_NOW, payload_id)


async def session_exists(connection: asyncpg.Connection, upload_id: UUID) -> bool:
    """Whether the upload still exists (not terminated, swept or completed)."""
    return await connection.fetchval(_SESSION_EXISTS, upload_id) is not None


async def lease_holds(connection: asyncpg.Connection, lease: UploadLease) -> bool:
    """Whether `lease` still owns its upload."""
    return await connection.fetchval(_LEASE_HOLDS, lease.upload_id, lease.lease_id) is not None


# --- termination and the sweeper (SQLAlchemy) ------------------------------------------------------------------

_LOCK_SESSION = text("SELECT id FROM upload_sessions WHERE id = :id FOR UPDATE")
_SWEEPABLE = text("SELECT organization_id, payload_id FROM zkeb_sweepable_payloads(:limit, :orphan_before)")
_STILL_SWEEPABLE = text(
    "SELECT p.id, (SELECT s.id FROM upload_sessions s WHERE s.payload_id = p.id) AS upload_id"
    " FROM payloads p WHERE p.id = :id AND ("
    " EXISTS (SELECT 1 FROM upload_sessions s WHERE s.payload_id = p.id AND s.expires_at < now())"
    " OR (p.created_at < :orphan_before"
    "     AND NOT EXISTS (SELECT 1 FROM backups b WHERE b.payload_id = p.id)"
    "     AND NOT EXISTS (SELECT 1 FROM upload_sessions s WHERE s.payload_id = p.id)))"
    " FOR UPDATE OF p SKIP LOCKED"
)
#: The session row first, as every writer locks it (see `claim`); a PATCH storing a batch right now holds it.
_LOCK_SESSION_OF = text("SELECT id FROM upload_sessions WHERE payload_id = :id FOR UPDATE SKIP LOCKED")
_DELETE_PAYLOAD = text("DELETE FROM payloads WHERE id = :id")


async def lock_session(session: AsyncSession, upload_id: UUID) -> bool:
    """Lock the upload's session row (a PATCH still open on it then stores nothing more); False when it is gone."""
    return await session.scalar(_LOCK_SESSION, {"id": upload_id}) is not None


async def delete_payload(connection: AsyncConnection | AsyncSession, payload_id: UUID) -> None:
    """Delete a payload; its chunks and its upload session go with it (foreign keys)."""
    await connection.execute(_DELETE_PAYLOAD, {"id": payload_id})


async def sweepable_payloads(connection: AsyncConnection, *, limit: int, orphan_before: datetime) -> Sequence[Row[Any]]:
    """Up to `limit` (organization_id, payload_id) of expired uploads and orphaned payloads, across tenants."""
    return (await connection.execute(_SWEEPABLE, {"limit": limit, "orphan_before": orphan_before})).all()


async def lock_session_of_payload(connection: AsyncConnection, payload_id: UUID) -> UUID | None:
    """Lock the session row of the payload's upload, skipping a locked one; its id, or None."""
    upload_id: UUID | None = await connection.scalar(_LOCK_SESSION_OF, {"id": payload_id})
    return upload_id


async def still_sweepable(connection: AsyncConnection, payload_id: UUID, *, orphan_before: datetime) -> Row[Any] | None:
    """The payload (`id`, `upload_id`), locked, if it is still expired or orphaned; None otherwise or when locked."""
    return (await connection.execute(_STILL_SWEEPABLE, {"id": payload_id, "orphan_before": orphan_before})).first()
