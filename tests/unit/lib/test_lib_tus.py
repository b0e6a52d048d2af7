from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest

from zkeb.lib.tus import (
    TUS_CHECKSUM_ALGORITHMS,
    TUS_EXTENSIONS,
    TUS_VERSION,
    TusHeaderError,
    TusHeaderTooLargeError,
    UnsupportedChecksumAlgorithmError,
    format_upload_expires,
    parse_non_negative_int,
    parse_upload_checksum,
    parse_upload_metadata,
)


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def test_protocol_constants() -> None:
    assert TUS_VERSION == "1.0.0"
    assert TUS_EXTENSIONS == ("creation", "creation-with-upload", "termination", "checksum", "expiration")
    assert ",".join(TUS_EXTENSIONS) == "creation,creation-with-upload,termination,checksum,expiration"
    assert TUS_CHECKSUM_ALGORITHMS == ("sha1", "sha256")


def test_parse_upload_metadata_spec_example() -> None:
    # The example from the tus 1.0.0 specification.
    header = "filename d29ybGRfZG9taW5hdGlvbl9wbGFuLnBkZg==,is_confidential"
    assert parse_upload_metadata(header) == {"filename": b"world_domination_plan.pdf", "is_confidential": None}


def test_parse_upload_metadata_envelope_fields() -> None:
    device_id_hash = hashlib.sha256(b"device").digest()
    nonce = bytes(range(12))
    header = (
        f"container_id {b64(b'11111111-2222-4333-8444-555555555555')},"
        f"device_id_hash {b64(device_id_hash)}, payload_nonce {b64(nonce)},"
        f"backup_timestamp {b64(b'2026-11-27T10:00:00Z')}"
    )
    assert parse_upload_metadata(header) == {
        "container_id": b"11111111-2222-4333-8444-555555555555",
        "device_id_hash": device_id_hash,
        "payload_nonce": nonce,
        "backup_timestamp": b"2026-11-27T10:00:00Z",
    }


@pytest.mark.parametrize("header", ["", "   "])
def test_parse_upload_metadata_empty_header_means_no_metadata(header: str) -> None:
    assert parse_upload_metadata(header) == {}


def test_parse_upload_metadata_value_without_padding_is_accepted() -> None:
    assert parse_upload_metadata("name aGk") == {"name": b"hi"}


def test_parse_upload_metadata_key_with_trailing_space_has_no_value() -> None:
    assert parse_upload_metadata("flag ,name aGk=") == {"flag": None, "name": b"hi"}


def test_parse_upload_metadata_preserves_binary_values() -> None:
    raw = bytes(range(256))
    assert parse_upload_metadata(f"blob {b64(raw)}") == {"blob": raw}


def test_parse_upload_metadata_duplicate_key_is_refused() -> None:
    with pytest.raises(TusHeaderError, match="'name'"):
        parse_upload_metadata("name aGk=,name aGk=")


@pytest.mark.parametrize("value", ["not base64!", "aGk=x", "a", "aGk===", "-_8=", "aGk=aGk="])
def test_parse_upload_metadata_invalid_base64_names_the_key(value: str) -> None:
    with pytest.raises(TusHeaderError, match="'payload_nonce'"):
        parse_upload_metadata(f"ok aGk=,payload_nonce {value}")


@pytest.mark.parametrize(
    "header",
    [",", "name aGk=,", ",name aGk=", "name aGk=,,other", "\x7fkey aGk=", "ke\x00y aGk=", "kéy aGk=", "name\taGk="],
)
def test_parse_upload_metadata_invalid_keys_are_refused(header: str) -> None:
    with pytest.raises(TusHeaderError, match="key"):
        parse_upload_metadata(header)


def test_parse_upload_metadata_extra_words_are_refused() -> None:
    with pytest.raises(TusHeaderError, match="'name'"):
        parse_upload_metadata("name aGk= aGk=")
    with pytest.raises(TusHeaderError, match="'name'"):
        parse_upload_metadata("name  aGk=")


def test_tus_errors_are_value_errors() -> None:
    assert issubclass(TusHeaderError, ValueError)
    assert issubclass(UnsupportedChecksumAlgorithmError, TusHeaderError)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"sha1 {b64(hashlib.sha1(b'chunk').digest())}", ("sha1", hashlib.sha1(b"chunk").digest())),
        (f"sha256 {b64(hashlib.sha256(b'chunk').digest())}", ("sha256", hashlib.sha256(b"chunk").digest())),
        (f"SHA256 {b64(hashlib.sha256(b'chunk').digest())}", ("sha256", hashlib.sha256(b"chunk").digest())),
        (f" sha1 {b64(hashlib.sha1(b'').digest())} ", ("sha1", hashlib.sha1(b"").digest())),
        ("sha1 2jmj7l5rSw0yVb/vlWAYkK/YBwk=", ("sha1", bytes.fromhex("da39a3ee5e6b4b0d3255bfef95601890afd80709"))),
    ],
)
def test_parse_upload_checksum(header: str, expected: tuple[str, bytes]) -> None:
    assert parse_upload_checksum(header) == expected


@pytest.mark.parametrize("algorithm", ["md5", "crc32", "sha512", "sha-256", "blake2b"])
def test_parse_upload_checksum_unsupported_algorithm(algorithm: str) -> None:
    with pytest.raises(UnsupportedChecksumAlgorithmError, match="sha1, sha256"):
        parse_upload_checksum(f"{algorithm} {b64(bytes(32))}")


@pytest.mark.parametrize(
    "header",
    [
        "",
        "sha1",
        "sha1 ",
        f" {b64(bytes(20))}",
        f"sha1  {b64(bytes(20))}",
        f"sha1 {b64(bytes(20))} extra",
        "sha1 not-base64!",
        f"sha1 {b64(bytes(32))}",  # sha256-sized digest
        f"sha256 {b64(bytes(20))}",  # sha1-sized digest
        f"sha1:{b64(bytes(20))}",
    ],
)
def test_parse_upload_checksum_malformed(header: str) -> None:
    with pytest.raises(TusHeaderError) as caught:
        parse_upload_checksum(header)
    assert not isinstance(caught.value, UnsupportedChecksumAlgorithmError)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0), ("1", 1), ("007", 7), ("104857600", 104_857_600), (str(2**63 - 1), 2**63 - 1)],
)
def test_parse_non_negative_int(value: str, expected: int) -> None:
    assert parse_non_negative_int(value, name="Upload-Offset") == expected


@pytest.mark.parametrize(
    "value",
    ["", " ", "-1", "+1", " 1", "1 ", "1.0", "1e3", "0x10", "1_000", "\u0661\u0662", "\uff11", "abc", "9" * 100],
)
def test_parse_non_negative_int_is_strict_and_names_the_header(value: str) -> None:
    with pytest.raises(TusHeaderError, match="Upload-Length"):
        parse_non_negative_int(value, name="Upload-Length")


@pytest.mark.parametrize("value", [str(2**63), str(2**64), "9" * 20, "9" * 100, "0" * 40 + str(2**63)])
def test_parse_non_negative_int_refuses_values_beyond_i64_as_too_large(value: str) -> None:
    # Well formed but too large: a size above it is a 413 (tus: beyond Tus-Max-Size), not a malformed header.
    with pytest.raises(TusHeaderTooLargeError, match="Upload-Offset is too large"):
        parse_non_negative_int(value, name="Upload-Offset")


def test_parse_non_negative_int_reads_past_leading_zeros() -> None:
    assert parse_non_negative_int("0" * 40 + "7", name="Upload-Offset") == 7


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC), "Fri, 27 Nov 2026 10:00:00 GMT"),
        (datetime(2026, 11, 27, 10, 0, 0, 999999, tzinfo=UTC), "Fri, 27 Nov 2026 10:00:00 GMT"),
        (datetime(2026, 11, 27, 11, 0, 0, tzinfo=timezone(timedelta(hours=1))), "Fri, 27 Nov 2026 10:00:00 GMT"),
        (datetime(2027, 1, 3, 4, 5, 6, tzinfo=UTC), "Sun, 03 Jan 2027 04:05:06 GMT"),
    ],
)
def test_format_upload_expires_is_imf_fixdate(value: datetime, expected: str) -> None:
    assert format_upload_expires(value) == expected


def test_format_upload_expires_rejects_naive() -> None:
    with pytest.raises(ValueError, match="aware"):
        format_upload_expires(datetime(2026, 11, 27, 10, 0, 0))
