"""Opaque pagination cursors: the one codec and the one error of every list endpoint.

A list endpoint hands out `next_cursor`, the position of the last row it returned; the client passes it back
unchanged as `cursor`. A cursor is unpadded URL-safe base64 of the listing's name and the position's fields joined
by dots: a timestamp as whole microseconds since the Unix epoch, a UUID as 32 hex digits, an integer in decimal.
It decodes only for the listing that made it, and only if encoding what it decodes to gives it back exactly
(padding aside), so nothing a client makes up, truncates, appends to or carries over from another listing reaches
a query; anything else is `InvalidCursorError`, one 400 body for every endpoint. A cursor carries no authority:
the query it resumes is scoped to the caller like the first page.

A listing is a name and the filters its pages are read with (`listing_name`): a cursor passed back with other
filters (another container, project, action or time window) would resume a position in a different list, skipping
or repeating rows without a word, so it is refused like any other cursor that is not the listing's.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
from typing import TypeVar
from uuid import UUID

from zkeb.core.errors import ProblemError

__all__ = (
    "MAX_CURSOR_LENGTH",
    "InvalidCursorError",
    "decode_keyset_cursor",
    "decode_sequence_cursor",
    "encode_keyset_cursor",
    "encode_sequence_cursor",
    "listing_name",
)

#: Longer than any cursor this codec makes (a keyset cursor of a 12-letter listing with filters is 102 characters).
MAX_CURSOR_LENGTH = 128
#: Hex digits of the filters' digest in a listing's name: enough that two filters of one caller never share one.
_FILTER_DIGEST_LENGTH = 12
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_ONE_MICROSECOND = datetime.timedelta(microseconds=1)
_Field = datetime.datetime | UUID | int
_Position = TypeVar("_Position", bound=tuple[_Field, ...])


class InvalidCursorError(ProblemError):
    """The `cursor` query parameter is not a `next_cursor` this endpoint handed out (400)."""

    status_code: int = 400

    def __init__(self) -> None:
        """The one refusal, naming the parameter."""
        super().__init__(
            "cursor: not a cursor returned by this endpoint with these filters; pass back next_cursor unchanged, "
            "with the query parameters of the page that returned it",
            extra={"errors": [{"key": "cursor", "message": "invalid cursor", "source": "query"}]},
        )


def listing_name(name: str, *filters: object) -> str:
    """The listing `name` read with `filters` (the values of its filter parameters, None for one not given).

    Two listings differ when any filter does; without filters, the listing is `name` itself.
    """
    if not filters:
        return name
    text = "\x1f".join(_filter_text(value) for value in filters)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:_FILTER_DIGEST_LENGTH]}"


def _filter_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return f"{type(value).__name__}:{value}"


def encode_keyset_cursor(listing: str, at: datetime.datetime, row_id: UUID) -> str:
    """The cursor of `listing` after the row (`at`, `row_id`) of its (timestamp, id) ordering (`at` aware)."""
    return _encode(listing, (at, row_id))


def decode_keyset_cursor(listing: str, cursor: str) -> tuple[datetime.datetime, UUID]:
    """The (timestamp in UTC, id) position a cursor of `listing` from `encode_keyset_cursor` stands for.

    Raises:
        InvalidCursorError: anything else.
    """
    micros, id_hex = _fields(listing, cursor, 2)
    try:
        position = (_EPOCH + int(micros) * _ONE_MICROSECOND, UUID(hex=id_hex))
    except (ValueError, OverflowError):
        raise InvalidCursorError from None
    return _canonical(listing, cursor, position)


def encode_sequence_cursor(listing: str, seq: int) -> str:
    """The cursor of `listing` after the row numbered `seq` of its integer ordering."""
    return _encode(listing, (seq,))


def decode_sequence_cursor(listing: str, cursor: str) -> int:
    """The number a cursor of `listing` from `encode_sequence_cursor` stands for.

    Raises:
        InvalidCursorError: anything else.
    """
    (text,) = _fields(listing, cursor, 1)
    try:
        seq = int(text)
    except ValueError:
        raise InvalidCursorError from None
    return _canonical(listing, cursor, (seq,))[0]


def _encode(listing: str, position: tuple[_Field, ...]) -> str:
    text = ".".join((listing, *map(_field_text, position)))
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def _field_text(field: _Field) -> str:
    if isinstance(field, datetime.datetime):
        return str((field - _EPOCH) // _ONE_MICROSECOND)
    if isinstance(field, UUID):
        return field.hex
    return str(field)


def _fields(listing: str, cursor: str, count: int) -> list[str]:
    """The `count` dot-separated fields after `listing`'s name in `cursor` (not yet checked to be canonical)."""
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise InvalidCursorError
    try:
        fields = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii").split(".")
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        raise InvalidCursorError from None
    if len(fields) != count + 1 or fields[0] != listing:
        raise InvalidCursorError
    return fields[1:]


def _canonical(listing: str, cursor: str, position: _Position) -> _Position:
    """`position` if it encodes back to `cursor` exactly (padding aside): signs, spaces, `_` digit separators,
    upper-case hex and characters outside the base64 alphabet (which the decoder skips) all fail this."""
    if _encode(listing, position) != cursor.rstrip("="):
        raise InvalidCursorError
    return position
