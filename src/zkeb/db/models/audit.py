"""Audit aggregate: the append-only, per-organization hash-chained event log."""

from __future__ import annotations

import datetime
from typing import Any
from uuid import UUID

from advanced_alchemy.types import JsonB
from sqlalchemy import BigInteger, CheckConstraint, Index, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from zkeb.db.models._base import TenantModel, TimestampUTC

__all__ = ("AuditChainHead", "AuditEvent", "AuditPendingEvent")


class AuditEvent(TenantModel):
    """One sensitive operation. `hash` chains it to the organization's previous event (`prev_hash`)."""

    __tablename__ = "audit_events"
    __table_args__ = (
        UniqueConstraint("organization_id", "seq", name="uq_audit_events_org_seq"),
        CheckConstraint("octet_length(prev_hash) = 32 AND octet_length(hash) = 32", name="hash_len"),
        CheckConstraint("outcome IN ('success', 'failure', 'denied')", name="outcome"),
        Index("ix_audit_events_org_time", "organization_id", "occurred_at"),
        Index("ix_audit_events_org_action", "organization_id", "action", "seq"),
    )

    seq: Mapped[int] = mapped_column(BigInteger)
    occurred_at: Mapped[datetime.datetime] = mapped_column(TimestampUTC)
    actor_type: Mapped[str] = mapped_column(String(32))
    actor_id: Mapped[str | None] = mapped_column(String(80), default=None)
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str | None] = mapped_column(String(32), default=None)
    target_id: Mapped[str | None] = mapped_column(String(80), default=None)
    outcome: Mapped[str] = mapped_column(String(16))
    client_ip: Mapped[str | None] = mapped_column(String(64), default=None)
    user_agent: Mapped[str | None] = mapped_column(String(512), default=None)
    request_id: Mapped[str | None] = mapped_column(String(128), default=None)
    trace_id: Mapped[str | None] = mapped_column(String(32), default=None)
    details: Mapped[dict[str, Any]] = mapped_column(JsonB, default=dict)
    prev_hash: Mapped[bytes] = mapped_column(LargeBinary)
    hash: Mapped[bytes] = mapped_column(LargeBinary)


class AuditChainHead(TenantModel):
    """The latest event of an organization's chain; writers lock this row to append in order."""

    __tablename__ = "audit_chain_heads"
    __table_args__ = (
        UniqueConstraint("organization_id", name="uq_audit_chain_heads_org"),
        CheckConstraint("octet_length(hash) = 32", name="hash_len"),
    )

    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    hash: Mapped[bytes] = mapped_column(LargeBinary)
    event_id: Mapped[UUID | None] = mapped_column(default=None)


class AuditPendingEvent(TenantModel):
    """An event written without the chain head's lock, waiting to be linked into `audit_events` (not yet chained).

    Same fields as `AuditEvent` but the chain's own; `zkeb.core.audit_linker` moves it into the chain, in order.
    """

    __tablename__ = "audit_pending_events"
    __table_args__ = (
        CheckConstraint("outcome IN ('success', 'failure', 'denied')", name="outcome"),
        Index("ix_audit_pending_events_org", "organization_id", "occurred_at", "id"),
    )

    occurred_at: Mapped[datetime.datetime] = mapped_column(TimestampUTC)
    actor_type: Mapped[str] = mapped_column(String(32))
    actor_id: Mapped[str | None] = mapped_column(String(80), default=None)
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str | None] = mapped_column(String(32), default=None)
    target_id: Mapped[str | None] = mapped_column(String(80), default=None)
    outcome: Mapped[str] = mapped_column(String(16))
    client_ip: Mapped[str | None] = mapped_column(String(64), default=None)
    user_agent: Mapped[str | None] = mapped_column(String(512), default=None)
    request_id: Mapped[str | None] = mapped_column(String(128), default=None)
    trace_id: Mapped[str | None] = mapped_column(String(32), default=None)
    details: Mapped[dict[str, Any]] = mapped_column(JsonB, default=dict)
