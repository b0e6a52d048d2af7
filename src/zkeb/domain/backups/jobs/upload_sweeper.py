"""The upload sweeper: purges expired tus uploads and orphaned payloads, with their chunks, in bounded batches.

Sessions expire `UPLOAD_EXPIRY` after their last stored bytes (`zkeb.domain.backups.services.uploads`); payloads no
backup and no upload references (a process died mid single-shot upload) are orphans after `ORPHAN_AGE`. The
maintenance runner (`zkeb.domain.backups.jobs.maintenance`) calls `UploadSweeper.sweep` each pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.audit import record_event
from zkeb.core.tenancy import tenant_transaction
from zkeb.domain.backups.metrics import ORPHAN_PAYLOADS_PURGED, TUS_SESSIONS_EXPIRED
from zkeb.domain.backups.services.lifecycle import SYSTEM_ACTOR
from zkeb.domain.backups.store import upload_leases
from zkeb.settings import Settings

__all__ = ("ORPHAN_AGE", "SWEEPER_ACTOR_ID", "SWEEP_BATCH", "SweepResult", "UploadSweeper")

logger = logging.getLogger("zkeb.backups.tus")
tracer = trace.get_tracer("zkeb.backups")

#: Payloads no backup and no upload references (a process died mid single-shot upload) are purged after this.
ORPHAN_AGE = timedelta(hours=1)
SWEEP_BATCH = 100
#: `actor_id` of the audit events the sweeper records.
SWEEPER_ACTOR_ID = "maintenance"


@dataclass(frozen=True, slots=True)
class SweepResult:
    """What one sweep found and removed."""

    candidates: int
    expired_uploads: int
    orphaned_payloads: int

    @property
    def deleted(self) -> int:
        """Payloads deleted, both kinds."""
        return self.expired_uploads + self.orphaned_payloads


class UploadSweeper:
    """Purges expired tus uploads (and orphaned payloads) with their chunks, in bounded batches.

    Safe with several processes: each payload is deleted in its tenant's transaction after re-checking, under
    `FOR UPDATE SKIP LOCKED` of its upload session and itself, that it is still sweepable. A PATCH pushes the
    upload's expiry forward with each batch it stores, so an upload receiving bytes is never expired.
    Each deletion is audited (actor `system`) in the same transaction.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        batch: int = SWEEP_BATCH,
        settings: Settings | None = None,
    ) -> None:
        """Sweep at most `batch` payloads of each kind per pass (the maintenance runner schedules the passes)."""
        self._engine = engine
        self._batch = batch
        self._settings = settings

    async def sweep_once(self) -> int:
        """One pass; returns how many payloads it deleted."""
        return (await self.sweep()).deleted

    async def sweep(self) -> SweepResult:
        """One pass; says how many candidates it saw and what it deleted."""
        orphan_before = datetime.now(UTC) - ORPHAN_AGE
        expired = orphaned = 0
        with tracer.start_as_current_span("backups.sweep") as span:
            async with self._engine.connect() as connection:
                candidates = await upload_leases.sweepable_payloads(
                    connection, limit=self._batch, orphan_before=orphan_before
                )
                await connection.rollback()
            for organization_id, payload_id in candidates:
                async with tenant_transaction(self._engine, organization_id) as connection:
                    locked_session = await upload_leases.lock_session_of_payload(connection, payload_id)
                    still = await upload_leases.still_sweepable(connection, payload_id, orphan_before=orphan_before)
                    if still is None or (still.upload_id is not None and still.upload_id != locked_session):
                        continue
                    await upload_leases.delete_payload(connection, payload_id)
                    is_upload = still.upload_id is not None
                    await record_event(
                        connection,
                        organization_id=organization_id,
                        action="upload.expired" if is_upload else "payload.orphan_purged",
                        actor_type=SYSTEM_ACTOR,
                        actor_id=SWEEPER_ACTOR_ID,
                        target_type="upload" if is_upload else "payload",
                        target_id=str(still.upload_id if is_upload else payload_id),
                        details={"payload_id": str(payload_id)},
                        settings=self._settings,
                    )
                if is_upload:
                    expired += 1
                    TUS_SESSIONS_EXPIRED.inc()
                else:
                    orphaned += 1
                    ORPHAN_PAYLOADS_PURGED.inc()
            result = SweepResult(len(candidates), expired, orphaned)
            span.set_attribute("zkeb.candidates", len(candidates))
            span.set_attribute("zkeb.deleted", result.deleted)
        if result.deleted:
            logger.info("purged %d expired uploads and %d orphaned payloads", expired, orphaned)
        return result
