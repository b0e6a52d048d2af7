"""Keyset cursors round-trip exactly and anything else is a 400 naming `cursor`."""

from __future__ import annotations

import base64
import datetime
import uuid

import pytest

from zkeb.domain.accounts.pagination import InvalidCursorError, KeysetCursor


def test_a_cursor_round_trips_to_the_same_microsecond_and_id() -> None:
    position = KeysetCursor(
        created_at=datetime.datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=datetime.UTC), id=uuid.uuid4()
    )
    encoded = position.encode()
    assert "=" not in encoded
    assert KeysetCursor.decode(encoded) == position


@pytest.mark.parametrize(
    "value",
    [
        "zzz",
        "",
        "!!!!",
        base64.urlsafe_b64encode(b"not-a-number.abc").decode(),
        base64.urlsafe_b64encode(b"123.not-a-uuid").decode(),
        base64.urlsafe_b64encode(b"99999999999999999999999.00000000000000000000000000000000").decode(),
        "A" * 200,
    ],
)
def test_malformed_cursors_are_refused_with_a_400_naming_the_parameter(value: str) -> None:
    with pytest.raises(InvalidCursorError) as caught:
        KeysetCursor.decode(value)
    assert caught.value.status_code == 400
    assert caught.value.problem_extra["errors"][0]["key"] == "cursor"
