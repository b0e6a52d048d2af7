"""Header parsing for the tus 1.0.0 resumable upload protocol (https://tus.io/protocols/resumable-upload)."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from email.utils import format_datetime

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = ("creation", "creation-with-upload", "termination", "checksum", "expiration")
TUS_CHECKSUM_ALGORITHMS = ("sha1", "sha256")

MAX_HEADER_INT = 2**63 - 1
# 2**63 - 1 has 19 digits: a longer value (leading zeros aside) is too large without int() on hostile input.
_MAX_INT_DIGITS = 19

_DIGEST_LENGTHS = {"sha1": 20, "sha256": 32}
_DIGITS_PATTERN = re.compile(r"[0-9]+")
_BASE64_PATTERN = re.compile(r"[A-Za-z0-9+/]*={0,2}")
# Printable ASCII except space and comma: the tus key rules plus no control characters that could reach logs.
_METADATA_KEY_PATTERN = re.compile(r"[\x21-\x2b\x2d-\x7e]+")


class TusHeaderError(ValueError):
    """A tus request header is malformed (answer 400)."""


class TusHeaderTooLargeError(TusHeaderError):
    """A tus integer header is well formed but above ``2**63 - 1`` (400, or 413 where it is a size)."""


class UnsupportedChecksumAlgorithmError(TusHeaderError):
    """``Upload-Checksum`` names an algorithm the server does not offer (answer 400)."""


def _decode_base64(value: str) -> bytes | None:
    """Strict standard base64; padding may be omitted. Returns None when invalid."""
    if not _BASE64_PATTERN.fullmatch(value):
        return None
    unpadded = value.rstrip("=")
    try:
        return base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def parse_upload_metadata(header: str) -> dict[str, bytes | None]:
    """Parse ``Upload-Metadata``: comma-separated ``key base64value`` pairs whose value may be omitted.

    Args:
        header: The header value; an empty value means no metadata.

    Returns:
        Each key mapped to its decoded value, or None when the pair has no value.

    Raises:
        TusHeaderError: On an empty or invalid key, a duplicate key, extra fields, or a value that is not base64.
    """
    metadata: dict[str, bytes | None] = {}
    if not header.strip():
        return metadata
    for pair in header.split(","):
        key, _, encoded = pair.strip().partition(" ")
        if not _METADATA_KEY_PATTERN.fullmatch(key):
            raise TusHeaderError("Upload-Metadata has an empty or invalid key")
        if key in metadata:
            raise TusHeaderError(f"Upload-Metadata repeats the key {key!r}")
        if " " in encoded:
            raise TusHeaderError(f"Upload-Metadata value for {key!r} must be a single base64 word")
        if not encoded:
            metadata[key] = None
            continue
        value = _decode_base64(encoded)
        if value is None:
            raise TusHeaderError(f"Upload-Metadata value for {key!r} is not valid base64")
        metadata[key] = value
    return metadata


def parse_upload_checksum(header: str) -> tuple[str, bytes]:
    """Parse ``Upload-Checksum: <algorithm> <base64 digest>``.

    Returns:
        The lowercase algorithm name and the raw digest.

    Raises:
        UnsupportedChecksumAlgorithmError: If the algorithm is not one of ``TUS_CHECKSUM_ALGORITHMS``.
        TusHeaderError: If the header is malformed or the digest has the wrong length for its algorithm.
    """
    parts = header.strip().split(" ")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise TusHeaderError("Upload-Checksum must be '<algorithm> <base64 digest>'")
    algorithm = parts[0].lower()
    if algorithm not in TUS_CHECKSUM_ALGORITHMS:
        raise UnsupportedChecksumAlgorithmError(
            f"Upload-Checksum algorithm is not supported; use one of {', '.join(TUS_CHECKSUM_ALGORITHMS)}"
        )
    digest = _decode_base64(parts[1])
    if digest is None:
        raise TusHeaderError("Upload-Checksum digest is not valid base64")
    if len(digest) != _DIGEST_LENGTHS[algorithm]:
        raise TusHeaderError(f"Upload-Checksum digest has the wrong length for {algorithm}")
    return algorithm, digest


def parse_non_negative_int(header_value: str, *, name: str) -> int:
    """Parse a header such as ``Upload-Offset`` or ``Upload-Length``: ASCII digits only, at most ``2**63 - 1``.

    Raises:
        TusHeaderTooLargeError: Naming the header, if the value is digits only but above ``2**63 - 1``.
        TusHeaderError: Naming the header, if the value has a sign, whitespace or other characters.
    """
    if not _DIGITS_PATTERN.fullmatch(header_value):
        raise TusHeaderError(f"{name} must be a non-negative integer")
    significant = header_value.lstrip("0") or "0"
    if len(significant) > _MAX_INT_DIGITS or (value := int(significant)) > MAX_HEADER_INT:
        raise TusHeaderTooLargeError(f"{name} is too large")
    return value


def format_upload_expires(dt: datetime) -> str:
    """Format ``Upload-Expires`` as an RFC 9110 IMF-fixdate, e.g. ``"Fri, 27 Nov 2026 10:00:00 GMT"``.

    Raises:
        ValueError: If ``dt`` is naive.
    """
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware")
    return format_datetime(dt.astimezone(UTC), usegmt=True)
