"""The backups domain's Prometheus metrics: uploads, restores, tus sessions, the lifecycle and maintenance.

They live in prometheus_client's default registry beside the core's request, pool and process metrics, so
`/metrics` (`zkeb.core.metrics`) exposes them; `zkeb_tus_sessions_open` is sampled from the database by
`sample_open_upload_sessions`, which the domain's plugin registers in `Runtime.metric_samplers`.

| object | metric | labels |
| --- | --- | --- |
| `BACKUPS_CREATED` | `zkeb_backups_created_total` | `method` = `single` or `tus` |
| `BACKUPS_FAILED` | `zkeb_backups_failed_total` | `method`, `reason` (see `record_backup_failed`) |
| `BACKUP_BYTES_UPLOADED` | `zkeb_backup_bytes_uploaded_total` | |
| `BACKUP_BYTES_RESTORED` | `zkeb_backup_bytes_restored_total` | |
| `BACKUP_PAYLOAD_SIZE` | `zkeb_backup_payload_size_bytes` (histogram) | |
| `TUS_SESSIONS_CREATED` | `zkeb_tus_sessions_created_total` | |
| `TUS_SESSIONS_EXPIRED` | `zkeb_tus_sessions_expired_total` | |
| `TUS_SESSIONS_OPEN` | `zkeb_tus_sessions_open` (gauge, sampled) | |
| `BACKUPS_TRASHED` | `zkeb_backups_trashed_total` | `reason` = `deleted` or `retention` |
| `BACKUPS_RESTORED` | `zkeb_backups_restored_total` | |
| `BACKUPS_PURGED` | `zkeb_backups_purged_total` | `reason` = `admin` or `trash_expired` |
| `ORPHAN_PAYLOADS_PURGED` | `zkeb_orphan_payloads_purged_total` | |
| `DATA_KEYS_REWRAPPED` | `zkeb_data_keys_rewrapped_total` | |
| `MAINTENANCE_PASSES` | `zkeb_maintenance_passes_total` | `task`, `outcome` = `ok` or `error` |
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = (
    "BACKUPS_CREATED",
    "BACKUPS_FAILED",
    "BACKUPS_PURGED",
    "BACKUPS_RESTORED",
    "BACKUPS_TRASHED",
    "BACKUP_BYTES_RESTORED",
    "BACKUP_BYTES_UPLOADED",
    "BACKUP_PAYLOAD_SIZE",
    "DATA_KEYS_REWRAPPED",
    "MAINTENANCE_PASSES",
    "ORPHAN_PAYLOADS_PURGED",
    "TUS_SESSIONS_CREATED",
    "TUS_SESSIONS_EXPIRED",
    "TUS_SESSIONS_OPEN",
    "open_upload_sessions_sampler",
    "record_backup_created",
    "record_backup_failed",
    "record_bytes_restored",
)

_KIB, _MIB = 1024, 1024 * 1024
#: Every tenant's open sessions, through a SECURITY DEFINER function (the runtime role sees one tenant at a time).
_OPEN_SESSIONS = text("SELECT zkeb_open_upload_sessions()")

# --- uploads and restores -------------------------------------------------------------------------------------
BACKUPS_CREATED = Counter("zkeb_backups_created_total", "Backups committed.", ["method"])
BACKUPS_FAILED = Counter("zkeb_backups_failed_total", "Backup uploads refused or failed.", ["method", "reason"])
BACKUP_BYTES_UPLOADED = Counter("zkeb_backup_bytes_uploaded_total", "Payload bytes of committed backups.")
BACKUP_BYTES_RESTORED = Counter("zkeb_backup_bytes_restored_total", "Payload bytes streamed back to clients.")
BACKUP_PAYLOAD_SIZE = Histogram(
    "zkeb_backup_payload_size_bytes",
    "Payload size of committed backups.",
    buckets=(_KIB, 16 * _KIB, 256 * _KIB, _MIB, 4 * _MIB, 16 * _MIB, 64 * _MIB, 256 * _MIB, 1024 * _MIB),
)
TUS_SESSIONS_CREATED = Counter("zkeb_tus_sessions_created_total", "tus upload sessions created.")
TUS_SESSIONS_EXPIRED = Counter(
    "zkeb_tus_sessions_expired_total", "Expired tus upload sessions (and orphaned upload payloads) purged."
)
TUS_SESSIONS_OPEN = Gauge(
    "zkeb_tus_sessions_open", "Unexpired, uncompleted tus upload sessions (all tenants).", multiprocess_mode="livemax"
)

# --- lifecycle and maintenance --------------------------------------------------------------------------------
BACKUPS_TRASHED = Counter("zkeb_backups_trashed_total", "Backups moved to the trash.", ["reason"])
BACKUPS_RESTORED = Counter("zkeb_backups_restored_total", "Backups brought back from the trash.")
BACKUPS_PURGED = Counter("zkeb_backups_purged_total", "Backups purged with their payload.", ["reason"])
ORPHAN_PAYLOADS_PURGED = Counter(
    "zkeb_orphan_payloads_purged_total", "Payloads no backup or upload referenced (a crashed upload), purged."
)
DATA_KEYS_REWRAPPED = Counter("zkeb_data_keys_rewrapped_total", "Payload data keys re-wrapped under the active key.")
MAINTENANCE_PASSES = Counter(
    "zkeb_maintenance_passes_total", "Maintenance task passes, by task and outcome.", ["task", "outcome"]
)


def record_backup_created(method: str, payload_size: int) -> None:
    """Count one committed backup of `payload_size` bytes (`method`: `single` or `tus`)."""
    BACKUPS_CREATED.labels(method=method).inc()
    BACKUP_BYTES_UPLOADED.inc(payload_size)
    BACKUP_PAYLOAD_SIZE.observe(payload_size)


def record_backup_failed(reason: str, method: str) -> None:
    """Count one refused upload (`reason`: signature, nonce_reuse, quota; `method`: `single` or `tus`)."""
    BACKUPS_FAILED.labels(method=method, reason=reason).inc()


def record_bytes_restored(size: int) -> None:
    """Count payload bytes sent back to a client."""
    BACKUP_BYTES_RESTORED.inc(size)


def open_upload_sessions_sampler(engine: AsyncEngine) -> Callable[[], Awaitable[None]]:
    """The sampler of `zkeb_tus_sessions_open` through `engine` (registered in `Runtime.metric_samplers`)."""

    async def sample_open_upload_sessions() -> None:
        async with engine.connect() as connection:
            TUS_SESSIONS_OPEN.set((await connection.execute(_OPEN_SESSIONS)).scalar_one())

    return sample_open_upload_sessions
