"""The byte strings that devices sign: the backup envelope and the device-token proof of possession.

Both layouts are fixed by the protocol (docs/protocol.md §4 and §5.2, with test vectors); any change breaks every
client signature, so they carry a version in their domain-separation prefix.
"""

from __future__ import annotations

import re
import struct
from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

BACKUP_SIGNATURE_DOMAIN = b"ZKEB-BACKUP-V1\x00"
AUTH_SIGNATURE_DOMAIN = b"ZKEB-AUTH-V1\x00"

UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

DEVICE_ID_HASH_LENGTH = 32
NONCE_LENGTH = 12
AUTH_TAG_LENGTH = 16
SHA256_LENGTH = 32
ED25519_PUBLIC_KEY_LENGTH = 32
ED25519_SIGNATURE_LENGTH = 64

_U64_MAX = 2**64 - 1

_RFC3339_PATTERN = re.compile(
    r"(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})[Tt ]"
    r"(?P<time>[0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.(?P<fraction>[0-9]{1,6}))?"
    r"(?P<offset>[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
#: The same with seven or more fractional digits: well-formed, but finer than the microseconds ZKEB signs.
_TOO_PRECISE = re.compile(_RFC3339_PATTERN.pattern.replace("{1,6}", "{7,}"))


def _require_length(field: str, value: bytes, expected: int) -> None:
    if len(value) != expected:
        raise ValueError(f"{field} must be {expected} bytes, got {len(value)}")


def _require_u64(field: str, value: int) -> None:
    if not 0 <= value <= _U64_MAX:
        raise ValueError(f"{field} must be between 0 and 2**64-1")


def datetime_to_epoch_microseconds(value: datetime) -> int:
    """Convert an aware datetime to integer microseconds since the Unix epoch, exactly (no float rounding).

    Args:
        value: A timezone-aware datetime.

    Returns:
        Signed microseconds since 1970-01-01T00:00:00Z.

    Raises:
        ValueError: If ``value`` is naive.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamp must be timezone-aware")
    return (value - UNIX_EPOCH) // timedelta(microseconds=1)


def backup_signed_message(
    *,
    project_id: UUID,
    container_id: UUID,
    device_id_hash: bytes,
    backup_timestamp: datetime,
    payload_nonce: bytes,
    payload_auth_tag: bytes,
    payload_sha256: bytes,
    payload_size: int,
    metadata_nonce: bytes,
    metadata_auth_tag: bytes,
    metadata_sha256: bytes,
    metadata_size: int,
) -> bytes:
    """Build the message a device signs with Ed25519 for one backup.

    Layout (big-endian): ``"ZKEB-BACKUP-V1\\0" || project_id(16) || container_id(16) || device_id_hash(32) ||
    i64(backup_timestamp µs) || payload_nonce(12) || payload_auth_tag(16) || payload_sha256(32) || u64(payload_size)
    || metadata_nonce(12) || metadata_auth_tag(16) || metadata_sha256(32) || u64(metadata_size)``.

    Returns:
        The 223-byte message.

    Raises:
        ValueError: If a field has the wrong length or range, or the timestamp is naive; the message names the field.
    """
    _require_length("device_id_hash", device_id_hash, DEVICE_ID_HASH_LENGTH)
    _require_length("payload_nonce", payload_nonce, NONCE_LENGTH)
    _require_length("payload_auth_tag", payload_auth_tag, AUTH_TAG_LENGTH)
    _require_length("payload_sha256", payload_sha256, SHA256_LENGTH)
    _require_u64("payload_size", payload_size)
    _require_length("metadata_nonce", metadata_nonce, NONCE_LENGTH)
    _require_length("metadata_auth_tag", metadata_auth_tag, AUTH_TAG_LENGTH)
    _require_length("metadata_sha256", metadata_sha256, SHA256_LENGTH)
    _require_u64("metadata_size", metadata_size)
    try:
        timestamp_us = datetime_to_epoch_microseconds(backup_timestamp)
    except ValueError:
        raise ValueError("backup_timestamp must be timezone-aware") from None
    return b"".join(
        (
            BACKUP_SIGNATURE_DOMAIN,
            project_id.bytes,
            container_id.bytes,
            bytes(device_id_hash),
            struct.pack(">q", timestamp_us),
            bytes(payload_nonce),
            bytes(payload_auth_tag),
            bytes(payload_sha256),
            struct.pack(">Q", payload_size),
            bytes(metadata_nonce),
            bytes(metadata_auth_tag),
            bytes(metadata_sha256),
            struct.pack(">Q", metadata_size),
        )
    )


def auth_message(*, project_id: UUID, device_id_hash: bytes, timestamp_ms: int) -> bytes:
    """Build the proof-of-possession message a device signs to obtain a device token.

    Layout: ``"ZKEB-AUTH-V1\\0" || project_id(16) || device_id_hash(32) || u64be(timestamp_ms)``.

    Raises:
        ValueError: If ``device_id_hash`` is not 32 bytes or ``timestamp_ms`` does not fit an unsigned 64-bit integer.
    """
    _require_length("device_id_hash", device_id_hash, DEVICE_ID_HASH_LENGTH)
    _require_u64("timestamp_ms", timestamp_ms)
    return AUTH_SIGNATURE_DOMAIN + project_id.bytes + bytes(device_id_hash) + struct.pack(">Q", timestamp_ms)


def verify_ed25519(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Check an Ed25519 signature.

    Never raises for bad input: a key or signature of the wrong length or an invalid key simply does not verify.

    Returns:
        True only if ``signature`` is a valid signature of ``message`` under ``public_key``.
    """
    if len(public_key) != ED25519_PUBLIC_KEY_LENGTH or len(signature) != ED25519_SIGNATURE_LENGTH:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(bytes(signature), bytes(message))
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def parse_rfc3339_utc(value: str) -> datetime:
    """Parse an RFC 3339 timestamp with an explicit offset into an aware UTC datetime.

    Accepts ``2026-11-27T10:00:00Z``, ``2026-11-27T10:00:00.123456+00:00`` and other explicit offsets (converted to
    UTC). More than six fractional digits are refused rather than truncated, because the signed message carries
    exactly microseconds and a silent truncation would make client and server disagree.

    Raises:
        ValueError: If the text is not an RFC 3339 timestamp with an offset.
    """
    match = _RFC3339_PATTERN.fullmatch(value.strip())
    if match is None:
        if _TOO_PRECISE.fullmatch(value.strip()):
            raise ValueError("timestamp has more than 6 fractional digits (the signed message carries microseconds)")
        raise ValueError("timestamp must be RFC 3339 with an offset, e.g. '2026-11-27T10:00:00Z'")
    fraction = (match["fraction"] or "").ljust(6, "0")
    offset = match["offset"]
    if offset in {"Z", "z"}:
        tz = UTC
    else:
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError("timestamp has an invalid UTC offset")
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        parsed = datetime.fromisoformat(f"{match['date']}T{match['time']}.{fraction}").replace(tzinfo=tz)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError("timestamp is not a valid date and time") from None


def format_rfc3339_utc(dt: datetime) -> str:
    """Format an aware datetime as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC.

    Raises:
        ValueError: If ``dt`` is naive.
    """
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware")
    utc = dt.astimezone(UTC)
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T"
        f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{utc.microsecond:06d}Z"
    )
