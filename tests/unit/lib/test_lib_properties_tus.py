"""Properties of the tus header parsers: exact round trips, and only `TusHeaderError` on any other input."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zkeb.lib.tus import (
    MAX_HEADER_INT,
    TUS_CHECKSUM_ALGORITHMS,
    TusHeaderError,
    UnsupportedChecksumAlgorithmError,
    format_upload_expires,
    parse_non_negative_int,
    parse_upload_checksum,
    parse_upload_metadata,
)

# No per-example deadline: the suite shares a busy machine, and a slow example is not a wrong one.
bounded = settings(deadline=None, max_examples=200)

# What tus allows in a key that the parser also keeps: printable ASCII but space and comma.
metadata_keys = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=","), min_size=1, max_size=20
)
# An empty value is sent as a bare key, which tus reads as "no value" (None): values here are non-empty.
metadata_maps = st.dictionaries(metadata_keys, st.one_of(st.none(), st.binary(min_size=1, max_size=64)), max_size=12)
# Header-ish text: every printable ASCII character plus the separators and controls hostile clients send.
header_text = st.text(alphabet=st.characters(max_codepoint=0x7F) | st.sampled_from(" ,=+/-\t\x00é"), max_size=80)
DIGEST_LENGTHS = {"sha1": 20, "sha256": 32}


def metadata_header(values: dict[str, bytes | None], *, padded: bool) -> str:
    pairs = []
    for key, value in values.items():
        if value is None:
            pairs.append(key)
            continue
        encoded = base64.b64encode(value).decode()
        pairs.append(f"{key} {encoded if padded else encoded.rstrip('=')}")
    return ",".join(pairs)


@bounded
@given(values=metadata_maps, padded=st.booleans())
def test_upload_metadata_round_trips_with_or_without_padding(values: dict[str, bytes | None], padded: bool) -> None:
    assert parse_upload_metadata(metadata_header(values, padded=padded)) == values


@bounded
@given(header=header_text)
def test_upload_metadata_parses_or_raises_tus_header_error(header: str) -> None:
    try:
        parsed = parse_upload_metadata(header)
    except TusHeaderError:
        return
    for key, value in parsed.items():
        assert key
        assert " " not in key
        assert "," not in key
        assert key.isprintable()
        assert value is None or isinstance(value, bytes)


@bounded
@given(values=metadata_maps.filter(bool), data=st.data())
def test_upload_metadata_repeated_key_is_refused(values: dict[str, bytes | None], data: st.DataObject) -> None:
    repeated = data.draw(st.sampled_from(sorted(values)))
    header = metadata_header(values, padded=True) + f",{repeated}"
    with pytest.raises(TusHeaderError, match="repeats"):
        parse_upload_metadata(header)


@bounded
@given(algorithm=st.sampled_from(TUS_CHECKSUM_ALGORITHMS), data=st.data(), upper=st.booleans())
def test_upload_checksum_round_trips(algorithm: str, data: st.DataObject, upper: bool) -> None:
    digest = data.draw(st.binary(min_size=DIGEST_LENGTHS[algorithm], max_size=DIGEST_LENGTHS[algorithm]))
    name = algorithm.upper() if upper else algorithm
    assert parse_upload_checksum(f"{name} {base64.b64encode(digest).decode()}") == (algorithm, digest)


@bounded
@given(algorithm=st.sampled_from(TUS_CHECKSUM_ALGORITHMS), digest=st.binary(max_size=40))
def test_upload_checksum_of_the_wrong_length_is_refused(algorithm: str, digest: bytes) -> None:
    header = f"{algorithm} {base64.b64encode(digest).decode()}"
    if len(digest) == DIGEST_LENGTHS[algorithm]:
        assert parse_upload_checksum(header) == (algorithm, digest)
        return
    try:
        parse_upload_checksum(header)
    except UnsupportedChecksumAlgorithmError:
        raise AssertionError("a known algorithm was called unsupported") from None
    except TusHeaderError:
        return
    raise AssertionError("a digest of the wrong length was accepted")


@bounded
@given(algorithm=metadata_keys, digest=st.binary(min_size=1, max_size=40))
def test_upload_checksum_unknown_algorithm_is_unsupported(algorithm: str, digest: bytes) -> None:
    header = f"{algorithm} {base64.b64encode(digest).decode()}"
    try:
        parse_upload_checksum(header)
    except UnsupportedChecksumAlgorithmError:
        assert algorithm.lower() not in TUS_CHECKSUM_ALGORITHMS
    except TusHeaderError:
        assert algorithm.lower() in TUS_CHECKSUM_ALGORITHMS  # then only the digest length can be wrong


@bounded
@given(header=header_text)
def test_upload_checksum_parses_or_raises_tus_header_error(header: str) -> None:
    try:
        algorithm, digest = parse_upload_checksum(header)
    except TusHeaderError:
        return
    assert len(digest) == DIGEST_LENGTHS[algorithm]


@bounded
@given(value=st.integers(min_value=0, max_value=MAX_HEADER_INT), zeros=st.integers(min_value=0, max_value=5))
def test_non_negative_int_round_trips(value: int, zeros: int) -> None:
    assert parse_non_negative_int("0" * zeros + str(value), name="Upload-Offset") == value


@bounded
@given(value=st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX_HEADER_INT + 1)))
def test_non_negative_int_refuses_negative_and_beyond_i64(value: int) -> None:
    with pytest.raises(TusHeaderError, match="Upload-Length"):
        parse_non_negative_int(str(value), name="Upload-Length")


@bounded
@given(header=st.one_of(header_text, st.text(max_size=40)))
def test_non_negative_int_parses_digits_only_or_raises_tus_header_error(header: str) -> None:
    try:
        value = parse_non_negative_int(header, name="Upload-Offset")
    except TusHeaderError:
        return
    assert header.isascii()
    assert header.isdigit()
    assert 0 <= value <= MAX_HEADER_INT


@bounded
@given(moment=st.datetimes(min_value=datetime(1970, 1, 1), timezones=st.timezones()))
def test_upload_expires_names_the_same_second_in_gmt(moment: datetime) -> None:
    text = format_upload_expires(moment)
    assert text.endswith(" GMT")
    assert parsedate_to_datetime(text) == moment.astimezone(UTC).replace(microsecond=0)
