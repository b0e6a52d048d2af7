"""Master-key rotation: re-wrap every payload's data key under the active master key, without touching chunks.

With `ZKEB_MASTER_ENCRYPTION_KEY_NEW` set, new payloads are wrapped by the new key (the keyring's active key) and
payloads wrapped by `ZKEB_MASTER_ENCRYPTION_KEY` still open. `zkeb keys rotate` unwraps each remaining data key
with the key that wrapped it and wraps it again under the active key, a batch per transaction (`FOR UPDATE SKIP
LOCKED`, so it runs alongside the service and alongside another rotation), tenant by tenant; it can be stopped
and run again at any time, and only payloads not yet under the active key are touched. Chunks are encrypted under
the data key, which does not change, so no byte of payload is read or rewritten. `zkeb keys status` counts the
data keys under each master key id; once nothing is left under the old id, the old key can be dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.core.audit import record_event
from zkeb.core.tenancy import tenant_transaction
from zkeb.db.models import Payload
from zkeb.domain.backups.metrics import DATA_KEYS_REWRAPPED
from zkeb.lib.atrest import DataKeyUnwrapError, MasterKeyring, master_key_id, unwrap_data_key, wrap_data_key
from zkeb.settings import Settings

__all__ = (
    "DEFAULT_ROTATION_BATCH",
    "KeyRotator",
    "KeyStatus",
    "RotationReport",
    "StoredKeysCheck",
    "configured_key_ids",
)

logger = logging.getLogger("zkeb.backups.keys")

DEFAULT_ROTATION_BATCH = 500
#: How often a rotation goes back for payloads that were locked by someone else during its first sweep.
_LOCKED_RETRIES = 5
_REWRAP = text("UPDATE payloads SET key_id = :key_id, wrapped_key = :wrapped_key, updated_at = now() WHERE id = :id")
_KEY_USAGE = text("SELECT organization_id, key_id, payloads FROM zkeb_payload_key_usage()")


def configured_key_ids(settings: Settings, keyring: MasterKeyring) -> dict[str, str]:
    """The key id of each configured master-key variable (`ZKEB_MASTER_ENCRYPTION_KEY`, and `_NEW` when set)."""
    names = {"ZKEB_MASTER_ENCRYPTION_KEY": keyring.others[0] if keyring.others else keyring.active}
    if settings.secrets.master_key_new:
        names["ZKEB_MASTER_ENCRYPTION_KEY_NEW"] = keyring.active
    return {name: master_key_id(key) for name, key in names.items()}


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """How many data keys each master key id wraps, across every tenant, and which ids are configured."""

    active_key_id: str
    configured: dict[str, str]
    data_keys: dict[str, int]

    @property
    def remaining(self) -> int:
        """Data keys not yet under the active key."""
        return sum(count for key_id, count in self.data_keys.items() if key_id != self.active_key_id)

    @property
    def unknown_key_ids(self) -> list[str]:
        """Key ids some data keys are under but no configured master key has: those payloads cannot be opened."""
        known = set(self.configured.values())
        return sorted(key_id for key_id, count in self.data_keys.items() if count and key_id not in known)


@dataclass(slots=True)
class RotationReport:
    """What a rotation did: data keys re-wrapped, those that would not open, and what is left elsewhere."""

    rewrapped: int = 0
    failed_payloads: list[UUID] = field(default_factory=list)
    remaining: int = 0

    @property
    def complete(self) -> bool:
        """Whether every data key is now under the active key."""
        return self.remaining == 0 and not self.failed_payloads


class KeyRotator:
    """Counts and re-wraps payload data keys under the keyring's active master key."""

    def __init__(self, engine: AsyncEngine, keyring: MasterKeyring, settings: Settings) -> None:
        """Act through `engine` (the runtime role; each tenant's rows in that tenant's transaction)."""
        self._engine = engine
        self._keyring = keyring
        self._settings = settings

    async def _usage(self) -> list[tuple[UUID, str, int]]:
        async with self._engine.connect() as connection:
            rows = (await connection.execute(_KEY_USAGE)).all()
            await connection.rollback()
        return [(row.organization_id, row.key_id, int(row.payloads)) for row in rows]

    async def status(self) -> KeyStatus:
        """Data keys per master key id (configured ids listed with 0 when nothing is under them)."""
        counts: dict[str, int] = dict.fromkeys(self._keyring.ids, 0)
        for _, key_id, payloads in await self._usage():
            counts[key_id] = counts.get(key_id, 0) + payloads
        return KeyStatus(
            active_key_id=self._keyring.active_id,
            configured=configured_key_ids(self._settings, self._keyring),
            data_keys=counts,
        )

    async def rotate(
        self, *, batch_size: int = DEFAULT_ROTATION_BATCH, on_progress: Callable[[int], None] | None = None
    ) -> RotationReport:
        """Re-wrap every data key under a configured non-active key id with the active key.

        Resumable: stop it at any point and run it again. `on_progress` is called with the count of each batch.
        """
        report = RotationReport()
        old_ids = [key_id for key_id in self._keyring.ids if key_id != self._keyring.active_id]
        for attempt in range(_LOCKED_RETRIES + 1):
            pending: dict[UUID, int] = defaultdict(int)
            for organization_id, key_id, payloads in await self._usage():
                if key_id in old_ids:
                    pending[organization_id] += payloads
            if sum(pending.values()) <= len(report.failed_payloads):
                break  # nothing left, or only data keys that do not open
            if attempt:
                # Rows locked during the previous sweep (an upload writing its offset, another rotation).
                await asyncio.sleep(min(0.2 * attempt, 1.0))
            for organization_id in sorted(pending):
                rewrapped = await self._rotate_organization(
                    organization_id, old_ids, batch_size=batch_size, report=report, on_progress=on_progress
                )
                if rewrapped:
                    await self._audit(organization_id, rewrapped)
        final = await self._usage()
        report.remaining = sum(p for _, key_id, p in final if key_id != self._keyring.active_id)
        return report

    async def _rotate_organization(
        self,
        organization_id: UUID,
        old_ids: list[str],
        *,
        batch_size: int,
        report: RotationReport,
        on_progress: Callable[[int], None] | None,
    ) -> int:
        active, active_id = self._keyring.active, self._keyring.active_id
        rewrapped_here = 0
        while True:
            async with tenant_transaction(self._engine, organization_id) as connection:
                query = (
                    select(Payload.id, Payload.key_id, Payload.wrapped_key)
                    .where(Payload.key_id.in_(old_ids))
                    .order_by(Payload.id)
                    .limit(batch_size)
                    .with_for_update(skip_locked=True)
                )
                if report.failed_payloads:
                    query = query.where(Payload.id.not_in(report.failed_payloads))
                rows = (await connection.execute(query)).all()
                if not rows:
                    return rewrapped_here
                updates: list[dict[str, object]] = []
                for row in rows:
                    try:
                        data_key = unwrap_data_key(
                            self._keyring.get(row.key_id), bytes(row.wrapped_key), payload_id=row.id
                        )
                    except DataKeyUnwrapError:
                        logger.error(  # noqa: TRY400 - the traceback adds nothing
                            "data key of payload %s does not open with master key %s; left as it is", row.id, row.key_id
                        )
                        report.failed_payloads.append(row.id)
                        continue
                    wrapped = wrap_data_key(active, data_key, payload_id=row.id)
                    updates.append({"id": row.id, "key_id": active_id, "wrapped_key": wrapped})
                if updates:
                    await connection.execute(_REWRAP, updates)
            rewrapped_here += len(updates)
            report.rewrapped += len(updates)
            DATA_KEYS_REWRAPPED.inc(len(updates))
            if on_progress is not None:
                on_progress(len(rows))

    async def _audit(self, organization_id: UUID, rewrapped: int) -> None:
        async with tenant_transaction(self._engine, organization_id) as connection:
            await record_event(
                connection,
                organization_id=organization_id,
                action="master_key.rewrapped",
                actor_type="cli",
                actor_id=None,
                target_type="organization",
                target_id=str(organization_id),
                details={"to_key_id": self._keyring.active_id, "count": rewrapped},
                settings=self._settings,
            )


#: How long a readiness probe waits for the stored-keys check before answering "not ready yet".
_CHECK_WAIT_SECONDS = 3.0
_KEY_IDS_IN_USE = text("SELECT zkeb_payload_key_ids() AS key_id")


class StoredKeysCheck:
    """Readiness: every master key that wraps a stored data key is configured.

    A wrong `ZKEB_MASTER_ENCRYPTION_KEY` (or one dropped before `zkeb keys rotate` finished) would otherwise serve
    happily and answer 503 to every restore; not ready, a deployment with it never takes traffic. The key ids in use
    are read once per process, in the background from start-up, by a loose index scan (milliseconds whatever the
    number of payloads). A failure to read them (the database down, a schema before the function) passes the check
    and is tried again at the next probe: the database check reports an outage, and this one must never be what
    keeps a healthy fleet from deploying.
    """

    def __init__(self, engine: AsyncEngine, keyring: MasterKeyring) -> None:
        self._engine = engine
        self._configured = frozenset(keyring.ids)
        self._task: asyncio.Task[list[str] | None] | None = None

    def start(self) -> None:
        """Begin the check (at start-up, so that the first probe finds it done), or again after it failed."""
        task = self._task
        if task is None or (task.done() and (task.cancelled() or task.result() is None)):
            self._task = asyncio.create_task(self._unknown_key_ids(), name="zkeb-stored-keys-check")

    async def stop(self) -> None:
        """Cancel a check still running (shutdown)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def __call__(self) -> str | None:
        """Why this process is not ready, or None."""
        self.start()
        task = self._task
        assert task is not None
        done, _ = await asyncio.wait({task}, timeout=_CHECK_WAIT_SECONDS)
        if not done:
            return "master keys: still checking which keys the stored data keys need"
        unknown = None if task.cancelled() else task.result()
        if unknown:
            return (
                f"master keys: stored data keys are wrapped with {', '.join(unknown)}, which no configured "
                "ZKEB_MASTER_ENCRYPTION_KEY[_NEW] is (their payloads cannot be restored; see docs/key-rotation.md)"
            )
        return None

    async def _unknown_key_ids(self) -> list[str] | None:
        """The unconfigured key ids in use; None when they could not be read (the next probe tries again)."""
        try:
            # A process's background check, not part of whichever request started it: no client spans.
            with suppress_instrumentation():
                async with self._engine.connect() as connection:
                    in_use = (await connection.execute(_KEY_IDS_IN_USE)).scalars().all()
                    await connection.rollback()
        except Exception as exc:  # noqa: BLE001 - see the class docstring: a failed read passes
            logger.warning("could not read the master key ids in use", extra={"error": type(exc).__name__})
            return None
        unknown = sorted(key_id for key_id in in_use if key_id not in self._configured)
        if unknown:
            logger.error("stored data keys are wrapped with unconfigured master keys", extra={"key_ids": unknown})
        return unknown
