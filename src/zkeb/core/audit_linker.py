"""Audit events written without taking the chain head, and the short step that links them into the chain.

`zkeb.core.audit.record_event` appends to an organization's hash chain inside the caller's transaction, holding
the chain head's row lock until that transaction commits: every audited transaction of an organization queues
behind the previous one's commit. That is right for rare events (a key created, a backup purged), not for one
written by every backup: 32 devices of an organization uploading at once would commit one at a time.

So a busy transaction calls `append_unchained_event` instead: a plain `INSERT` into `audit_pending_events`, which
no other writer touches, committed (or rolled back) with the caller's work. `link_pending_events` then moves an
organization's waiting events into `audit_events` in one short transaction under the head's lock: ordered by
their time (then id), numbered from the head's `seq`, each hashed over the previous event's hash exactly as
`record_event` would. Nothing about the chain's format changes: `zkeb audit verify` and the chain tests check
linked events as before; an event is part of the chain once linked, usually milliseconds after its commit.

Who links: `AuditLinker`, one background task per process, woken by each commit that left an event waiting and
batching whatever is waiting by then (one linking transaction serves many commits); every few seconds it also
looks for organizations with events waiting that no live process announced (a process that died in between).
It takes the head with `SKIP LOCKED`, so it never waits behind a writer; whoever reads the trail (the audit API,
`zkeb audit verify`) links the organization's waiting events first, waiting for the head, so a reader always
sees every committed event.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

import msgspec
from litestar.connection import ASGIConnection
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import Table, insert, text, update
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from uuid_utils.compat import uuid7

from zkeb.core.audit import AuditOutcome, audit_enabled, audited_text, chained_fields, request_fields, sanitize_details
from zkeb.core.errors import database_connection_lost, database_timed_out
from zkeb.db.models.audit import AuditChainHead, AuditEvent
from zkeb.lib.hashchain import GENESIS_HASH, chain_hash
from zkeb.settings import Settings

if TYPE_CHECKING:
    import asyncpg

__all__ = ("LINK_BATCH", "AuditLinker", "append_unchained_event", "link_pending_events")

logger = logging.getLogger("zkeb.audit")
tracer = trace.get_tracer("zkeb.audit")

#: Most events one linking transaction moves into the chain.
LINK_BATCH = 500
#: How long the linker lets commits gather after being woken, so that one transaction links many. Linking after
#: every commit cost each sequential 1 KiB backup a second WAL flush (14 ms against 6.4 ms a backup, bench/small.py);
#: readers link first, so the delay is never visible in the trail.
LINK_GATHER_SECONDS = 0.1
#: How often the linker looks for waiting events no live process announced.
SWEEP_INTERVAL_SECONDS = 5.0

_EVENTS = cast("Table", AuditEvent.__table__)
_HEADS = cast("Table", AuditChainHead.__table__)
_INSERT_PENDING = (
    "INSERT INTO audit_pending_events (id, organization_id, occurred_at, actor_type, actor_id, action, target_type,"
    " target_id, outcome, client_ip, user_agent, request_id, trace_id, details, created_at, updated_at)"
    " VALUES ($1, $2, clock_timestamp(), $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb, now(), now())"
)
_PENDING_PARAMETERS = tuple(f"p{index}" for index in range(1, 14))
#: The same statement for a SQLAlchemy session or connection (named parameters).
_INSERT_PENDING_SA = text(_INSERT_PENDING.replace("$13::jsonb", "CAST(:p13 AS jsonb)").replace("$", ":p"))
_SET_TENANT = text("SELECT set_config('zkeb.org_id', :organization_id, true)")
_ANY_PENDING = text("SELECT 1 FROM audit_pending_events WHERE organization_id = :organization_id LIMIT 1")
_ENSURE_HEAD = text(
    "INSERT INTO audit_chain_heads (id, organization_id, seq, hash, created_at, updated_at)"
    " VALUES (:id, :organization_id, 0, :genesis, now(), now()) ON CONFLICT (organization_id) DO NOTHING"
)
_LOCK_HEAD = "SELECT seq, hash FROM audit_chain_heads WHERE organization_id = :organization_id FOR UPDATE"
_TAKE_PENDING = text(
    "DELETE FROM audit_pending_events WHERE id IN (SELECT id FROM audit_pending_events"
    " WHERE organization_id = :organization_id ORDER BY occurred_at, id LIMIT :limit)"
    " RETURNING id, organization_id, occurred_at, actor_type, actor_id, action, target_type, target_id, outcome,"
    " client_ip, user_agent, request_id, trace_id, details"
)
_PENDING_ORGANIZATIONS = text("SELECT zkeb_audit_pending_organizations(:limit) AS organization_id")


async def append_unchained_event(
    executor: asyncpg.Connection | AsyncSession | AsyncConnection,
    *,
    organization_id: UUID,
    action: str,
    actor_type: str,
    actor_id: str | None,
    outcome: AuditOutcome = "success",
    target_type: str | None = None,
    target_id: str | None = None,
    details: Mapping[str, object] | None = None,
    request: ASGIConnection[Any, Any, Any, Any] | None = None,
    settings: Settings | None = None,
) -> bool:
    """Record one event in the caller's transaction, which acts for `organization_id`.

    Takes no lock: the event waits in `audit_pending_events` until `link_pending_events` chains it. Returns
    whether an event was written (`ENABLE_AUDIT_LOGS=false` writes none); the caller then wakes the linker.
    Fields are cleaned exactly as `record_event` cleans them.
    """
    if not audit_enabled(settings, request):
        return False
    fields = request_fields(request, settings)
    values = (
        uuid7(),
        organization_id,
        audited_text("actor_type", actor_type),
        audited_text("actor_id", actor_id),
        audited_text("action", action),
        audited_text("target_type", target_type),
        audited_text("target_id", target_id),
        outcome,
        fields["client_ip"],
        fields["user_agent"],
        fields["request_id"],
        fields["trace_id"],
        msgspec.json.encode(sanitize_details(details)).decode(),
    )
    if isinstance(executor, AsyncSession | AsyncConnection):
        await executor.execute(_INSERT_PENDING_SA, dict(zip(_PENDING_PARAMETERS, values, strict=True)))
    else:
        await executor.execute(_INSERT_PENDING, *values)
    return True


async def link_pending_events(
    executor: AsyncSession | AsyncConnection, organization_id: UUID, *, wait: bool = True, limit: int = LINK_BATCH
) -> int | None:
    """Chain up to `limit` of the organization's waiting events, in the caller's transaction; how many it linked.

    The caller commits (the head stays locked until then) and acts for `organization_id` or for no tenant (the
    tenant is set here). With `wait=False` an organization whose head another transaction holds is skipped
    (returns None): that holder is linking, or writing an event; the waiting events are linked by a later pass.
    """
    await executor.execute(_SET_TENANT, {"organization_id": str(organization_id)})
    if (await executor.execute(_ANY_PENDING, {"organization_id": organization_id})).first() is None:
        return 0
    await executor.execute(_ENSURE_HEAD, {"id": uuid7(), "organization_id": organization_id, "genesis": GENESIS_HASH})
    lock = _LOCK_HEAD if wait else f"{_LOCK_HEAD} SKIP LOCKED"
    head = (await executor.execute(text(lock), {"organization_id": organization_id})).first()
    if head is None:
        return None
    rows = (await executor.execute(_TAKE_PENDING, {"organization_id": organization_id, "limit": limit})).mappings()
    pending = sorted(rows, key=lambda row: (row["occurred_at"], row["id"]))
    if not pending:
        return 0
    seq, prev_hash = int(head.seq), bytes(head.hash)
    linked: list[dict[str, Any]] = []
    for row in pending:
        seq += 1
        event: dict[str, Any] = {**row, "seq": seq, "occurred_at": row["occurred_at"].astimezone(datetime.UTC)}
        event_hash = chain_hash(prev_hash, chained_fields(event))
        at = event["occurred_at"]
        linked.append({**event, "prev_hash": prev_hash, "hash": event_hash, "created_at": at, "updated_at": at})
        prev_hash = event_hash
    await executor.execute(insert(_EVENTS), linked)
    await executor.execute(
        update(_HEADS)
        .where(_HEADS.c.organization_id == organization_id)
        .values(seq=seq, hash=prev_hash, event_id=linked[-1]["id"], updated_at=linked[-1]["occurred_at"])
    )
    return len(linked)


class AuditLinker:
    """Links waiting audit events in the background of one process (see the module docstring).

    `notify(organization_id)` after a commit that left an event waiting; `start()` and `stop()` with the app
    (`stop` links what is still waiting, so it must run before the engine is disposed).
    """

    def __init__(self, engine: AsyncEngine, *, sweep_interval: float = SWEEP_INTERVAL_SECONDS) -> None:
        """Link through `engine`'s pool; look for unannounced waiting events every `sweep_interval` seconds."""
        self._engine = engine
        self._sweep_interval = sweep_interval
        self._announced: set[UUID] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def notify(self, organization_id: UUID) -> None:
        """An event of `organization_id` is waiting: link it soon."""
        self._announced.add(organization_id)
        self._wake.set()

    async def link(self, organization_ids: Sequence[UUID], *, wait: bool) -> set[UUID]:
        """One pass over `organization_ids`, each in its own transaction; the ones that still have events waiting."""
        again: set[UUID] = set()
        for organization_id in organization_ids:
            async with self._engine.begin() as connection:
                linked = await link_pending_events(connection, organization_id, wait=wait)
            if linked is None or linked == LINK_BATCH:
                again.add(organization_id)
        return again

    async def _unannounced(self) -> list[UUID]:
        # A poll every few seconds: no client spans, which would each be a trace of their own.
        with suppress_instrumentation():
            async with self._engine.connect() as connection:
                rows = (await connection.execute(_PENDING_ORGANIZATIONS, {"limit": 1000})).all()
                await connection.rollback()
        return [row.organization_id for row in rows]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self._sweep_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_sweep - loop.time())):
                    await self._wake.wait()
            try:
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + self._sweep_interval
                    self._announced.update(await self._unannounced())
                await asyncio.sleep(LINK_GATHER_SECONDS)
                self._wake.clear()
                organizations, self._announced = sorted(self._announced), set()
                if not organizations:
                    continue
                # One trace per pass, its statements beneath (not a root span each).
                with tracer.start_as_current_span(
                    "audit.link", context=Context(), attributes={"zkeb.organizations": len(organizations)}
                ):
                    # A skipped head is busy: retried at the next wake-up or sweep, never in a tight loop.
                    left = await self.link(organizations, wait=False)
                self._announced.update(left)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if database_connection_lost(exc):  # a restart or failover: expected, and the events wait safely
                    logger.warning("linking audit events failed: the database connection was lost; retrying later")
                elif database_timed_out(exc):  # a database that hangs: the same
                    logger.warning("linking audit events failed: the database did not answer in time; retrying later")
                elif isinstance(exc, PoolTimeoutError):  # every pooled connection busy: requests get 503s meanwhile
                    logger.warning("linking audit events failed: no database connection was free; retrying later")
                else:
                    logger.exception("linking audit events failed; retrying at the next sweep")

    def start(self) -> None:
        """Run in the background of this process."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="zkeb-audit-linker")

    async def stop(self) -> None:
        """Stop the task, then link what this process announced and is still waiting (best effort)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            await self.link(sorted(self._announced), wait=True)
        except Exception:
            logger.warning("could not link waiting audit events at shutdown; the next sweep will", exc_info=True)
