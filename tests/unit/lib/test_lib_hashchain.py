from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta, timezone
from uuid import UUID

import pytest

from zkeb.lib.hashchain import (
    GENESIS_HASH,
    ChainBreak,
    canonical_event_bytes,
    chain_hash,
    escape_control_chars,
    verify_chain,
)

EVENT_ID = UUID("0192f5a4-1b2c-7d3e-8f40-5a6b7c8d9e0f")
ORG_ID = UUID("11111111-2222-4333-8444-555555555555")
OCCURRED_AT = datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC)


class Action(enum.StrEnum):
    BACKUP_CREATED = "backup.created"


def sample_event(**overrides: object) -> dict[str, object]:
    event: dict[str, object] = {
        "id": EVENT_ID,
        "organization_id": ORG_ID,
        "action": "backup.created",
        "occurred_at": OCCURRED_AT,
        "device_id_hash": bytes([0xAB]) * 4,
        "details": {"size": 5, "append_only": False, "note": None},
    }
    event.update(overrides)
    return event


EXPECTED_CANONICAL = (
    b'{"action":"backup.created",'
    b'"details":{"append_only":false,"note":null,"size":5},'
    b'"device_id_hash":"abababab",'
    b'"id":"0192f5a4-1b2c-7d3e-8f40-5a6b7c8d9e0f",'
    b'"occurred_at":"2026-11-27T10:00:00.123456Z",'
    b'"organization_id":"11111111-2222-4333-8444-555555555555"}'
)


def test_genesis_hash_is_32_zero_bytes() -> None:
    assert GENESIS_HASH == b"\x00" * 32


def test_canonical_event_bytes_known_answer() -> None:
    assert canonical_event_bytes(sample_event()) == EXPECTED_CANONICAL


def test_canonical_event_bytes_ignores_insertion_order() -> None:
    event = sample_event()
    reordered = dict(reversed(list(event.items())))
    assert list(reordered) != list(event)
    assert canonical_event_bytes(reordered) == canonical_event_bytes(event)


def test_canonical_event_bytes_normalises_timezones() -> None:
    shifted = OCCURRED_AT.astimezone(timezone(timedelta(hours=-7)))
    assert canonical_event_bytes(sample_event(occurred_at=shifted)) == EXPECTED_CANONICAL


def test_canonical_event_bytes_whole_second_datetime_keeps_microseconds() -> None:
    encoded = canonical_event_bytes({"at": datetime(2026, 1, 1, tzinfo=UTC)})
    assert encoded == b'{"at":"2026-01-01T00:00:00.000000Z"}'


def test_canonical_event_bytes_other_value_kinds() -> None:
    event = {
        "when": date(2026, 11, 27),
        "kind": Action.BACKUP_CREATED,
        "ids": (EVENT_ID, ORG_ID),
        "raw": bytearray(b"\x00\xff"),
        "view": memoryview(b"\x10"),
        "ratio": 0.5,
        "big": 2**63,
        "text": "line\nbreak \u00e9",
    }
    assert canonical_event_bytes(event) == (
        b'{"big":9223372036854775808,'
        b'"ids":["0192f5a4-1b2c-7d3e-8f40-5a6b7c8d9e0f","11111111-2222-4333-8444-555555555555"],'
        b'"kind":"backup.created","ratio":0.5,"raw":"00ff",'
        b'"text":"line\\nbreak \xc3\xa9","view":"10","when":"2026-11-27"}'
    )


def test_canonical_event_bytes_distinguishes_types_that_print_alike() -> None:
    assert canonical_event_bytes({"v": "1"}) != canonical_event_bytes({"v": 1})
    assert canonical_event_bytes({"v": True}) != canonical_event_bytes({"v": 1})
    assert canonical_event_bytes({"v": None}) != canonical_event_bytes({"v": "null"})


def test_canonical_event_bytes_rejects_naive_datetime() -> None:
    with pytest.raises(ValueError, match="aware"):
        canonical_event_bytes({"at": datetime(2026, 1, 1)})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_canonical_event_bytes_rejects_non_finite_floats(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        canonical_event_bytes({"v": value})


@pytest.mark.parametrize("value", [{1, 2}, object(), 1j])
def test_canonical_event_bytes_rejects_values_without_canonical_form(value: object) -> None:
    with pytest.raises(TypeError, match="canonical"):
        canonical_event_bytes({"v": value})


def test_canonical_event_bytes_rejects_non_string_keys() -> None:
    with pytest.raises(TypeError, match="keys"):
        canonical_event_bytes({"nested": {1: "x"}})


def test_chain_hash_known_answer() -> None:
    expected = hashlib.sha256(b"zkeb-audit-v1\x00" + GENESIS_HASH + EXPECTED_CANONICAL).digest()
    assert chain_hash(GENESIS_HASH, sample_event()) == expected
    assert len(expected) == 32


def test_chain_hash_depends_on_prev_hash_and_every_field() -> None:
    base = chain_hash(GENESIS_HASH, sample_event())
    assert chain_hash(b"\x01" + bytes(31), sample_event()) != base
    assert chain_hash(GENESIS_HASH, sample_event(action="backup.deleted")) != base
    assert chain_hash(GENESIS_HASH, sample_event(occurred_at=OCCURRED_AT + timedelta(microseconds=1))) != base
    assert chain_hash(GENESIS_HASH, sample_event(details={"size": 6, "append_only": False, "note": None})) != base
    assert chain_hash(GENESIS_HASH, {**sample_event(), "extra": None}) != base


@pytest.mark.parametrize("length", [0, 31, 33])
def test_chain_hash_rejects_wrong_prev_hash_length(length: int) -> None:
    with pytest.raises(ValueError, match="prev_hash"):
        chain_hash(bytes(length), sample_event())


def build_chain(count: int) -> list[tuple[Mapping[str, object], bytes, bytes]]:
    rows: list[tuple[Mapping[str, object], bytes, bytes]] = []
    prev = GENESIS_HASH
    for index in range(count):
        fields = sample_event(id=UUID(int=index + 1), action=f"action-{index}")
        current = chain_hash(prev, fields)
        rows.append((fields, prev, current))
        prev = current
    return rows


def test_verify_chain_accepts_an_intact_chain() -> None:
    assert verify_chain(build_chain(10)) is None


def test_verify_chain_accepts_an_empty_chain() -> None:
    assert verify_chain([]) is None


def test_verify_chain_consumes_a_generator() -> None:
    assert verify_chain(row for row in build_chain(5)) is None


def test_verify_chain_detects_edited_fields() -> None:
    rows = build_chain(5)
    fields, prev, stored = rows[2]
    rows[2] = ({**fields, "action": "forged"}, prev, stored)
    assert verify_chain(rows) == ChainBreak(index=2, event_id=UUID(int=3), reason="hash mismatch")


def test_verify_chain_detects_a_recomputed_hash_through_the_next_link() -> None:
    rows = build_chain(5)
    fields, prev, _ = rows[2]
    forged = {**fields, "action": "forged"}
    rows[2] = (forged, prev, chain_hash(prev, forged))
    assert verify_chain(rows) == ChainBreak(index=3, event_id=UUID(int=4), reason="prev_hash mismatch")


def test_verify_chain_detects_a_deleted_event() -> None:
    rows = build_chain(5)
    del rows[1]
    assert verify_chain(rows) == ChainBreak(index=1, event_id=UUID(int=3), reason="prev_hash mismatch")


def test_verify_chain_detects_reordered_events() -> None:
    rows = build_chain(5)
    rows[1], rows[2] = rows[2], rows[1]
    assert verify_chain(rows) == ChainBreak(index=1, event_id=UUID(int=3), reason="prev_hash mismatch")


def test_verify_chain_first_event_must_link_to_genesis() -> None:
    rows = build_chain(3)
    assert verify_chain(rows[1:]) == ChainBreak(index=0, event_id=UUID(int=2), reason="prev_hash mismatch")


def test_verify_chain_from_a_checkpoint() -> None:
    rows = build_chain(6)
    checkpoint = rows[2][2]
    assert verify_chain(rows[3:], initial_prev_hash=checkpoint) is None
    assert verify_chain(rows[4:], initial_prev_hash=checkpoint) is not None


def test_verify_chain_detects_a_tampered_stored_hash() -> None:
    rows = build_chain(3)
    fields, prev, stored = rows[2]
    rows[2] = (fields, prev, bytes([stored[0] ^ 1]) + stored[1:])
    assert verify_chain(rows) == ChainBreak(index=2, event_id=UUID(int=3), reason="hash mismatch")


def test_verify_chain_reports_missing_id_as_none() -> None:
    fields: dict[str, object] = {"action": "x"}
    assert verify_chain([(fields, GENESIS_HASH, bytes(32))]) == ChainBreak(
        index=0, event_id=None, reason="hash mismatch"
    )


def test_verify_chain_accepts_memoryview_hashes_from_drivers() -> None:
    rows = [(fields, memoryview(prev), memoryview(current)) for fields, prev, current in build_chain(3)]
    assert verify_chain(rows) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain text", "plain text"),
        ("line\nforged", "line\\x0aforged"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("\x00\x1b[31m", "\\x00\\x1b[31m"),
        ("tab\there", "tab\\x09here"),
        ("del\x7f", "del\\x7f"),
        ("c1\x85\x9f", "c1\\x85\\x9f"),
        ("sep\u2028par\u2029", "sep\\u2028par\\u2029"),
        ("bidi\u202e\u2066", "bidi\\u202e\\u2066"),
        ("back\\slash", "back\\\\slash"),
        ("forged \\x0a escape", "forged \\\\x0a escape"),
        ("é ü 日本 \u00a0", "é ü 日本 \u00a0"),
        ("", ""),
    ],
)
def test_escape_control_chars(raw: str, escaped: str) -> None:
    assert escape_control_chars(raw) == escaped


def test_escape_control_chars_leaves_no_control_character() -> None:
    every_low_code_point = "".join(chr(code_point) for code_point in range(0x250))
    escaped = escape_control_chars(every_low_code_point)
    assert not any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in escaped)
    assert "\n" not in escaped
    assert escaped.splitlines() == [escaped]
