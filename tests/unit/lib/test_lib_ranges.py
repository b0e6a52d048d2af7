from __future__ import annotations

import pytest

from zkeb.lib.ranges import ByteRange, RangeNotSatisfiableError, etag_matches, if_match_holds, parse_range


def test_byte_range_length_and_content_range() -> None:
    byte_range = ByteRange(0, 99)
    assert byte_range.length == 100
    assert byte_range.content_range(1000) == "bytes 0-99/1000"
    assert ByteRange(5, 5).length == 1
    assert ByteRange(5, 5).content_range(6) == "bytes 5-5/6"


@pytest.mark.parametrize(("start", "end"), [(-1, 5), (10, 9)])
def test_byte_range_rejects_empty_or_negative(start: int, end: int) -> None:
    with pytest.raises(ValueError, match="start"):
        ByteRange(start, end)


@pytest.mark.parametrize(
    ("header", "total", "expected"),
    [
        ("bytes=0-99", 1000, ByteRange(0, 99)),
        ("bytes=0-0", 1000, ByteRange(0, 0)),
        ("bytes=999-999", 1000, ByteRange(999, 999)),
        ("bytes=100-", 1000, ByteRange(100, 999)),
        ("bytes=0-", 1000, ByteRange(0, 999)),
        ("bytes=900-5000", 1000, ByteRange(900, 999)),
        ("bytes=-500", 1000, ByteRange(500, 999)),
        ("bytes=-1", 1000, ByteRange(999, 999)),
        ("bytes=-1000", 1000, ByteRange(0, 999)),
        ("bytes=-5000", 1000, ByteRange(0, 999)),
        ("BYTES=0-9", 1000, ByteRange(0, 9)),
        ("Bytes=0-9", 1000, ByteRange(0, 9)),
        ("  bytes=0-9  ", 1000, ByteRange(0, 9)),
        ("bytes= 0-9 ", 1000, ByteRange(0, 9)),
        ("bytes=0-9,", 1000, ByteRange(0, 9)),
        ("bytes=, 0-9", 1000, ByteRange(0, 9)),
        ("bytes=0-99999999999999999999999", 1000, ByteRange(0, 999)),
        ("bytes=-99999999999999999999999", 1000, ByteRange(0, 999)),
        ("bytes=0-0", 1, ByteRange(0, 0)),
        ("bytes=00010-00019", 1000, ByteRange(10, 19)),
        # More than 19 digits, but only because of leading zeros: still the small number they spell.
        ("bytes=00000000000000000000000000001-2", 10000, ByteRange(1, 2)),
        ("bytes=-000000000000000000000000000010", 1000, ByteRange(990, 999)),
    ],
)
def test_parse_range_satisfiable(header: str, total: int, expected: ByteRange) -> None:
    assert parse_range(header, total) == expected


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes",
        "bytes=",
        "bytes=-",
        "items=0-9",
        "bytes 0-9",
        "bytes=a-9",
        "bytes=0-b",
        "bytes=9-0",
        "bytes=1-2-3",
        "bytes=+1-2",
        "bytes=0x10-20",
        "bytes=0 - 9",
        "bytes=1.5-9",
        "bytes=\u0661-9",
        # Multiple ranges: served whole instead of multipart/byteranges (documented choice).
        "bytes=0-9,20-29",
        "bytes=0-9, -5",
        "bytes=0-0,0-0",
    ],
)
def test_parse_range_ignored_headers_serve_the_whole(header: str | None) -> None:
    assert parse_range(header, 1000) is None


@pytest.mark.parametrize(
    ("header", "total"),
    [
        ("bytes=1000-", 1000),
        ("bytes=1000-1000", 1000),
        ("bytes=5000-6000", 1000),
        ("bytes=-0", 1000),
        ("bytes=0-", 0),
        ("bytes=0-0", 0),
        ("bytes=99999999999999999999999-", 1000),
    ],
)
def test_parse_range_unsatisfiable(header: str, total: int) -> None:
    with pytest.raises(RangeNotSatisfiableError) as caught:
        parse_range(header, total)
    assert caught.value.total == total
    assert caught.value.content_range == f"bytes */{total}"
    assert isinstance(caught.value, ValueError)


def test_parse_range_suffix_on_empty_representation_serves_the_whole() -> None:
    assert parse_range("bytes=-10", 0) is None


def test_parse_range_absent_header_on_empty_representation() -> None:
    assert parse_range(None, 0) is None


def test_parse_range_rejects_negative_total() -> None:
    with pytest.raises(ValueError, match="total"):
        parse_range("bytes=0-1", -1)


def test_parse_range_result_covers_the_right_bytes() -> None:
    data = bytes(range(256)) * 4
    byte_range = parse_range("bytes=-10", len(data))
    assert byte_range is not None
    assert data[byte_range.start : byte_range.end + 1] == data[-10:]
    assert byte_range.length == 10


ETAG = '"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"'


@pytest.mark.parametrize(
    "header",
    [
        ETAG,
        f"W/{ETAG}",
        "*",
        " * ",
        f'"other", {ETAG}',
        f'"other",{ETAG},"third"',
        f'W/"other" ,\tW/{ETAG}',
        f" {ETAG} ",
        f",{ETAG},",
    ],
)
def test_etag_matches(header: str) -> None:
    assert etag_matches(header, ETAG) is True


def test_weak_current_etag_matches_strong_listed_tag() -> None:
    assert etag_matches('"abc"', 'W/"abc"') is True
    assert etag_matches('W/"abc"', 'W/"abc"') is True


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        '"other"',
        '"2cf24dba"',
        ETAG.strip('"'),  # unquoted: malformed
        f"w/{ETAG}",  # the weak indicator is case-sensitive
        f'"unterminated, {ETAG}',
        f'{ETAG}"junk"',
        f'"a"x, {ETAG}',
        "**",
        f"*, {ETAG}",
    ],
)
def test_etag_does_not_match(header: str | None) -> None:
    assert etag_matches(header, ETAG) is False


def test_etag_comparison_is_exact_on_the_opaque_tag() -> None:
    assert etag_matches('"ABC"', '"abc"') is False
    assert etag_matches('"abc "', '"abc"') is False


def test_etag_with_comma_inside_quotes_is_one_tag() -> None:
    assert etag_matches('"a,b"', '"a,b"') is True
    assert etag_matches('"a,b"', '"a"') is False


@pytest.mark.parametrize("etag", ["abc", "", '"a", "b"', '"unterminated'])
def test_etag_matches_requires_a_single_quoted_current_etag(etag: str) -> None:
    with pytest.raises(ValueError, match="etag"):
        etag_matches('"abc"', etag)


@pytest.mark.parametrize("header", [None, ETAG, "*", " * ", f'"other", {ETAG}', f'W/"other",{ETAG}', f" {ETAG} "])
def test_if_match_holds(header: str | None) -> None:
    assert if_match_holds(header, ETAG) is True


@pytest.mark.parametrize(
    "header",
    [
        "",
        '"other"',
        f"W/{ETAG}",  # the strong comparison: a weak tag never matches
        ETAG.strip('"'),  # unquoted: malformed, so the condition does not hold
        f'"unterminated, {ETAG}',
        f"*, {ETAG}",
    ],
)
def test_if_match_does_not_hold(header: str) -> None:
    assert if_match_holds(header, ETAG) is False


def test_if_match_never_holds_for_a_weak_current_tag() -> None:
    assert if_match_holds('W/"abc"', 'W/"abc"') is False
    assert if_match_holds('"abc"', 'W/"abc"') is False
    assert if_match_holds("*", 'W/"abc"') is True
