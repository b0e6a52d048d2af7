"""Response bodies of the audit domain."""

from __future__ import annotations

import datetime
from typing import Any
from uuid import UUID

import msgspec

__all__ = ("AuditEventPage", "AuditEventRead", "ChainBreakRead", "ChainVerification")


class AuditEventRead(msgspec.Struct):
    """One stored audit event, with the hashes that chain it (hex)."""

    id: UUID
    seq: int
    occurred_at: datetime.datetime
    action: str
    outcome: str
    actor_type: str
    actor_id: str | None
    target_type: str | None
    target_id: str | None
    client_ip: str | None
    user_agent: str | None
    request_id: str | None
    trace_id: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str


class AuditEventPage(msgspec.Struct):
    """A page of events, newest first; pass `next_cursor` as `cursor` for the next page (null: no more)."""

    items: list[AuditEventRead]
    next_cursor: str | None


class ChainBreakRead(msgspec.Struct):
    """The first event where the stored chain does not verify."""

    seq: int
    id: UUID | None
    reason: str


class ChainVerification(msgspec.Struct):
    """The result of walking an organization's whole chain.

    `events` counts the stored events read; `head` is the hash (hex) of the last event that verified: of the last
    event when the chain is valid (64 zeros for an empty chain), the value to compare with an anchored head; when
    it is broken, of the last event before `first_broken`, as far as the chain can be trusted.
    """

    valid: bool
    events: int
    head: str
    first_broken: ChainBreakRead | None
