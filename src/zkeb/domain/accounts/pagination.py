"""Keyset pagination over `(created_at, id)`: stable under inserts, no OFFSET scans.

The cursor is opaque to clients: unpadded URL-safe base64 of `<created_at µs>.<id hex>`, pointing at the last
row of the previous page.
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar
from uuid import UUID

from advanced_alchemy.base import UUIDv7AuditBase
from sqlalchemy import Select, literal, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from zkeb.core.errors import ProblemError

__all__ = ("InvalidCursorError", "KeysetCursor", "Page", "fetch_page")

T = TypeVar("T", bound=UUIDv7AuditBase)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


class InvalidCursorError(ProblemError):
    """The `cursor` query parameter is not one this server handed out (400)."""

    status_code: int = 400

    def __init__(self) -> None:
        super().__init__(
            "cursor: not a cursor returned by this endpoint",
            extra={"errors": [{"key": "cursor", "message": "invalid cursor", "source": "query"}]},
        )


@dataclass(frozen=True, slots=True)
class KeysetCursor:
    """The position after which the next page starts."""

    created_at: datetime.datetime
    id: UUID

    def encode(self) -> str:
        """The opaque string clients pass back as `cursor`."""
        micros = (self.created_at - _EPOCH) // datetime.timedelta(microseconds=1)
        raw = f"{micros}.{self.id.hex}".encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    @classmethod
    def decode(cls, value: str) -> KeysetCursor:
        """Parse a cursor.

        Raises:
            InvalidCursorError: not a cursor this server produced.
        """
        if len(value) > 128:
            raise InvalidCursorError
        try:
            decoded = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            # Only canonical text, padded or not: the decoder silently skips characters outside the alphabet.
            if base64.urlsafe_b64encode(decoded).rstrip(b"=").decode() != value.rstrip("="):
                raise InvalidCursorError
            raw = decoded.decode("ascii")
            micros, _, id_hex = raw.partition(".")
            created_at = _EPOCH + datetime.timedelta(microseconds=int(micros))
            return cls(created_at=created_at, id=UUID(hex=id_hex))
        except (ValueError, binascii.Error, OverflowError, UnicodeDecodeError):
            raise InvalidCursorError from None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """Rows of one page and the cursor of the next (None on the last page)."""

    items: Sequence[T]
    next_cursor: str | None


async def fetch_page(
    session: AsyncSession, statement: Select[tuple[T]], model: type[T], *, limit: int, cursor: str | None
) -> Page[T]:
    """Run `statement` (a select of `model` rows, already filtered) as one page ordered by `(created_at, id)`.

    Raises:
        InvalidCursorError: the cursor is malformed.
    """
    if cursor:
        position = KeysetCursor.decode(cursor)
        statement = statement.where(
            tuple_(model.created_at, model.id) > tuple_(literal(position.created_at), literal(position.id))
        )
    statement = statement.order_by(model.created_at, model.id).limit(limit + 1)
    rows = list((await session.execute(statement)).scalars().all())
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = KeysetCursor(created_at=last.created_at, id=last.id).encode()
    return Page(items=rows, next_cursor=next_cursor)
