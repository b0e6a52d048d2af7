"""Human-readable byte sizes for configuration (``MAX_UPLOAD_SIZE=100MB``) and messages."""

from __future__ import annotations

import re
from decimal import Decimal

_SIZE_PATTERN = re.compile(r"([0-9]+(?:\.[0-9]+)?)[ \t]*([A-Za-z]*)")
_MAX_SIZE_TEXT_LENGTH = 64

_UNIT_FACTORS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(value: str) -> int:
    """Parse a byte size such as ``100MB``, ``64 KiB``, ``1.5MB`` or ``512``.

    Units are case-insensitive: ``B``, ``K``/``KB``, ``M``/``MB``, ``G``/``GB``, ``T``/``TB`` are powers of 1000;
    ``KiB``, ``MiB``, ``GiB``, ``TiB`` are powers of 1024. A fractional result is rounded down to whole bytes.

    Args:
        value: The size text.

    Returns:
        The size in bytes.

    Raises:
        ValueError: If the text is not a size, is negative, has an unknown unit, or is zero written as anything
            other than ``0``.
    """
    text = value.strip()
    if len(text) > _MAX_SIZE_TEXT_LENGTH:
        raise ValueError("size is too long to be a byte count")
    if text == "0":
        return 0
    match = _SIZE_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected a non-negative number with an optional unit, e.g. '100MB'")
    number, unit = match.groups()
    factor = _UNIT_FACTORS.get(unit.lower())
    if factor is None:
        raise ValueError(f"invalid size {text!r}: unknown unit {unit!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")
    size = int(Decimal(number) * factor)
    if size == 0:
        raise ValueError(f"invalid size {text!r}: it amounts to zero bytes (write '0' if zero is meant)")
    return size


def format_size(n: int) -> str:
    """Format a byte count for humans with binary units, e.g. ``"100.0 MiB"`` or ``"512 B"``.

    Args:
        n: A non-negative number of bytes.

    Returns:
        The formatted size.

    Raises:
        ValueError: If ``n`` is negative.
    """
    if n < 0:
        raise ValueError("size must not be negative")
    if n < 1024:
        return f"{n} B"
    amount = n / 1024
    for unit in _BINARY_UNITS[:-1]:
        # Round first so 1023.96 KiB prints as "1.0 MiB" rather than "1024.0 KiB".
        if round(amount, 1) < 1024:
            return f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} {_BINARY_UNITS[-1]}"
