"""Device public keys: strict validation of a 32-byte Ed25519 public key before a device is enrolled.

`cryptography` loads any 32 bytes as an Ed25519 public key and only fails at verification time, so enrolment
decodes the point itself (RFC 8032 §5.1.3) and refuses encodings that are not canonical, not on the curve, or
of small order: with a small-order key, signatures can verify for messages its "holder" never signed.
"""

from __future__ import annotations

__all__ = ("ED25519_PUBLIC_KEY_LENGTH", "InvalidPublicKeyError", "validate_ed25519_public_key")

ED25519_PUBLIC_KEY_LENGTH = 32

_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_IDENTITY = (0, 1)


class InvalidPublicKeyError(ValueError):
    """The bytes are not a usable Ed25519 public key; the message says why (no key material)."""


def _inverse(value: int) -> int:
    return pow(value, _P - 2, _P)


def _decode_point(encoded: bytes) -> tuple[int, int]:
    number = int.from_bytes(encoded, "little")
    sign = number >> 255
    y = number & ((1 << 255) - 1)
    if y >= _P:
        raise InvalidPublicKeyError("not a canonical point encoding")
    y2 = y * y % _P
    u = (y2 - 1) % _P
    v = (_D * y2 + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    vx2 = v * x * x % _P
    if vx2 == (-u) % _P:
        x = x * _SQRT_M1 % _P
    elif vx2 != u:
        raise InvalidPublicKeyError("not a point on the curve")
    if x == 0 and sign:
        raise InvalidPublicKeyError("not a canonical point encoding")
    if x & 1 != sign:
        x = _P - x
    return x, y


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    # Complete affine addition on the twisted Edwards curve -x^2 + y^2 = 1 + d x^2 y^2.
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    x3 = (x1 * y2 + x2 * y1) * _inverse(1 + t) % _P
    y3 = (y1 * y2 + x1 * x2) * _inverse(1 - t) % _P
    return x3, y3


def validate_ed25519_public_key(encoded: bytes) -> bytes:
    """Return `encoded` if it is a canonical Ed25519 public key of large order.

    Raises:
        InvalidPublicKeyError: wrong length, non-canonical encoding, not on the curve, or small order.
    """
    if len(encoded) != ED25519_PUBLIC_KEY_LENGTH:
        raise InvalidPublicKeyError(f"must be {ED25519_PUBLIC_KEY_LENGTH} bytes, got {len(encoded)}")
    point = _decode_point(bytes(encoded))
    multiple = point
    for _ in range(3):  # [8]P: the cofactor clears every small-order component
        multiple = _add(multiple, multiple)
    if multiple == _IDENTITY:
        raise InvalidPublicKeyError("a small-order point")
    return bytes(encoded)
