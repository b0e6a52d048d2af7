"""Tenant context: which organization the current unit of work acts for.

Every ORM transaction begins with `set_config('zkeb.org_id', <org>, true)`, so PostgreSQL's row-level
security policies filter every query, including one that forgets its own `WHERE organization_id = ...`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Any
from uuid import UUID

from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.orm import Session, SessionTransaction

__all__ = (
    "TENANT_INFO_KEY",
    "current_tenant",
    "install_tenant_setter",
    "set_tenant",
    "tenant_scope",
    "tenant_transaction",
)

TENANT_INFO_KEY = "zkeb_org_id"
_SET_TENANT = text("SELECT set_config('zkeb.org_id', :org_id, true)")
_current_tenant: ContextVar[UUID | None] = ContextVar("zkeb_tenant", default=None)


def current_tenant() -> UUID | None:
    """The organization the running task acts for, if any."""
    return _current_tenant.get()


def set_tenant(org_id: UUID | None) -> None:
    """Set the tenant for the rest of the running task (e.g. by the authentication middleware)."""
    _current_tenant.set(org_id)


@contextmanager
def tenant_scope(org_id: UUID | None) -> Iterator[None]:
    """Act for `org_id` inside the block, restoring the previous tenant afterwards."""
    token = _current_tenant.set(org_id)
    try:
        yield
    finally:
        _current_tenant.reset(token)


def _set_tenant_on_begin(session: Session, _transaction: SessionTransaction, connection: Connection) -> None:
    org_id: Any = session.info.get(TENANT_INFO_KEY) or _current_tenant.get()
    if org_id is not None:
        connection.execute(_SET_TENANT, {"org_id": str(org_id)})


_installed = False


def install_tenant_setter() -> None:
    """Register the `after_begin` hook on every ORM session (idempotent)."""
    global _installed  # noqa: PLW0603 - one process-wide event registration
    if not _installed:
        event.listen(Session, "after_begin", _set_tenant_on_begin)
        _installed = True


@asynccontextmanager
async def tenant_transaction(engine: AsyncEngine, org_id: UUID) -> AsyncIterator[AsyncConnection]:
    """A Core (non-ORM) transaction acting for `org_id`, for short lookups outside a request session."""
    async with engine.begin() as connection:
        await connection.execute(_SET_TENANT, {"org_id": str(org_id)})
        yield connection
