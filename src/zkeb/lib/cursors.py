"""Opaque keyset cursors over (timestamp, id) positions, as list endpoints hand them out in `next_cursor`."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from uuid import UUID

__all__ = ("decode_keyset_cursor", "encode_keyset_cursor")


def encode_keyset_cursor(at: datetime, row_id: UUID) -> str:
    """The cursor for the position just after the row (`at`, `row_id`) in a (timestamp, id) ordering."""
    raw = f"{at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_keyset_cursor(cursor: str) -> tuple[datetime, UUID]:
    """The position a cursor from `encode_keyset_cursor` stands for.

    Raises:
        ValueError: the cursor is malformed, its timestamp naive or out of range once in UTC.
    """
    try:
        decoded = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("malformed cursor") from None
    # Only canonical text, padded or not: the decoder silently skips characters outside the alphabet.
    if base64.urlsafe_b64encode(decoded).decode().rstrip("=") != cursor.rstrip("="):
        raise ValueError("malformed cursor")
    try:
        raw = decoded.decode()
        at, _, identifier = raw.partition("|")
        instant, row_id = datetime.fromisoformat(at), UUID(identifier)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError("malformed cursor") from None
    if instant.tzinfo is None:
        raise ValueError("malformed cursor")
    try:  # in UTC, as issued: a crafted offset must not carry the instant out of the representable range
        return instant.astimezone(UTC), row_id
    except OverflowError:
        raise ValueError("malformed cursor") from None
