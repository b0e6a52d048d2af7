"""Reading the audit log: keyset pages, chain verification in bounded batches, and chain heads for anchoring."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast
from uuid import UUID

from advanced_alchemy.filters import LimitOffset, OrderBy
from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from advanced_alchemy.service import SQLAlchemyAsyncRepositoryService
from sqlalchemy import ColumnElement, Table, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from zkeb.core.audit import chained_fields
from zkeb.core.audit_linker import LINK_BATCH, link_pending_events
from zkeb.core.cursors import InvalidCursorError, decode_sequence_cursor, encode_sequence_cursor, listing_name
from zkeb.core.tenancy import tenant_transaction
from zkeb.db.models.audit import AuditChainHead, AuditEvent
from zkeb.lib.hashchain import GENESIS_HASH, chain_hash

__all__ = (
    "AuditEventService",
    "ChainBreak",
    "ChainHead",
    "ChainReport",
    "ChainWalk",
    "log_chain_heads",
    "read_chain_heads",
    "verify_all_chains",
    "verify_organization_chain",
)

logger = logging.getLogger("zkeb.audit")

VERIFY_BATCH_SIZE = 500
_EVENTS = cast("Table", AuditEvent.__table__)
_HEADS = cast("Table", AuditChainHead.__table__)
_MAX_SEQ = 2**63 - 1  # audit_events.seq is a bigint
_ALL_HEADS = text("SELECT organization_id, seq, hash, updated_at FROM zkeb_audit_chain_heads()")


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """Where an organization's stored chain first fails to verify."""

    seq: int
    event_id: UUID | None
    reason: str


@dataclass(frozen=True, slots=True)
class ChainReport:
    """The outcome of walking a chain: event count, last stored hash, and the first break if any."""

    events: int
    head: bytes
    first_broken: ChainBreak | None

    @property
    def valid(self) -> bool:
        """Whether every event verified and the chain head agrees with the last event."""
        return self.first_broken is None


class ChainWalk:
    """Incremental verifier fed stored events in `seq` order; memory stays constant whatever the chain length.

    Checks, per event: `seq` is the previous one plus one (else a row was deleted or renumbered), `prev_hash`
    is the previous event's stored hash, and the stored hash is `chain_hash(prev_hash, fields)`.
    """

    def __init__(self) -> None:
        self.events = 0
        self.last_seq = 0
        self.head = GENESIS_HASH
        self.first_broken: ChainBreak | None = None

    def feed(self, row: Mapping[str, Any]) -> None:
        """Check the next stored event (a row mapping with every column of `audit_events`)."""
        self.events += 1
        if self.first_broken is not None:
            return
        seq = int(row["seq"])
        reason: str | None = None
        if seq != self.last_seq + 1:
            reason = "seq gap: events are missing before this one" if seq > self.last_seq else "seq out of order"
        elif bytes(row["prev_hash"]) != self.head:
            reason = "prev_hash mismatch"
        elif bytes(row["hash"]) != chain_hash(self.head, chained_fields(row)):
            reason = "hash mismatch"
        if reason is not None:
            self.first_broken = ChainBreak(seq=seq, event_id=row["id"], reason=reason)
            return
        self.last_seq = seq
        self.head = bytes(row["hash"])

    def finish(self, head_seq: int | None, head_hash: bytes | None, head_event_id: UUID | None) -> ChainReport:
        """Compare the walked chain with the stored chain head and report."""
        if self.first_broken is None and head_seq is not None:
            if head_seq > self.last_seq:
                self.first_broken = ChainBreak(
                    seq=self.last_seq + 1, event_id=head_event_id, reason="events missing at the tail of the chain"
                )
            elif head_seq == self.last_seq and head_hash is not None and bytes(head_hash) != self.head:
                self.first_broken = ChainBreak(
                    seq=self.last_seq, event_id=head_event_id, reason="chain head does not match the last event"
                )
        return ChainReport(events=self.events, head=self.head, first_broken=self.first_broken)


class AuditEventService(SQLAlchemyAsyncRepositoryService[AuditEvent]):
    """Reads the current tenant's audit log (row-level security scopes every query to it)."""

    class Repo(SQLAlchemyAsyncRepository[AuditEvent]):
        """Audit events."""

        model_type = AuditEvent

    repository_type = Repo

    async def page(
        self,
        *,
        action: str | None = None,
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[Sequence[AuditEvent], str | None]:
        """Events newest first, filtered, with a keyset cursor on `seq`.

        `since` is inclusive, `until` exclusive (both on `occurred_at`).

        Raises:
            InvalidCursorError: a malformed cursor, or one given out with other filters (400).
        """
        conditions: list[ColumnElement[bool]] = []
        if action is not None:
            conditions.append(AuditEvent.action == action)
        if since is not None:
            conditions.append(AuditEvent.occurred_at >= since)
        if until is not None:
            conditions.append(AuditEvent.occurred_at < until)
        listing = listing_name("audit_events", action, since, until)
        if cursor is not None:
            after = decode_sequence_cursor(listing, cursor)
            if not 1 <= after <= _MAX_SEQ:
                raise InvalidCursorError
            conditions.append(AuditEvent.seq < after)
        rows = await self.get_many(*conditions, OrderBy("seq", "desc"), LimitOffset(limit=limit + 1, offset=0))
        items = list(rows[:limit])
        next_cursor = encode_sequence_cursor(listing, items[-1].seq) if len(rows) > limit else None
        return items, next_cursor

    async def link_waiting(self, organization_id: UUID) -> None:
        """Chain the organization's events still waiting to be linked, so a reader sees every committed event.

        Runs in the request's transaction (committed with the response) and waits for the chain head.
        """
        while await link_pending_events(self.repository.session, organization_id) == LINK_BATCH:
            pass

    async def verify_chain(self, organization_id: UUID, *, batch_size: int = VERIFY_BATCH_SIZE) -> ChainReport:
        """Walk the organization's whole chain in `seq` order, `batch_size` rows at a time."""
        return await verify_organization_chain(self.repository.session, organization_id, batch_size=batch_size)


async def verify_organization_chain(
    executor: AsyncSession | AsyncConnection, organization_id: UUID, *, batch_size: int = VERIFY_BATCH_SIZE
) -> ChainReport:
    """Verify `organization_id`'s chain through an `AsyncSession` or `AsyncConnection` acting for that tenant.

    The head is read first: appends commit in `seq` order (writers hold the head's row lock until commit), so
    every batch sees a prefix of the chain that extends the one the head describes.
    """
    head = (
        await executor.execute(
            select(_HEADS.c.seq, _HEADS.c.hash, _HEADS.c.event_id).where(_HEADS.c.organization_id == organization_id)
        )
    ).one_or_none()
    walk = ChainWalk()
    last_seq = 0
    while True:
        rows = (
            (
                await executor.execute(
                    select(_EVENTS)
                    .where(_EVENTS.c.organization_id == organization_id, _EVENTS.c.seq > last_seq)
                    .order_by(_EVENTS.c.seq)
                    .limit(batch_size)
                )
            )
            .mappings()
            .all()
        )
        for row in rows:
            walk.feed(cast("Mapping[str, Any]", row))
        if len(rows) < batch_size:
            break
        last_seq = int(rows[-1]["seq"])
        if walk.first_broken is not None:
            # Count the rest without hashing it.
            remaining = (
                await executor.execute(
                    select(func.count())
                    .select_from(_EVENTS)
                    .where(_EVENTS.c.organization_id == organization_id, _EVENTS.c.seq > last_seq)
                )
            ).scalar_one()
            walk.events += int(remaining)
            break
    if head is None:
        return walk.finish(None, None, None)
    return walk.finish(int(head.seq), bytes(head.hash), head.event_id)


@dataclass(frozen=True, slots=True)
class ChainHead:
    """One organization's chain head, as anchored in the log."""

    organization_id: UUID
    seq: int
    hash: bytes
    updated_at: datetime.datetime


async def read_chain_heads(engine: AsyncEngine | AsyncConnection) -> list[ChainHead]:
    """Every organization's chain head (a cross-tenant read through a SECURITY DEFINER function)."""
    if isinstance(engine, AsyncConnection):
        rows = (await engine.execute(_ALL_HEADS)).all()
    else:
        async with engine.connect() as connection:
            rows = (await connection.execute(_ALL_HEADS)).all()
    return [ChainHead(r.organization_id, int(r.seq), bytes(r.hash), r.updated_at) for r in rows]


async def log_chain_heads(engine: AsyncEngine) -> int:
    """Log every organization's chain head (one line each) so an operator can anchor it outside the database."""
    heads = await read_chain_heads(engine)
    for head in heads:
        fields = {
            "organization_id": str(head.organization_id),
            "seq": head.seq,
            "hash": head.hash.hex(),
            "updated_at": head.updated_at.isoformat(),
        }
        # The values also as fields of the JSON line, for a log pipeline that anchors them.
        logger.info("audit chain head organization_id=%s seq=%d hash=%s updated_at=%s", *fields.values(), extra=fields)
    return len(heads)


async def verify_all_chains(
    engine: AsyncEngine, organization_ids: Sequence[UUID] | None = None
) -> list[tuple[UUID, ChainReport]]:
    """Link waiting events, then verify the chains of `organization_ids` (default: every organization listable).

    Each organization is verified in its own transaction acting for it, so row-level security holds whatever
    the role; listing every organization needs a role that bypasses it (the schema owner as superuser).
    """
    if organization_ids is None:
        async with engine.connect() as connection:
            organization_ids = list(
                (await connection.execute(text("SELECT id FROM organizations ORDER BY id"))).scalars()
            )
    reports: list[tuple[UUID, ChainReport]] = []
    for organization_id in organization_ids:
        async with tenant_transaction(engine, organization_id) as connection:
            # Events committed but not linked yet join the chain first (see zkeb.core.audit_linker).
            while await link_pending_events(connection, organization_id) == LINK_BATCH:
                pass
            reports.append((organization_id, await verify_organization_chain(connection, organization_id)))
    return reports
