"""Ed25519 public keys are refused at enrolment unless canonical, on the curve and of large order."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from zkeb.lib.devicekeys import InvalidPublicKeyError, validate_ed25519_public_key

# The eight small-order points (and a non-canonical encoding of one), as listed in the Ed25519 literature.
SMALL_ORDER = (
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # pragma: allowlist secret
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # pragma: allowlist secret
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # pragma: allowlist secret
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # pragma: allowlist secret
)


def test_real_public_keys_are_accepted_unchanged() -> None:
    for _ in range(50):
        raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        assert validate_ed25519_public_key(raw) == raw


@pytest.mark.parametrize("encoded", SMALL_ORDER)
def test_small_order_points_are_refused(encoded: str) -> None:
    with pytest.raises(InvalidPublicKeyError, match="small-order"):
        validate_ed25519_public_key(bytes.fromhex(encoded))


def test_non_canonical_and_off_curve_encodings_are_refused() -> None:
    with pytest.raises(InvalidPublicKeyError, match="canonical"):
        validate_ed25519_public_key(b"\xff" * 32)  # y >= p
    with pytest.raises(InvalidPublicKeyError, match="on the curve"):
        validate_ed25519_public_key(bytes([2]) + bytes(31))  # y = 2 has no x


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_keys_of_the_wrong_length_are_refused(length: int) -> None:
    with pytest.raises(InvalidPublicKeyError, match="32 bytes"):
        validate_ed25519_public_key(bytes(length))
