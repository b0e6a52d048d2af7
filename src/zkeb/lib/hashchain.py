"""Tamper-evident hash chaining of audit events, and escaping of untrusted text for logs."""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from uuid import UUID

import msgspec

from zkeb.lib.envelope import format_rfc3339_utc

GENESIS_HASH = bytes(32)

_CHAIN_DOMAIN = b"zkeb-audit-v1\x00"
_HASH_LENGTH = 32


def _canonical_value(value: object) -> object:
    """Reduce a field value to JSON types with one fixed textual form per value."""
    # Enum before the scalars (str and int enums are scalars too); datetime before date (a datetime is a date).
    if isinstance(value, enum.Enum):
        return _canonical_value(value.value)
    if value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("audit event floats must be finite")
        return value
    if isinstance(value, datetime):
        return format_rfc3339_utc(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        canonical: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError("audit event keys must be strings")
            canonical[key] = _canonical_value(item)
        return canonical
    if isinstance(value, list | tuple):
        return [_canonical_value(item) for item in value]
    raise TypeError(f"audit event values of type {type(value).__name__} have no canonical form")


def canonical_event_bytes(event: Mapping[str, object]) -> bytes:
    """Encode an audit event's fields deterministically, independent of process, dict order or timezone.

    Keys are sorted (recursively); datetimes become RFC 3339 UTC with microseconds, UUIDs their canonical string,
    bytes lowercase hex, enums their value; the result is compact JSON.

    Raises:
        TypeError: If a key is not a string or a value has no canonical form.
        ValueError: If a datetime is naive or a float is not finite.
    """
    return msgspec.json.encode(_canonical_value(event), order="sorted")


def chain_hash(prev_hash: bytes, event: Mapping[str, object]) -> bytes:
    """Return ``sha256("zkeb-audit-v1\\0" || prev_hash || canonical_event_bytes(event))``.

    Raises:
        ValueError: If ``prev_hash`` is not 32 bytes.
    """
    if len(prev_hash) != _HASH_LENGTH:
        raise ValueError(f"prev_hash must be {_HASH_LENGTH} bytes")
    return hashlib.sha256(_CHAIN_DOMAIN + bytes(prev_hash) + canonical_event_bytes(event)).digest()


@dataclass(frozen=True)
class ChainBreak:
    """The first place where a stored audit chain does not verify.

    Attributes:
        index: Position of the offending event in the verified sequence (0-based).
        event_id: The event's ``id`` field, if it has one.
        reason: ``"prev_hash mismatch"`` or ``"hash mismatch"``.
    """

    index: int
    event_id: object
    reason: str


def verify_chain(
    events: Iterable[tuple[Mapping[str, object], bytes, bytes]],
    *,
    initial_prev_hash: bytes = GENESIS_HASH,
) -> ChainBreak | None:
    """Verify a chain of stored audit events in sequence order.

    Each item is ``(fields, stored_prev_hash, stored_hash)``. The first event must link to ``initial_prev_hash``
    (the genesis hash unless verifying from a known checkpoint), each later one to the previous stored hash, and each
    stored hash must equal :func:`chain_hash` of its fields. Consumes ``events`` lazily, so a database cursor works.

    Returns:
        The first break, or None if the whole sequence verifies.
    """
    expected_prev = bytes(initial_prev_hash)
    for index, (fields, stored_prev, stored_hash) in enumerate(events):
        if bytes(stored_prev) != expected_prev:
            return ChainBreak(index=index, event_id=fields.get("id"), reason="prev_hash mismatch")
        if bytes(stored_hash) != chain_hash(expected_prev, fields):
            return ChainBreak(index=index, event_id=fields.get("id"), reason="hash mismatch")
        expected_prev = bytes(stored_hash)
    return None


def _control_escape(code_point: int) -> str:
    return f"\\x{code_point:02x}" if code_point <= 0xFF else f"\\u{code_point:04x}"


# C0, DEL, C1, plus the Unicode line/paragraph separators and bidi controls that can fake line breaks or reorder text
# in log viewers. The backslash is escaped too, so an escaped string can never be mistaken for a forged escape.
_ESCAPED_CODE_POINTS = (
    *range(0x20),
    0x7F,
    *range(0x80, 0xA0),
    0x2028,
    0x2029,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
)
_ESCAPE_TABLE: dict[int, str] = {code_point: _control_escape(code_point) for code_point in _ESCAPED_CODE_POINTS}
_ESCAPE_TABLE[ord("\\")] = "\\\\"


def escape_control_chars(value: str) -> str:
    """Escape control characters in untrusted text before it is logged or stored as an audit field.

    C0 controls, DEL and C1 controls become ``\\xNN``; Unicode line separators and bidi controls become ``\\uNNNN``;
    a backslash becomes ``\\\\``. No newline or carriage return survives, so one value cannot forge log lines.
    """
    return value.translate(_ESCAPE_TABLE)
