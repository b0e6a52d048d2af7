"""Properties of the Range, If-None-Match and size parsers: results in bounds, only their documented errors."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from zkeb.lib.ranges import ByteRange, RangeNotSatisfiableError, etag_matches, if_match_holds, parse_range
from zkeb.lib.sizes import format_size, parse_size

# No per-example deadline: the suite shares a busy machine, and a slow example is not a wrong one.
bounded = settings(deadline=None, max_examples=200)

totals = st.integers(min_value=0, max_value=10**12)
positions = st.integers(min_value=0, max_value=10**25)
range_text = st.text(alphabet=st.sampled_from("bytes=0123456789-, \t;xX*"), max_size=40)
UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
UNITS |= {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


@bounded
@given(header=st.one_of(range_text, st.text(max_size=40)), total=totals)
def test_range_is_ignored_in_bounds_or_unsatisfiable(header: str, total: int) -> None:
    unsatisfiable: RangeNotSatisfiableError | None = None
    chosen: ByteRange | None = None
    try:
        chosen = parse_range(header, total)
    except RangeNotSatisfiableError as error:
        unsatisfiable = error
    if unsatisfiable is not None:
        assert unsatisfiable.content_range == f"bytes */{total}"
        return
    if chosen is not None:
        assert 0 <= chosen.start <= chosen.end < total


@bounded
@given(first=positions, last=st.one_of(st.none(), positions), total=totals)
@example(first=10**19 + 1, last=10**19, total=0)  # both past any length: still last < first, so ignored
def test_first_last_range_selects_exactly_the_asked_bytes(first: int, last: int | None, total: int) -> None:
    header = f"bytes={first}-{'' if last is None else last}"
    if last is not None and last < first:
        assert parse_range(header, total) is None
        return
    if first >= total:
        try:
            parse_range(header, total)
        except RangeNotSatisfiableError:
            return
        raise AssertionError("a range starting past the end was satisfied")
    end = total - 1 if last is None else min(last, total - 1)
    assert parse_range(header, total) == ByteRange(first, end)


@bounded
@given(suffix=st.integers(min_value=1, max_value=10**25), total=st.integers(min_value=1, max_value=10**12))
def test_suffix_range_selects_the_last_bytes(suffix: int, total: int) -> None:
    chosen = parse_range(f"bytes=-{suffix}", total)
    assert chosen is not None
    assert chosen.end == total - 1
    assert chosen.length == min(suffix, total)


@bounded
@given(first=positions, second=positions, total=totals)
def test_several_ranges_serve_the_whole(first: int, second: int, total: int) -> None:
    assert parse_range(f"bytes={first}-,{second}-", total) is None


@bounded
@given(
    tag=st.text(alphabet=st.characters(min_codepoint=0x23, max_codepoint=0x7E), max_size=20),
    header=st.text(max_size=60),
)
def test_if_none_match_never_raises_and_matches_its_own_tag(tag: str, header: str) -> None:
    etag = f'"{tag}"'
    assert isinstance(etag_matches(header, etag), bool)
    assert etag_matches(etag, etag)
    assert etag_matches(f'W/{etag}, "other"', etag)
    assert etag_matches("*", etag)


@bounded
@given(
    tag=st.text(alphabet=st.characters(min_codepoint=0x23, max_codepoint=0x7E), max_size=20),
    header=st.text(max_size=60),
)
def test_if_match_never_raises_and_holds_for_its_own_strong_tag_only(tag: str, header: str) -> None:
    etag = f'"{tag}"'
    assert isinstance(if_match_holds(header, etag), bool)
    assert if_match_holds(etag, etag)
    assert if_match_holds(f'"other", {etag}', etag)
    assert not if_match_holds(f"W/{etag}", etag)


@bounded
@given(amount=st.integers(min_value=1, max_value=10**9), unit=st.sampled_from(sorted(UNITS)), lower=st.booleans())
def test_size_with_unit_round_trips(amount: int, unit: str, lower: bool) -> None:
    assert parse_size(f"{amount}{unit.lower() if lower else unit}") == amount * UNITS[unit]
    assert parse_size(f" {amount} {unit} ") == amount * UNITS[unit]


@bounded
@given(
    text=st.one_of(st.text(max_size=80), st.text(alphabet=st.sampled_from("0123456789.-+ eEkKmMgGiIbB"), max_size=30))
)
def test_size_parses_to_whole_bytes_or_raises_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert isinstance(size, int)
    assert size > 0 or text.strip() == "0"


@bounded
@given(amount=st.integers(min_value=1, max_value=10**9))
def test_negative_size_is_refused(amount: int) -> None:
    try:
        parse_size(f"-{amount}MB")
    except ValueError:
        return
    raise AssertionError("a negative size was accepted")


@bounded
@given(n=st.integers(min_value=0, max_value=2**63))
def test_format_size_is_within_a_tenth_of_the_unit(n: int) -> None:
    text = format_size(n)
    number, unit = text.split(" ")
    factor = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4, "PiB": 1024**5}[unit]
    assert abs(float(number) * factor - n) <= 0.05 * factor + 1e-9 * n
    if unit != "PiB":
        assert float(number) < 1024
