"""Single byte-range requests and ``If-Match``/``If-None-Match`` evaluation (RFC 9110 §13.1.1, §13.1.2 and §14)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_RANGE_SPEC_PATTERN = re.compile(r"(?P<first>[0-9]*)-(?P<last>[0-9]*)")
_OWS = " \t"
# Positions beyond any real representation; also keeps int() away from its huge-string conversion limit.
_MAX_POSITION_DIGITS = 19
_BEYOND_ANY_LENGTH = 10**_MAX_POSITION_DIGITS


class RangeNotSatisfiableError(ValueError):
    """A syntactically valid range that selects no byte of the representation (answer 416).

    Attributes:
        total: The representation's length, for ``Content-Range: bytes */total``.
    """

    def __init__(self, total: int) -> None:
        """Record the representation length the range was checked against."""
        super().__init__(f"range not satisfiable for a representation of {total} bytes")
        self.total = total

    @property
    def content_range(self) -> str:
        """The ``Content-Range`` value for the 416 response, e.g. ``"bytes */1000"``."""
        return f"bytes */{self.total}"


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range ``start..end`` of a representation.

    Attributes:
        start: First byte offset.
        end: Last byte offset, inclusive.
    """

    start: int
    end: int

    def __post_init__(self) -> None:
        """Reject empty or negative ranges."""
        if self.start < 0 or self.end < self.start:
            raise ValueError("a byte range needs 0 <= start <= end")

    @property
    def length(self) -> int:
        """Number of bytes in the range."""
        return self.end - self.start + 1

    def content_range(self, total: int) -> str:
        """The ``Content-Range`` header value, e.g. ``"bytes 0-99/1000"``."""
        return f"bytes {self.start}-{self.end}/{total}"


def _position(digits: str) -> int:
    """The value of a position's digits (leading zeros allowed, RFC 9110 `1*DIGIT`); huge ones cap beyond any length."""
    significant = digits.lstrip("0") or "0"
    return _BEYOND_ANY_LENGTH if len(significant) > _MAX_POSITION_DIGITS else int(significant)


def _digits_less(left: str, right: str) -> bool:
    """Whether the decimal `left` is below `right`, however long (`_position` caps both at the same value)."""
    left, right = left.lstrip("0") or "0", right.lstrip("0") or "0"
    return (len(left), left) < (len(right), right)


def parse_range(header: str | None, total: int) -> ByteRange | None:
    """Interpret a ``Range`` header against a representation of ``total`` bytes.

    ``None`` means "ignore the header and serve the whole representation with 200": the header is absent, uses a unit
    other than ``bytes``, is syntactically invalid (RFC 9110 §14.2 lets a server ignore it), or asks for several
    ranges. Multiple ranges would need ``multipart/byteranges``; serving the whole is allowed and simpler for clients
    that only resume downloads. Likewise a suffix range on an empty representation is served whole (it is
    satisfiable per §14.1.3 but selects nothing).

    Supports ``bytes=0-99``, ``bytes=100-`` and suffix ``bytes=-500``; the end is clamped to ``total - 1`` and a
    suffix longer than the representation selects all of it.

    Raises:
        RangeNotSatisfiableError: The range is valid but selects no byte (``start >= total``, a zero-length suffix).
        ValueError: If ``total`` is negative.
    """
    if total < 0:
        raise ValueError("total must not be negative")
    if header is None:
        return None
    unit, separator, range_set = header.strip(_OWS).partition("=")
    if not separator or unit.strip(_OWS).lower() != "bytes":
        return None
    specs = [spec.strip(_OWS) for spec in range_set.split(",")]
    specs = [spec for spec in specs if spec]
    if len(specs) != 1:
        return None
    match = _RANGE_SPEC_PATTERN.fullmatch(specs[0])
    if match is None:
        return None
    first, last = match["first"], match["last"]
    if not first:
        if not last:
            return None
        suffix_length = _position(last)
        if suffix_length == 0:
            raise RangeNotSatisfiableError(total)
        if total == 0:
            return None
        return ByteRange(max(total - suffix_length, 0), total - 1)
    if last and _digits_less(last, first):
        return None
    start = _position(first)
    end = _position(last) if last else None
    if start >= total:
        raise RangeNotSatisfiableError(total)
    return ByteRange(start, total - 1 if end is None else min(end, total - 1))


def _parse_entity_tags(value: str) -> list[str] | None:
    """Split an entity-tag list into its tags as sent (quotes and any ``W/`` kept); None if malformed."""
    tags: list[str] = []
    position, length = 0, len(value)
    while position < length:
        char = value[position]
        if char in _OWS or char == ",":
            position += 1
            continue
        start = position
        if value.startswith("W/", position):
            position += 2
        if position >= length or value[position] != '"':
            return None
        closing = value.find('"', position + 1)
        if closing == -1:
            return None
        tags.append(value[start : closing + 1])
        position = closing + 1
        if position < length and value[position] not in _OWS + ",":
            return None
    return tags


def _single_entity_tag(etag: str) -> str:
    current = _parse_entity_tags(etag)
    if current is None or len(current) != 1:
        raise ValueError("etag must be a single quoted entity tag")
    return current[0]


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Evaluate ``If-None-Match`` with the weak comparison function: True means answer 304.

    Args:
        if_none_match: The header value: ``*`` or a list of (possibly weak) entity tags; None if absent.
        etag: The current entity tag, quoted, optionally with a ``W/`` prefix, e.g. ``'"abc"'``.

    Returns:
        True if the header is ``*`` or lists a tag weakly equal to ``etag``. A malformed header never matches, so the
        representation is served normally.

    Raises:
        ValueError: If ``etag`` itself is not a single entity tag.
    """
    opaque = _single_entity_tag(etag).removeprefix("W/")
    if if_none_match is None:
        return False
    if if_none_match.strip(_OWS) == "*":
        return True
    listed = _parse_entity_tags(if_none_match)
    return listed is not None and any(tag.removeprefix("W/") == opaque for tag in listed)


def if_match_holds(if_match: str | None, etag: str) -> bool:
    """Evaluate ``If-Match`` with the strong comparison function: False means answer 412 (RFC 9110 §13.1.1).

    Args:
        if_match: The header value: ``*`` or a list of entity tags; None if absent.
        etag: The current entity tag, quoted, optionally with a ``W/`` prefix.

    Returns:
        True if the header is absent, ``*`` (the representation exists), or lists a strong tag equal to ``etag``,
        itself strong. A weak tag on either side never matches, and a malformed header never holds: the client
        asked for the request to be carried out only on a representation it names.

    Raises:
        ValueError: If ``etag`` itself is not a single entity tag.
    """
    current = _single_entity_tag(etag)
    if if_match is None or if_match.strip(_OWS) == "*":
        return True
    listed = _parse_entity_tags(if_match)
    return listed is not None and not current.startswith("W/") and current in listed
