"""Keyset cursors: round trips, opacity, and refusal of anything malformed."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest

from zkeb.lib.cursors import decode_keyset_cursor, encode_keyset_cursor

ID = UUID("01a21ca0-e7ad-722a-9585-e64cb0b11adb")


def test_round_trip_keeps_microseconds_and_zone() -> None:
    at = datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC)
    cursor = encode_keyset_cursor(at, ID)
    assert "=" not in cursor
    assert decode_keyset_cursor(cursor) == (at, ID)


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "!!!",
        base64.urlsafe_b64encode(b"2026-11-27T10:00:00|not-a-uuid").decode(),
        base64.urlsafe_b64encode(f"2026-11-27T10:00:00|{ID}".encode()).decode(),  # naive timestamp
        base64.urlsafe_b64encode(f"yesterday|{ID}".encode()).decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        # Representable as written, not once in UTC (a 500 from the database before).
        base64.urlsafe_b64encode(f"0001-01-01T00:00:00+14:00|{ID}".encode()).decode(),
        base64.urlsafe_b64encode(f"9999-12-31T23:59:59-14:00|{ID}".encode()).decode(),
    ],
)
def test_malformed_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(ValueError, match="malformed cursor"):
        decode_keyset_cursor(cursor)


def test_a_cursor_with_another_offset_stands_for_the_same_instant_in_utc() -> None:
    cursor = base64.urlsafe_b64encode(f"2026-11-27T12:00:00+02:00|{ID}".encode()).decode()
    at, row_id = decode_keyset_cursor(cursor)
    assert (at, at.utcoffset(), row_id) == (datetime(2026, 11, 27, 10, tzinfo=UTC), timedelta(0), ID)
