"""Keyset pagination over `(created_at, id)` for the accounts listings: stable under inserts, no OFFSET scans.

The cursor (see `zkeb.core.cursors`) points at the last row of the previous page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from advanced_alchemy.base import UUIDv7AuditBase
from sqlalchemy import Select, literal, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from zkeb.core.cursors import decode_keyset_cursor, encode_keyset_cursor, listing_name

__all__ = ("Page", "fetch_page")

T = TypeVar("T", bound=UUIDv7AuditBase)


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """Rows of one page and the cursor of the next (None on the last page)."""

    items: Sequence[T]
    next_cursor: str | None


async def fetch_page(
    session: AsyncSession,
    statement: Select[tuple[T]],
    model: type[T],
    *,
    limit: int,
    cursor: str | None,
    scope: tuple[object, ...] = (),
) -> Page[T]:
    """Run `statement` (a select of `model` rows, already filtered) as one page ordered by `(created_at, id)`.

    `scope` is what selects the rows besides the caller (a project's id): a cursor is refused by another listing.

    Raises:
        InvalidCursorError: the cursor is malformed, or another listing's.
    """
    listing = listing_name(str(model.__tablename__), *scope)
    if cursor:
        created_at, after_id = decode_keyset_cursor(listing, cursor)
        statement = statement.where(tuple_(model.created_at, model.id) > tuple_(literal(created_at), literal(after_id)))
    statement = statement.order_by(model.created_at, model.id).limit(limit + 1)
    rows = list((await session.execute(statement)).scalars().all())
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_keyset_cursor(listing, last.created_at, last.id)
    return Page(items=rows, next_cursor=next_cursor)
