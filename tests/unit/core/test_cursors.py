"""The one cursor codec: positions round-trip exactly within their listing; anything else is the one 400."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zkeb.core.cursors import (
    MAX_CURSOR_LENGTH,
    InvalidCursorError,
    decode_keyset_cursor,
    decode_sequence_cursor,
    encode_keyset_cursor,
    encode_sequence_cursor,
    listing_name,
)

ID = UUID("01a21ca0-e7ad-722a-9585-e64cb0b11adb")


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


@given(
    at=st.datetimes(timezones=st.just(UTC), min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    row_id=st.uuids(),
)
def test_a_keyset_position_round_trips_to_the_same_microsecond_and_id(at: datetime, row_id: UUID) -> None:
    cursor = encode_keyset_cursor("project_usage", at, row_id)
    assert "=" not in cursor
    assert len(cursor) <= MAX_CURSOR_LENGTH
    assert decode_keyset_cursor("project_usage", cursor) == (at, row_id)


def test_a_position_in_another_zone_decodes_to_the_same_instant_in_utc() -> None:
    at = datetime(2026, 11, 27, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    decoded, _ = decode_keyset_cursor("backups", encode_keyset_cursor("backups", at, ID))
    assert (decoded, decoded.utcoffset()) == (datetime(2026, 11, 27, 10, 0, tzinfo=UTC), timedelta(0))


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_a_sequence_position_round_trips(seq: int) -> None:
    assert decode_sequence_cursor("audit_events", encode_sequence_cursor("audit_events", seq)) == seq


GENUINE = encode_keyset_cursor("backups", datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC), ID)
MICROS = "1795773600123456"
ROW = f"{MICROS}.{ID.hex}"


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param("", id="empty"),
        pytest.param("!!!", id="not-base64"),
        pytest.param(GENUINE[:-3], id="truncated"),
        pytest.param(GENUINE + "AA", id="appended"),
        pytest.param(GENUINE[:10] + "*" + GENUINE[10:], id="character-outside-the-alphabet"),
        pytest.param("A" * (MAX_CURSOR_LENGTH + 1), id="oversize"),
        pytest.param(_b64(ROW), id="no-listing"),
        pytest.param(_b64(f"trash.{ROW}"), id="another-listing"),
        pytest.param(_b64(f"Backups.{ROW}"), id="listing-in-another-case"),
        pytest.param(_b64(f"backups.{ROW}.1"), id="three-fields"),
        pytest.param(_b64(f"backups.{MICROS}"), id="one-field"),
        pytest.param(_b64(f"backups.{MICROS}.not-a-uuid"), id="not-a-uuid"),
        pytest.param(_b64(f"backups.{MICROS}.{ID.hex.upper()}"), id="upper-case-hex"),
        pytest.param(_b64(f"backups.{MICROS}.{ID}"), id="uuid-with-dashes"),
        pytest.param(_b64(f"backups.+{ROW}"), id="plus-sign"),
        pytest.param(_b64(f"backups. {ROW}"), id="leading-space"),
        pytest.param(_b64(f"backups.0{ROW}"), id="leading-zero"),
        pytest.param(_b64(f"backups.1_795_773_600_123_456.{ID.hex}"), id="digit-separators"),
        pytest.param(_b64(f"backups.99999999999999999999999.{ID.hex}"), id="past-year-9999"),
        pytest.param(_b64(f"backups.2026-11-27T10:00:00+00:00|{ID}"), id="another-format"),
        pytest.param(base64.urlsafe_b64encode(b"backups.\xff\xfe.\x00").decode(), id="not-ascii"),
    ],
)
def test_anything_but_a_genuine_keyset_cursor_is_the_one_400_naming_cursor(cursor: str) -> None:
    with pytest.raises(InvalidCursorError) as caught:
        decode_keyset_cursor("backups", cursor)
    assert caught.value.status_code == 400
    assert caught.value.problem_extra["errors"] == [{"key": "cursor", "message": "invalid cursor", "source": "query"}]


def test_the_genuine_cursor_of_those_cases_decodes_padded_or_not() -> None:
    position = (datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC), ID)
    assert _b64(f"backups.{ROW}") == GENUINE
    assert decode_keyset_cursor("backups", GENUINE) == position
    assert decode_keyset_cursor("backups", GENUINE + "=" * (-len(GENUINE) % 4)) == position


@pytest.mark.parametrize("text", ["-0", "+5", "05", "5.5", "five", "", " 5"])
def test_a_sequence_cursor_must_be_canonical(text: str) -> None:
    with pytest.raises(InvalidCursorError):
        decode_sequence_cursor("audit_events", _b64(f"audit_events.{text}"))


def test_a_keyset_cursor_is_not_a_sequence_cursor_nor_the_reverse() -> None:
    with pytest.raises(InvalidCursorError):
        decode_sequence_cursor("backups", GENUINE)
    with pytest.raises(InvalidCursorError):
        decode_keyset_cursor("backups", encode_sequence_cursor("backups", 42))


def test_a_listing_is_its_name_and_its_filters() -> None:
    assert listing_name("backups") == "backups"
    container = UUID(int=1)
    same = listing_name("backups", container, None)
    assert same == listing_name("backups", UUID(int=1), None)
    others = {
        listing_name("backups", None, None),
        listing_name("backups", UUID(int=2), None),
        listing_name("backups", container, b"\x01"),
        listing_name("backups", None, container),
        listing_name("trash", container, None),
        listing_name("audit_events", None, datetime(2026, 1, 1, tzinfo=UTC), None),
        listing_name("audit_events", None, None, datetime(2026, 1, 1, tzinfo=UTC)),
        listing_name("audit_events", "", None, None),
    }
    assert same not in others
    assert len(others) == 8


def test_a_cursor_of_a_listing_read_with_other_filters_is_refused() -> None:
    cursor = encode_keyset_cursor(listing_name("backups", UUID(int=1)), datetime(2026, 1, 1, tzinfo=UTC), ID)
    assert len(cursor) <= MAX_CURSOR_LENGTH
    assert decode_keyset_cursor(listing_name("backups", UUID(int=1)), cursor)[1] == ID
    for other in (listing_name("backups", UUID(int=2)), listing_name("backups"), "backups"):
        with pytest.raises(InvalidCursorError):
            decode_keyset_cursor(other, cursor)
