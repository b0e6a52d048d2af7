"""The statements of a backup's commit: admission reads, the rows of a new backup, usage and retention.

Every backup is admitted and committed in one transaction on one connection (see
`zkeb.domain.backups.services.finalize`): one whose payload is in memory (a single-shot upload, a tus upload sent
in one request) with its payload and chunks, a tus upload completed by a PATCH with its payload already stored.
These are its statements, each one round trip.

Usage. A project's `used_bytes` is `projects.used_bytes` plus its rows in `project_usage_shards`. A commit to a
project without a quota adds its bytes to the shard of its database connection (`pg_backend_pid() % SHARDS`): a
pooled connection serves one request at a time, so concurrent commits of one project update different rows and
never wait for each other's commit. A project with a quota is charged on its own row, by a conditional `UPDATE`
counting the bytes open tus uploads reserve, after locking the row (no two commits squeeze under the limit). The
lock is taken just before the commit's inserts (their foreign keys would otherwise share-lock the row first, and
upgrading that lock can deadlock), so it is held for the inserts, the charge and the commit, not the admission.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from zkeb.domain.backups.envelope import ENVELOPE_FIELDS

if TYPE_CHECKING:
    import asyncpg

    from zkeb.domain.backups.envelope import BackupEnvelope

__all__ = (
    "RESERVED_BYTES_SQL",
    "SHARDS",
    "USED_BYTES_SQL",
    "Admission",
    "BackupRow",
    "PayloadKeyColumns",
    "TrashedRow",
    "charge_project_row",
    "insert_backup",
    "insert_chunk",
    "lock_project_row",
    "lock_retention_scope",
    "nonce_owner",
    "project_usage",
    "read_admission",
    "reserved_bytes_sql",
    "seal_stored_backup",
    "share_project_row",
    "trash_beyond_retention",
)

#: Usage shards per project: more than the connections that commit to one project at once, in practice.
SHARDS = 64
#: A project's used bytes, for a query over `projects p`: its own counter plus its shards.
USED_BYTES_SQL = (
    "(p.used_bytes"
    " + coalesce((SELECT sum(s.used_bytes) FROM project_usage_shards s WHERE s.project_id = p.id), 0)::bigint)"
)


def reserved_bytes_sql(*, but: str | None = None) -> str:
    """What the open (unexpired) tus uploads of project `p` reserve (their `Upload-Length`), over `projects p`.

    `but` is an SQL expression naming an upload left out (the one committing its bytes now).
    """
    excluded = f" AND u.id IS DISTINCT FROM {but}" if but is not None else ""
    return (
        "(SELECT CAST(coalesce(sum(u.upload_length), 0) AS bigint) FROM upload_sessions u"  # noqa: S608 - `but`: ours
        f" WHERE u.project_id = p.id AND u.expires_at > now(){excluded})"
    )


#: What the open tus uploads of project `p` reserve, over `projects p`.
RESERVED_BYTES_SQL = reserved_bytes_sql()

# $4: the upload committing (NULL for none), whose reservation is its own room, and whose lease is read too.
# $5: the API key the request came with (NULL for a device token, whose device is checked): revoked meanwhile?
_ADMISSION = f"""
SELECT p.storage_quota_bytes AS quota,
       NOT EXISTS (SELECT 1 FROM api_keys k WHERE k.id = $5::uuid AND k.revoked_at IS NOT NULL) AS key_unrevoked,
       (SELECT s.lease_id FROM upload_sessions s WHERE s.id = $4::uuid) AS upload_lease_id,
       EXISTS (SELECT 1 FROM upload_sessions s WHERE s.id = $4::uuid) AS upload_exists,
       CASE WHEN p.storage_quota_bytes IS NULL THEN 0
            ELSE {USED_BYTES_SQL} + {reserved_bytes_sql(but="$4::uuid")} END AS used,
       p.retention_keep_last, p.retention_days,
       d.id AS device_id, d.public_key,
       n.id AS nonce_id, b.id AS nonce_backup_id, b.signature AS nonce_signature
FROM projects p
LEFT JOIN devices d ON d.project_id = p.id AND d.device_id_hash = $2 AND d.revoked_at IS NULL
LEFT JOIN payload_nonces n ON n.project_id = p.id AND n.device_id_hash = $2 AND n.nonce = $3
LEFT JOIN backups b ON b.id = n.backup_id AND b.deleted_at IS NULL
WHERE p.id = $1
"""  # noqa: S608 - a constant fragment, no input

_NONCE_OWNER = """
SELECT b.id, b.signature FROM payload_nonces n
LEFT JOIN backups b ON b.id = n.backup_id AND b.deleted_at IS NULL
WHERE n.project_id = $1 AND n.device_id_hash = $2 AND n.nonce = $3
"""


def _commit_statement(payload: str, first_envelope_parameter: int, **p: str) -> str:
    """One statement committing a backup: the CTE `payload` (returning the payload's id), then the nonce, the usage
    shard (without a quota, `p["charge_shard"]`) and the backup, returning its `created_at`.

    `p` names the placeholders of the other columns; the envelope's fields follow from `first_envelope_parameter`, in
    field order. `created_at` is the clock at this statement, after any retention lock, so a scope's creation order is
    its commit order.
    """
    envelope = {f.name: f"${first_envelope_parameter + i}" for i, f in enumerate(ENVELOPE_FIELDS)}
    return f"""
WITH payload AS ({payload}
), nonce AS (
    INSERT INTO payload_nonces (id, organization_id, project_id, device_id_hash, nonce, backup_id,
                                created_at, updated_at)
    VALUES ({p["nonce_id"]}, {p["organization_id"]}, {p["project_id"]}, {envelope["device_id_hash"]},
            {envelope["payload_nonce"]}, {p["backup_id"]}, now(), now())
), shard AS (
    INSERT INTO project_usage_shards (id, organization_id, project_id, shard, used_bytes, created_at, updated_at)
    SELECT {p["shard_id"]}, {p["organization_id"]}, {p["project_id"]}, pg_backend_pid() % {SHARDS}, {p["size"]},
           now(), now()
    WHERE {p["charge_shard"]}::boolean
    ON CONFLICT (project_id, shard)
    DO UPDATE SET used_bytes = project_usage_shards.used_bytes + EXCLUDED.used_bytes, updated_at = now()
)
INSERT INTO backups (id, organization_id, project_id, device_id, payload_id, encrypted_payload_size, payload_sha256,
                     {", ".join(envelope)}, created_at, updated_at)
SELECT {p["backup_id"]}, {p["organization_id"]}, {p["project_id"]}, {p["device_id"]}, payload.id, {p["size"]},
       {p["sha256"]}, {", ".join(envelope.values())}, clock_timestamp(), clock_timestamp()
FROM payload
RETURNING created_at
"""  # noqa: S608 - constants: placeholders, SHARDS and the envelope's column names


_ROW_PARAMETERS = ("organization_id", "project_id", "backup_id", "device_id", "size", "sha256", "nonce_id", "shard_id")

# A payload received whole: the payload row with its first chunk ($1..$9), then the other rows' columns.
_INSERT_BACKUP = _commit_statement(
    """
    INSERT INTO payloads (id, organization_id, project_id, key_id, wrapped_key, size, chunk_count, sha256, store,
                          created_at, updated_at)
    VALUES ($1, $10, $11, $2, $3, $14, $4, $15, $5, now(), now())
    RETURNING id
), chunk AS (
    INSERT INTO backup_chunks (id, organization_id, payload_id, seq, byte_offset, plain_size, data,
                               created_at, updated_at)
    SELECT $6, $10, payload.id, 0, 0, $7, $8, now(), now() FROM payload""",
    18,
    **{name: f"${10 + i}" for i, name in enumerate(_ROW_PARAMETERS)},
    charge_shard="$9",
)

# A tus upload whose chunks are stored: its payload sealed with its size and digest ($1..$3), then the other rows'.
_SEAL_STORED_BACKUP = _commit_statement(
    """
    UPDATE payloads SET size = $8, sha256 = $9, chunk_count = $2, updated_at = now()
    WHERE id = $1
    RETURNING id""",
    12,
    **{name: f"${4 + i}" for i, name in enumerate(_ROW_PARAMETERS)},
    charge_shard="$3",
)

_INSERT_CHUNK = (
    "INSERT INTO backup_chunks (id, organization_id, payload_id, seq, byte_offset, plain_size, data, "
    "created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, now(), now())"
)

_LOCK_PROJECT = "SELECT 1 FROM projects WHERE id = $1 FOR UPDATE"
_SHARE_PROJECT = "SELECT 1 FROM projects WHERE id = $1 FOR KEY SHARE"
# A statement after the lock: its snapshot sees every charge and reservation committed before the lock was granted
# (a waiting UPDATE would re-check only the row itself).
_CHARGE_PROJECT = f"""
UPDATE projects p SET used_bytes = p.used_bytes + $2
WHERE p.id = $1
  AND (p.storage_quota_bytes IS NULL OR {USED_BYTES_SQL} + {RESERVED_BYTES_SQL} + $2 <= p.storage_quota_bytes)
RETURNING p.id
"""  # noqa: S608 - constant fragments

_USAGE = (
    f"SELECT {USED_BYTES_SQL} + {RESERVED_BYTES_SQL} AS used, p.storage_quota_bytes AS quota"  # noqa: S608
    " FROM projects p WHERE p.id = $1"
)

_LOCK_SCOPE = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"

_TRASH_BEYOND_RETENTION = """
WITH ranked AS (
    SELECT id, created_at, row_number() OVER (ORDER BY created_at DESC, id DESC) AS rank
    FROM backups
    WHERE project_id = $1 AND container_id = $2 AND device_id_hash = $3
      AND deleted_at IS NULL AND restored_at IS NULL
)
UPDATE backups b SET deleted_at = now(), deleted_by = $6, updated_at = now()
FROM ranked r
WHERE b.id = r.id AND b.deleted_at IS NULL
  AND (($4::integer IS NOT NULL AND r.rank > $4)
       OR ($5::integer IS NOT NULL AND r.rank > 1 AND r.created_at < now() - make_interval(days => $5)))
RETURNING b.id, b.container_id
"""


@dataclass(frozen=True, slots=True)
class Admission:
    """What admitting an upload reads, in one statement: the project's policy, the device and the nonce."""

    quota: int | None
    used: int
    retention_keep_last: int | None
    retention_days: int | None
    device_id: UUID | None
    public_key: bytes | None
    nonce_used: bool
    nonce_backup_id: UUID | None
    nonce_signature: bytes | None
    #: The upload committing (`upload_id`): whether its session row exists, and the lease holding it.
    upload_exists: bool = False
    upload_lease_id: UUID | None = None
    #: False when the request's API key (`api_key_id`) was revoked since the request was authenticated.
    key_unrevoked: bool = True


async def read_admission(
    connection: asyncpg.Connection,
    *,
    project_id: UUID,
    device_id_hash: bytes,
    nonce: bytes,
    upload_id: UUID | None = None,
    api_key_id: UUID | None = None,
) -> Admission | None:
    """The project's quota, usage and retention, the enrolled unrevoked device, and any earlier use of the nonce.

    `used` counts the room open tus uploads reserve, but for that of `upload_id` (the upload committing), whose
    session's lease is read too. None when the project does not exist (in this tenant).
    """
    row = await connection.fetchrow(_ADMISSION, project_id, device_id_hash, nonce, upload_id, api_key_id)
    if row is None:
        return None
    return Admission(
        quota=row["quota"],
        used=int(row["used"]),
        retention_keep_last=row["retention_keep_last"],
        retention_days=row["retention_days"],
        device_id=row["device_id"],
        public_key=row["public_key"],
        nonce_used=row["nonce_id"] is not None,
        nonce_backup_id=row["nonce_backup_id"],
        nonce_signature=row["nonce_signature"],
        upload_exists=row["upload_exists"],
        upload_lease_id=row["upload_lease_id"],
        key_unrevoked=row["key_unrevoked"],
    )


async def nonce_owner(
    connection: asyncpg.Connection, *, project_id: UUID, device_id_hash: bytes, nonce: bytes
) -> tuple[UUID | None, bytes | None] | None:
    """(visible backup id, its signature) of a used nonce (both None when the backup is gone); None if unused."""
    row = await connection.fetchrow(_NONCE_OWNER, project_id, device_id_hash, nonce)
    return None if row is None else (row["id"], row["signature"])


@dataclass(frozen=True, slots=True)
class BackupRow:
    """Every column of a backup, and its payload's totals."""

    id: UUID
    organization_id: UUID
    project_id: UUID
    device_id: UUID
    payload_id: UUID
    size: int
    sha256: bytes
    chunk_count: int
    envelope: BackupEnvelope


@dataclass(frozen=True, slots=True)
class PayloadKeyColumns:
    """The columns of a new payload row beside its totals: its wrapped data key and where its chunk bytes are."""

    key_id: str
    wrapped_key: bytes
    #: `payloads.store`.
    store: str = "postgres"


def _row_arguments(backup: BackupRow, *, nonce_id: UUID, shard_id: UUID) -> tuple[Any, ...]:
    """The arguments `_commit_statement` numbers by `_ROW_PARAMETERS`, then the envelope's fields."""
    return (
        backup.organization_id,
        backup.project_id,
        backup.id,
        backup.device_id,
        backup.size,
        backup.sha256,
        nonce_id,
        shard_id,
        *(getattr(backup.envelope, f.name) for f in ENVELOPE_FIELDS),
    )


async def insert_backup(
    connection: asyncpg.Connection,
    backup: BackupRow,
    payload: PayloadKeyColumns,
    *,
    first_chunk: tuple[UUID, int, bytes],
    nonce_id: UUID,
    shard_id: UUID,
    charge_shard: bool,
) -> datetime:
    """Insert the payload (with `first_chunk`: id, plaintext size, row data), the nonce and the backup; its time.

    With `charge_shard`, the payload's bytes go to the project's usage shard of this connection.

    Raises:
        asyncpg.UniqueViolationError: the nonce is taken (`uq_payload_nonces`).
    """
    chunk_id, plain_size, data = first_chunk
    created_at: datetime = await connection.fetchval(
        _INSERT_BACKUP,
        backup.payload_id,
        payload.key_id,
        payload.wrapped_key,
        backup.chunk_count,
        payload.store,
        chunk_id,
        plain_size,
        data,
        charge_shard,
        *_row_arguments(backup, nonce_id=nonce_id, shard_id=shard_id),
    )
    return created_at


async def seal_stored_backup(
    connection: asyncpg.Connection, backup: BackupRow, *, nonce_id: UUID, shard_id: UUID, charge_shard: bool
) -> datetime:
    """Seal the stored payload (size, digest, chunk count) and insert the nonce and the backup; its time.

    With `charge_shard`, the payload's bytes go to the project's usage shard of this connection.

    Raises:
        asyncpg.UniqueViolationError: the nonce is taken (`uq_payload_nonces`).
    """
    created_at: datetime = await connection.fetchval(
        _SEAL_STORED_BACKUP,
        backup.payload_id,
        backup.chunk_count,
        charge_shard,
        *_row_arguments(backup, nonce_id=nonce_id, shard_id=shard_id),
    )
    return created_at


async def insert_chunk(
    connection: asyncpg.Connection,
    *,
    chunk_id: UUID,
    organization_id: UUID,
    payload_id: UUID,
    seq: int,
    offset: int,
    plain_size: int,
    data: bytes,
) -> None:
    """Insert one more chunk of a payload."""
    await connection.execute(_INSERT_CHUNK, chunk_id, organization_id, payload_id, seq, offset, plain_size, data)


async def lock_project_row(connection: asyncpg.Connection, project_id: UUID) -> None:
    """Lock the project row until the commit (the order a quota needs; see the module docstring).

    Taken before the commit's inserts, whose foreign keys share-lock the row: upgrading that share lock later could
    deadlock with a transaction already waiting to lock the row (a deletion, a policy change, another commit).
    """
    await connection.execute(_LOCK_PROJECT, project_id)


async def share_project_row(connection: asyncpg.Connection, project_id: UUID) -> None:
    """Key-share-lock the project row until the commit, as the commit's inserts would, but before any other lock.

    A tus commit deletes the upload's session row first: a project deletion, which locks the project row and then
    the sessions it cascades to, must not find that row taken by a commit waiting for the project row.
    """
    await connection.execute(_SHARE_PROJECT, project_id)


async def charge_project_row(connection: asyncpg.Connection, *, project_id: UUID, size: int) -> bool:
    """Charge `size` bytes on the (locked) project row if they fit beside its usage and the uploads' reservations."""
    return await connection.fetchval(_CHARGE_PROJECT, project_id, size) is not None


async def project_usage(connection: asyncpg.Connection, project_id: UUID) -> tuple[int, int | None] | None:
    """(used and reserved bytes, quota) of a project; None when it does not exist."""
    row = await connection.fetchrow(_USAGE, project_id)
    return None if row is None else (int(row["used"]), row["quota"])


async def lock_retention_scope(
    connection: asyncpg.Connection, *, project_id: UUID, container_id: UUID, device_id_hash: bytes
) -> None:
    """Serialize the commits that retention ranks together (one device's backups in one container) until commit."""
    await connection.execute(_LOCK_SCOPE, f"retention:{project_id}:{container_id}:{device_id_hash.hex()}")


@dataclass(frozen=True, slots=True)
class TrashedRow:
    """A backup retention moved to the trash."""

    id: UUID
    container_id: UUID


async def trash_beyond_retention(
    connection: asyncpg.Connection,
    *,
    project_id: UUID,
    container_id: UUID,
    device_id_hash: bytes,
    keep_last: int | None,
    days: int | None,
    deleted_by: str,
) -> list[TrashedRow]:
    """Move one device's backups of a container that the policy no longer keeps to the trash.

    Newest first by `created_at`, then id; restored backups are neither ranked nor removed, and age never removes
    the newest. The caller holds `lock_retention_scope`.
    """
    rows = await connection.fetch(
        _TRASH_BEYOND_RETENTION,
        project_id,
        container_id,
        device_id_hash,
        keep_last,
        days,
        deleted_by,
    )
    return [TrashedRow(row["id"], row["container_id"]) for row in rows]
