"""Audit endpoints: org admins list their organization's events and verify its chain."""

from __future__ import annotations

import datetime
from typing import Annotated

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.params import Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from zkeb.core.auth import principal_of, requires_org_admin
from zkeb.core.errors import ProblemError
from zkeb.db.models.audit import AuditEvent
from zkeb.domain.audit.schemas import AuditEventPage, AuditEventRead, ChainBreakRead, ChainVerification
from zkeb.domain.audit.services import AuditEventService

__all__ = ("AuditController",)

#: Actions are dotted lowercase names (`api_key.created`); anything else, a control character above all, is a 400
#: naming the parameter (a NUL used to reach PostgreSQL, which refused it, and came back as a 409).
#: `(?!\n)`: Python's `$` also matches before a final newline (ECMAScript's, in the OpenAPI schema, does not).
_ACTION_PATTERN = r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*(?!\n)$"
#: Cursors are unpadded URL-safe base64.
_CURSOR_PATTERN = r"^[A-Za-z0-9_-]+(?!\n)$"


def _read(event: AuditEvent) -> AuditEventRead:
    return AuditEventRead(
        id=event.id,
        seq=event.seq,
        occurred_at=event.occurred_at,
        action=event.action,
        outcome=event.outcome,
        actor_type=event.actor_type,
        actor_id=event.actor_id,
        target_type=event.target_type,
        target_id=event.target_id,
        client_ip=event.client_ip,
        user_agent=event.user_agent,
        request_id=event.request_id,
        trace_id=event.trace_id,
        details=event.details,
        prev_hash=bytes(event.prev_hash).hex(),
        hash=bytes(event.hash).hex(),
    )


class AuditController(Controller):
    """The organization's audit log (org admin keys only)."""

    path = "/api/v1/audit-events"
    tags = ["audit"]  # noqa: RUF012 - Litestar's declared attribute
    guards = [requires_org_admin]  # noqa: RUF012

    @get(
        "/",
        summary="List audit events",
        description="Newest first. `since` is inclusive, `until` exclusive; pass `next_cursor` back as `cursor`.",
    )
    async def list_events(
        self,
        request: Request,  # type: ignore[type-arg]
        db_session: NamedDependency[AsyncSession],
        *,
        action: Annotated[
            str | None,
            Parameter(pattern=_ACTION_PATTERN, max_length=64, description="Exact action, e.g. `api_key.created`"),
        ] = None,
        since: Annotated[datetime.datetime | None, Parameter(description="RFC 3339; events at or after")] = None,
        until: Annotated[datetime.datetime | None, Parameter(description="RFC 3339; events before")] = None,
        cursor: Annotated[str | None, Parameter(pattern=_CURSOR_PATTERN, max_length=64)] = None,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 50,
    ) -> AuditEventPage:
        """One page of the organization's events."""
        since, until = _instant("since", since), _instant("until", until)
        service = AuditEventService(session=db_session)
        await service.link_waiting(principal_of(request).organization_id)
        items, next_cursor = await service.page(action=action, since=since, until=until, cursor=cursor, limit=limit)
        return AuditEventPage(items=[_read(event) for event in items], next_cursor=next_cursor)

    @get(
        "/verify",
        summary="Verify the audit chain",
        description="Walks the whole chain in batches; `first_broken` names the first event that does not verify.",
    )
    async def verify(self, request: Request, db_session: NamedDependency[AsyncSession]) -> ChainVerification:  # type: ignore[type-arg]
        """Check every link of the organization's chain and its head."""
        organization_id = principal_of(request).organization_id
        service = AuditEventService(session=db_session)
        await service.link_waiting(organization_id)
        report = await service.verify_chain(organization_id)
        broken = report.first_broken
        return ChainVerification(
            valid=report.valid,
            events=report.events,
            head=report.head.hex(),
            first_broken=None
            if broken is None
            else ChainBreakRead(seq=broken.seq, id=broken.event_id, reason=broken.reason),
        )


def _instant(name: str, value: datetime.datetime | None) -> datetime.datetime | None:
    """A `since`/`until` filter in UTC; 400 without a UTC offset or outside the representable range in UTC."""
    if value is None:
        return None
    if value.utcoffset() is None:
        raise ProblemError(
            f"`{name}` needs a UTC offset as RFC 3339 requires (e.g. 2026-01-01T00:00:00Z)",
            extra={"errors": [{"key": name, "source": "query", "message": "no UTC offset"}]},
        )
    try:
        return value.astimezone(datetime.UTC)
    except OverflowError:
        raise ProblemError(
            f"`{name}` is out of range once in UTC",
            extra={"errors": [{"key": name, "source": "query", "message": "out of range"}]},
        ) from None
