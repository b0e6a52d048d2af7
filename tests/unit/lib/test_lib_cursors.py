"""Keyset cursors: round trips, opacity, and refusal of anything malformed."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
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
    ],
)
def test_malformed_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(ValueError, match="malformed cursor"):
        decode_keyset_cursor(cursor)
