from __future__ import annotations

import calendar
import hashlib
import struct
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from zkeb.lib.envelope import (
    AUTH_SIGNATURE_DOMAIN,
    BACKUP_SIGNATURE_DOMAIN,
    auth_message,
    backup_signed_message,
    datetime_to_epoch_microseconds,
    format_rfc3339_utc,
    parse_rfc3339_utc,
    verify_ed25519,
)

PRIVATE_KEY_SEED = bytes(range(1, 33))
PROJECT_ID = UUID("0192f5a4-1b2c-7d3e-8f40-5a6b7c8d9e0f")
CONTAINER_ID = UUID("11111111-2222-4333-8444-555555555555")
DEVICE_ID_HASH = hashlib.sha256(b"device-1").digest()
BACKUP_TIMESTAMP = datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC)
PAYLOAD = b"hello"
METADATA = b'{"app":"notes"}'
PAYLOAD_NONCE = bytes(range(0x10, 0x1C))
PAYLOAD_TAG = bytes(range(0x20, 0x30))
METADATA_NONCE = bytes(range(0x40, 0x4C))
METADATA_TAG = bytes(range(0x50, 0x60))

# Frozen known answers for the vector above: a change here breaks every client signature.
EXPECTED_PUBLIC_KEY_HEX = "79b5562e8fe654f94078b112e8a98ba7901f853ae695bed7e0e3910bad049664"
EXPECTED_SIGNATURE_HEX = (
    "925b94f0009f5e37e83aa6804f694abbe34b430218108754e34b9f851f7162b4"
    "ec1aecd35e80e326d29d9bab1b96eec5b1727fbc2a30a4e1629f5094a022ba06"
)


def private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(PRIVATE_KEY_SEED)


def public_key_bytes() -> bytes:
    return private_key().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def envelope_fields() -> dict[str, Any]:
    return {
        "project_id": PROJECT_ID,
        "container_id": CONTAINER_ID,
        "device_id_hash": DEVICE_ID_HASH,
        "backup_timestamp": BACKUP_TIMESTAMP,
        "payload_nonce": PAYLOAD_NONCE,
        "payload_auth_tag": PAYLOAD_TAG,
        "payload_sha256": hashlib.sha256(PAYLOAD).digest(),
        "payload_size": len(PAYLOAD),
        "metadata_nonce": METADATA_NONCE,
        "metadata_auth_tag": METADATA_TAG,
        "metadata_sha256": hashlib.sha256(METADATA).digest(),
        "metadata_size": len(METADATA),
    }


def independently_packed_message() -> bytes:
    timestamp_us = calendar.timegm((2026, 11, 27, 10, 0, 0, 0, 0, 0)) * 1_000_000 + 123456
    return struct.pack(
        ">15s16s16s32sq12s16s32sQ12s16s32sQ",
        b"ZKEB-BACKUP-V1\x00",
        PROJECT_ID.bytes,
        CONTAINER_ID.bytes,
        DEVICE_ID_HASH,
        timestamp_us,
        PAYLOAD_NONCE,
        PAYLOAD_TAG,
        hashlib.sha256(b"hello").digest(),
        5,
        METADATA_NONCE,
        METADATA_TAG,
        hashlib.sha256(METADATA).digest(),
        len(METADATA),
    )


def test_domain_constants_match_the_contract() -> None:
    assert BACKUP_SIGNATURE_DOMAIN == b"ZKEB-BACKUP-V1\x00"
    assert AUTH_SIGNATURE_DOMAIN == b"ZKEB-AUTH-V1\x00"


def test_backup_signed_message_matches_independent_packing() -> None:
    message = backup_signed_message(**envelope_fields())
    assert message.hex() == independently_packed_message().hex()
    assert len(message) == 15 + 16 + 16 + 32 + 8 + 12 + 16 + 32 + 8 + 12 + 16 + 32 + 8


def test_backup_signed_message_layout_offsets() -> None:
    message = backup_signed_message(**envelope_fields())
    assert message[:15] == b"ZKEB-BACKUP-V1\x00"
    assert message[15:31] == PROJECT_ID.bytes
    assert message[31:47] == CONTAINER_ID.bytes
    assert message[47:79] == DEVICE_ID_HASH
    assert message[79:87] == bytes.fromhex("0006613f1f884a40") == (1795773600123456).to_bytes(8, "big")
    assert message[87:99] == PAYLOAD_NONCE
    assert message[99:115] == PAYLOAD_TAG
    assert message[115:147].hex() == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert message[147:155] == bytes.fromhex("0000000000000005")
    assert message[155:167] == METADATA_NONCE
    assert message[167:183] == METADATA_TAG
    assert message[183:215] == hashlib.sha256(METADATA).digest()
    assert message[215:] == len(METADATA).to_bytes(8, "big")


def test_known_answer_signature_of_the_vector() -> None:
    assert public_key_bytes().hex() == EXPECTED_PUBLIC_KEY_HEX
    signature = private_key().sign(backup_signed_message(**envelope_fields()))
    assert signature.hex() == EXPECTED_SIGNATURE_HEX


def test_sign_and_verify_round_trip() -> None:
    message = backup_signed_message(**envelope_fields())
    signature = private_key().sign(message)
    assert verify_ed25519(public_key_bytes(), signature, message) is True


def _changed(value: object) -> object:
    if isinstance(value, UUID):
        raw = bytearray(value.bytes)
        raw[-1] ^= 0x01
        return UUID(bytes=bytes(raw))
    if isinstance(value, bytes):
        raw = bytearray(value)
        raw[0] ^= 0x01
        return bytes(raw)
    if isinstance(value, datetime):
        return value + timedelta(microseconds=1)
    assert isinstance(value, int)
    return value + 1


@pytest.mark.parametrize("field", sorted(envelope_fields()))
def test_changing_any_envelope_field_breaks_the_signature(field: str) -> None:
    fields = envelope_fields()
    signature = private_key().sign(backup_signed_message(**fields))
    fields[field] = _changed(fields[field])
    assert verify_ed25519(public_key_bytes(), signature, backup_signed_message(**fields)) is False


def test_flipping_any_single_message_byte_breaks_the_signature() -> None:
    message = backup_signed_message(**envelope_fields())
    signature = private_key().sign(message)
    public_key = public_key_bytes()
    for position in range(len(message)):
        tampered = bytearray(message)
        tampered[position] ^= 0x80
        assert verify_ed25519(public_key, signature, bytes(tampered)) is False, position


def test_signature_for_one_project_does_not_verify_in_another() -> None:
    fields = envelope_fields()
    signature = private_key().sign(backup_signed_message(**fields))
    fields["project_id"] = UUID("0192f5a4-1b2c-7d3e-8f40-5a6b7c8d9e10")
    assert verify_ed25519(public_key_bytes(), signature, backup_signed_message(**fields)) is False


@pytest.mark.parametrize(
    ("field", "bad_value"),
    [
        ("device_id_hash", bytes(31)),
        ("device_id_hash", bytes(33)),
        ("payload_nonce", bytes(11)),
        ("payload_auth_tag", bytes(15)),
        ("payload_sha256", bytes(20)),
        ("metadata_nonce", bytes(13)),
        ("metadata_auth_tag", bytes(17)),
        ("metadata_sha256", b""),
    ],
)
def test_backup_signed_message_rejects_wrong_lengths_naming_the_field(field: str, bad_value: bytes) -> None:
    fields = envelope_fields()
    fields[field] = bad_value
    with pytest.raises(ValueError, match=field):
        backup_signed_message(**fields)


@pytest.mark.parametrize(("field", "bad_value"), [("payload_size", -1), ("metadata_size", 2**64)])
def test_backup_signed_message_rejects_sizes_outside_u64(field: str, bad_value: int) -> None:
    fields = envelope_fields()
    fields[field] = bad_value
    with pytest.raises(ValueError, match=field):
        backup_signed_message(**fields)


def test_backup_signed_message_rejects_naive_timestamp() -> None:
    fields = envelope_fields()
    fields["backup_timestamp"] = datetime(2026, 11, 27, 10, 0, 0)
    with pytest.raises(ValueError, match="backup_timestamp"):
        backup_signed_message(**fields)


def test_timestamp_offset_does_not_change_the_message() -> None:
    fields = envelope_fields()
    fields["backup_timestamp"] = BACKUP_TIMESTAMP.astimezone(timezone(timedelta(hours=-5, minutes=-30)))
    assert backup_signed_message(**fields) == independently_packed_message()


def test_pre_epoch_timestamp_is_signed_as_negative_i64() -> None:
    fields = envelope_fields()
    fields["backup_timestamp"] = datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    message = backup_signed_message(**fields)
    assert message[79:87] == struct.pack(">q", -1) == b"\xff" * 8


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(1970, 1, 1, tzinfo=UTC), 0),
        (datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC), 1),
        (datetime(2262, 4, 11, 23, 47, 16, 854775, tzinfo=UTC), 9_223_372_036_854_775),
        # Far dates where float seconds would lose microsecond precision.
        (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), 253_402_300_799_999_999),
        (datetime(1, 1, 1, tzinfo=UTC), -62_135_596_800_000_000),
    ],
)
def test_epoch_microseconds_are_exact(value: datetime, expected: int) -> None:
    assert datetime_to_epoch_microseconds(value) == expected


def test_auth_message_layout() -> None:
    message = auth_message(project_id=PROJECT_ID, device_id_hash=DEVICE_ID_HASH, timestamp_ms=1_795_773_600_123)
    expected = struct.pack(">13s16s32sQ", b"ZKEB-AUTH-V1\x00", PROJECT_ID.bytes, DEVICE_ID_HASH, 1_795_773_600_123)
    assert message.hex() == expected.hex()
    assert len(message) == 13 + 16 + 32 + 8
    assert message[-8:].hex() == "000001a21c72917b"


def test_auth_message_sign_verify_round_trip() -> None:
    message = auth_message(project_id=PROJECT_ID, device_id_hash=DEVICE_ID_HASH, timestamp_ms=1_700_000_000_000)
    signature = private_key().sign(message)
    assert verify_ed25519(public_key_bytes(), signature, message) is True
    later = auth_message(project_id=PROJECT_ID, device_id_hash=DEVICE_ID_HASH, timestamp_ms=1_700_000_000_001)
    assert verify_ed25519(public_key_bytes(), signature, later) is False


def test_auth_signature_is_not_a_backup_signature() -> None:
    auth = auth_message(project_id=PROJECT_ID, device_id_hash=DEVICE_ID_HASH, timestamp_ms=0)
    signature = private_key().sign(auth)
    assert verify_ed25519(public_key_bytes(), signature, backup_signed_message(**envelope_fields())) is False


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"device_id_hash": bytes(16), "timestamp_ms": 0}, "device_id_hash"),
        ({"device_id_hash": bytes(32), "timestamp_ms": -1}, "timestamp_ms"),
        ({"device_id_hash": bytes(32), "timestamp_ms": 2**64}, "timestamp_ms"),
    ],
)
def test_auth_message_rejects_bad_fields(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        auth_message(project_id=PROJECT_ID, **kwargs)


# RFC 8032 §7.1, TEST 1 and TEST 2.
RFC8032_VECTORS = [
    (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
]


@pytest.mark.parametrize(("public_key_hex", "message_hex", "signature_hex"), RFC8032_VECTORS)
def test_verify_ed25519_accepts_rfc8032_vectors(public_key_hex: str, message_hex: str, signature_hex: str) -> None:
    public_key, message, signature = map(bytes.fromhex, (public_key_hex, message_hex, signature_hex))
    assert verify_ed25519(public_key, signature, message) is True
    assert verify_ed25519(public_key, signature, message + b"\x00") is False


@pytest.mark.parametrize(
    ("public_key", "signature"),
    [
        (bytes(31), bytes(64)),
        (bytes(33), bytes(64)),
        (b"", b""),
        (bytes(32), bytes(63)),
        (bytes(32), bytes(65)),
        (bytes(32), bytes(64)),
        (b"\xff" * 32, b"\xff" * 64),
        # A y-coordinate with no point on the curve (y = 2).
        ((2).to_bytes(32, "little"), bytes(64)),
    ],
)
def test_verify_ed25519_returns_false_for_bad_input_without_raising(public_key: bytes, signature: bytes) -> None:
    assert verify_ed25519(public_key, signature, b"message") is False


def test_verify_ed25519_rejects_signature_from_another_key() -> None:
    message = b"message"
    other = Ed25519PrivateKey.from_private_bytes(bytes(32)).sign(message)
    assert verify_ed25519(public_key_bytes(), other, message) is False


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-27T10:00:00Z", datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)),
        ("2026-11-27T10:00:00+00:00", datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)),
        ("2026-11-27T10:00:00-00:00", datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)),
        ("2026-11-27t10:00:00z", datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)),
        ("2026-11-27T10:00:00.1Z", datetime(2026, 11, 27, 10, 0, 0, 100000, tzinfo=UTC)),
        ("2026-11-27T10:00:00.123Z", datetime(2026, 11, 27, 10, 0, 0, 123000, tzinfo=UTC)),
        ("2026-11-27T10:00:00.123456Z", datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC)),
        ("2026-11-27T10:00:00.000001+00:00", datetime(2026, 11, 27, 10, 0, 0, 1, tzinfo=UTC)),
        ("2026-11-27T12:30:00+02:30", datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)),
        ("2026-11-27T05:00:00-05:00", datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)),
        ("2026-11-28T01:00:00+15:00", datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC)),
    ],
)
def test_parse_rfc3339_utc_accepts_valid_forms(text: str, expected: datetime) -> None:
    parsed = parse_rfc3339_utc(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2026-11-27T10:00:00",
        "2026-11-27 10:00",
        "2026-11-27",
        "2026-11-27T10:00:00.1234567Z",
        "2026-11-27T10:00:00.Z",
        "2026-11-27T10:00Z",
        "20261127T100000Z",
        "2026-13-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2026-11-27T24:00:00Z",
        "2026-11-27T10:00:60Z",
        "2026-11-27T10:00:00+24:00",
        "2026-11-27T10:00:00+0000",
        "0001-01-01T00:00:00+01:00",
        "not a timestamp",
        "2026-11-27T10:00:00Z trailing",
        "\u0662026-11-27T10:00:00Z",
    ],
)
def test_parse_rfc3339_utc_rejects_invalid_or_naive(text: str) -> None:
    with pytest.raises(ValueError, match="timestamp"):
        parse_rfc3339_utc(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(2026, 11, 27, 10, 0, 0, tzinfo=UTC), "2026-11-27T10:00:00.000000Z"),
        (datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC), "2026-11-27T10:00:00.123456Z"),
        (datetime(2026, 11, 27, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=2))), "2026-11-27T10:00:00.000005Z"),
        (datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC), "0999-01-02T03:04:05.000000Z"),
    ],
)
def test_format_rfc3339_utc(value: datetime, expected: str) -> None:
    assert format_rfc3339_utc(value) == expected


def test_format_rfc3339_utc_rejects_naive() -> None:
    with pytest.raises(ValueError, match="aware"):
        format_rfc3339_utc(datetime(2026, 11, 27))


@pytest.mark.parametrize(
    "value",
    [BACKUP_TIMESTAMP, datetime(1970, 1, 1, tzinfo=UTC), datetime(2000, 2, 29, 23, 59, 59, 999999, tzinfo=UTC)],
)
def test_rfc3339_round_trip(value: datetime) -> None:
    assert parse_rfc3339_utc(format_rfc3339_utc(value)) == value
