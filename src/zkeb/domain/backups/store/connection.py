"""The one helper that opens a transaction for a tenant on a raw asyncpg connection (`core.database.pooled_connection`).

The backups domain's hot paths (chunk writes, restores, reads, the one-transaction commit) run on the driver
connection under SQLAlchemy's pool: fewer round trips and no ORM work per statement. Every such transaction acts for one
organization (row-level security) through `raw_tenant_transaction`, so no caller sets the tenant by hand. The
SQLAlchemy instrumentation does not see these statements; each transaction is one CLIENT span of its own
(`postgresql.transaction`), so a trace shows the database's share of a listing, a read or a chunk batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
from opentelemetry import trace
from opentelemetry.trace import SpanKind

__all__ = ("raw_tenant_transaction",)

tracer = trace.get_tracer("zkeb.backups")

#: One round trip opens the transaction and sets its tenant: a simple-protocol query of two statements (it takes no
#: parameters, so the organization id is written into it; a `UUID` renders as hex digits and dashes only).
_BEGIN = "BEGIN{mode}; SELECT set_config('zkeb.org_id', '{organization_id}', true){async_commit}"
#: For writes whose durability a later synchronous commit provides (see `zkeb.domain.backups.chunk_writes`).
_ASYNC_COMMIT = ", set_config('synchronous_commit', 'off', true)"


@contextlib.asynccontextmanager
async def raw_tenant_transaction(
    connection: asyncpg.Connection,
    organization_id: UUID,
    *,
    readonly: bool = False,
    synchronous_commit: bool = True,
) -> AsyncIterator[asyncpg.Connection]:
    """A transaction on `connection` acting for `organization_id`; commits on success, rolls back on error.

    `synchronous_commit=False` skips the commit's WAL flush: only for rows that stay invisible until a later
    synchronous commit references them (whose flush then covers them too).
    """
    if not isinstance(organization_id, UUID):  # the id is written into the statement: never anything but a UUID
        raise TypeError(f"organization_id must be a UUID, not {type(organization_id).__name__}")
    begin = _BEGIN.format(
        mode=" READ ONLY" if readonly else "",
        organization_id=UUID(int=organization_id.int),  # canonical text, whatever UUID subclass came in
        async_commit="" if synchronous_commit else _ASYNC_COMMIT,
    )
    if not trace.get_current_span().is_recording():  # tracing off, or this request not sampled: no span to make
        async with _transaction(connection, begin):
            yield connection
        return
    with tracer.start_as_current_span(
        "postgresql.transaction",
        kind=SpanKind.CLIENT,
        attributes={"db.system": "postgresql", "zkeb.readonly": readonly},
        record_exception=False,  # the request's span records what reaches it; a cancellation is no error here
        set_status_on_exception=False,
    ):
        async with _transaction(connection, begin):
            yield connection


@contextlib.asynccontextmanager
async def _transaction(connection: asyncpg.Connection, begin: str) -> AsyncIterator[None]:
    try:
        await connection.execute(begin)
        yield
    except BaseException:
        # A connection that is closed or busy (a cancelled statement) is not rolled back here: `pooled_connection`
        # invalidates it, which ends the transaction on the server.
        if not connection.is_closed() and connection.is_in_transaction():
            with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
                await connection.execute("ROLLBACK")
        raise
    await connection.execute("COMMIT")
