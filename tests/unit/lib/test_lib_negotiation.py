"""Content negotiation on `Accept` (quality values, `q=0` refusals, specificity and ties) and on `Accept-Encoding`."""

from __future__ import annotations

import pytest

from zkeb.lib.negotiation import accepts_gzip, negotiate

JSON = "application/json"
MSGPACK = "application/msgpack"
OFFERS = (JSON, MSGPACK)


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, JSON),
        ("", JSON),
        ("*/*", JSON),
        (MSGPACK, MSGPACK),
        ("Application/MsgPack", MSGPACK),
        (f"{JSON}, {MSGPACK}", JSON),
        (f"{MSGPACK}, {JSON}", MSGPACK),
        (f"{JSON};q=0.5, {MSGPACK}", MSGPACK),
        (f"{MSGPACK};q=0.4, {JSON};q=0.5", JSON),
        (f"{MSGPACK};q=0.5, */*;q=0.1", MSGPACK),
        (f"*/*, {MSGPACK}", MSGPACK),  # a named type beats a wildcard at equal quality
        ("application/*", JSON),
        (f"{MSGPACK};q=0", None),  # names msgpack only to refuse it; nothing else is listed
        (f"{MSGPACK};q=0, */*", JSON),
        (f"{MSGPACK};q=0.000, application/*", JSON),
        (f"*/*;q=0, {MSGPACK}", MSGPACK),
        (f"{MSGPACK};q=1.0", MSGPACK),
        (f"{MSGPACK} ; q = 0.9 , {JSON};q=0.8", MSGPACK),
        ("text/html", None),
        (f"{MSGPACK};q=2, {JSON};q=0.1", JSON),  # a malformed q disregards its range
        (f"{MSGPACK};q=abc", None),
        ("garbage, /, */json", None),
    ],
)
def test_the_best_acceptable_offer_is_chosen(accept: str | None, chosen: str | None) -> None:
    assert negotiate(accept, OFFERS).chosen == chosen


def test_offers_given_q_zero_are_reported_as_refused() -> None:
    assert negotiate(f"{MSGPACK};q=0", OFFERS).refused == {MSGPACK}
    assert negotiate("*/*;q=0", OFFERS).refused == {JSON, MSGPACK}
    assert negotiate(f"*/*;q=0, {JSON}", OFFERS).refused == {MSGPACK}
    assert negotiate("text/html", OFFERS).refused == frozenset()


def test_the_most_specific_range_decides_an_offers_quality() -> None:
    assert negotiate(f"{JSON};q=0, application/*;q=1", OFFERS).chosen == MSGPACK
    assert negotiate(f"application/*;q=0, {JSON};q=0.1", OFFERS).chosen == JSON


@pytest.mark.parametrize(
    ("accept_encoding", "gzip"),
    [
        (None, False),  # nothing said of codings: the identity
        ("", False),
        ("identity", False),
        ("gzip", True),
        ("GZip", True),
        ("x-gzip", True),
        ("gzip, deflate, br, zstd", True),  # what browsers send
        ("br;q=1.0, gzip;q=0.8, *;q=0.1", True),
        ("*", True),
        ("gzip;q=0", False),
        ("gzip;q=0, *", False),  # named and refused: the wildcard does not bring it back
        ("*;q=0", False),
        ("*;q=0, gzip;q=0.5", True),
        ("deflate, br", False),
        ("gzip;q=2", False),  # a malformed quality disregards the element
        ("gzip;q=bogus, *", True),
    ],
)
def test_gzip_is_taken_when_named_or_covered_by_a_wildcard_with_a_quality_above_zero(
    accept_encoding: str | None, gzip: bool
) -> None:
    assert accepts_gzip(accept_encoding) is gzip
